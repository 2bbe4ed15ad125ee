"""Parameter-efficient fine-tuning: train a few new parameters on top of a frozen model.

LoRA (Hu et al., 2021) adds to a linear layer W a low-rank update, y = W x + (alpha / r) * B A x, with A (r x in)
random and B (out x r) zero, so training starts from exactly the base model. Only A and B learn: for SmolLM2's
attention and MLP at r = 8 that is about 1.5 % of the parameters. After training the update can be merged into W
(`merge_lora`, no cost at inference) or saved alone as a small file (`save_peft`) and loaded on top of the base.

    names = add_lora(model, targets=("qkv", "proj"), r=8, alpha=16)   # wraps the matching nn.Linear layers
    ... train: only LoRA parameters (and any head you unfreeze) have requires_grad ...
    save_peft(model, "lora.safetensors", "lora", settings)           # a few MB
    load_peft(base_model, "lora.safetensors")                        # checks it fits this base model
    merge_lora(model)                                                # W += (alpha / r) B A; same logits

`METHODS` is the one registry of methods: each name maps to a `Method`, its typed settings class (`LoraConfig`,
`AdapterHConfig`, `AdapterPConfig`, as Hugging Face peft's LoraConfig) and the function that modifies a model in
place given those settings, so that a saved file can re-apply its own method before its weights are loaded. A
saved file keeps the settings as a plain dict (`config.settings()`), so save_peft/load_peft work for all.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from lmlab.errors import Damaged, LmlabError
from lmlab.util import comma_list, first_line, option, save_safetensors_atomic


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + dropout(x) A^T B^T * alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise LmlabError(f"LoRA rank must be at least 1 (got r={r})")
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        # A as nn.Linear initialises its weight (Kaiming uniform, a = sqrt(5)), as the LoRA paper's code does.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        # The scale multiplies the r-wide product, and addmm adds the update into the base output as part of the
        # last matmul: two fewer passes over an output-sized tensor, forward and backward. Those passes are
        # memory-bound and the LoRA matmuls tiny, so they are most of what LoRA adds to a step (measured on
        # SmolLM2 on the CPU: 4.9 s instead of 5.1 s a step).
        y = self.base(x)
        h = (self.dropout(x) @ self.lora_A.t()) * self.scale
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.r), self.lora_B.t()).view(y.shape)

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(model: nn.Module, targets=("qkv", "proj", "fc"), r: int = 8, alpha: float = 16,
             dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose name ends with one of `targets` (e.g. "qkv", "attn.proj", "lm_head") in a
    LoRALinear, and freeze every other parameter of `model`. Returns the wrapped layers' names."""
    targets = tuple(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LmlabError(f"no linear layer matches the LoRA targets {', '.join(targets)}; this model's linear "
                         f"layers are named {', '.join(linear)}")
    freeze(model)
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and unwrap it (the model computes the same function, with no
    extra cost). Returns the number of merged layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, getattr(parent, child).merged())
    return len(names)


def cast_frozen_matmuls(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen nn.Linear weights in `dtype` (for training under autocast to that dtype). Autocast casts
    every linear weight to bf16 at every forward; a frozen weight never changes, so casting it once gives the
    same products without a cast per step or the fp32 copy's memory. Embeddings (and a head tied to them), norms
    and every trainable parameter stay as they are, so the residual stream keeps its precision. Returns the
    number of weights cast. The base model's file is untouched: a PEFT run saves only its own weights."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    cast = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in tied and not any(
                p.requires_grad for p in module.parameters()):
            module.to(dtype)
            cast += 1
    return cast


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name: what a PEFT file holds."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(model: nn.Module) -> str:
    """Identifies a base model's architecture: its config and every base parameter's name and shape (not the
    values: a LoRA trained on one copy of a model loads onto another copy of the same weights). The same before
    and after a PEFT method is applied: the method's own parameters are left out and wrapped layers are named as
    they were before wrapping."""
    config = getattr(model, "config", None)
    shapes = sorted((n.replace(".base.", "."), tuple(p.shape)) for n, p in model.named_parameters()
                    if not any(k in n for k in ("lora_", "adapter")))
    text = json.dumps([config.to_dict() if hasattr(config, "to_dict") else None, shapes], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck adapters: a small MLP (down, nonlinearity, up) added to a block's sublayers, as LLM-Adapters
# (Hu et al., 2023) compares them with LoRA. The up-projection starts at zero, so the model starts unchanged.
#   adapterh  Houlsby et al. (2019): in series, on the output of attention and of the MLP, before each residual
#             add: h = sublayer(x); h + up(act(down(h)))
#   adapterp  in parallel to the MLP (He et al., 2022), from the MLP's own input: mlp(x) + up(act(down(x)))
# A block's sublayer (block.attn, block.mlp) is wrapped, so lmlab/model.py is untouched. The nonlinearity between
# down and up means an adapter cannot be folded into the base weights as LoRA is: it is saved alone (save_peft)
# and loaded on top of the base (load_peft), and stays a module at inference.

_ADAPTER_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu,
                        "silu": nn.functional.silu}


