"""The run wrapper every training command (lmlab train, finetune, sft, dpo) goes through: CPU threads, a run
folder that already holds a run refused unless --resume, the process group and precision (Dist), `fit`, and the
files the command writes next to fit's (results.json, ...), by the main process only."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.models import checkpoint
from lmlab.training.config import TrainConfig
from lmlab.training.distributed import Dist
from lmlab.training.loop import Objective, fit, no_checkpoint, refuse_existing_run
from lmlab.util import atomic_write_json, atomic_write_text, check_writable


class TrainingRun:
    """    with TrainingRun(t, resume=resume) as run:
            objective = ...(model on run.world.device)
            summary = run.fit(objective)
            run.write_json("results.json", results)

    `hint` ends the message that refuses a run folder holding a run."""

    def __init__(self, t: TrainConfig, *, resume: bool = False, hint: str = "choose another run folder"):
        if t.threads:
            torch.set_num_threads(t.threads)
        self.t, self.resume, self.run_dir = t, resume, Path(t.run_dir)
        refuse_existing_run(self.run_dir, resume, hint)
        if resume and not checkpoint.step_checkpoints(self.run_dir):  # before the command writes its first file
            raise no_checkpoint(self.run_dir)
        self.world = Dist(t.device, t.dtype, t.parallel)
        if self.world.main and not resume:  # (a resumed run's folder exists; a mistyped one must not appear)
            check_writable(self.run_dir)  # before the data and the model load

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        self.world.close()

    @property
    def main(self) -> bool:
        return self.world.main

    def fit(self, objective: Objective, *, on_step=None, progress: bool = True) -> dict:
        return fit(objective, self.t, self.run_dir, world=self.world, resume=self.resume, on_step=on_step,
                   progress=progress)

    def write_json(self, name: str, obj) -> None:
        if self.main:
            atomic_write_json(self.run_dir / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            atomic_write_text(self.run_dir / name, text)
