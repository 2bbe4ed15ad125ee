"""Many LoRA runs on one base model, each row of a batch with its own (S-LoRA, Sheng et al. 2023; punica, Chen et
al. 2023): what `lmlab serve --adapter NAME=RUN` runs.

The base weights stay as they are (unmerged). Every linear layer that some run trained a LoRA on is wrapped in a
MultiLoRALinear that holds all the runs' A and B matrices stacked, slot 0 all zeros (the base model). A forward
pass computes the base product once for the whole batch and adds each row's own low-rank update,
(alpha / r) B_a A_a x, a being the row's adapter. Which adapter each row uses is set before each pass on the
AdapterRows that all the wrapped layers share (the engine knows its rows), so the model's forward and its KV cache
are untouched:

    rows = attach_adapters(model, {"poet": "runs/poet", "sql": "runs/sql"})   # checks each run fits the model
    rows.select([0, 2, 1, 1])      # row 0 the base model, row 1 "sql", rows 2 and 3 "poet"
    logits = model(ids, ...)

Three ways to add the updates of a mixed batch (bench/lora_batch.py measures them at batch 16 on the CPU):
    stacked  all N adapters as one LoRA of rank N x r: x A_all^T for every row, times a mask that keeps each
             row's own r columns (zeros for base rows), then one matmul with B_all added into the output: two
             plain GEMMs with an inner size of N x r, N times the update's flops (a rank-32 LoRA for 4 adapters
             of rank 8: still tiny beside the base matmul)
    gather   each row's A and B gathered into (B, r, in) and (B, out, r), then two bmm (punica's BGMV, in
             PyTorch ops; base rows gather the zero slot)
    group    rows grouped by adapter: per adapter present, its rows selected, two matmuls, an index_add
A pass whose rows all use one adapter (a prompt's prefill) takes two plain matmuls; one with none, nothing.
stacked is the default: the fastest decode step on the CPU, whose small bmm and gathers cost more than the flops
they save (docs/results/serve-adapters/).

Runs may have different ranks and targets: each is padded with zeros to the largest rank (zero rows of A and
columns of B add nothing) and a layer a run did not train gets zeros in its slot; alpha / r is folded into B.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from lmlab.errors import LmlabError
from lmlab.models import checkpoint
from lmlab.models.peft import fingerprint, read_peft
from lmlab.models.quantize import is_quantized, replace_module

MODES = ("stacked", "gather", "group")


class AdapterRows:
    """The adapter of each row of the next forward pass (0: the base model, i: the i-th run), shared by every
    MultiLoRALinear of a model. `runs` maps each adapter's name to its run folder, in slot order."""

    def __init__(self, runs: dict[str, str], device, dtype=torch.float32, rank: int = 0, mode: str = "stacked"):
        if mode not in MODES:
            raise LmlabError(f"unknown multi-LoRA mode {mode!r} (choose {', '.join(MODES)})")
        self.runs, self.device, self.dtype, self.rank, self.mode = dict(runs), device, dtype, rank, mode
        self.names = list(runs)
        self.select([])

    def index_of(self, name: str) -> int:
        """The slot of an adapter, by name."""
        return self.names.index(name) + 1

    def select(self, ids: list[int], shortcut: bool = True) -> None:
        """Set the rows' adapters for the next pass; what the layers need is worked out once here, not per layer.
        shortcut=False: no plain matmuls for a batch of one adapter, so that a row's arithmetic never depends on
        the other rows' adapters (batch invariance: a row's own columns of the mode's products are the same)."""
        present = sorted(set(ids) - {0})
        self.active = bool(present)
        # One adapter for every row: plain matmuls with its A and B
        self.single = present[0] if shortcut and len(present) == 1 and 0 not in ids else None
        self.index = self.groups = self.mask = None
        if self.active and self.single is None:
            if self.mode == "stacked":  # (B, 1, N x r): ones over each row's own adapter's r columns
                own = torch.nn.functional.one_hot(torch.tensor(ids), len(self.names) + 1)[:, 1:]
                self.mask = own.repeat_interleave(self.rank, dim=1)[:, None].to(self.device, self.dtype)
            elif self.mode == "gather":
                self.index = torch.tensor(ids, device=self.device)
            else:
                self.groups = [(a, torch.tensor([r for r, i in enumerate(ids) if i == a], device=self.device))
                               for a in present]


