"""The training loop: one loop for every objective, one process or many.

`fit(objective, train_config, run_dir)` trains whatever an `Objective` describes (its model, batches, loss and
evaluation): next-token pretraining and BERT's masked-LM pretraining (`LanguageModeling`, here), classification
fine-tuning (lmlab.training.classification), instruction and preference tuning (lmlab.training.sft). Under
`torchrun --nproc_per_node N` it wraps the model in DDP (gloo on CPU, nccl on CUDA). Every process draws the same
global batch from the same seeded generator and takes its own rows, so N processes compute exactly what one
process computes with the same global batch (and gradient accumulation).

Run folder layout (`train.run_dir`):
    config.yaml            the resolved run config
    tokenizer.json, meta.json   copied from the prepared data (pretraining)
    metrics.jsonl          one JSON record per logged step and per evaluation
    loss.png               training loss and evaluation curves
    ckpt/step_0000500/     weights (model.safetensors + config.json, or an adapter file) + train_state.pt
                           (optimizer, RNG, data position, best evaluation so far)
    ckpt/latest            name of the newest complete checkpoint
    best/                  the weights of the best evaluation, when the objective names a metric to follow
    summary.json           the final figures

Checkpoints are written to a temporary folder and renamed into place, and `ckpt/latest` is replaced atomically,
so a run killed at any moment resumes (`--resume`) from its last complete checkpoint and, on the CPU, follows the
same loss curve as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from tqdm import tqdm

from lmlab.training.config import RunConfig, TrainConfig
from lmlab.data.corpus import load_tokens, prepare
from lmlab.errors import LmlabError
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.util import (atomic_write_json, atomic_write_text, load_torch_safe, pick_device, save_safetensors_atomic,
                        save_torch_atomic)


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process.

class Dist:
    """Process group, device and precision of this process."""

    def __init__(self, device_name: str = "auto", dtype: str = "auto"):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(device_name)
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")

    def autocast(self):
        """bf16 autocast where asked for (the default on CUDA); full precision otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (so that all stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def lr_at(step: int, t, elapsed: float | None = None) -> float:
    """Linear warmup to t.lr, then cosine decay to t.min_lr at t.max_steps.

    With a time_limit, the decay also follows the clock (progress is the larger of steps and seconds used, as in
    Geiping & Goldstein's "Cramming"), so a run that is slower than planned still anneals before it is stopped.
    Such a schedule depends on the machine's speed; leave time_limit unset for bit-exact reproducibility."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.time_limit and elapsed is not None:
        progress = max(progress, elapsed / t.time_limit)
    progress = min(1.0, progress)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices (linear weights, embeddings) only, never on biases or norm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel does one pass over all parameters instead of one small op per tensor.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "ckpt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt = checkpoint_dir(Path(run_dir))
    pointer = ckpt / "latest"
    if not pointer.exists():
        return None
    path = ckpt / pointer.read_text().strip()
    return path if (path / "train_state.pt").exists() else None


def save_checkpoint(folder: Path, objective: "Objective", train_state: dict | None) -> Path:
    """Write a checkpoint folder through a temporary sibling and a rename, so it is complete or absent."""
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    objective.save(objective.model, tmp)
    if train_state is not None:
        save_torch_atomic(train_state, tmp / "train_state.pt")
    # Swap in: the old copy (e.g. the previous best/) moves aside first, so a crash leaves one of the two.
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_step_checkpoint(run_dir: Path, objective: "Objective", train_state: dict, keep: int) -> Path:
    ckpt = checkpoint_dir(run_dir)
    name = f"step_{train_state['step']:07d}"
    final = save_checkpoint(ckpt / name, objective, train_state)
    atomic_write_text(ckpt / "latest", name + "\n")
    for old in sorted(ckpt.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Load a model from a checkpoint folder, or from a run folder (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"no such run or checkpoint folder: {path}")
    if not (path / "model.safetensors").exists():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise LmlabError(f"{path} has no checkpoint yet (no ckpt/latest); train first with `lmlab train`")
        path = ckpt
    config = TransformerConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = Transformer.from_weights(config, load_file(str(path / "model.safetensors")))
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# Logging

def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path) -> None:
    """loss.png: training loss and validation loss per step; other evaluation metrics (a fine-tuning run's dev
    accuracy, say) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    other = sorted({k for r in records if "loss" not in r for k, v in r.items()
                    if k not in ("step", "elapsed", "val_loss") and isinstance(v, (int, float))})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)" if val else "loss")
    ax.set_title(f"{run_dir.name}: training curves")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if other:
        right = ax.twinx()
        for i, key in enumerate(other):
            points = [(r["step"], r[key]) for r in records if key in r and "loss" not in r]
            right.plot(*zip(*points), "s--", color=f"C{i + 2}", label=key, linewidth=1.2, markersize=3)
        right.set_ylabel(", ".join(other))
        h, lab = right.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


