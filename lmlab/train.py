"""The training loop: next-token prediction on a prepared token stream.

One loop for one process or many: under `torchrun --nproc_per_node N` it wraps the model in DDP (gloo on CPU,
nccl on CUDA). Every process draws the same global batch from the same seeded generator and takes its own rows, so
N processes compute exactly what one process computes with the same global batch (and gradient accumulation).

Run folder layout (`train.run_dir`):
    config.yaml            the resolved run config
    tokenizer.json, meta.json   copied from the prepared data
    metrics.jsonl          one JSON record per logged step and per evaluation
    loss.png               training and validation loss curves
    ckpt/step_0000500/     model.safetensors + config.json (model) + train_state.pt (optimizer, RNG, data position)
    ckpt/latest            name of the newest complete checkpoint

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

from lmlab.config import RunConfig
from lmlab.data import load_tokens, prepare
from lmlab.errors import LmlabError
from lmlab.model import Transformer, TransformerConfig
from lmlab.util import (atomic_write_json, atomic_write_text, load_torch_safe, pick_device, save_safetensors_atomic,
                        save_torch_atomic)


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process.

class Dist:
    def __init__(self, device_name: str):
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


# ----------------------------------------------------------------------------------------------------------------
# Data: random windows of block_size + 1 tokens from a memmapped token stream.

class Batches:
    """Draws global batches of random windows; the generator's state is the data position saved in checkpoints."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        if len(tokens) <= block_size + 1:
            raise LmlabError(f"the split has {len(tokens)} tokens, fewer than block_size+1={block_size + 1}; "
                             "use more data or a smaller model.block_size")
        self.tokens = tokens
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> torch.Tensor:
        """(n, block_size + 1) int64 windows; inputs are [:, :-1], targets [:, 1:]."""
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (n,), generator=self.generator).tolist()
        windows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(windows)


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
    return path if (path / "model.safetensors").exists() else None


def save_checkpoint(run_dir: Path, model: Transformer, train_state: dict, keep: int) -> Path:
    ckpt = checkpoint_dir(run_dir)
    name = f"step_{train_state['step']:07d}"
    final, tmp = ckpt / name, ckpt / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors_atomic(model.weights(), tmp / "model.safetensors")
    atomic_write_json(tmp / "config.json", model.config.to_dict())
    save_torch_atomic(train_state, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"{run_dir.name}: next-token prediction loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


# ----------------------------------------------------------------------------------------------------------------

def ensure_data(cfg: RunConfig, main: bool, world: Dist) -> dict:
    """Prepare the data on first use (rank 0 only; the others wait), then return its meta.json."""
    data_dir = Path(cfg.data.dir)
    if main and not (data_dir / "meta.json").exists():
        prepare(cfg.data.source, data_dir, tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size,
                text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction)
    world.barrier()
    return json.loads((data_dir / "meta.json").read_text())


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, block_size: int, cfg_train, world: Dist, autocast) -> float:
    """Mean loss over eval_batches global batches of fixed windows: the same windows at every evaluation (so the
    curve is comparable across steps) and whatever the process count or micro-batch size."""
    batches = Batches(tokens, block_size, seed=cfg_train.seed + 1)
    per_process = cfg_train.batch_size // world.world
    model.eval()
    losses = []
    for _ in range(cfg_train.eval_batches):
        mine = batches.draw(cfg_train.batch_size)[world.rank * per_process:(world.rank + 1) * per_process]
        for chunk in mine.to(world.device).split(cfg_train.micro_batch_size):
            with autocast():
                _, loss = model(chunk[:, :-1], chunk[:, 1:])
            losses.append(loss.item())
    model.train()
    return world.mean(sum(losses) / len(losses))


