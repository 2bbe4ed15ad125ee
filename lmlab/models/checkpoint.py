"""The run folder and its checkpoints: the one place that knows their layout (as nanochat's checkpoint_manager).

Every training command (lmlab train, finetune, sft, dpo) writes a run folder through this module, and
lmlab.models.hub and `lmlab sample` read it back:

    config.yaml, tokenizer.json, meta.json   the run's config and tokenizer (pretraining; finetune: tokenizer)
    sft.json               a tuned run (lmlab sft / dpo): the base model, the method and its settings
    elmo.json, vocab.txt   a biLM run (lmlab elmo): its config and words (lmlab.models.elmo)
    ckpt/step_0000500/     weights + train_state.pt (optimizer, RNG, data position, best evaluation so far)
    ckpt/latest            name of the newest complete checkpoint
    best/                  the weights of the best evaluation (+ eval.json)

Weights in a checkpoint folder are the whole Transformer (model.safetensors + config.json) or a PEFT method's own
weights (peft.safetensors, lmlab.models.peft's format). A folder is written to a temporary sibling and renamed
into place, and `ckpt/latest` is replaced atomically, so a run killed at any moment keeps its last complete
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch.nn as nn

from lmlab.data.corpus import load_tokenizer
from lmlab.errors import LmlabError
from lmlab.models.peft import FULL, load_peft, merge_peft, save_peft
from lmlab.models.t5 import EncoderDecoder
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.util import (atomic_write_json, atomic_write_text, fsync_folder, load_safetensors, load_torch_safe,
                        save_safetensors_atomic, save_torch_atomic, write_error)

CKPT, LATEST, BEST = "ckpt", "latest", "best"
MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"
PEFT_FILE = "peft.safetensors"  # a tuned run's PEFT weights
TUNED_FILE = "sft.json"  # in a run folder of lmlab sft or dpo: the base model, the method and its settings
ELMO_FILE = "elmo.json"  # in a run folder of lmlab elmo: the biLM's config (lmlab.models.elmo), next to vocab.txt


# ----------------------------------------------------------------------------------------------------------------
# Where things are

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete step checkpoint of a run, or None."""
    ckpt = checkpoint_dir(run_dir)
    pointer = ckpt / LATEST
    if not pointer.exists():
        return None
    path = ckpt / pointer.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def step_name(step: int) -> str:
    """The folder name of step N's checkpoint (zero-padded, so that names sort by step)."""
    return f"step_{step:07d}"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete step checkpoints of a run, newest first: the one ckpt/latest names, then the older ones (to
    fall back on when the newest is damaged)."""
    newest = latest(run_dir)
    older = sorted((p for p in checkpoint_dir(run_dir).glob("step_*") if (p / STATE_FILE).exists()), reverse=True)
    return ([newest] if newest is not None else []) + [p for p in older if p != newest]


def best(run_dir: str | Path) -> Path | None:
    """The folder of the best evaluation, or None."""
    path = Path(run_dir) / BEST
    return path if path.is_dir() else None


def best_eval(run_dir: str | Path) -> dict:
    """best/eval.json (the step and figures of the best evaluation); {} when there is none."""
    folder = best(run_dir)
    return json.loads((folder / "eval.json").read_text()) if folder is not None else {}


def holds_run(run_dir: str | Path) -> bool:
    return latest(run_dir) is not None


def tokenizer_path(path: str | Path) -> Path:
    """The tokenizer.json of a run folder, or of the run a checkpoint folder (run/ckpt/step_N) belongs to."""
    path = Path(path)
    return next((p / "tokenizer.json" for p in (path, path.parent.parent) if (p / "tokenizer.json").exists()),
                path / "tokenizer.json")


# ----------------------------------------------------------------------------------------------------------------
# Writing

def save(folder: Path, write_weights: Callable[[Path], None], train_state: dict | None = None) -> Path:
    """Write a checkpoint folder (its weights by `write_weights(tmp_folder)`, and the train state) through a
    temporary sibling and a rename, so it is complete or absent."""
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_weights(tmp)
        if train_state is not None:
            save_torch_atomic(train_state, tmp / STATE_FILE)
    except OSError as e:  # a full disk: the previous checkpoints stay, the half-written folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(tmp, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in: the old copy (e.g. the previous best/) moves aside first, so a crash leaves one of the two.
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_folder(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_step(run_dir: Path, write_weights: Callable[[Path], None], train_state: dict, keep: int) -> Path:
    """ckpt/step_N with the train state, ckpt/latest pointing at it, and only the `keep` newest kept."""
    ckpt = checkpoint_dir(run_dir)
    name = step_name(train_state["step"])
    final = save(ckpt / name, write_weights, train_state)
    atomic_write_text(ckpt / LATEST, name + "\n")
    for old in sorted(ckpt.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, write_weights: Callable[[Path], None], evaluation: dict) -> Path:
    folder = save(Path(run_dir) / BEST, write_weights)
    atomic_write_json(folder / "eval.json", evaluation)
    return folder


def load_train_state(folder: Path) -> dict:
    return load_torch_safe(folder / STATE_FILE)


# ----------------------------------------------------------------------------------------------------------------
# Weights in a checkpoint folder

def save_full(model: Transformer, folder: Path) -> None:
    """The whole Transformer in safetensors + its config."""
    save_safetensors_atomic(model.weights(), folder / MODEL_FILE)
    atomic_write_json(folder / CONFIG_FILE, model.config.to_dict())


def load_full(model: Transformer, folder: Path, check_config: bool = True) -> None:
    if check_config:
        saved = json.loads((folder / CONFIG_FILE).read_text())
        if saved != model.config.to_dict():
            raise LmlabError(f"cannot resume from {folder}: the model config differs from the checkpoint's")
    model.load_weights(load_safetensors(folder / MODEL_FILE))


def save_weights(model, folder: Path, method: str, settings: dict, peft_file: str = PEFT_FILE) -> None:
    """The whole model (method "full") or the PEFT method's own weights with its settings."""
    if method == FULL:
        save_full(model, folder)
    else:
        save_peft(model, folder / peft_file, method, settings)