class Bottleneck(nn.Module):
    """up(act(down(dropout(x)))): dim -> size -> dim, with biases; `up` is zero-initialised."""

    def __init__(self, dim: int, size: int, activation: str = "tanh", dropout: float = 0.0):
        super().__init__()
        if size < 1:
            raise LmlabError(f"adapter bottleneck size must be at least 1 (got {size})")
        if activation not in _ADAPTER_ACTIVATIONS:
            raise LmlabError(f"unknown adapter activation {activation!r} (choose one of "
                             f"{', '.join(_ADAPTER_ACTIVATIONS)})")
        self.down = nn.Linear(dim, size)  # nn.Linear's default (Kaiming uniform) initialisation
        self.up = nn.Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = _ADAPTER_ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.up(self.act(self.down(self.dropout(x))))


class _Adapted(nn.Module):
    """A sublayer (`base`, called with whatever the block passes: mask, cache, ...) and its bottleneck."""

    def __init__(self, base: nn.Module, dim: int, **bottleneck):
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(dim, **bottleneck)


class SeriesAdapter(_Adapted):
    """A sublayer followed by a bottleneck on its output, with the adapter's own skip connection."""

    def forward(self, x, *args, **kwargs):
        h = self.base(x, *args, **kwargs)
        return h + self.adapter(h)


class ParallelAdapter(_Adapted):
    """A sublayer plus a bottleneck that reads the same input."""

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + self.adapter(x)


def _add_adapters(model: nn.Module, wrapper, places: tuple[str, ...], size: int, activation: str,
                  dropout: float) -> list[str]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmlabError("bottleneck adapters go into an lmlab Transformer's blocks; this model has no .blocks")
    unknown = sorted(set(places) - {"attn", "mlp"})
    if unknown or not places:
        raise LmlabError(f"adapters go after 'attn' and/or 'mlp' (got {', '.join(places) or 'nothing'})")
    freeze(model)
    dim = model.config.n_embd
    names = []
    for i, block in enumerate(blocks):
        for place in places:
            sublayer = getattr(block, place)
            if isinstance(sublayer, _Adapted):
                raise LmlabError(f"blocks.{i}.{place} already has an adapter")
            setattr(block, place, wrapper(sublayer, dim, size=size, activation=activation, dropout=dropout))
            names.append(f"blocks.{i}.{place}")
    return names


def add_adapterh(model: nn.Module, size: int = 32, places=("attn", "mlp"), activation: str = "tanh",
                 dropout: float = 0.0) -> list[str]:
    """Houlsby adapters in series after each block's attention and/or MLP; freezes the rest of `model`. Returns
    the adapted sublayers' names."""
    return _add_adapters(model, SeriesAdapter, tuple(places), size, activation, dropout)


def add_adapterp(model: nn.Module, size: int = 64, activation: str = "tanh", dropout: float = 0.0) -> list[str]:
    """Parallel adapters next to each block's MLP; freezes the rest of `model`. Returns the adapted MLPs' names."""
    return _add_adapters(model, ParallelAdapter, ("mlp",), size, activation, dropout)


def merge_peft(model: nn.Module, method: str) -> int:
    """Fold a method's weights into the base model where the method allows it (LoRA). Returns the number of merged
    layers. Bottleneck adapters cannot be merged (a nonlinearity sits between their matrices): an error says so."""
    if method == "lora":
        return merge_lora(model)
    if method in ("adapterh", "adapterp"):
        raise LmlabError(f"{method} adapters cannot be merged into the base weights (a nonlinearity sits between "
                         "their two matrices); load them on top of the base model instead (lmlab.models.peft.load_peft)")
    raise LmlabError(f"unknown PEFT method {method!r} (known: {', '.join(METHODS)})")


# ----------------------------------------------------------------------------------------------------------------
# The registry: one typed settings class per method, and the function that puts the method on a model.

