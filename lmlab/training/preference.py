"""Preference tuning: Direct Preference Optimization (Rafailov et al., 2023) on (chosen, rejected) pairs."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmlab.training.examples import collate
from lmlab.training.tuning import Tuning


def sequence_logprobs(module, inputs, targets):
    """The summed log-probability of each row's target tokens (IGNORE positions count 0). The LM head runs only
    at the target positions (the model's loss_only)."""
    return -module(inputs, targets, loss_only=True, reduction="none")[1].sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Direct Preference Optimization (Rafailov et al., 2023), per pair:
        loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
    with y_w the chosen and y_l the rejected response (summed log-probabilities of their tokens). Returns the loss
    and the implicit rewards beta * (log pi - log ref) of the chosen and the rejected response."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


class Preference(Tuning):
    """DPO on (chosen, rejected) pairs. The reference model is the model as it starts (DPO's pi_ref: the SFT
    model), so its log-probabilities are constants: they are computed once, here, before any update, and no
    second copy of the model is kept."""

    best_metric = "val_dpo_loss"

    def __init__(self, model, train: list, val: list, *, beta: float = 0.1, method: str = "full",
                 settings: dict | None = None, pad_id: int = 0, seed: int = 0, eval_batch_size: int = 4,
                 progress: bool = True):
        super().__init__(model, method, settings or {}, seed)
        self.train, self.val, self.beta, self.pad_id = train, val, beta, pad_id
        self.eval_batch_size = eval_batch_size
        self.tokens_per_row = round(sum(len(c[0]) + len(r[0]) - 2 for c, r in train) / len(train))
        self.train_ref = self._logprobs(model, train, progress, "reference log-probs (train)")
        self.val_ref = self._logprobs(model, val, progress, "reference log-probs (held out)")

    def _collate(self, pairs) -> dict:
        batch = collate([side for pair in pairs for side in pair], self.pad_id)  # chosen, rejected, chosen, ...
        return {k: v.view(len(pairs), 2, -1) for k, v in batch.items()}

    def _logprobs(self, model, pairs, progress: bool, desc: str):
        """(n, 2) summed log-probabilities of the chosen and the rejected response of each pair."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in tqdm(range(0, len(pairs), self.eval_batch_size), desc=desc, disable=not progress,
                              leave=False):
                batch = self._collate(pairs[start:start + self.eval_batch_size])
                out.append(sequence_logprobs(model, batch["inputs"].flatten(0, 1).to(device),
                                             batch["targets"].flatten(0, 1).to(device)).view(-1, 2).cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 2)

    def draw(self, n: int) -> dict:
        def batches(epoch):
            order = random.Random(f"{self.seed}/{epoch}").sample(range(len(self.train)), len(self.train))
            return [order[a:a + n] for a in range(0, len(order) - n + 1, n)]

        picked = self._next_rows(n, batches)
        batch = self._collate([self.train[i] for i in picked])
        batch["reference"] = self.train_ref[picked]
        return batch

    def loss(self, module, batch):
        n = batch["inputs"].shape[0]
        policy = sequence_logprobs(module, batch["inputs"].flatten(0, 1), batch["targets"].flatten(0, 1)).view(n, 2)
        ref = batch["reference"]
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)[0].mean()

    def evaluate(self, model) -> dict[str, float]:
        """On the held-out pairs: the DPO loss, the mean reward margin (chosen minus rejected implicit reward),
        the reward accuracy (how often the chosen response has the higher reward), and each mean reward."""
        policy = self._logprobs(model, self.val, False, "")
        losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], self.val_ref[:, 0], self.val_ref[:, 1],
                                            self.beta)
        margin = chosen - rejected
        return {"val_dpo_loss": float(losses.mean()), "val_reward_margin": float(margin.mean()),
                "val_reward_accuracy": float((margin > 0).float().mean()),
                "val_chosen_reward": float(chosen.mean()), "val_rejected_reward": float(rejected.mean())}

    def describe(self) -> str:
        return f"DPO ({self.method}, beta {self.beta}), {len(self.train)} pairs, {len(self.val)} held out"
