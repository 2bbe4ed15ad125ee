"""T5 (Raffel et al. 2020): every task as text in, text out, by an encoder-decoder built from the shared Block.

    encoder   token embeddings -> n_layer Blocks (bidirectional self-attention) -> RMSNorm
    decoder   the same embeddings -> n_decoder_layer Blocks (causal self-attention, then cross-attention over
              the encoder's output) -> RMSNorm -> LM head (tied: scaled by n_embd^-0.5 first)

Both stacks are lmlab.models.transformer.Block with the T5 switches of TransformerConfig (no biases, RMSNorm, no
1/sqrt(d) scaling, ReLU or gated-GELU feed-forward); this module only composes them and adds T5's position
signal, a learned bias per head and bucket of relative distance that is added to every layer's attention scores
(bidirectional buckets in the encoder, causal ones in the decoder; computed once per pass and shared by the
layers, as T5 computes it in the first layer). The decoder starts from the pad token (id 0), as T5 does.

For generation, `start_decoding` runs the encoder once and returns an `EncoderDecoderCache`: the decoder's
self-attention KVCache and each decoder layer's cross-attention keys/values of the encoder output, projected
once; lmlab.inference.generate then drives the decoder one token at a time like any decoder.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.models.head_loss import linear_cross_entropy
from lmlab.models.transformer import Block, KVCache, TiedWeights, TransformerConfig, make_norm

DECODER_START = 0  # T5: the decoder's first input is the pad token, id 0 (also the id of padding)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): half of the buckets are exact small distances,
    the rest grow logarithmically up to max_distance; bidirectional attention splits them by direction, causal
    attention only sees keys at or before the query."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    # clamp(min=1) keeps log() finite for the small distances that take the exact branch anyway.
    far = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    return bucket + torch.where(distance < exact, distance, far.clamp(max=buckets - 1))


class RelativePositionBias(nn.Module):
    """A learned scalar per head for each relative-distance bucket, as an additive (1, H, T, S) score bias."""

    def __init__(self, config: TransformerConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.embedding = nn.Embedding(config.relative_buckets, config.n_head)

    def forward(self, queries: int, keys: int, past: int = 0) -> torch.Tensor:
        device = self.embedding.weight.device
        q_at = torch.arange(past, past + queries, device=device)[:, None]
        relative = torch.arange(keys, device=device)[None, :] - q_at
        bucket = relative_position_bucket(relative, self.bidirectional, self.buckets, self.max_distance)
        bias = self.embedding(bucket).permute(2, 0, 1).unsqueeze(0)
        if not self.bidirectional:  # causal: a query never sees later keys
            bias = bias.masked_fill(relative[None, None] > 0, float("-inf"))
        return bias


class EncoderDecoderCache:
    """What decoding needs between steps: the decoder's self-attention KVCache, each decoder layer's
    cross-attention keys/values of the encoder output (computed once) and the encoder's padding mask."""

    def __init__(self, self_attn: KVCache, memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
                 memory_mask: torch.Tensor | None):
        self.self_attn, self.memory_kv, self.memory_mask = self_attn, memory_kv, memory_mask

    @property
    def length(self) -> int:
        return self.self_attn.length

    @property
    def max_len(self) -> int:
        return self.self_attn.max_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        self.self_attn.select(rows)
        self.memory_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.memory_kv]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, rows)


