"""Experiment 4: grokking (Power et al. 2022). `lmlab lab grokking`

Modular addition: every pair (a, b) of 0..p-1 is a sequence `a b =` (token p is "="), whose answer (a + b) mod p
is predicted at "=". A seeded random `train_fraction` of the p^2 pairs is the training set, the rest the test set.
A small Transformer (the shared Block: 1 layer, pre-norm LayerNorm, GELU MLP, learned positions, untied head)
trains on the whole training set at every step (full batch) through the one training loop, with AdamW and strong
weight decay (1.0, Nanda et al. 2023's setting) at a constant learning rate after a short warmup. The model first
memorises the training set, and only much later, as weight decay shrinks the memorising weights, does test
accuracy jump: it has found the general algorithm.

Reported: the step where train accuracy first reaches 99 %, the step where test accuracy first does (or the most
it reached), their ratio, and the curves on a log-step axis (with the parameters' L2 norm, which falls as the
model generalises).

Verdict (`judge`, a pure function of the curves): both reach 99 % and the test step is at least 5 x the train step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from lmlab.experiments.lab.common import first_step, train_run, verdict
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training.config import TrainConfig
from lmlab.training.loop import Objective
from lmlab.util import check_flags, pick_device, write_report

NAME = "grokking"
REACHED, MIN_RATIO = 0.99, 5.0


@dataclass(frozen=True)
class Size:
    """The task (prime, train fraction), the model and the training budget."""
    p: int = 113
    train_fraction: float = 0.3
    n_layer: int = 1
    n_embd: int = 64
    n_head: int = 4
    steps: int = 3000
    lr: float = 3e-3
    weight_decay: float = 1.0
    eval_interval: int = 25


SIZES = {"default": Size(), "gpu": Size(n_embd=128, lr=1e-3, steps=20000, eval_interval=50)}
QUICK = Size(p=23, train_fraction=0.5, n_embd=32, steps=400, lr=3e-3, eval_interval=10)


def split(p: int, train_fraction: float, seed: int):
    """(inputs, answers) of the training and the test pairs: `a b =` as token ids, and (a + b) mod p."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    inputs = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    answers = (a.flatten() + b.flatten()) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * p * p)
    train, test = order[:n_train], order[n_train:]
    return (inputs[train], answers[train]), (inputs[test], answers[test])


class ModularAddition(Objective):
    """The whole training set at every step; evaluated on both sets (accuracy and cross-entropy at "=")."""

    best_metric = None

    def __init__(self, model: Transformer, size: Size, seed: int):
        self.model = model
        self.train, self.test = split(size.p, size.train_fraction, seed)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.train[0][:n], "answers": self.train[1][:n]}

    def loss(self, module, batch):
        logits, _ = module(batch["inputs"], last_only=True)
        return F.cross_entropy(logits[:, -1].float(), batch["answers"])

    def evaluate(self, model) -> dict[str, float]:
        figures = {}
        device = model.tok_emb.weight.device
        for name, (inputs, answers) in (("train", self.train), ("test", self.test)):
            inputs, answers = inputs.to(device), answers.to(device)
            logits = model(inputs, last_only=True)[0][:, -1].float()
            figures[f"{name}_accuracy"] = float((logits.argmax(-1) == answers).float().mean())
            figures[f"{name}_ce"] = float(F.cross_entropy(logits, answers))
        figures["weight_norm"] = float(torch.sqrt(sum((p.float() ** 2).sum() for p in model.parameters())))
        return figures


def judge(steps: list[int], train_accuracy: list[float], test_accuracy: list[float]) -> dict:
    """The verdict from the curves alone: the steps where train and test accuracy first reach 99 %, their ratio."""
    train_step = first_step(steps, train_accuracy, REACHED)
    test_step = first_step(steps, test_accuracy, REACHED)
    ratio = test_step / train_step if train_step and test_step else None
    appeared = ratio is not None and ratio >= MIN_RATIO
    value = {"train_step": train_step, "test_step": test_step, "ratio": None if ratio is None else round(ratio, 2),
             "max_test_accuracy": round(max(test_accuracy), 4), "max_train_accuracy": round(max(train_accuracy), 4)}
    if train_step is None:
        reading = f"Train accuracy never reached 99 % (at most {max(train_accuracy):.1%}): nothing was memorised."
    elif test_step is None:
        reading = (f"Train accuracy reached 99 % at step {train_step}; test accuracy reached at most "
                   f"{max(test_accuracy):.1%}, never 99 %: no grokking within {steps[-1]} steps.")
    else:
        reading = (f"Train accuracy reached 99 % at step {train_step}, test accuracy at step {test_step}, "
                   f"{ratio:.1f}x later: {'grokking' if appeared else 'generalisation came too soon for grokking'}.")
    return verdict(appeared, f"train and test accuracy both reach {REACHED:.0%}, the test step >= {MIN_RATIO:g}x the "
                   "train step", value, reading)


def model_config(size: Size) -> TransformerConfig:
    return TransformerConfig(vocab_size=size.p + 1, block_size=3, n_layer=size.n_layer, n_head=size.n_head,
                             n_embd=size.n_embd, dropout=0.0, bias=False, tie_embeddings=False)


