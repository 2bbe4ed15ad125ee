"""The training log: metrics.jsonl (one JSON record per logged step and per evaluation), the progress bar, and
loss.png (training loss and evaluation curves)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from lmlab.util import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path) -> None:
    """loss.png: training loss and validation loss per step; other evaluation metrics (a fine-tuning run's dev
    accuracy, say) on a second axis."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    other = sorted({k for r in records if "loss" not in r for k, v in r.items()
                    if k not in ("step", "elapsed", "val_loss") and isinstance(v, (int, float))})
    # Imported here, not at the top: matplotlib costs a second at every lmlab command's start. The object API: no
    # pyplot, no GUI backend, nothing global.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
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
    os.replace(tmp, run_dir / "loss.png")


class MetricsLog:
    """What `fit` reports while it trains: records in metrics.jsonl (written by the main process only), the
    progress bar, and loss.png after each evaluation. A resumed run keeps the records up to its checkpoint's step
    (those past it belong to the killed part of the run, which is trained again)."""

    def __init__(self, run_dir: Path, main: bool, progress: bool, total: int, step: int, resumed: bool):
        self.run_dir, self.main, self.progress = run_dir, main, progress
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_metrics(run_dir) if r["step"] <= step] if resumed else []
            atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

        self.bar = tqdm(total=total, initial=step, disable=not (progress and main), unit="step", dynamic_ncols=True)
        self.file = open(run_dir / METRICS_FILE, "a") if main else None
        self.window_start, self.window_rows = time.perf_counter(), 0

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def rows(self, n: int) -> None:
        """n more rows trained (for the speed of the next logged step)."""
        self.window_rows += n

    def train_step(self, step: int, loss: float, lr: float, elapsed: float, tokens_per_row: int, tokens: int):
        """The record of a logged step: loss, learning rate, speed since the last logged step."""
        now = time.perf_counter()
        rate = self.window_rows / max(now - self.window_start, 1e-9)
        self.window_start, self.window_rows = now, 0
        record = {"step": step, "loss": loss, "lr": lr, "rows_per_s": round(rate, 2), "elapsed": round(elapsed, 3)}
        if tokens_per_row:
            record.update(tokens=tokens, tokens_per_s=round(rate * tokens_per_row, 1))
        self.write(record)
        speed = f"{rate * tokens_per_row:,.0f} tok/s" if tokens_per_row else f"{rate:,.1f} rows/s"
        self.bar.set_postfix(loss=f"{loss:.4f}", speed=speed, refresh=False)

    def evaluation(self, step: int, figures: dict, elapsed: float) -> None:
        self.write({"step": step, **figures, "elapsed": round(elapsed, 3)})
        if self.main:
            if self.progress:
                self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()
                                                            if isinstance(v, float)))
            plot_losses(self.run_dir)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