class _Config:
    def settings(self) -> dict:
        """The settings as a PEFT file's metadata keeps them (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LoraConfig(_Config):
    """LoRA's settings (the `--lora-*` flags of lmlab sft, dpo and finetune). Each command's own default is set
    where the command's settings declare their `lora` field."""
    r: int = option(8, "LoRA rank")
    alpha: float = option(16, "LoRA scale: the update is multiplied by alpha / r")
    dropout: float = option(0.0, "dropout on LoRA's input (as Hugging Face PEFT, 0 by default: on a CPU it costs a "
                                 "quarter of a SmolLM2 step)")
    targets: tuple[str, ...] = option(("qkv", "proj", "fc"), "linear layers that get LoRA (name suffixes, "
                                                             "comma-separated)", type=comma_list)


@dataclass
class AdapterHConfig(_Config):
    """Houlsby bottleneck adapters in series after attention and the MLP."""
    size: int = 32
    places: tuple[str, ...] = ("attn", "mlp")
    activation: str = "tanh"
    dropout: float = 0.0


@dataclass
class AdapterPConfig(_Config):
    """Parallel bottleneck adapters next to the MLP."""
    size: int = 64
    activation: str = "tanh"
    dropout: float = 0.0


@dataclass(frozen=True)
class Method:
    """A PEFT method: its settings class and the function(model, **settings) that adds its modules to a (frozen)
    model. Calling the method applies it."""
    config: type
    add: Callable[..., list[str]]

    def __call__(self, model: nn.Module, **settings) -> list[str]:
        return self.add(model, **settings)


METHODS: dict[str, Method] = {"lora": Method(LoraConfig, add_lora), "adapterh": Method(AdapterHConfig, add_adapterh),
                              "adapterp": Method(AdapterPConfig, add_adapterp)}
FULL = "full"  # no PEFT method: every parameter trains
ADAPTER_ACTIVATIONS = tuple(_ADAPTER_ACTIVATIONS)


def method_config(method: str, **settings):
    """The settings object of a PEFT method; keywords override its defaults (None: keep the default)."""
    if method not in METHODS:
        raise LmlabError(f"unknown PEFT method {method!r} (known: {', '.join(METHODS)})")
    return METHODS[method].config(**{k: v for k, v in settings.items() if v is not None})


def method_settings(method: str, **settings) -> dict:
    """The settings dict a method is applied (and saved) with: its config's defaults, keywords overriding them
    (None: keep the default); {} for full."""
    return {} if method == FULL else method_config(method, **settings).settings()


def apply_method(model: nn.Module, method: str, settings: dict) -> None:
    """Make `model` trainable by `method`: every parameter (full), or a frozen base plus the PEFT method's own."""
    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if method not in METHODS:
        raise LmlabError(f"unknown PEFT method {method!r} (known: {', '.join(METHODS)})")
    METHODS[method](model, **settings)


def save_peft(model: nn.Module, path: str | Path, method: str, settings: dict) -> None:
    """Write the trainable parameters to a safetensors file, with the method, its settings and the base model's
    fingerprint in the metadata. Atomic."""
    if method not in METHODS:
        raise LmlabError(f"unknown PEFT method {method!r} (known: {', '.join(METHODS)})")
    meta = {"method": method, "settings": json.dumps(settings), "base": fingerprint(model)}
    save_safetensors_atomic(trainable_state(model), Path(path), metadata=meta)


def read_peft(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such adapter file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise Damaged(f"{path} is damaged or not a safetensors adapter file ({first_line(e)}); download or "
                      "rebuild it") from None
    if "method" not in meta or "settings" not in meta:
        raise LmlabError(f"{path} has no PEFT metadata (method, settings); was it written by lmlab's save_peft?")
    return meta, tensors


def load_peft(model: nn.Module, path: str | Path, apply: bool = True) -> dict:
    """Apply the file's method to `model` (a base model without it) and load its weights. Returns the settings.
    A file made for another base model is refused, naming the difference. apply=False: the model has the method
    already (a run being resumed), only the weights are loaded."""
    meta, tensors = read_peft(path)
    method, settings = meta["method"], json.loads(meta["settings"])
    if method not in METHODS:
        raise LmlabError(f"{path} uses the PEFT method {method!r}, which this lmlab does not know "
                         f"(known: {', '.join(METHODS)})")
    base = fingerprint(model)
    if meta.get("base") and meta["base"] != base:
        raise LmlabError(f"{path} was trained on another base model (fingerprint {meta['base']}, this model's is "
                         f"{base}): load it onto the model it was made for")
    if apply:
        METHODS[method](model, **settings)
    own = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise LmlabError(f"{path} does not fit this model: it has no parameter {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise LmlabError(f"{path} does not fit this model: {name} is {tuple(value.shape)} in the file, "
                                 f"{tuple(own[name].shape)} in the model")
            own[name].copy_(value)
    return {"method": method, **settings}
