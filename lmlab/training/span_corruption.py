"""T5 pretraining: span corruption (lmlab.data.span_corruption) on a token stream, as an Objective of the one
training loop. Every row is a random window of raw tokens whose corrupted input is exactly the model's
block_size long, so inputs and targets have fixed lengths and batches need no padding."""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.span_corruption import MEAN_SPAN, NOISE_DENSITY, corrupt, corrupted_lengths, noise_mask, raw_length
from lmlab.errors import LmlabError
from lmlab.models.t5 import EncoderDecoder, is_encoder_decoder
from lmlab.training.loop import Objective


def require_encoder_decoder(model, command: str) -> None:
    if not is_encoder_decoder(model):
        raise LmlabError(f"{command} trains an encoder-decoder (T5), and this model is a decoder-only or encoder "
                         "Transformer; give it a T5 model (model.encoder_decoder: true, or a T5 folder)")


class SpanCorruption(Objective):
    """Span-corruption pretraining of an EncoderDecoder: noise density 15 %, mean span length 3, sentinels."""

    def __init__(self, model: EncoderDecoder, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 sentinels: list[int], eos: int, seed: int = 0, eval_rows: int = 64,
                 density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN):
        require_encoder_decoder(model, "span corruption")
        self.model, self.sentinels, self.eos = model, sentinels, eos
        self.density, self.mean_span = density, mean_span
        self.raw = raw_length(model.config.block_size, density, mean_span)
        self.input_length, self.target_length = corrupted_lengths(self.raw, density, mean_span)
        if self.target_length > model.config.block_size:
            raise LmlabError(f"targets of {self.target_length} tokens are longer than the decoder's context "
                             f"({model.config.block_size}); lower the noise density or raise model.block_size")
        for name, tokens in (("train", train_tokens), ("val", val_tokens)):
            if len(tokens) <= self.raw:
                raise LmlabError(f"the {name} split has {len(tokens)} tokens, fewer than a window of {self.raw}; "
                                 "use more data or a smaller model.block_size")
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.tokens_per_row = self.input_length + self.target_length
        self.generator = torch.Generator().manual_seed(seed)
        self.seed, self.eval_rows = seed, eval_rows

    def rows(self, tokens: np.ndarray, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        starts = torch.randint(len(tokens) - self.raw, (n,), generator=generator).tolist()
        pairs = [corrupt(tokens[s:s + self.raw].tolist(), noise_mask(self.raw, generator, self.density,
                                                                     self.mean_span), self.sentinels, self.eos)
                 for s in starts]
        return {"inputs": torch.tensor([p[0] for p in pairs]), "targets": torch.tensor([p[1] for p in pairs])}

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        return self.rows(self.train_tokens, n, self.generator)

    def loss(self, module, batch):
        return module(batch["inputs"], batch["targets"], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        """The loss on the same eval_rows corrupted validation windows at every evaluation."""
        batch = self.rows(self.val_tokens, self.eval_rows, torch.Generator().manual_seed(self.seed + 1))
        device = next(model.parameters()).device
        losses = [self.loss(model, {k: v[i:i + 16].to(device) for k, v in batch.items()}).item()
                  for i in range(0, self.eval_rows, 16)]
        return {"val_loss": sum(losses) / len(losses)}

    def data_state(self) -> dict:
        return {"data_generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.generator.set_state(state["data_generator"])

    def describe(self) -> str:
        return (f"{self.model.num_params() / 1e6:.2f}M parameters, span corruption ({self.raw} raw tokens -> "
                f"{self.input_length} in, {self.target_length} out)")
