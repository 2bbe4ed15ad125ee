"""What the lab's experiments share: the ladder of GPT sizes; training a small model through the one training
loop (`lmlab.training.loop.fit`), either by way of TrainingRun with a run folder that is reused or resumed
(train_once), or straight through fit for the experiments that log curves over steps (train_run); an Objective
over a tensor of rows (a synthetic task: addition, ...); the verdict record; and the log-N interpolation that the
verdicts read their crossings with."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from lmlab.errors import LmlabError
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training.config import TrainConfig
from lmlab.training.distributed import Dist, training_precision
from lmlab.training.loop import Objective, fit
from lmlab.training.metrics import read_metrics
from lmlab.training.run import TrainingRun
from lmlab.util import atomic_write_json, comma_list, pick_device


@dataclass(frozen=True)
class Size:
    """One rung of the ladder: a GPT-2-style model (the shared Block) of this depth and width."""
    name: str
    n_layer: int
    n_head: int
    n_embd: int


# Six sizes each, non-embedding parameters spanning at least 30x: the CPU ladder 36x (12.8k to 456k; the largest
# trains at about 12k tokens/s on one idle core in bf16), the GPU ladder 380x (100k to 38M), the quick one 30x.
LADDERS = {
    "quick": [Size("xs", 1, 2, 16), Size("s", 1, 2, 24), Size("m", 1, 2, 32), Size("l", 2, 2, 32),
              Size("xl", 2, 2, 48), Size("xxl", 2, 4, 64)],
    "cpu": [Size("1x32", 1, 2, 32), Size("1x48", 1, 2, 48), Size("2x48", 2, 2, 48), Size("2x80", 2, 4, 80),
            Size("3x80", 3, 4, 80), Size("3x112", 3, 4, 112)],
    "gpu": [Size("2x64", 2, 2, 64), Size("4x128", 4, 4, 128), Size("6x192", 6, 6, 192), Size("6x288", 6, 6, 288),
            Size("8x384", 8, 6, 384), Size("12x512", 12, 8, 512)],
}


def gpt_config(size: Size, vocab_size: int, block_size: int) -> TransformerConfig:
    """GPT-2's switches (layernorm, learned positions, GELU, tied embeddings) at this size."""
    return TransformerConfig(vocab_size=vocab_size, block_size=block_size, n_layer=size.n_layer, n_head=size.n_head,
                             n_embd=size.n_embd, dropout=0.0)


def non_embedding_params(model: Transformer) -> int:
    """Kaplan et al.'s N: every parameter but the token and position embeddings (the tied LM head included in
    the token embedding)."""
    embeddings = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    return sum(p.numel() for p in model.parameters()) - embeddings


def lab_precision(dtype: str, device: str = "auto") -> str:
    """train.dtype for the lab's runs: "auto" is bf16 autocast where the hardware multiplies bf16 natively (a CPU
    with AVX512-BF16 or AMX, CUDA), fp32 elsewhere (lmlab.training.distributed.training_precision)."""
    return training_precision(dtype, pick_device(device))


def train_once(t: TrainConfig, build: Callable[[Dist], Objective], progress: bool = True) -> dict:
    """Train the objective `build(world)` makes, in t.run_dir, through the one training loop; a run folder that
    already holds a finished run (summary.json) is read back instead, and one killed part-way is resumed from its
    checkpoint. Returns fit's summary plus "params" (N, non-embedding) and "curve" (the evaluations:
    step, tokens, and the objective's figures)."""
    run_dir = Path(t.run_dir)
    done = run_dir / "summary.json"
    if not done.is_file():
        with TrainingRun(t, resume=(run_dir / "ckpt").is_dir()) as run:
            torch.manual_seed(t.seed)  # the same initialisation on every call (resuming loads the weights)
            objective = build(run.world)
            summary = run.fit(objective, progress=progress)
            summary["params"] = non_embedding_params(objective.model)
            summary["tokens_per_step"] = t.batch_size * objective.tokens_per_row
            run.write_json("summary.json", summary)
    summary = json.loads(done.read_text())
    summary["curve"] = [{**r, "tokens": r["step"] * summary["tokens_per_step"]} for r in evaluations(run_dir)]
    return summary


def run_record(size: Size, summary: dict, figures: tuple[str, ...], curve: tuple[str, ...]) -> dict:
    """One size's row of a lab report: its shape and N, the named figures of train_once's summary, and its curve
    (the named figures at each evaluation)."""
    return {"name": size.name, "n_layer": size.n_layer, "n_embd": size.n_embd, "params": summary["params"],
            **{k: summary[k] for k in figures}, "curve": [{k: p[k] for k in curve} for p in summary["curve"]]}


def seed_list(text: str, flag: str = "--seeds") -> list[int]:
    """A comma-separated flag of seeds ("0,1,2") as distinct whole numbers in the order given, checked before any
    work starts."""
    try:
        seeds = [int(item) for item in comma_list(text)]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise LmlabError(f"{flag} {text}: give distinct whole numbers 0 or more, comma-separated, e.g. {flag} 0,1,2")
    return seeds


