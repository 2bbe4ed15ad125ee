"""What instruction tuning (lmlab.training.instruction) and preference tuning (lmlab.training.preference) share:
a base model made trainable by a method (every weight, or a PEFT method of lmlab.models.peft on a frozen base),
the weights a checkpoint holds (the whole model, or the method's own weights), and a seeded walk through epochs
of batches."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.models import checkpoint
from lmlab.models.peft import FULL, apply_method, cast_frozen_matmuls
from lmlab.training.loop import Objective


class Tuning(Objective):
    """What SFT and DPO share: the weights a checkpoint holds (the whole model, or the PEFT method's own weights),
    and a seeded walk through epochs of batches."""

    best_metric = "val_loss"
    higher_is_better = False

    def __init__(self, model, method: str, settings: dict, seed: int):
        self.model, self.method, self.settings, self.seed = model, method, settings, seed
        self.epoch, self.index, self._batches = 0, 0, None

    def _next_rows(self, n: int, make_batches) -> list:
        """The next batch of n rows; a new epoch (a new shuffle) when this one is used up."""
        if self._batches is None or self._batches[0] != (self.epoch, n):
            self._batches = ((self.epoch, n), make_batches(self.epoch))
            if not self._batches[1]:
                raise LmlabError(f"the training data does not fill one batch of {n} rows; use a smaller batch size "
                                 "or more data")
        if self.index >= len(self._batches[1]):
            self.epoch, self.index = self.epoch + 1, 0
            return self._next_rows(n, make_batches)
        self.index += 1
        return self._batches[1][self.index - 1]

    def data_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_data_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def save(self, model, folder: Path) -> None:
        checkpoint.save_weights(model, folder, self.method, self.settings)

    def load(self, model, folder: Path) -> None:
        checkpoint.load_weights(model, folder, self.method)


def trainable_parameters(model) -> tuple[int, int]:
    """(parameters being trained, all parameters); a tied embedding counts once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def prepare_model(model, method: str, settings: dict, *, bf16: bool, device, seed: int = 0) -> None:
    """The method on the model, on the training device, as lmlab sft and dpo train it. Under bf16 autocast a PEFT
    method's frozen matmul weights are stored in bf16 once (lmlab.models.peft.cast_frozen_matmuls: the products
    autocast computes, without a cast per step); the run saves only the method's weights, and its results and a
    tuned run loaded back (lmlab.models.hub.load_tuned) use the fp32 base."""
    torch.manual_seed(seed)  # the method's random initialisation (LoRA's A, the adapters' down)
    apply_method(model, method, settings)
    if bf16 and method != FULL:
        cast_frozen_matmuls(model, torch.bfloat16)
    model.to(device)