class MultiLoRALinear(nn.Module):
    """A frozen linear layer (float or quantized) plus the LoRA updates of several runs, one per row."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, rows: AdapterRows):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", lora_A)  # (adapters + 1, r, in), slot 0 zeros
        self.register_buffer("lora_B", lora_B)  # (adapters + 1, out, r), times alpha / r
        # B of all the adapters side by side, (out, adapters x r), for the stacked mode
        self.register_buffer("wide_B", lora_B[1:].permute(1, 0, 2).reshape(lora_B.shape[1], -1).contiguous())
        self.rows = rows  # a plain attribute: shared, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows
        if not rows.active:
            return y
        if rows.single is not None:
            return y + (x @ self.lora_A[rows.single].t()) @ self.lora_B[rows.single].t()
        # (B, T, features) whatever came in: the engine's head sees (B, features)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        if rows.mode == "stacked":
            h = (x3 @ self.lora_A[1:].reshape(-1, x.shape[-1]).t()) * rows.mask
            out = y.shape[-1]
            return torch.addmm(y.reshape(-1, out), h.reshape(-1, h.shape[-1]), self.wide_B.t()).view(y.shape)
        if rows.mode == "gather":
            A = self.lora_A.index_select(0, rows.index)
            B = self.lora_B.index_select(0, rows.index)
            y3 = y.reshape(y.shape[0], -1, y.shape[-1])
            return torch.baddbmm(y3, torch.bmm(x3, A.transpose(1, 2)), B.transpose(1, 2)).view(y.shape)
        y = y.contiguous()  # a view of it is updated in place below
        y3 = y.view(y.shape[0], -1, y.shape[-1])
        for a, index in rows.groups:
            y3.index_add_(0, index, (x3.index_select(0, index) @ self.lora_A[a].t()) @ self.lora_B[a].t())
        return y


def parse_adapter_flags(flags: list[str], base_names: tuple[str, ...]) -> dict[str, str]:
    """{name: run folder} of `--adapter NAME=RUN` flags, checked before any model loads: the form, unique names
    that are not the base model's, and folders that are runs of lmlab sft or dpo."""
    runs: dict[str, str] = {}
    for flag in flags:
        name, sep, run = flag.partition("=")
        name, run = name.strip(), run.strip()
        if not sep or not name or not run:
            raise LmlabError(f"--adapter {flag!r}: write it as NAME=RUN (NAME: what clients send as 'model'; RUN: "
                             "a LoRA run folder of lmlab sft)")
        if name in runs or name in base_names:
            raise LmlabError(f"--adapter {flag!r}: the name {name!r} is taken (by "
                             f"{'another --adapter' if name in runs else 'the base model'}); give each adapter "
                             "its own name")
        if not checkpoint.is_tuned(run):
            raise LmlabError(f"--adapter {flag!r}: {run} is not a run of lmlab sft or dpo (no "
                             f"{checkpoint.TUNED_FILE}); train one with lmlab sft --method lora")
        runs[name] = run
    return runs


def _read_run(name: str, run: str, model: nn.Module, base_print: str | None) -> tuple[int, dict]:
    """(rank, {layer: (A, B times alpha / r)}) of a LoRA run, refused where it does not fit `model`."""
    info = checkpoint.tuned_info(run)
    flag = f"--adapter {name}={run}"
    if info.get("method") != "lora":
        raise LmlabError(f"{flag}: the run trained {info.get('method')!r}, and only LoRA runs are served as "
                         f"adapters; serve that run on its own (lmlab serve --model {run})")
    meta, tensors = read_peft(checkpoint.tuned_weights_folder(run, info) / checkpoint.PEFT_FILE)
    if base_print is not None and meta.get("base") and meta["base"] != base_print:
        raise LmlabError(f"{flag}: the run was trained on another base model ({info.get('base')}, fingerprint "
                         f"{meta['base']}; this --model's is {base_print}); serve it on the model it was made for")
    settings = json.loads(meta["settings"])
    r, scale = int(settings["r"]), float(settings["alpha"]) / int(settings["r"])
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise LmlabError(f"{flag}: the run trained {key} besides LoRA's matrices, which cannot be added per "
                             f"request; serve that run on its own (lmlab serve --model {run})")
        layers.setdefault(layer, {})[part] = value
    out = {}
    for layer, parts in sorted(layers.items()):
        try:
            base = model.get_submodule(layer)
        except AttributeError:
            base = None
        if base is None or not hasattr(base, "in_features") or set(parts) != {"lora_A", "lora_B"}:
            raise LmlabError(f"{flag}: the run's {layer} does not fit this --model (no such linear layer, or not "
                             "both lora_A and lora_B); serve it on the model it was made for")
        A, B = parts["lora_A"], parts["lora_B"]
        if tuple(A.shape) != (r, base.in_features) or tuple(B.shape) != (base.out_features, r):
            raise LmlabError(f"{flag}: {layer} holds A {tuple(A.shape)} and B {tuple(B.shape)}, which do not fit "
                             f"rank r={r} on a layer of {base.in_features} inputs and {base.out_features} outputs; "
                             "the run is damaged or made for another model")
        out[layer] = (A.float(), B.float() * scale)
    return r, out


def attach_adapters(model: nn.Module, runs: dict[str, str], mode: str = "stacked") -> AdapterRows:
    """Load the LoRA runs (name -> run folder of lmlab sft), check that each fits `model` (its base model: same
    architecture and layer shapes), and wrap every layer that any of them trained. Returns the AdapterRows to set
    before each forward pass (none selected: the base model)."""
    weight = model.tok_emb.weight
    # A quantized model's parameters are not the float ones the fingerprint names: there the shapes are checked
    base_print = None if is_quantized(model) else fingerprint(model)
    loaded = [_read_run(name, run, model, base_print) for name, run in runs.items()]
    rank = max((r for r, _ in loaded), default=0)
    rows = AdapterRows(runs, weight.device, weight.dtype, rank, mode)
    for layer in sorted(set().union(*(layers for _, layers in loaded))):
        base = model.get_submodule(layer)
        A = torch.zeros(len(loaded) + 1, rank, base.in_features)
        B = torch.zeros(len(loaded) + 1, base.out_features, rank)
        for slot, (r, layers) in enumerate(loaded, start=1):
            if layer in layers:
                A[slot, :r], B[slot, :, :r] = layers[layer]
        to = dict(device=weight.device, dtype=weight.dtype)
        replace_module(model, layer, MultiLoRALinear(base, A.to(**to), B.to(**to), rows))
    return rows
