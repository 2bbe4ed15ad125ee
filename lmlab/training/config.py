"""Run configuration: a YAML file with three sections, overridable from the command line.

    lmlab train configs/shakespeare-char.yaml --set train.lr=3e-4 --set model.n_layer=4

`data` says what to train on (prepared by `lmlab prepare`, or prepared on first use), `model` holds
`TransformerConfig` fields (vocab_size comes from the data), `train` holds `TrainConfig` fields.
A config may also be named by its file stem (`shakespeare-char`) to use one shipped with lmlab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from lmlab.errors import LmlabError
from lmlab.models.transformer import TransformerConfig
from lmlab.training.compile import normalize_mode

CONFIG_DIR = Path(__file__).parents[1] / "configs"


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare", a .txt file or folder, .jsonl, .parquet (see lmlab.data.corpus)
    dir: str = "data/shakespeare-char"  # prepared train.bin / val.bin / tokenizer.json / meta.json
    tokenizer: str = "char"  # "char" | "bpe" | path to a tokenizer.json
    vocab_size: int = 4096  # bpe only
    text_field: str = "text"  # the field that holds the text in .jsonl / .parquet rows
    val_fraction: float = 0.1  # the share of the characters that validates (the end of the corpus)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # the run folder: checkpoints, metrics.jsonl, loss.png
    batch_size: int = 64  # sequences per optimizer step, summed over all processes and micro-batches
    micro_batch_size: int = 16  # sequences per forward pass on one process
    max_steps: int = 2000  # optimizer steps
    lr: float = 1e-3  # peak learning rate, after the linear warmup
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup_steps: int = 100  # steps of linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250  # steps between evaluations on held-out data
    eval_batches: int = 20  # batches per evaluation
    log_interval: int = 10  # steps between lines of metrics.jsonl
    ckpt_interval: int = 250  # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 2  # the newest checkpoints kept (older ones are deleted)
    seed: int = 1337  # seeds the weights, the batches and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 autocast where bf16 is native: CUDA, AVX512-BF16/AMX CPUs) | float32 | bfloat16
    compile: str | bool = "auto"  # auto (when the run is long enough to repay it: lmlab.training.compile) | true | false
    parallel: str = "ddp"  # under torchrun: ddp (a copy per process) | fsdp (FSDP2 shards; lmlab.training.distributed)
    time_limit: float | None = None  # seconds: the LR decay follows the clock too, and the run stops (checkpointed) then
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    patience: int = 0  # fine-tuning: stop after this many evaluations without a better dev metric (0: never)

    def __post_init__(self):
        # Each bound is (key, holds, what it must be): one line per wrong value, naming the key and the fix.
        at_least_one = ("batch_size", "micro_batch_size", "max_steps", "eval_interval", "eval_batches",
                        "log_interval", "ckpt_interval")
        checks = [(key, getattr(self, key) >= 1, "at least 1") for key in at_least_one]
        checks += [(key, getattr(self, key) >= 0, "at least 0") for key in ("warmup_steps", "keep_checkpoints",
                                                                              "patience", "weight_decay",
                                                                              "grad_clip", "min_lr")]
        checks += [("lr", self.lr > 0, "a positive number"),
                   ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
                   ("time_limit", self.time_limit is None or self.time_limit > 0, "a positive number of seconds"),
                   ("threads", self.threads is None or self.threads >= 1, "at least 1"),
                   ("dtype", self.dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
                   ("parallel", self.parallel in ("ddp", "fsdp"), "ddp or fsdp")]
        self.compile = normalize_mode(self.compile)
        for key, holds, must in checks:
            if not holds:
                raise LmlabError(f"train.{key}={getattr(self, key)!r} is invalid: it must be {must} "
                                 f"(e.g. --set train.{key}=...)")


# The peak learning rate of each command and method when --lr is not given.
DEFAULT_LR = {
    # lmlab finetune: what worked for MiniLM on SST-2 (docs/results/paradigms); from scratch: Adam's usual.
    "finetune": {"full": 1e-4, "lora": 1e-3, "baseline": 2e-3},
    # lmlab sft and dpo: LLM-Adapters' 3e-4 for PEFT.
    "sft": {"full": 2e-5, "lora": 3e-4, "adapterh": 3e-4, "adapterp": 3e-4},
}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # TransformerConfig fields, vocab_size excluded
    train: TrainConfig = field(default_factory=TrainConfig)

    def model_config(self, vocab_size: int) -> TransformerConfig:
        return TransformerConfig.from_dict({**self.model, "vocab_size": vocab_size})

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "model": dict(self.model), "train": asdict(self.train)}


def _coerce(cls, section: str, values: dict) -> dict:
    """Check keys and value types against the dataclass, and fix YAML's number quirks: YAML 1.1 reads `3e-4` as a
    string, and `1e3` for an integer field should be 1000. A value of the wrong type is a one-line error."""
    if not isinstance(values, dict):
        raise LmlabError(f"the '{section}' section must be a mapping of keys to values, not {values!r}")
    known = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise LmlabError(f"unknown key(s) in '{section}': {', '.join(unknown)} (known: {', '.join(known)})")
    return {key: _typed(f"{section}.{key}", known[key], value) for key, value in values.items()}


def _typed(key: str, kind: str, value):
    """`value` as the field type `kind` ("int", "float | None", ...) says, or a one-line error naming the key."""
    base = kind.split("|")[0].strip()
    if value is None:
        if "None" in kind:
            return None
        raise LmlabError(f"{key} needs a value ({base}), not null")
    if base == "float" and not isinstance(value, bool) and isinstance(value, (str, int, float)):
        try:
            return float(value)
        except ValueError:
            raise LmlabError(f"{key}={value!r} is not a number (e.g. --set {key}=3e-4)") from None
    if base == "int" and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise LmlabError(f"{key}={value!r} is not a whole number (e.g. --set {key}=100)")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise LmlabError(f"{key}={value!r} is not true or false")
    if base == "str" and isinstance(value, bool) and "bool" in kind:  # train.compile: auto | true | false
        return value
    if base == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if base in ("float", "int", "str"):
        raise LmlabError(f"{key}={value!r} is not a {dict(float='number', int='whole number', str='text')[base]}")
    return value


def _build(cls, section: str, values: dict):
    return cls(**_coerce(cls, section, values))


def _parse_value(text: str):
    # Numbers first (so `3e-4` is a float), then YAML scalars (`true`, `null`, strings).
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise LmlabError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in ("data", "model", "train"):
            raise LmlabError(f"--set {item!r}: keys look like data.X, model.X or train.X")
        raw.setdefault(parts[0], {})
        raw[parts[0]][parts[1]] = _parse_value(value)
    return raw


def resolve_config_path(name: str | Path) -> Path:
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.exists():
        return shipped
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise LmlabError(f"no such config file: {name} (shipped configs: {available})")


def load_config(name: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = {}
    if name is not None:
        path = resolve_config_path(name)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise LmlabError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if raw is None:  # an empty file would silently train the 10M default model into runs/default
            raise LmlabError(f"{path} is empty: a config needs sections data, model, train (start from "
                             f"{CONFIG_DIR / 'shakespeare-char.yaml'})")
        if not isinstance(raw, dict):
            raise LmlabError(f"{path} must be a mapping with sections data, model, train")
    unknown = sorted(set(raw) - {"data", "model", "train"})
    if unknown:
        raise LmlabError(f"unknown section(s) {', '.join(unknown)} in config (known: data, model, train)")
    raw = apply_overrides(raw, overrides)
    model = dict(raw.get("model") or {})
    model.pop("vocab_size", None)
    model = _coerce(TransformerConfig, "model", model)
    TransformerConfig.from_dict({**model, "vocab_size": 1})  # validate now, not after data preparation
    return RunConfig(
        data=_build(DataConfig, "data", raw.get("data") or {}),
        model=model,
        train=_build(TrainConfig, "train", raw.get("train") or {}),
    )
