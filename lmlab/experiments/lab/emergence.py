"""Experiment 2, emergence and its mirage: `lmlab lab emergence`.

    lmlab lab emergence                    # six GPT sizes x 3 seeds on 3-digit addition, ~3 minutes a seed
    lmlab lab emergence --quick --seeds 0  # tiny sizes, 2-digit operands, one seed, under 30 seconds (the tests)
    lmlab lab emergence --scale gpu        # the GPU ladder, 4-digit operands, more steps

The task: "123+489=" followed by the sum's digits, zero-padded to digits + 1 of them and, by default, written
least significant digit first ("2160" for 0612): then each answer digit depends on the two operand digits at its
place and on the carry out of the digit just written, which the model has already produced, while the usual
order needs the whole carry chain before the first digit (Lee et al. 2023 find reversed sums learnt with far
fewer examples). The six sizes of the ladder (lmlab.experiments.lab.common.LADDERS) train on the same examples
for the same steps; each is scored on held-out pairs never trained on, in one teacher-forced pass:

    exact match       every answer digit the argmax (the same as greedy decoding the whole answer: when each
                      digit is the argmax given the true digits before it, greedy decoding writes exactly those)
    token accuracy    the share of answer digits that are the argmax
    answer log-prob   the log-likelihood of the whole answer, in nats

Schaeffer et al. (2023): exact match is a harsh, nonlinear function of the per-token quality (about p^k for k
answer tokens), so it can jump between two sizes while the per-token metrics improve smoothly. The verdict reads
both curves: the size where exact match crosses 50 % (interpolated in log N), and whether exact match is sharper
than token accuracy, measured as the share of its total rise that falls between one pair of neighbouring sizes.

Each size is trained once per seed (--seeds; a seed draws the examples, the initialisation and the batches, so each
seed is a whole replication of the experiment), and the report gives each metric's mean over the seeds with its
spread (min, max, standard deviation). The verdict is read from the means; beside it, each seed's own verdict, and
the sizes at which a metric's mean falls as N grows (monotonic_exceptions), each named with the size it falls
below.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from lmlab.errors import LmlabError
from lmlab.experiments.lab.common import (LADDERS, RowsObjective, crossing, gpt_config, run_record, run_settings,
                                          seed_list, seed_summary, settings_record, train_once, verdict)
from lmlab.models.checkpoint import load_model
from lmlab.models.transformer import Transformer
from lmlab.training.config import TrainConfig
from lmlab.util import check_flags, pick_device, write_report

VOCAB = "0123456789+="
MAX_DIGITS = 9  # the pairs are drawn as int64 codes below 10^(2 digits), which must stay under 2^63
SHARPER_BY = 0.1  # exact match is "sharper" when its largest step's share exceeds token accuracy's by this much
# A larger size's mean below a smaller one's by less than this is a tie, not an exception to monotonicity (the
# 1-layer sizes sit at the floor of exact match, about 1 %, where seeds move it by this much).
MONOTONE_SLACK = 0.01

# Per scale: operand digits, training pairs, held-out pairs, and the settings every size shares.
SCALES = {
    "quick": (2, 3000, 300, TrainConfig(batch_size=64, micro_batch_size=64, max_steps=80, lr=3e-3, min_lr=3e-4,
                                        warmup_steps=8, eval_interval=40, log_interval=20, ckpt_interval=80)),
    "cpu": (3, 100_000, 2000, TrainConfig(batch_size=128, micro_batch_size=128, max_steps=800, lr=3e-3,
                                          min_lr=3e-4, warmup_steps=50, eval_interval=100, log_interval=50,
                                          ckpt_interval=400)),
    "gpu": (4, 500_000, 5000, TrainConfig(batch_size=256, micro_batch_size=256, max_steps=10_000, lr=1e-3,
                                          min_lr=1e-4, warmup_steps=300, eval_interval=500, log_interval=100,
                                          ckpt_interval=2000)),
}


# ----------------------------------------------------------------------------------------------------------------
# The task

def addition_text(a: int, b: int, digits: int, reverse: bool) -> str:
    """"a+b=" with zero-padded operands, then the sum in digits + 1 digits (least significant first if reverse)."""
    answer = str(a + b).zfill(digits + 1)
    return f"{a:0{digits}d}+{b:0{digits}d}=" + (answer[::-1] if reverse else answer)


def addition_rows(pairs: np.ndarray, digits: int, reverse: bool) -> dict[str, torch.Tensor]:
    """Next-token rows of the pairs: inputs are the text but its last character, targets the text shifted by one,
    -100 everywhere but at the answer's digits (the loss and the scores are the answer's alone)."""
    ids = torch.tensor([[VOCAB.index(c) for c in addition_text(int(a), int(b), digits, reverse)] for a, b in pairs])
    targets = ids[:, 1:].clone()
    targets[:, :2 * digits + 1] = -100  # the prompt "a+b" (the target at "=" is the first answer digit)
    return {"inputs": ids[:, :-1], "targets": targets}


def addition_pairs(digits: int, train: int, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sets of distinct (a, b) pairs of operands below 10^digits: `train` to learn, `held_out` to score."""
    space = 10 ** (2 * digits)
    if train + held_out > space:
        raise LmlabError(f"{digits}-digit addition has {space:,} pairs, fewer than {train + held_out:,} asked for; "
                         "use more digits or fewer examples")
    codes = np.random.default_rng(seed).choice(space, size=train + held_out, replace=False)
    pairs = np.stack([codes // 10 ** digits, codes % 10 ** digits], axis=1)
    return pairs[:train], pairs[train:]


def answer_scores(model, rows: dict[str, torch.Tensor], chunk: int = 512) -> dict[str, float]:
    """Exact match, token accuracy and the answer's log-likelihood (nats) over the rows, in one teacher-forced
    pass (chunked)."""
    exact, correct, digits, logprob = 0, 0, 0, 0.0
    for start in range(0, len(rows["inputs"]), chunk):
        inputs, targets = rows["inputs"][start:start + chunk], rows["targets"][start:start + chunk]
        logits = model(inputs)[0].float()
        scored = targets != -100
        hits = (logits.argmax(-1) == targets) & scored
        exact += int((hits.sum(1) == scored.sum(1)).sum())
        correct, digits = correct + int(hits.sum()), digits + int(scored.sum())
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        logprob -= float(nll)
    rows_n = len(rows["inputs"])
    return {"exact_match": exact / rows_n, "token_accuracy": correct / digits, "answer_logprob": logprob / rows_n}


def digit_accuracy(model, rows: dict[str, torch.Tensor], chunk: int = 512) -> list[float]:
    """The share of the rows whose answer digit at each place (in the order the answer is written) is the argmax,
    in one teacher-forced pass: which of the digits a model has learnt, where token accuracy gives their mean."""
    answer = rows["targets"][0] != -100  # the answer's columns, the same in every row
    hits = [(model(rows["inputs"][s:s + chunk])[0].argmax(-1) == rows["targets"][s:s + chunk])[:, answer]
            for s in range(0, len(rows["inputs"]), chunk)]
    return torch.cat(hits).float().mean(0).tolist()


def final_digit_accuracy(t: TrainConfig, rows: dict[str, torch.Tensor]) -> list[float]:
    """digit_accuracy of a finished run's final weights (its latest checkpoint), in the run's precision: read at
    report time, so that runs trained before it was measured have it too."""
    device = pick_device(t.device)
    model = load_model(t.run_dir, device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if t.dtype == "bfloat16" else contextlib.nullcontext()
    with torch.no_grad(), bf16:
        return digit_accuracy(model, {k: v.to(device) for k, v in rows.items()})


# ----------------------------------------------------------------------------------------------------------------
# The verdict: a pure function of the measured curves

def sharpness(sizes: list[float], values: list[float]) -> float:
    """The share of a curve's total rise (max - min over the sizes) taken by its largest rise between two
    neighbouring sizes: 1 for a step, 1/(k-1) for k sizes evenly spaced on a straight line; 0 for a flat curve
    (a rise under 0.01)."""
    ordered = [v for _, v in sorted(zip(sizes, values))]
    total = max(ordered) - min(ordered)
    if total < 0.01:
        return 0.0
    return max(0.0, max(b - a for a, b in zip(ordered, ordered[1:]))) / total


def emergence_verdict(sizes: list[float], exact_match: list[float], token_accuracy: list[float]) -> dict:
    """Emergence and its mirage, read from the curves: exact match crosses 50 % within the ladder, and it is
    sharper than token accuracy (its largest step between neighbouring sizes takes a larger share of its rise, by
    at least SHARPER_BY)."""
    n50 = crossing(sizes, exact_match, 0.5)
    sharp_em, sharp_tok = sharpness(sizes, exact_match), sharpness(sizes, token_accuracy)
    sharper = bool(sharp_em >= sharp_tok + SHARPER_BY)
    if n50 is None:
        where = (f"exact match never reaches 50 % (best {max(exact_match):.1%})" if max(exact_match) < 0.5
                 else "exact match is above 50 % already at the smallest size")
    else:
        where = f"exact match crosses 50 % at N = {n50:,.0f}"
    how = ("sharper than" if sharper else "no sharper than")
    reading = (f"{where[0].upper() + where[1:]}; it is {how} token accuracy (largest step {sharp_em:.2f} of its "
               f"rise against {sharp_tok:.2f}).")
    record = verdict(n50 is not None and sharper,
                     f"exact match crosses 50 % within the ladder and its largest step between neighbouring sizes "
                     f"takes a share of its rise >= token accuracy's + {SHARPER_BY}", n50, reading)
    return {**record, "sharpness": {"exact_match": float(sharp_em), "token_accuracy": float(sharp_tok)},
            "sharper": sharper}


def monotonic_exceptions(runs: list[dict], metric: str, slack: float = MONOTONE_SLACK) -> list[dict]:
    """The sizes at which a metric's mean over the seeds falls below the best mean of a smaller size by more than
    `slack` (higher is better for all three metrics): each with the size it falls below, the fall, and whether
    the two are apart across the seeds too (every seed of the larger size below every seed of the smaller)."""
    exceptions, best = [], None
    for r in sorted(runs, key=lambda r: r["params"]):
        if best is not None and r[metric] < best[metric] - slack:
            exceptions.append({"size": r["name"], "mean": r[metric], "below": best["name"], "best": best[metric],
                               "fall": best[metric] - r[metric],
                               "apart": r["spread"][metric]["max"] < best["spread"][metric]["min"]})
        if best is None or r[metric] > best[metric]:
            best = r
    return exceptions


# ----------------------------------------------------------------------------------------------------------------
# The experiment

def lab_emergence(digits: int | None = None, reverse: bool = True, scale: Literal["cpu", "gpu"] = "cpu",
                  quick: bool = False, out: str = "runs/lab/emergence", work: str = "runs/lab/emergence-work",
                  threads: int | None = None, seeds: str = "0,1,2", steps: int | None = None,
                  dtype: Literal["auto", "float32", "bfloat16"] = "auto", device: str = "auto",
                  progress: bool = True, command: str | None = None) -> dict:
    """Emergence and its mirage: six GPT sizes on multi-digit addition, exact match against per-token metrics,
    each size trained once per seed and reported as the mean over the seeds with their spread.

    Args:
        digits: operand digits (default: 3 on the CPU, 4 on a GPU, 2 with --quick)
        reverse: write the sum least significant digit first (--no-reverse: the usual order)
        scale: cpu (about 3 minutes a seed on one core) or gpu (the GPU ladder, more steps)
        quick: tiny sizes, 2-digit operands and 80 steps, under 30 seconds a seed (the tests)
        out: folder for emergence.json, emergence.md and emergence.png
        work: folder for the runs, one a seed and size (a finished run is read back, an interrupted one resumed)
        threads: CPU threads for torch (1 is fastest on a busy machine)
        seeds: comma-separated seeds, one run of the ladder each; a seed draws the examples, the initialisation
            and the batches
        steps: training steps of every size instead of the scale's (800; quick: 80; gpu: 10,000), with the
            learning-rate schedule stretched to them
        dtype: auto (bf16 autocast where the hardware has bf16, else fp32) | float32 | bfloat16
        device: auto | cpu | cuda | mps
        progress: show each run's progress bar
    """
    check_flags(("--digits", digits, digits is None or 1 <= digits <= MAX_DIGITS,
                 f"between 1 and {MAX_DIGITS} (or leave it out for the scale's)"),
                ("--threads", threads, threads is None or threads >= 1, "at least 1"),
                ("--steps", steps, steps is None or steps >= 1, "at least 1 (or leave it out for the scale's)"))
    seed_values = seed_list(seeds)
    level = "quick" if quick else scale
    default_digits, n_train, n_held_out, base = SCALES[level]
    digits = default_digits if digits is None else digits
    # Other steps are other runs: their folders are named apart, since a finished run is read back as it is.
    ladder = f"{level}-{digits}d{'-reversed' if reverse else ''}"
    if steps is not None and steps != base.max_steps:
        base = replace(base, max_steps=steps, warmup_steps=min(base.warmup_steps, steps),
                       ckpt_interval=min(base.ckpt_interval, steps))
        ladder = f"{ladder}-{steps}steps"
    figures = ("exact_match", "token_accuracy", "answer_logprob", "val_loss", "elapsed_s")
    by_size: dict[str, list[dict]] = {size.name: [] for size in LADDERS[level]}
    for seed in seed_values:  # seed by seed, so that an interrupted run has whole ladders done first
        train_pairs, held_out_pairs = addition_pairs(digits, n_train, n_held_out, seed)
        train_rows = addition_rows(train_pairs, digits, reverse)
        held_out = addition_rows(held_out_pairs, digits, reverse)
        block_size = train_rows["inputs"].shape[1]
        for size in LADDERS[level]:
            folder = Path(work) / f"seed{seed}" / ladder / size.name
            t = run_settings(replace(base, device=device, eval_batches=1), folder, threads, seed, dtype)

            def build(world, size=size, t=t, train_rows=train_rows, held_out=held_out, block_size=block_size):
                model = Transformer(gpt_config(size, len(VOCAB), block_size)).to(world.device)
                return RowsObjective(model, train_rows, held_out, t.seed, score=answer_scores)

            summary = train_once(t, build, progress)
            row = run_record(size, summary, figures, ("step", "exact_match", "token_accuracy"))
            by_size[size.name].append({**row, "digit_accuracy": final_digit_accuracy(t, held_out)})
    runs = [seed_summary(records, seed_values, figures) for records in by_size.values()]
    sizes = [r["params"] for r in runs]
    # The verdict reads the means over the seeds; each seed's own verdict and the monotonicity of the means in N
    # are recorded beside it.
    record = emergence_verdict(sizes, [r["exact_match"] for r in runs], [r["token_accuracy"] for r in runs])
    per_seed = []
    for i, seed in enumerate(seed_values):
        own = emergence_verdict(sizes, [r["seeds"][i]["exact_match"] for r in runs],
                                [r["seeds"][i]["token_accuracy"] for r in runs])
        per_seed.append({"seed": seed, "appeared": own["appeared"], "value": own["value"]})
    monotonic = {m: monotonic_exceptions(runs, m) for m in ("exact_match", "token_accuracy", "answer_logprob")}
    settings = {k: v for k, v in settings_record(t, threads, seed_values[0]).items() if k != "seed"}
    summary = {"experiment": "emergence", "verdict": record, "verdict_per_seed": per_seed,
               "monotonic_exceptions": monotonic, "runs": runs,
               "settings": {"scale": level, "digits": digits, "reverse": reverse, "answer_digits": digits + 1,
                            "train_pairs": n_train, "held_out_pairs": n_held_out, **settings, "seeds": seed_values},
               "command": command}
    print(write_report(out, "emergence", summary, emergence_markdown(summary), plot_emergence))
    return summary


def emergence_markdown(summary: dict) -> str:
    s, v = summary["settings"], summary["verdict"]
    order = "least significant digit first" if s["reverse"] else "most significant digit first"
    seeds = s["seeds"]

    def spread(r, k, fmt):  # the mean, and with several seeds its range
        lo, hi = r["spread"][k]["min"], r["spread"][k]["max"]
        return f"{r[k]:{fmt}}" + (f" [{lo:{fmt}}, {hi:{fmt}}]" if len(seeds) > 1 else "")

    lines = [f"{s['digits']}-digit addition, the {s['answer_digits']}-digit sum {order}; {s['train_pairs']:,} training "
             f"pairs, {s['held_out_pairs']:,} held-out pairs scored; {s['steps']} steps of {s['batch_size']} "
             f"examples, {s['dtype']}; seeds {', '.join(map(str, seeds))} (each a whole run of the ladder: examples, "
             "initialisation, batches).", "",
             (f"Each figure is the mean over the {len(seeds)} seeds, with the seeds' [min, max]; minutes are the "
              "seeds' total." if len(seeds) > 1 else "One seed: each figure is its run's."), "",
             "| size | layers | width | N (non-embedding) | exact match | token accuracy | token acc.^k | "
             "answer log-prob (nats) | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        minutes = sum(x["elapsed_s"] for x in r["seeds"]) / 60
        lines.append(f"| {r['name']} | {r['n_layer']} | {r['n_embd']} | {r['params']:,} | "
                     f"{spread(r, 'exact_match', '.3f')} | {spread(r, 'token_accuracy', '.3f')} | "
                     f"{r['token_accuracy'] ** s['answer_digits']:.3f} | {spread(r, 'answer_logprob', '.3f')} | "
                     f"{minutes:.1f} |")
    lines += ["", "Each seed's exact match, and in brackets the accuracy of each answer digit (in the order written) "
              "of its final weights:", "", "| size | " + " | ".join(f"seed {x}" for x in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    lines += [f"| {r['name']} | " + " | ".join(f"{x['exact_match']:.3f} ("
                                               + " ".join(f"{d:.2f}" for d in x["digit_accuracy"]) + ")"
                                               for x in r["seeds"]) + " |" for r in summary["runs"]]
    n50 = f"N = {v['value']:,.0f}" if v["value"] is not None else "none"
    lines += ["", f"token acc.^k: exact match if the k = {s['answer_digits']} answer digits were right independently "
              "(from the mean token accuracy).",
              "", f"Sharpness of the means (largest step between neighbouring sizes / total rise): exact match "
              f"{v['sharpness']['exact_match']:.2f}, token accuracy {v['sharpness']['token_accuracy']:.2f}.",
              f"Mean exact match crosses 50 %: {n50}.", ""]
    for name, m in (("exact match", "exact_match"), ("token accuracy", "token_accuracy"),
                    ("answer log-prob", "answer_logprob")):
        found = summary["monotonic_exceptions"][m]
        falls = "; ".join(f"{e['size']} ({e['mean']:.3f}) below {e['below']} ({e['best']:.3f}), "
                          f"{'every seed below every seed' if e['apart'] else 'the seeds overlap'}" for e in found)
        lines.append(f"Monotonic in N, mean {name}: " + (f"no: {falls}." if found else "yes."))
    own = ", ".join(f"seed {x['seed']} {'appeared' if x['appeared'] else 'did not appear'}"
                    + (f" (50 % at N = {x['value']:,.0f})" if x["value"] is not None else "")
                    for x in summary["verdict_per_seed"])
    lines += ["", f"Verdict on the means ({v['criterion']}): {'appeared' if v['appeared'] else 'did not appear'}. "
              f"{v['reading']}", "", f"Each seed's own verdict: {own}."]
    return "\n".join(lines) + "\n"


def plot_emergence(summary: dict, path: Path) -> None:
    """Left: the three metrics' means against N with the seeds' range as error bars (log-likelihood on its own
    axis); right: exact match over training for each size, each seed a thin line and the mean a thick one."""
    runs, s, v = summary["runs"], summary["settings"], summary["verdict"]
    fig = Figure(figsize=(12, 4.6))
    left, right = fig.subplots(1, 2)
    sizes = [r["params"] for r in runs]

    def with_range(ax, metric, fmt, shift, **style):  # the mean, and the seeds' min to max as an error bar
        means = np.array([r[metric] for r in runs])
        lo = means - np.array([r["spread"][metric]["min"] for r in runs])
        hi = np.array([r["spread"][metric]["max"] for r in runs]) - means
        # the three metrics' bars set a little apart in N, so that they do not hide one another
        return ax.errorbar(np.array(sizes) * shift, means, yerr=np.stack([lo, hi]), fmt=fmt, capsize=3, **style)

    seeds = len(s["seeds"])
    over = f" (mean of {seeds} seeds, bars: min-max)" if seeds > 1 else ""
    with_range(left, "exact_match", "o-", 1.0, color="C3", linewidth=2, label="exact match" + over)
    with_range(left, "token_accuracy", "s-", 0.93, color="C0", label="token accuracy")
    left.plot(sizes, [r["token_accuracy"] ** s["answer_digits"] for r in runs], ":", color="C0",
              label=f"token accuracy^{s['answer_digits']} (independent digits)")
    if v["value"] is not None:
        left.axvline(v["value"], linestyle="--", color="C3", linewidth=0.8, label=f"50 % at N = {v['value']:,.0f}")
    left.set_xscale("log")
    left.set(xlabel="non-embedding parameters N", ylabel="accuracy on held-out sums", ylim=(-0.02, 1.02),
             title=f"{s['digits']}-digit addition: three metrics of the same models")
    loglik = left.twinx()
    with_range(loglik, "answer_logprob", "^--", 1.07, color="C2", label="answer log-prob (right)")
    loglik.set_xscale("log")
    loglik.set_ylabel("log-likelihood of the answer (nats)")
    handles = [h for ax in (left, loglik) for h in ax.get_legend_handles_labels()[0]]
    left.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    for i, r in enumerate(runs):
        curves = [x["curve"] for x in r["seeds"]]
        for curve in curves:
            right.plot([p["step"] for p in curve], [p["exact_match"] for p in curve], "-", color=f"C{i}",
                       linewidth=0.7, alpha=0.5 if seeds > 1 else 1)
        if seeds > 1:  # at the steps every seed evaluated (a resumed run may have evaluated one step twice)
            by_step = [{p["step"]: p["exact_match"] for p in c} for c in curves]
            steps = sorted(set.intersection(*(set(c) for c in by_step)))
            right.plot(steps, [np.mean([c[x] for c in by_step]) for x in steps], "-", color=f"C{i}", linewidth=2)
        right.plot([], [], "-", color=f"C{i}", linewidth=2, label=f"{r['name']} ({r['params']:,})")
    right.set(xlabel="optimizer step", ylabel="exact match (held out)", ylim=(-0.02, 1.02),
              title="exact match during training" + (" (thin: each seed, thick: mean)" if seeds > 1 else ""))
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