# ----------------------------------------------------------------------------------------------------------------
# What is trained: an Objective gives the model, its batches, its loss and its evaluation. The loop below owns the
# rest, so pretraining, masked-LM pretraining, classification fine-tuning, instruction tuning and preference tuning
# share one loop (the torchtitan split of model, objective and training loop).

class Objective:
    """Base class of what `fit` trains. Subclasses set `model` and implement draw, loss and evaluate.

    `draw(n)` returns the next global batch of n rows as a dict of tensors with leading dimension n; every
    process draws the same batch from the same seeded generator and `fit` takes this process's rows, then splits
    them into micro-batches. `loss(module, batch)` is the mean loss of one micro-batch, computed by calling
    `module` (the model, possibly wrapped by DDP or torch.compile). Only parameters with requires_grad are trained,
    so a frozen base with LoRA or adapters needs nothing special here. `evaluate(model)` returns named figures on
    held-out data (val_loss, dev_accuracy, ...; not "loss" or "lr", the names of the training log); `fit` calls
    it in eval mode, without gradients and under the run's autocast, as it calls `loss` in training."""

    model: torch.nn.Module
    tokens_per_row: int = 0  # tokens a row holds, for the tokens/s figure (0: not a token count)
    best_metric: str | None = None  # a key of evaluate(): run_dir/best/ keeps the best evaluation, patience applies
    higher_is_better: bool = True

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model) -> dict[str, float]:
        return {}

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        pass

    def describe(self) -> str:
        return f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters"

    def save(self, model, folder: Path) -> None:
        """Write the weights into a checkpoint folder: the whole Transformer in safetensors + its config."""
        save_safetensors_atomic(model.weights(), folder / "model.safetensors")
        atomic_write_json(folder / "config.json", model.config.to_dict())

    def load(self, model, folder: Path) -> None:
        saved = json.loads((folder / "config.json").read_text())
        if saved != model.config.to_dict():
            raise LmlabError(f"cannot resume from {folder}: the model config differs from the checkpoint's")
        model.load_weights(load_file(str(folder / "model.safetensors")))


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
        return module(batch["inputs"], batch["targets"])[1]

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


# ----------------------------------------------------------------------------------------------------------------
# The loop

def fit(objective: Objective, t: TrainConfig, run_dir: str | Path, *, world: Dist | None = None,
        resume: bool = False, on_step=None, progress: bool = True) -> dict:
    """Train `objective` as `t` says and return a summary.

    AdamW over the parameters that require gradients, warmup then cosine decay, gradient accumulation, clipping,
    DDP under torchrun, bf16 autocast on CUDA, torch.compile. Every eval_interval steps (and at the end) it
    evaluates; with `objective.best_metric` it keeps the best evaluation in run_dir/best/ and stops after
    `t.patience` evaluations without improvement (0: never). Checkpoints in run_dir/ckpt/ are written atomically
    and `resume` continues from the newest on the same curve. `on_step(step, loss)` is called after each optimizer
    step (the tests use it to kill a run part-way)."""
    own_world = world is None
    world = world or Dist(t.device)
    try:
        return _fit(objective, t, Path(run_dir), world, resume, on_step, progress)
    finally:
        if own_world:
            world.close()