def train(cfg: RunConfig, resume: bool = False, on_step=None, progress: bool = True) -> dict:
    """Train as cfg says; return a summary. `on_step(step, loss)` is called after each optimizer step (the
    tests use it to kill a run part-way)."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    world = Dist(t.device)
    device = world.device
    run_dir = Path(t.run_dir)
    try:
        return _train(cfg, t, world, device, run_dir, resume, on_step, progress)
    finally:
        world.close()


def _train(cfg, t, world, device, run_dir, resume, on_step, progress):
    per_process, rest = divmod(t.batch_size, world.world)
    if rest or per_process % t.micro_batch_size:
        raise LmlabError(f"train.batch_size={t.batch_size} must be a multiple of micro_batch_size "
                         f"({t.micro_batch_size}) x processes ({world.world})")
    accum_steps = per_process // t.micro_batch_size

    meta = ensure_data(cfg, world.main, world)
    model_cfg = cfg.model_config(meta["vocab_size"])
    train_tokens = load_tokens(cfg.data.dir, "train")
    val_tokens = load_tokens(cfg.data.dir, "val")

    random.seed(t.seed)
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg).to(device)
    optimizer = make_optimizer(model, t, device)
    batches = Batches(train_tokens, model_cfg.block_size, seed=t.seed)
    step, elapsed_before, tokens_seen = 0, 0.0, 0

    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and world.main:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch")
    if not resume and world.main and latest_checkpoint(run_dir) is not None:
        raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                         "train.run_dir (--set train.run_dir=...)")
    if ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())
        if saved != model_cfg.to_dict():
            raise LmlabError(f"cannot resume {run_dir}: the model config differs from the checkpoint's")
        state = load_torch_safe(ckpt / "train_state.pt")
        model.load_weights(load_file(str(ckpt / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        batches.generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step, elapsed_before, tokens_seen = state["step"], state["elapsed"], state["tokens"]

    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        for name in ("tokenizer.json", "meta.json"):
            shutil.copyfile(Path(cfg.data.dir) / name, run_dir / name)
        # Records past the checkpoint belong to the killed part of the run; the resumed run logs them again.
        kept = [r for r in read_metrics(run_dir) if r["step"] <= step] if ckpt is not None else []
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    forward = torch.compile(model) if t.compile else model
    if world.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)

    tokens_per_step = t.batch_size * model_cfg.block_size
    if world.main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters | {world.world} process(es) on {device} | "
              f"{tokens_per_step} tokens/step ({accum_steps} micro-batch(es) of {t.micro_batch_size}) | "
              f"{'bf16 autocast' if use_bf16 else 'fp32'}{' | compiled' if t.compile else ''}")
    bar = tqdm(total=t.max_steps, initial=step, disable=not (progress and world.main), unit="step",
               dynamic_ncols=True)
    metrics = open(run_dir / "metrics.jsonl", "a") if world.main else None
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    loss_value, val_loss, stopped = float("nan"), None, None

    def current_state():
        return {"step": step, "elapsed": elapsed_before + time.perf_counter() - start, "tokens": tokens_seen,
                "optimizer": optimizer.state_dict(), "data_generator": batches.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def log(record):
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    model.train()
    try:
        while step < t.max_steps:
            lr = lr_at(step, t, elapsed_before + time.perf_counter() - start)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = batches.draw(t.batch_size)[world.rank * per_process:(world.rank + 1) * per_process]
            windows = windows.to(device, non_blocking=True)
            loss_sum = 0.0
            for micro in range(accum_steps):
                chunk = windows[micro * t.micro_batch_size:(micro + 1) * t.micro_batch_size]
                # Under DDP, only the last micro-batch all-reduces gradients.
                sync = micro == accum_steps - 1 or not world.enabled
                with (contextlib.nullcontext() if sync else forward.no_sync()), autocast():
                    _, loss = forward(chunk[:, :-1], chunk[:, 1:])
                (loss / accum_steps).backward()
                loss_sum += loss.detach()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step

            if step % t.log_interval == 0 or step == t.max_steps or on_step is not None:
                loss_value = world.mean(float(loss_sum) / accum_steps)
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                log({"step": step, "loss": loss_value, "lr": lr, "tokens": tokens_seen,
                     "tokens_per_s": round(tps, 1), "elapsed": round(elapsed_before + now - start, 3)})
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)

            # Each process reads its own clock; they must agree on the step they stop at.
            over_time = t.time_limit is not None and world.any(
                elapsed_before + time.perf_counter() - start > t.time_limit)
            if over_time:
                stopped = "time_limit"
            last = step == t.max_steps or over_time
            if step % t.eval_interval == 0 or last:
                val_loss = evaluate(model, val_tokens, model_cfg.block_size, t, world, autocast)
                log({"step": step, "val_loss": val_loss, "elapsed": round(elapsed_before + time.perf_counter() - start, 3)})
                if world.main:
                    if progress:
                        bar.write(f"step {step}: val loss {val_loss:.4f}")
                    plot_losses(run_dir)
            if step % t.ckpt_interval == 0 or last:
                if world.main:
                    save_checkpoint(run_dir, model, current_state(), t.keep_checkpoints)
                world.barrier()
            if on_step is not None:
                on_step(step, loss_value)
            if over_time:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    elapsed = elapsed_before + time.perf_counter() - start
    summary = {"run_dir": str(run_dir), "steps": step, "tokens": tokens_seen, "val_loss": val_loss,
               "train_loss": loss_value, "elapsed_s": round(elapsed, 1), "stopped": stopped,
               "params": model.num_params(), "processes": world.world, "device": str(device)}
    if world.main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary

