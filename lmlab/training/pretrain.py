"""Pretraining (`lmlab train`): next-token prediction, or BERT's masked-LM objective for an encoder, on a prepared
token stream, from a run config (lmlab.training.config)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from lmlab.data.corpus import load_tokenizer, load_tokens, prepare
from lmlab.data.tokenizers import sentinel_ids
from lmlab.errors import LmlabError
from lmlab.models.t5 import EncoderDecoder
from lmlab.models.transformer import Transformer
from lmlab.training.config import RunConfig, TrainConfig
from lmlab.training.distributed import Dist
from lmlab.training.loop import Objective
from lmlab.training.run import TrainingRun
from lmlab.training.span_corruption import SpanCorruption
from lmlab.util import device_memory


class LanguageModeling(Objective):
    """Pretraining on a token stream. A causal model learns next-token prediction on random windows of
    block_size + 1 tokens. An encoder (`causal: false`) learns BERT's masked-LM objective: 15 % of the positions
    are chosen, 80 % of those become [MASK], 10 % a random token, 10 % stay, and the loss is the cross-entropy of
    the original tokens at the chosen positions. [MASK] is the id after the tokenizer's vocabulary (so the model
    has one more embedding than the tokenizer has tokens)."""

    MASK_RATE, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1

    def __init__(self, model: Transformer, train_tokens: np.ndarray, val_tokens: np.ndarray, t: TrainConfig,
                 world: Dist):
        self.model, self.world, self.t = model, world, t
        self.block_size = model.config.block_size
        self.masked = not model.config.causal
        self.window = self.block_size if self.masked else self.block_size + 1
        for name, tokens in (("train", train_tokens), ("val", val_tokens)):
            if len(tokens) <= self.window:
                raise LmlabError(f"the {name} split has {len(tokens)} tokens, fewer than a window of {self.window}; "
                                 "use more data or a smaller model.block_size")
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.tokens_per_row = self.block_size
        self.generator = torch.Generator().manual_seed(t.seed)
        self.mask_id = model.config.vocab_size - 1  # only meaningful when masked

    def _windows(self, tokens: np.ndarray, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        starts = torch.randint(len(tokens) - self.window, (n,), generator=generator).tolist()
        windows = torch.from_numpy(np.stack([tokens[s:s + self.window] for s in starts]).astype(np.int64))
        if not self.masked:
            return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
        chosen = torch.rand(windows.shape, generator=generator) < self.MASK_RATE
        action = torch.rand(windows.shape, generator=generator)
        random_ids = torch.randint(self.mask_id, windows.shape, generator=generator)  # real tokens only
        inputs = torch.where(chosen & (action < self.MASK_TOKEN), self.mask_id, windows)
        inputs = torch.where(chosen & (action >= self.MASK_TOKEN) & (action < self.MASK_TOKEN + self.RANDOM_TOKEN),
                             random_ids, inputs)
        return {"inputs": inputs, "targets": torch.where(chosen, windows, -100)}

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        return self._windows(self.train_tokens, n, self.generator)

    def loss(self, module, batch):
        return module(batch["inputs"], batch["targets"], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        """Mean loss over eval_batches global batches of fixed windows (and masks): the same at every evaluation,
        whatever the process count or micro-batch size, so the curve is comparable across steps and runs."""
        t, world = self.t, self.world
        generator = torch.Generator().manual_seed(t.seed + 1)
        per_process = t.batch_size // world.world
        losses = []
        for _ in range(t.eval_batches):
            batch = self._windows(self.val_tokens, t.batch_size, generator)
            mine = {k: v[world.rank * per_process:(world.rank + 1) * per_process].to(world.device)
                    for k, v in batch.items()}
            for start in range(0, per_process, t.micro_batch_size):
                micro = {k: v[start:start + t.micro_batch_size] for k, v in mine.items()}
                losses.append(self.loss(model, micro).item())
        return {"val_loss": world.mean(sum(losses) / len(losses))}

    def data_state(self) -> dict:
        return {"data_generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.generator.set_state(state["data_generator"])

    def describe(self) -> str:
        kind = "masked-LM" if self.masked else "next-token"
        return f"{self.model.num_params() / 1e6:.2f}M parameters, {kind} objective"



def _check_activation_memory(config, rows: int, device) -> None:
    """Refuse a forward pass whose activations cannot fit the device's memory (model.block_size=100000 would
    otherwise swap and stall). Korthikanti et al. (2022) count 34 s·b·h bytes of 16-bit activations a layer, kept
    for backward (attention scores aside: long sequences take the fused kernel, which keeps none); in fp32 twice
    that, plus the logits and their gradient."""
    s, h = config.block_size, config.n_embd
    need = 2 * 34 * s * rows * h * config.n_layer + 3 * 4 * s * rows * config.vocab_size
    have = device_memory(device)
    if have and need > have:
        raise LmlabError(f"model.block_size={s} with train.micro_batch_size={rows} needs about {need / 2**30:.0f} "
                         f"GiB of activations per forward pass, more than the {have / 2**30:.0f} GiB of {device}; "
                         "lower model.block_size or train.micro_batch_size")


def ensure_data(cfg: RunConfig, world: Dist) -> dict:
    """Prepare the data on first use (rank 0 only; the others wait), then return its meta.json."""
    data_dir = Path(cfg.data.dir)
    if world.main and not (data_dir / "meta.json").exists():
        prepare(cfg.data.source, data_dir, tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size,
                text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction)
    world.barrier()
    return json.loads((data_dir / "meta.json").read_text())


def train(cfg: RunConfig, resume: bool = False, on_step=None, progress: bool = True) -> dict:
    """Pretrain the model of `cfg` on its data (next-token, masked-LM for an encoder, span corruption for an
    encoder-decoder: model.encoder_decoder: true, with a T5 tokenizer, data.tokenizer: t5); return a summary."""
    t = cfg.train
    with TrainingRun(t, resume=resume, hint="choose another run folder (--set train.run_dir=...)") as run:
        meta = ensure_data(cfg, run.world)
        encoder = cfg.model.get("causal") is False
        # An encoder's [MASK] is one more token after the tokenizer's vocabulary.
        model_cfg = cfg.model_config(meta["vocab_size"] + (1 if encoder else 0))
        _check_activation_memory(model_cfg, t.micro_batch_size, run.world.device)
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        splits = load_tokens(cfg.data.dir, "train"), load_tokens(cfg.data.dir, "val")
        if model_cfg.encoder_decoder:
            model = EncoderDecoder(model_cfg).to(run.world.device)
            tok = load_tokenizer(cfg.data.dir)
            objective = SpanCorruption(model, *splits, sentinel_ids(tok), tok.token_to_id("</s>"), seed=t.seed,
                                       eval_rows=t.eval_batches * t.micro_batch_size)
        else:
            model = Transformer(model_cfg).to(run.world.device)
            objective = LanguageModeling(model, *splits, t, run.world)
        if run.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            run.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for name in ("tokenizer.json", "meta.json"):
                shutil.copyfile(Path(cfg.data.dir) / name, run.run_dir / name)
        summary = run.fit(objective, on_step=on_step, progress=progress)
        summary["params"] = model.num_params()
        run.write_json("summary.json", summary)
        return summary
