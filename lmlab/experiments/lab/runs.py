"""What the small-model experiments of `lmlab lab` share: a training run through the one training loop
(lmlab.training.loop.fit) that resumes where it stopped, its evaluation curves read back from metrics.jsonl, and
the verdict record every experiment reports."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.training.config import TrainConfig
from lmlab.training.loop import Objective, fit
from lmlab.training.metrics import read_metrics
from lmlab.util import atomic_write_json

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


def verdict(appeared: bool, criterion: str, value, reading: str) -> dict:
    """The record every `lmlab lab` experiment ends with: did the phenomenon appear, by which rule, on what."""
    return {"appeared": bool(appeared), "criterion": criterion, "value": value, "reading": reading}


def first_step(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first step whose value reaches `threshold` (>=), or None."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)
