"""Instruction tuning (SFT): the mean cross-entropy of the response tokens of prompt/response examples."""

from __future__ import annotations

from lmlab.training.examples import IGNORE, collate, epoch_batches
from lmlab.training.tuning import Tuning


class InstructionTuning(Tuning):
    """Supervised fine-tuning on prompt/response examples: the mean cross-entropy of the response tokens."""

    def __init__(self, model, train: list, val: list, *, method: str = "full", settings: dict | None = None,
                 seq_len: int = 512, packing: bool = False, pad_id: int = 0, seed: int = 0, eval_batch_size: int = 8):
        super().__init__(model, method, settings or {}, seed)
        self.train, self.val, self.seq_len, self.packing, self.pad_id = train, val, seq_len, packing, pad_id
        self.eval_batch_size = eval_batch_size
        # For the tokens/s figure: a packed row is seq_len tokens, a bucketed row as long as an average example.
        self.tokens_per_row = seq_len if packing else round(sum(len(ids) - 1 for ids, _ in train) / len(train))

    def draw(self, n: int) -> dict:
        rows = self._next_rows(n, lambda epoch: epoch_batches(self.train, n, self.seed, epoch, self.packing,
                                                              self.seq_len))
        return collate(rows, self.pad_id)

    def loss(self, module, batch):
        return module(batch["inputs"], batch["targets"], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        """val_loss: the mean cross-entropy per response token over the held-out examples (all their tokens
        together, so a long response weighs by its length)."""
        total, count = 0.0, 0
        device = next(model.parameters()).device
        rows = sorted(self.val, key=lambda r: len(r[0]))
        for start in range(0, len(rows), self.eval_batch_size):
            batch = collate(rows[start:start + self.eval_batch_size], self.pad_id)
            targets = batch["targets"].to(device)
            n = int((targets != IGNORE).sum())
            total += float(model(batch["inputs"].to(device), targets, loss_only=True)[1]) * n
            count += n
        return {"val_loss": total / max(count, 1)}

    def describe(self) -> str:
        return f"instruction tuning ({self.method}), {len(self.train)} examples, {len(self.val)} held out"