def _fit(objective, t, run_dir, world, resume, on_step, progress):
    device, model = world.device, objective.model
    per_process, rest = divmod(t.batch_size, world.world)
    if rest or per_process % t.micro_batch_size:
        raise LmlabError(f"train.batch_size={t.batch_size} must be a multiple of micro_batch_size "
                         f"({t.micro_batch_size}) x processes ({world.world})")
    accum_steps = per_process // t.micro_batch_size
    if not any(p.requires_grad for p in model.parameters()):
        raise LmlabError("the model has no trainable parameters (everything is frozen)")

    optimizer = make_optimizer(model, t, device)
    step, elapsed_before, tokens_seen = 0, 0.0, 0
    best = {"value": None, "step": None, "since": 0}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and world.main:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                         "run folder")
    if ckpt is not None:
        state = load_torch_safe(ckpt / "train_state.pt")
        objective.load(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        objective.load_data_state(state["data"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step, elapsed_before, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        best = state.get("best", best)

    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Records past the checkpoint belong to the killed part of the run; the resumed run logs them again.
        kept = [r for r in read_metrics(run_dir) if r["step"] <= step] if ckpt is not None else []
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    forward = torch.compile(model) if t.compile else model
    if world.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)

    rows_per_step = t.batch_size
    if world.main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"model: {objective.describe()} ({trainable / 1e6:.3g}M trainable) | {world.world} process(es) on "
              f"{device} | {rows_per_step} rows/step ({accum_steps} micro-batch(es) of {t.micro_batch_size}) | "
              f"{'bf16 autocast' if world.bf16 else 'fp32'}{' | compiled' if t.compile else ''}")
    bar = tqdm(total=t.max_steps, initial=step, disable=not (progress and world.main), unit="step",
               dynamic_ncols=True)
    metrics = open(run_dir / "metrics.jsonl", "a") if world.main else None
    start = time.perf_counter()
    window_start, window_rows = start, 0
    loss_value, last_eval, stopped = float("nan"), {}, None

    def current_state():
        return {"step": step, "elapsed": elapsed_before + time.perf_counter() - start, "tokens": tokens_seen,
                "optimizer": optimizer.state_dict(), "data": objective.data_state(), "best": dict(best),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def log(record):
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    model.train()
    try:
        while step < t.max_steps:
            lr = lr_at(step, t, elapsed_before + time.perf_counter() - start)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = objective.draw(t.batch_size)
            mine = to_device({k: v[world.rank * per_process:(world.rank + 1) * per_process]
                              for k, v in batch.items()})
            loss_sum = 0.0
            for micro in range(accum_steps):
                chunk = {k: v[micro * t.micro_batch_size:(micro + 1) * t.micro_batch_size] for k, v in mine.items()}
                # Under DDP, only the last micro-batch all-reduces gradients.
                sync = micro == accum_steps - 1 or not world.enabled
                with (contextlib.nullcontext() if sync else forward.no_sync()), world.autocast():
                    loss = objective.loss(forward, chunk)
                (loss / accum_steps).backward()
                loss_sum += loss.detach()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += rows_per_step * objective.tokens_per_row
            window_rows += rows_per_step

            if step % t.log_interval == 0 or step == t.max_steps or on_step is not None:
                loss_value = world.mean(float(loss_sum) / accum_steps)
                now = time.perf_counter()
                rate = window_rows / max(now - window_start, 1e-9)
                window_start, window_rows = now, 0
                record = {"step": step, "loss": loss_value, "lr": lr, "rows_per_s": round(rate, 2),
                          "elapsed": round(elapsed_before + now - start, 3)}
                if objective.tokens_per_row:
                    record.update(tokens=tokens_seen, tokens_per_s=round(rate * objective.tokens_per_row, 1))
                log(record)
                speed = (f"{rate * objective.tokens_per_row:,.0f} tok/s" if objective.tokens_per_row
                         else f"{rate:,.1f} rows/s")
                bar.set_postfix(loss=f"{loss_value:.4f}", speed=speed, refresh=False)
            bar.update(1)

            # Each process reads its own clock; they must agree on the step they stop at.
            over_time = t.time_limit is not None and world.any(
                elapsed_before + time.perf_counter() - start > t.time_limit)
            if over_time:
                stopped = "time_limit"
            last = step == t.max_steps or over_time
            improved = False
            if step % t.eval_interval == 0 or last:
                model.eval()
                with torch.no_grad(), world.autocast():
                    last_eval = objective.evaluate(model)
                model.train()
                log({"step": step, **last_eval, "elapsed": round(elapsed_before + time.perf_counter() - start, 3)})
                if objective.best_metric is not None:
                    value = last_eval[objective.best_metric]
                    sign = 1 if objective.higher_is_better else -1
                    improved = best["value"] is None or sign * (value - best["value"]) > 0
                    if improved:
                        best.update(value=value, step=step, since=0)
                    else:
                        best["since"] += 1
                if world.main:
                    if progress:
                        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                                                                if isinstance(v, float)))
                    plot_losses(run_dir)
            patience_out = bool(t.patience) and best["since"] >= t.patience
            if patience_out:
                stopped = "early_stopping"
            if world.main and improved:
                save_checkpoint(run_dir / "best", objective, None)
                atomic_write_json(run_dir / "best" / "eval.json", {"step": step, **last_eval})
            if step % t.ckpt_interval == 0 or last or patience_out:
                if world.main:
                    save_step_checkpoint(run_dir, objective, current_state(), t.keep_checkpoints)
                world.barrier()
            if on_step is not None:
                on_step(step, loss_value)
            if over_time or patience_out:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    elapsed = elapsed_before + time.perf_counter() - start
    summary = {"run_dir": str(run_dir), "steps": step, "train_loss": loss_value, **last_eval,
               "elapsed_s": round(elapsed, 1), "stopped": stopped, "processes": world.world, "device": str(device)}
    if objective.tokens_per_row:
        summary["tokens"] = tokens_seen
    if objective.best_metric is not None:
        summary.update(best_step=best["step"], best_value=best["value"])
    if world.main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# `lmlab train`: pretraining from a run config