def seed_summary(records: list[dict], seeds: list[int], figures: tuple[str, ...]) -> dict:
    """One size's row over several seeds, from run_record's rows of it (one a seed, in the order of `seeds`): its
    shape and N, each figure's mean across the seeds, its spread ("spread": min, max and the sample standard
    deviation, 0 for one seed), and the seeds' own rows ("seeds": seed, and all but the shape of each record)."""
    shape = ("name", "n_layer", "n_embd", "params")
    row = {k: records[0][k] for k in shape}
    spread = {}
    for k in figures:
        values = [float(r[k]) for r in records]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        row[k] = mean
        spread[k] = {"min": min(values), "max": max(values), "std": std}
    return {**row, "spread": spread,
            "seeds": [{"seed": s, **{k: v for k, v in r.items() if k not in shape}} for s, r in zip(seeds, records)]}


def settings_record(t: TrainConfig, threads: int | None, seed: int) -> dict:
    """The training settings a lab report records (every size shares them)."""
    return {"steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr, "dtype": t.dtype, "threads": threads,
            "seed": seed}


def run_settings(base: TrainConfig, run_dir: Path, threads: int | None, seed: int, dtype: str) -> TrainConfig:
    """The base settings of an experiment for one run folder, with the lab's threads, seed and precision."""
    return replace(base, run_dir=str(run_dir), threads=threads, seed=seed, dtype=lab_precision(dtype, base.device))


class RowsObjective(Objective):
    """Next-token training on a fixed tensor of rows (a synthetic task's examples), inputs (R, T) and targets
    (R, T) with -100 where no loss is taken (a prompt): each step draws rows at random from the training rows;
    evaluation is the mean loss on the held-out rows plus whatever `score(model, rows)` measures there."""

    def __init__(self, model: Transformer, train: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor],
                 seed: int, score: Callable[[Transformer, dict], dict] | None = None, eval_rows: int = 512):
        self.model, self.train, self.held_out = model, train, held_out
        self.tokens_per_row = int(train["inputs"].shape[1])
        self.generator = torch.Generator().manual_seed(seed)
        self.score, self.eval_rows = score, eval_rows
        self.device = next(model.parameters()).device

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        rows = torch.randint(len(self.train["inputs"]), (n,), generator=self.generator)
        return {k: v[rows] for k, v in self.train.items()}

    def loss(self, module, batch):
        return module(batch["inputs"], batch["targets"], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        rows = {k: v.to(self.device) for k, v in self.held_out.items()}
        losses = [self.loss(model, {k: v[s:s + self.eval_rows] for k, v in rows.items()}).item()
                  for s in range(0, len(rows["inputs"]), self.eval_rows)]
        figures = {"val_loss": sum(losses) / len(losses)}
        if self.score is not None:
            figures.update(self.score(model, rows))
        return figures

    def data_state(self) -> dict:
        return {"data_generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.generator.set_state(state["data_generator"])


def verdict(appeared: bool, criterion: str, value, reading: str) -> dict:
    """The record every lab experiment ends in: did the phenomenon appear, by which rule, the measured figure."""
    return {"appeared": bool(appeared), "criterion": criterion, "value": value, "reading": reading}


def crossing(sizes: list[float], values: list[float], level: float) -> float | None:
    """The first size at which `values` rises through `level`, interpolated linearly in log(size); None when it
    never does (or starts above it)."""
    pairs = sorted(zip(sizes, values))
    if not pairs or pairs[0][1] >= level:
        return None
    for (n0, v0), (n1, v1) in zip(pairs, pairs[1:]):
        if v0 < level <= v1:
            share = (level - v0) / (v1 - v0)
            return math.exp(math.log(n0) + share * (math.log(n1) - math.log(n0)))
    return None


SETTINGS_FILE = "lab-settings.json"


def train_run(objective: Objective, t: TrainConfig, settings: dict, progress: bool = True) -> list[dict]:
    """Train `objective` in t.run_dir and return its evaluation records (step + the objective's figures).

    A folder with a checkpoint is resumed (a finished run is not trained again, an interrupted one continues on
    the same curve); one made with other settings is refused, since its curves would mix two experiments."""
    run_dir = Path(t.run_dir)
    recorded = run_dir / SETTINGS_FILE
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise LmlabError(f"{run_dir} holds a run made with other settings; use another --work folder, or delete it")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recorded, settings)
    fit(objective, t, run_dir, resume=(run_dir / "ckpt" / "latest").is_file(), progress=progress)
    return evaluations(run_dir)


def evaluations(run_dir: str | Path) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl (the training-loss records have a "loss" key), by step."""
    return sorted((r for r in read_metrics(run_dir) if "loss" not in r), key=lambda r: r["step"])


def first_step(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first step whose value reaches `threshold` (>=), or None."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)