def load_weights(model, folder: Path, method: str, peft_file: str = PEFT_FILE) -> None:
    """Back into a model that has the method already (a run being resumed, or its best weights)."""
    if method == FULL:
        load_full(model, folder)
    else:
        load_peft(model, folder / peft_file, apply=False)


def save_module(model: nn.Module, folder: Path, skip: str | None = None) -> None:
    """A module's state dict, less the tensors whose name ends with `skip` (a tied head)."""
    state = {k: v for k, v in model.state_dict().items() if skip is None or not k.endswith(skip)}
    save_safetensors_atomic(state, folder / MODEL_FILE)


def load_module(model: nn.Module, folder: Path, skip: str | None = None) -> None:
    missing, unexpected = model.load_state_dict(load_safetensors(folder / MODEL_FILE), strict=False)
    missing = [k for k in missing if skip is None or not k.endswith(skip)]
    if unexpected or missing:
        raise LmlabError(f"{folder} does not fit this model ({(unexpected or missing)[0]}); resume with the "
                         "settings the run was started with")


# ----------------------------------------------------------------------------------------------------------------
# Loading a run

def load_model(path: str | Path, device="cpu") -> Transformer | EncoderDecoder:
    """A pretrained Transformer (an EncoderDecoder for T5) from a checkpoint folder, or from a run folder (its
    latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"no such run or checkpoint folder: {path}")
    if not (path / MODEL_FILE).exists():
        ckpt = latest(path)
        if ckpt is None:
            raise LmlabError(f"{path} has no checkpoint yet (no ckpt/latest); train first with `lmlab train`")
        path = ckpt
    config = TransformerConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    family = EncoderDecoder if config.encoder_decoder else Transformer
    model = family.from_weights(config, load_safetensors(path / MODEL_FILE))
    return model.to(device).eval()


def load_run(path: str | Path, device="cpu"):
    """(model, tokenizer) of a pretraining run or one of its checkpoint folders."""
    return load_model(path, device), load_tokenizer(tokenizer_path(path))


def is_tuned(path: str | Path) -> bool:
    return (Path(path) / TUNED_FILE).is_file()


def write_tuned_info(run_dir: Path, info: dict) -> None:
    atomic_write_json(Path(run_dir) / TUNED_FILE, info)


def save_tuned_run(run_dir: str | Path, model, base: str, method: str, settings: dict) -> Path:
    """A tuned run folder as lmlab sft leaves it (sft.json and best/), of a model given its method in code (tests
    and benches make LoRA runs this way without training)."""
    run_dir = Path(run_dir)
    (run_dir / BEST).mkdir(parents=True, exist_ok=True)
    write_tuned_info(run_dir, {"command": "sft", "base": str(base), "method": method, "settings": settings})
    save_weights(model, run_dir / BEST, method, settings)
    return run_dir


def tuned_info(path: str | Path) -> dict:
    """sft.json of a tuned run: {"base": model spec, "method", "settings", ...}."""
    return json.loads((Path(path) / TUNED_FILE).read_text(encoding="utf-8"))


def tuned_weights_folder(path: str | Path, info: dict) -> Path:
    """The folder a tuned run is served from: best/, else the newest checkpoint."""
    folder = best(path) or latest(path)
    if folder is None:
        raise LmlabError(f"{path} has no checkpoint yet; train it first (lmlab {info.get('command', 'sft')})")
    return folder


def load_tuned_weights(model, path: str | Path, merge: bool = True) -> dict:
    """Put a tuned run's weights on its base model (loaded by the caller from tuned_info()["base"]): the method
    re-applied and its weights taken from best/ (else the newest checkpoint). A LoRA is merged into the weights
    (merge=True); bottleneck adapters stay modules on top of the base. Returns the run's info."""
    path = Path(path)
    info = tuned_info(path)
    folder = tuned_weights_folder(path, info)
    if info["method"] == FULL:
        load_full(model, folder, check_config=False)
    else:
        load_peft(model, folder / PEFT_FILE)
        if merge and info["method"] == "lora":
            merge_peft(model, "lora")
    return info