def ensure_data(cfg: RunConfig, world: Dist) -> dict:
    """Prepare the data on first use (rank 0 only; the others wait), then return its meta.json."""
    data_dir = Path(cfg.data.dir)
    if world.main and not (data_dir / "meta.json").exists():
        prepare(cfg.data.source, data_dir, tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size,
                text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction)
    world.barrier()
    return json.loads((data_dir / "meta.json").read_text())


def train(cfg: RunConfig, resume: bool = False, on_step=None, progress: bool = True) -> dict:
    """Pretrain the model of `cfg` on its data (next-token, or masked-LM for an encoder); return a summary."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    world = Dist(t.device, t.dtype)
    try:
        meta = ensure_data(cfg, world)
        encoder = cfg.model.get("causal") is False
        # An encoder's [MASK] is one more token after the tokenizer's vocabulary.
        model_cfg = cfg.model_config(meta["vocab_size"] + (1 if encoder else 0))
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        model = Transformer(model_cfg).to(world.device)
        objective = LanguageModeling(model, load_tokens(cfg.data.dir, "train"), load_tokens(cfg.data.dir, "val"),
                                     t, world)
        run_dir = Path(t.run_dir)
        if not resume and latest_checkpoint(run_dir) is not None:
            raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                             "run folder (--set train.run_dir=...)")
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for name in ("tokenizer.json", "meta.json"):
                shutil.copyfile(Path(cfg.data.dir) / name, run_dir / name)
        summary = fit(objective, t, run_dir, world=world, resume=resume, on_step=on_step, progress=progress)
        summary["params"] = model.num_params()
        if world.main:
            atomic_write_json(run_dir / "summary.json", summary)
        return summary
    finally:
        world.close()
