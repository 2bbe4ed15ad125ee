"""Experiment 1, the scaling law: `lmlab lab scaling`.

    lmlab lab scaling                      # six GPTs on Shakespeare (BPE 2048), under 10 minutes on an idle core
    lmlab lab scaling --quick              # six tiny GPTs, under 2 minutes (the tests)
    lmlab lab scaling --scale gpu          # a ladder 12x to 38M non-embedding parameters, for a GPU

Six GPTs of the shared Block (lmlab.experiments.lab.common.LADDERS), from 12.8k to 456k non-embedding parameters
on the CPU ladder, train on the same tokens (the same seed draws the same windows, so every size sees the same
batches) for the same number of steps through the one training loop. The final validation loss L of each size N
is fitted by L(N) = E + A / N^alpha (Kaplan et al. 2020; E is the irreducible loss) by least squares: alpha on a
grid refined by golden section, E and A in closed form for each alpha. The verdict is the fit's R^2 >= 0.95.

The IsoFLOP view (Hoffmann et al. 2022) reads, for three compute budgets C = 6 N D, the validation loss of each
size at D = C / 6N tokens from its own curve (interpolated in log C; one run per size), and names the size with
the lowest loss at each budget. Each run decays its learning rate over the whole run, so a curve's early points
were not annealed: the read-off is the cheap approximation of training a model to exactly D tokens, and it
favours the smaller sizes, which reach the budget at the end of their runs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lmlab.data.corpus import load_meta, load_tokens, prepare
from lmlab.errors import LmlabError
from lmlab.experiments.lab.common import (LADDERS, gpt_config, run_record, run_settings, settings_record, train_once,
                                          verdict)
from lmlab.models.transformer import Transformer
from lmlab.training.config import TrainConfig
from lmlab.training.pretrain import LanguageModeling
from lmlab.util import check_flags, write_report

R2_NEEDED = 0.95

# Per scale: the context, the training settings every size shares, and the BPE vocabulary.
SCALES = {
    "quick": (64, TrainConfig(batch_size=16, micro_batch_size=16, max_steps=60, lr=3e-3, min_lr=3e-4,
                              warmup_steps=6, eval_interval=15, eval_batches=2, log_interval=15, ckpt_interval=60)),
    "cpu": (128, TrainConfig(batch_size=16, micro_batch_size=16, max_steps=600, lr=2e-3, min_lr=2e-4,
                             warmup_steps=30, eval_interval=50, eval_batches=8, log_interval=25, ckpt_interval=200)),
    "gpu": (256, TrainConfig(batch_size=64, micro_batch_size=64, max_steps=5000, lr=1e-3, min_lr=1e-4,
                             warmup_steps=200, eval_interval=250, eval_batches=20, log_interval=50,
                             ckpt_interval=1000)),
}


# ----------------------------------------------------------------------------------------------------------------
# The fit and the verdict: pure functions of the measured sizes and losses

def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(E, A, squared error) of y = E + A x by least squares, with A >= 0 and E >= 0 (a loss is not negative)."""
    design = np.stack([np.ones_like(x), x], axis=1)
    (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    if a < 0:  # the best non-increasing fit is flat
        e, a = float(y.mean()), 0.0
    if e < 0:
        e, a = 0.0, float(max(0.0, (x @ y) / (x @ x)))
    return float(e), float(a), float(((e + a * x - y) ** 2).sum())


def fit_power_law(sizes: list[float], losses: list[float]) -> dict:
    """L(N) = E + A / N^alpha by least squares: for each alpha, E and A in closed form (_linear_fit); alpha on a
    grid over (0, 3], then refined by golden-section search. Returns E, A, alpha and R^2 (1 - residual / total
    sum of squares of the losses; 0 when the losses do not vary)."""
    n = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(n) < 3 or np.any(n <= 0) or not np.all(np.isfinite(y)):
        raise LmlabError("a power-law fit needs at least 3 sizes with positive parameter counts and finite losses")
    scale = n.min()  # N / N_min keeps N^-alpha near 1 whatever the units

    def error(alpha: float) -> float:
        return _linear_fit((n / scale) ** -alpha, y)[2]

    grid = np.linspace(0.005, 3.0, 600)
    best = int(np.argmin([error(a) for a in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a1, a2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        lo, hi = (lo, a2) if error(a1) < error(a2) else (a1, hi)
    alpha = (lo + hi) / 2
    e, a, residual = _linear_fit((n / scale) ** -alpha, y)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 0.0
    return {"E": e, "A": a * scale ** alpha, "alpha": float(alpha) if a > 0 else 0.0, "r2": float(r2)}


def scaling_verdict(sizes: list[float], losses: list[float]) -> dict:
    """The verdict on measured (N, final loss) pairs: a power law with alpha > 0 fits with R^2 >= 0.95."""
    fit = fit_power_law(sizes, losses)
    appeared = fit["r2"] >= R2_NEEDED and fit["alpha"] > 0
    span = max(sizes) / min(sizes)
    if appeared:
        reading = (f"Over a {span:.0f}x span of sizes the loss falls as a power law, L(N) = {fit['E']:.2f} + "
                   f"{fit['A']:.3g} / N^{fit['alpha']:.2f}, which explains {100 * fit['r2']:.1f} % of its variance.")
    elif fit["alpha"] == 0 or fit["A"] == 0:
        reading = f"The loss does not fall with size over a {span:.0f}x span: no power law to fit."
    else:
        reading = (f"A power law in N explains only {100 * fit['r2']:.1f} % of the loss's variance over a {span:.0f}x "
                   f"span (alpha {fit['alpha']:.2f}); the losses do not follow L(N) = E + A / N^alpha.")
    return {**verdict(appeared, f"R^2 >= {R2_NEEDED} (and alpha > 0) for L(N) = E + A / N^alpha",
                      round(fit["r2"], 4), reading), "fit": fit}


def _loss_at(curve: list[tuple[float, float]], flops: float) -> float | None:
    """The loss of a (compute, loss) curve at `flops`, interpolated linearly in log compute; None outside it."""
    for (c0, l0), (c1, l1) in zip(curve, curve[1:]):
        if c0 <= flops <= c1:
            share = (math.log(flops) - math.log(c0)) / (math.log(c1) - math.log(c0)) if c1 > c0 else 0.0
            return l0 + share * (l1 - l0)
    return None


def isoflop(runs: list[dict], budgets: int = 3) -> list[dict]:
    """For `budgets` compute budgets C = 6 N D, the loss of each size at D = C / 6N from its curve, and the size
    with the lowest. The budgets are spaced evenly in log C over the range where at least three sizes' curves
    reach (two when no range has three)."""
    curves = {r["name"]: [(6 * r["params"] * p["tokens"], p["val_loss"]) for p in r["curve"] if p["tokens"] > 0]
              for r in runs}
    spans = [(c[0][0], c[-1][0]) for c in curves.values() if c]
    grid = np.geomspace(min(s[0] for s in spans), max(s[1] for s in spans), 400)
    for enough in (3, 2, 1):
        covered = [c for c in grid if sum(lo <= c <= hi for lo, hi in spans) >= enough]
        if covered:
            break
    lo, hi = math.log(covered[0]), math.log(covered[-1])
    rows = []
    for k in range(budgets):
        flops = math.exp(lo + (k + 0.5) / budgets * (hi - lo))
        losses = {name: _loss_at(c, flops) for name, c in curves.items()}
        losses = {name: v for name, v in losses.items() if v is not None}
        best = min(losses, key=losses.get)
        params = next(r["params"] for r in runs if r["name"] == best)
        rows.append({"flops": flops, "losses": losses, "best": best, "best_params": params,
                     "best_tokens": flops / (6 * params)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The experiment

def _data(source: str, tokenizer: str, vocab_size: int, work: Path) -> Path:
    """The prepared corpus in WORK/data (prepared on first use; a folder prepared from another source is refused)."""
    folder = work / "data"
    if not (folder / "meta.json").is_file():
        prepare(source, folder, tokenizer=tokenizer, vocab_size=vocab_size)
    meta = load_meta(folder)
    if meta["source"]["name"] != str(source) or (tokenizer == "bpe" and meta.get("vocab_size_requested") != vocab_size):
        raise LmlabError(f"{folder} holds {meta['source']['name']} ({meta['tokenizer']}, {meta['vocab_size']} tokens), "
                         f"not {source} ({tokenizer}, {vocab_size}); pass another --work folder")
    return folder


def lab_scaling(source: str = "shakespeare", tokenizer: str = "bpe", vocab_size: int = 2048,
                scale: Literal["cpu", "gpu"] = "cpu", quick: bool = False, out: str = "runs/lab/scaling",
                work: str = "runs/lab/scaling-work", threads: int | None = None, seed: int = 0,
                dtype: Literal["auto", "float32", "bfloat16"] = "auto",
                device: str = "auto", progress: bool = True, command: str | None = None) -> dict:
    """The scaling law: six GPT sizes on the same tokens, L(N) = E + A / N^alpha with R^2, and the IsoFLOP view.

    Args:
        source: the corpus, anything lmlab prepare reads ('shakespeare', a .txt file or folder, .jsonl, .parquet)
        tokenizer: bpe | char | path to a tokenizer.json
        vocab_size: the BPE vocabulary size
        scale: cpu (under 10 minutes on an idle core) or gpu (a ladder up to 38M non-embedding parameters)
        quick: six tiny sizes and 60 steps, under 2 minutes (the tests)
        out: folder for scaling.json, scaling.md and scaling.png
        work: folder for the prepared data and the runs (a finished run is read back, not trained again)
        threads: CPU threads for torch (1 is fastest on a busy machine)
        seed: the seed of the initialisation and of the batches (every size sees the same batches)
        dtype: auto (bf16 autocast where the hardware has bf16, else fp32) | float32 | bfloat16
        device: auto | cpu | cuda | mps
        progress: show each run's progress bar
    """
    check_flags(("--threads", threads, threads is None or threads >= 1, "at least 1"))
    level = "quick" if quick else scale
    block_size, base = SCALES[level]
    work_dir = Path(work)
    data = _data(source, tokenizer, vocab_size, work_dir)
    meta = load_meta(data)
    splits = load_tokens(data, "train"), load_tokens(data, "val")
    runs = []
    for size in LADDERS[level]:
        t = run_settings(replace(base, device=device), work_dir / level / size.name, threads, seed, dtype)

        def build(world, size=size, t=t):
            model = Transformer(gpt_config(size, meta["vocab_size"], block_size)).to(world.device)
            return LanguageModeling(model, *splits, t, world)

        summary = train_once(t, build, progress)
        runs.append(run_record(size, summary, ("tokens", "val_loss", "elapsed_s"), ("tokens", "val_loss")))
    result = scaling_verdict([r["params"] for r in runs], [r["val_loss"] for r in runs])
    summary = {"experiment": "scaling", "verdict": {k: result[k] for k in ("appeared", "criterion", "value",
                                                                             "reading")},
               "fit": result["fit"], "isoflop": isoflop(runs), "runs": runs,
               "settings": {"scale": level, "source": source, "tokenizer": meta["tokenizer"],
                            "vocab_size": meta["vocab_size"], "block_size": block_size,
                            **settings_record(t, threads, seed)},
               "command": command}
    print(write_report(out, "scaling", summary, scaling_markdown(summary), plot_scaling))
    return summary


def scaling_markdown(summary: dict) -> str:
    fit, s, v = summary["fit"], summary["settings"], summary["verdict"]
    lines = [f"GPTs on {s['source']} ({s['tokenizer']}, {s['vocab_size']} tokens), {s['steps']} steps of "
             f"{s['batch_size']} x {s['block_size']} tokens each, {s['dtype']}.", "",
             "| size | layers | width | N (non-embedding) | tokens | val loss | minutes |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['name']} | {r['n_layer']} | {r['n_embd']} | {r['params']:,} | {r['tokens']:,} | "
                     f"{r['val_loss']:.4f} | {r['elapsed_s'] / 60:.1f} |")
    lines += ["", f"Fit: L(N) = {fit['E']:.3f} + {fit['A']:.4g} / N^{fit['alpha']:.3f}, R^2 = {fit['r2']:.4f}.", "",
              "IsoFLOP (C = 6 N D; each size's loss at D = C / 6N, read from its validation curve):", "",
              "| budget C (FLOPs) | " + " | ".join(r["name"] for r in summary["runs"]) + " | lowest |",
              "|---|" + "---|" * (len(summary["runs"]) + 1)]
    for b in summary["isoflop"]:
        cells = [f"{b['losses'][r['name']]:.3f}" if r["name"] in b["losses"] else "-" for r in summary["runs"]]
        lines.append(f"| {b['flops']:.3g} | " + " | ".join(cells) + f" | {b['best']} ({b['best_params']:,}) |")
    lines += ["", f"Verdict ({v['criterion']}): {'appeared' if v['appeared'] else 'did not appear'}, R^2 = "
              f"{v['value']}. {v['reading']}"]
    return "\n".join(lines) + "\n"


def plot_scaling(summary: dict, path: Path) -> None:
    """Three panels: loss against N with the fitted law (log-log), each size's loss against compute with the
    budgets, and the IsoFLOP profiles (loss against N at each budget)."""
    runs, fit = summary["runs"], summary["fit"]
    fig = Figure(figsize=(15, 4.4))
    law, curves, profiles = fig.subplots(1, 3)
    sizes = np.array([r["params"] for r in runs], dtype=float)
    line = np.geomspace(sizes.min() / 1.5, sizes.max() * 1.5, 100)
    law.loglog(sizes, [r["val_loss"] for r in runs], "o", label="final validation loss")
    law.loglog(line, fit["E"] + fit["A"] * line ** -fit["alpha"], "-",
               label=f"{fit['E']:.2f} + {fit['A']:.3g} N^-{fit['alpha']:.2f} (R^2 {fit['r2']:.3f})")
    law.axhline(fit["E"], linestyle=":", color="grey", label=f"E = {fit['E']:.2f}")
    law.set(xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)", title="L(N)")
    for i, r in enumerate(runs):
        flops = [6 * r["params"] * p["tokens"] for p in r["curve"] if p["tokens"] > 0]
        curves.loglog(flops, [p["val_loss"] for p in r["curve"] if p["tokens"] > 0], "-", color=f"C{i}",
                      label=f"{r['name']} ({r['params']:,})")
    for k, b in enumerate(summary["isoflop"]):
        curves.axvline(b["flops"], linestyle="--", color="grey", linewidth=0.8)
        points = sorted((next(r["params"] for r in runs if r["name"] == n), v) for n, v in b["losses"].items())
        profiles.semilogx(*zip(*points), "o-", color=f"C{k}", label=f"C = {b['flops']:.2g}")
        profiles.semilogx(b["best_params"], b["losses"][b["best"]], "*", color=f"C{k}", markersize=14)
    curves.set(xlabel="training compute C = 6 N D (FLOPs)", ylabel="validation loss", title="loss against compute")
    profiles.set(xlabel="non-embedding parameters N", ylabel="validation loss at the budget",
                 title="IsoFLOP profiles (star: lowest)")
    for ax in (law, curves, profiles):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())  # log x: label the decades only
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))  # log y spans less than a decade: plain numbers
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