def grokking(quick: bool = False, size: Literal["default", "gpu"] = "default", out: str = "runs/lab/grokking",
             work: str = "runs/lab/grokking/work", threads: int | None = None, seed: int = 0, device: str = "cpu",
             dtype: Literal["float32", "bfloat16"] = "float32", steps: int | None = None,
             minutes: float | None = None, progress: bool = True, command: str | None = None) -> str:
    """Experiment 4: grokking on modular addition, train accuracy long before test accuracy.

    Args:
        quick: a small run (p = 23, under a minute on 2 cores; for tests)
        size: default (p = 113, a 64-wide model, 3,000 steps) or gpu (p = 113, 128 wide, Nanda et al.'s lr 1e-3,
            20,000 steps)
        out: the folder for grokking.json, grokking.md and grokking.png
        work: the folder of the training run (resumed when run again)
        threads: CPU threads for torch (1 on a loaded machine)
        seed: seed of the split and the model
        device: cpu | cuda | mps | auto
        dtype: float32, or bfloat16 autocast (fp32 master weights)
        steps: training steps instead of the size's (3,000; quick: 400)
        minutes: stop training after this many minutes (a loaded machine); the report covers the steps made
        progress: show the progress bar
    """
    check_flags(("--steps", steps, steps is None or steps >= 1, "at least 1 (or leave it out for the size's)"),
                ("--minutes", minutes, minutes is None or minutes > 0, "a positive time (or leave it out)"),
                ("--threads", threads, threads is None or threads >= 1, "at least 1"))
    chosen = QUICK if quick else SIZES[size]
    if steps is not None:
        chosen = replace(chosen, steps=steps)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = Transformer(model_config(chosen)).to(pick_device(device))
    objective = ModularAddition(model, chosen, seed)
    n_train = len(objective.train[1])
    t = TrainConfig(run_dir=str(Path(work) / f"p{chosen.p}"), batch_size=n_train, micro_batch_size=n_train,
                    max_steps=chosen.steps, lr=chosen.lr, min_lr=chosen.lr, warmup_steps=10,
                    weight_decay=chosen.weight_decay, beta1=0.9, beta2=0.98, grad_clip=0.0,
                    eval_interval=chosen.eval_interval, log_interval=50, ckpt_interval=1000, keep_checkpoints=1,
                    seed=seed, threads=threads, device=device, dtype=dtype,
                    time_limit=None if minutes is None else 60 * minutes)
    records = train_run(objective, t, {**asdict(chosen), "seed": seed, "dtype": dtype}, progress)
    curves = {key: [r[key] for r in records] for key in records[-1] if key != "elapsed"}
    summary = {"experiment": NAME, "command": command, "quick": quick, "size": asdict(chosen), "dtype": dtype,
               "train_examples": n_train, "test_examples": chosen.p ** 2 - n_train,
               "parameters": sum(p.numel() for p in model.parameters()), "seconds": records[-1]["elapsed"],
               "curves": curves,
               "verdict": judge(curves["step"], curves["train_accuracy"], curves["test_accuracy"])}
    return write_report(out, NAME, summary, markdown(summary), plot)


def trained(summary: dict) -> str:
    """The steps trained, and the plan when a time limit stopped the run before it."""
    done, planned = summary["curves"]["step"][-1], summary["size"]["steps"]
    return f"{done:,} steps" + (f" (of {planned:,} planned; stopped by the time limit)" if done < planned else "")


def markdown(summary: dict) -> str:
    s, v = summary["size"], summary["verdict"]
    value = v["value"]
    steps = lambda x: "not reached" if x is None else f"{x:,}"  # noqa: E731
    lines = [f"# Grokking: (a + b) mod {s['p']}", "",
             f"{summary['train_examples']:,} training pairs ({s['train_fraction']:.0%}), "
             f"{summary['test_examples']:,} test pairs; {summary['parameters']:,} parameters, AdamW lr {s['lr']:g}, "
             f"weight decay {s['weight_decay']:g}, full batch, {trained(summary)} ({summary['dtype']}).", "",
             "| | step of 99 % | most reached |", "| --- | ---: | ---: |",
             f"| train accuracy | {steps(value['train_step'])} | {value['max_train_accuracy']:.3f} |",
             f"| test accuracy | {steps(value['test_step'])} | {value['max_test_accuracy']:.3f} |",
             f"| test step / train step | {'-' if value['ratio'] is None else value['ratio']} | |", "",
             f"**Verdict: {'appeared' if v['appeared'] else 'did not appear'}.** {v['reading']}", "",
             f"Rule: {v['criterion']}.", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    c, value = summary["curves"], summary["verdict"]["value"]
    fig = Figure(figsize=(11, 4.2))
    acc, ce = fig.subplots(1, 2)
    acc.plot(c["step"], c["train_accuracy"], label="train", color="tab:blue")
    acc.plot(c["step"], c["test_accuracy"], label="test", color="tab:red")
    for key, color in (("train_step", "tab:blue"), ("test_step", "tab:red")):
        if value[key] is not None:
            acc.axvline(value[key], color=color, linestyle=":", alpha=0.7)
    acc.set(xscale="log", xlabel="training step (log)", ylabel="accuracy", ylim=(0, 1.02),
            title=f"(a + b) mod {summary['size']['p']}, {summary['size']['train_fraction']:.0%} of pairs trained")
    ce.plot(c["step"], c["train_ce"], label="train", color="tab:blue")
    ce.plot(c["step"], c["test_ce"], label="test", color="tab:red")
    ce.set(xscale="log", yscale="log", xlabel="training step (log)", ylabel="cross-entropy", title="loss and weights")
    norm = ce.twinx()
    norm.plot(c["step"], c["weight_norm"], color="gray", linestyle="--", label="weight L2 norm")
    norm.set_ylabel("weight L2 norm")
    ce.legend(loc="lower left", fontsize=8)
    norm.legend(loc="upper right", fontsize=8)
    acc.legend(fontsize=8)
    for ax in (acc, ce):
        ax.grid(alpha=0.3)
        ax.xaxis.set_minor_formatter(NullFormatter())  # under a decade of steps the minor labels collide
    fig.tight_layout()
    fig.savefig(path, dpi=110)