def shift_right(targets: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs for teacher forcing: the start token, then the targets but the last (-100 -> pad)."""
    inputs = targets.new_full(targets.shape, DECODER_START)
    inputs[:, 1:] = targets[:, :-1].masked_fill(targets[:, :-1] == -100, DECODER_START)
    return inputs


class EncoderDecoder(TiedWeights, nn.Module):
    """T5: an encoder and a decoder stack of the shared Block over one token embedding, and an LM head."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not config.encoder_decoder or config.position != "relative" or config.norm_placement != "pre":
            raise LmlabError("an encoder-decoder needs encoder_decoder: true, position: relative and "
                             "norm_placement: pre (T5's switches); see lmlab.models.t5")
        self.config = config
        self.encoder_config = replace(config, causal=False, cross_attention=False)
        self.decoder_config = replace(config, causal=True, cross_attention=True,
                                      n_layer=config.n_decoder_layer or config.n_layer)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(self.encoder_config) for _ in range(config.n_layer))
        self.decoder = nn.ModuleList(Block(self.decoder_config) for _ in range(self.decoder_config.n_layer))
        self.encoder_bias = RelativePositionBias(config, bidirectional=True)
        self.decoder_bias = RelativePositionBias(config, bidirectional=False)
        self.encoder_norm = make_norm(config)
        self.decoder_norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_t5()

    def _init_t5(self) -> None:
        """T5's initialisation (Mesh TensorFlow): each matrix ~ N(0, 1/fan_in), the query's also over head_dim,
        because the scores are not scaled by 1/sqrt(head_dim); embeddings ~ N(0, 1). An untied head ~ N(0, 1/n_embd)
        (Hugging Face draws N(0, 1), which starts at logits of std sqrt(n_embd), a loss of 20 at n_embd 256, that
        Adafactor survives and a short AdamW run does not)."""
        c = self.config
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=c.n_embd ** -0.5)
        for name, p in self.named_parameters():
            if p.dim() < 2 or name in ("tok_emb.weight", "lm_head.weight"):
                continue
            fan_in = p.shape[1]
            if name.endswith("attn.qkv.weight") or name.endswith("cross.q.weight"):
                q_rows = c.n_head * c.head_dim
                nn.init.normal_(p, std=fan_in ** -0.5)
                with torch.no_grad():
                    p[:q_rows].normal_(std=(fan_in * c.head_dim) ** -0.5)
            elif name.endswith("embedding.weight"):
                nn.init.normal_(p, std=c.n_embd ** -0.5)
            else:
                nn.init.normal_(p, std=fan_in ** -0.5)

    @classmethod
    def from_weights(cls, config: TransformerConfig, state: dict[str, torch.Tensor]) -> "EncoderDecoder":
        """A model holding `state`, without the random initialisation the weights would overwrite."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        if config.tie_embeddings:  # to_empty gives every module its own tensor, which unties a shared one
            model.lm_head.weight = model.tok_emb.weight
        model.load_weights(state)
        return model

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_length(self, n: int, what: str) -> None:
        if n > self.config.block_size:
            raise LmlabError(f"{what} of {n} tokens is longer than the model's context (block_size "
                             f"{self.config.block_size}); shorten it or raise model.block_size")

    def encode(self, input_ids: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, n_embd); input_mask (B, S) is False at padding, which nothing attends to."""
        S = input_ids.shape[1]
        self._check_length(S, "an input")
        bias = self.encoder_bias(S, S)
        if input_mask is not None:
            bias = bias.masked_fill(~input_mask.bool()[:, None, None, :], float("-inf"))
        x = self.drop(self.tok_emb(input_ids))
        for block in self.encoder:
            x = block(x, attn_mask=bias)
        return self.drop(self.encoder_norm(x))

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cross.project_memory(memory) for block in self.decoder]

    def decode(self, ids: torch.Tensor, memory_kv, memory_mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, n_embd) of `ids`, which follow cache.length earlier tokens."""
        T = ids.shape[1]
        past = cache.length if cache is not None else 0
        self._check_length(past + T, "a target")
        bias = self.decoder_bias(T, past + T, past)
        x = self.drop(self.tok_emb(ids))
        for i, block in enumerate(self.decoder):
            x = block(x, attn_mask=bias, cache=cache, layer=i, memory_kv=memory_kv[i], memory_mask=memory_mask)
        if cache is not None:
            cache.length += T
        return self.drop(self.decoder_norm(x))

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        # T5 rescales before a tied head, as the embeddings are ~N(0, 1); T5 1.1's untied head does not.
        if c.head_scale if c.head_scale is not None else c.tie_embeddings:
            hidden = hidden * c.n_embd ** -0.5
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.head_input(hidden))

    def start_decoding(self, input_ids: torch.Tensor, input_mask: torch.Tensor | None,
                       max_len: int) -> tuple[EncoderDecoderCache, torch.Tensor]:
        """Run the encoder once; return the decoding cache (room for max_len decoder tokens) and the decoder's
        first input, the start token of every row (B, 1)."""
        memory = self.encode(input_ids, input_mask)
        B = input_ids.shape[0]
        self_attn = KVCache(self.decoder_config, B, max_len, memory.device, self.tok_emb.weight.dtype)
        mask = None if input_mask is None else input_mask.bool()[:, None, None, :]
        start = torch.full((B, 1), DECODER_START, dtype=torch.long, device=input_ids.device)
        return EncoderDecoderCache(self_attn, self.project_memory(memory), mask), start

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                input_mask: torch.Tensor | None = None, decoder_ids: torch.Tensor | None = None,
                cache: EncoderDecoderCache | None = None, last_only: bool = False,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                loss_only: bool = False):
        """Training: idx (B, S) is the encoder's input (input_mask False at padding) and targets (B, T) the
        decoder's (-100 = no target; the decoder reads shift_right(targets) unless decoder_ids are given); returns
        the logits (B, T, vocab) and the mean cross-entropy, as T5ForConditionalGeneration(labels=...). With
        `loss_only` it returns (None, loss) through the fused head + cross-entropy (no full logits), as the
        decoder-only Transformer does.

        Decoding: with `cache` (from start_decoding), idx holds the decoder's new tokens. positions and key_mask
        are the decoder-only generation arguments, which an encoder-decoder does not need (must be None)."""
        if positions is not None or key_mask is not None:
            raise LmlabError("an encoder-decoder takes the input's padding as input_mask, not positions/key_mask")
        if cache is not None:
            x = self.decode(idx, cache.memory_kv, cache.memory_mask, cache.self_attn)
        else:
            if decoder_ids is None:
                if targets is None:
                    raise LmlabError("an encoder-decoder needs targets or decoder_ids for its decoder")
                decoder_ids = shift_right(targets)
            memory = self.encode(idx, input_mask)
            mask = None if input_mask is None else input_mask.bool()[:, None, None, :]
            x = self.decode(decoder_ids, self.project_memory(memory), mask)
        if loss_only and targets is not None and type(self.lm_head) is nn.Linear:
            return None, linear_cross_entropy(self.head_input(x), self.lm_head.weight, targets)
        logits = self.head(x[:, -1:] if last_only else x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def flops_per_token(self) -> float:
        """Training FLOPs per target token, roughly: 6 x parameters (encoder and decoder both run per pair)."""
        return 6.0 * self.num_params()


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "encoder_decoder", False))
