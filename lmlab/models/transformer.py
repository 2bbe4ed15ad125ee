"""The Transformer: one block, many model families.

A single `Block` serves every model in lmlab; `TransformerConfig` switches pick the family:

    GPT-2        layernorm, learned positions, GELU (tanh) MLP, biases, tied embeddings, causal
    Llama-style  rmsnorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases
    BERT-style   post-norm (which also normalises the embeddings), bidirectional attention (causal=False),
                 token-type embeddings (type_vocab_size), a pooler (dense + tanh on the first token)
    Gemma 3      Llama's switches plus: embeddings scaled by sqrt(n_embd), RMSNorm as (1 + w) (norm_offset), query
                 and key RMSNorm before rotary (qk_norm), norms before and after attention and MLP ("sandwich"),
                 a tanh-GELU gated MLP (mlp="geglu"), heads wider than n_embd / n_head
                 (head_size), the attention scale query_pre_attn_scalar^-0.5, and local layers that attend within
                 a sliding window with their own rotary base, every `global_every`-th layer attending to everything
    T5           (T5 switches below) an encoder stack and a decoder stack of these blocks whose decoder blocks
                 gain cross-attention (lmlab.models.t5.EncoderDecoder composes them): rmsnorm, no biases, no
                 1/sqrt(d) attention scaling, a relative position bias added to the scores, ReLU (T5 1.0) or
                 gated-GELU (mlp="gated", T5 1.1) feed-forward, heads narrower than n_embd / n_head (head_size)

`Transformer` is the decoder-only language model trained by next-token prediction,
P(w_0..n) = prod_i P(w_i | w_<i): `forward(idx, targets)` returns the logits and the mean cross-entropy of
each token given the ones before it.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, which picks the fused kernel for the
device (flash attention on CUDA, a fused CPU kernel here), so no T x T matrix is materialised in Python; CPU
training on short sequences asks for its plain (math) kernel instead, whose backward is faster there
(`Attention._kernel`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.errors import LmlabError
from lmlab.models.head_loss import linear_cross_entropy


@dataclass
class TransformerConfig:
    vocab_size: int = 65  # set from the prepared data
    block_size: int = 256  # longest sequence the model sees (learned position table size / rotary cache)
    n_layer: int = 6  # Transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # the width of the residual stream
    n_kv_head: int | None = None  # grouped-query attention: fewer key/value heads than query heads
    intermediate_size: int | None = None  # MLP hidden width; None means 4 * n_embd
    dropout: float = 0.0  # on attention weights, residual branches and embeddings while training
    bias: bool = True  # biases in linear layers and norms
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5  # the epsilon of every norm
    norm_placement: str = "pre"  # "pre" (GPT-2, Llama) | "post" (BERT, the original Transformer) | "sandwich"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma stores w around 0 and adds 1
    position: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0  # the rotary base (position="rope")
    mlp: str = "gelu"  # "gelu" (two matrices) | "swiglu" / "geglu" (gated by silu / tanh-GELU, three matrices) |
    # "gated" (gated by `activation`: T5 1.1) | "none" (attention-only blocks: Olsson et al.'s induction-head models)
    activation: str = "gelu_tanh"  # GPT-2 uses the tanh approximation of GELU; "gelu" | "silu" | "relu"
    causal: bool = True  # False: bidirectional attention (BERT-style encoders)
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    type_vocab_size: int = 0  # BERT: token-type (segment) embeddings, sentence A = 0 / B = 1; 0 = none
    pooler: bool = False  # BERT: dense + tanh on the first ([CLS]) token's final hidden state
    head_size: int | None = None  # width of each attention head; None: n_embd // n_head (T5: d_kv; Gemma 3: 256)
    # --- Gemma 3 switches (see the module docstring); the defaults change nothing ---
    qk_norm: bool = False  # RMSNorm of each query and key head before rotary
    embed_scale: bool = False  # token embeddings times sqrt(n_embd)
    query_pre_attn_scalar: float | None = None  # attention scores times this^-0.5; None: head_dim^-0.5
    sliding_window: int = 0  # local layers attend to the last this many positions (their own included); 0: none
    global_every: int = 0  # with a sliding window, every global_every-th layer attends globally; 0: none does
    rope_local_theta: float = 10000.0  # the rotary base of the local layers
    # --- T5 switches (lmlab.models.t5) ---
    encoder_decoder: bool = False  # T5: an encoder of n_layer blocks and a decoder of n_decoder_layer blocks
    n_decoder_layer: int | None = None  # None means n_layer
    scale_attention: bool = True  # False: scores are q.k without the 1/sqrt(head_dim) (T5 folds it into init)
    relative_buckets: int = 32  # position="relative": T5's bucketed relative position bias, buckets...
    relative_max_distance: int = 128  # ...and the distance from which all positions share the last bucket
    cross_attention: bool = False  # set by EncoderDecoder on its decoder blocks: attend over the encoder output
    head_scale: bool | None = None  # decoder output x n_embd^-0.5 before the head; None: when tied (T5 1.0)

    def __post_init__(self):
        sizes = {"vocab_size": self.vocab_size, "block_size": self.block_size, "n_layer": self.n_layer,
                 "n_head": self.n_head, "n_embd": self.n_embd,
                 "n_kv_head": 1 if self.n_kv_head is None else self.n_kv_head,
                 "intermediate_size": 1 if self.intermediate_size is None else self.intermediate_size}
        problems = [f"{key}={value} (must be positive)" for key, value in sizes.items() if value < 1]
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            problems.append("norm_eps and rope_theta must be positive")
        if problems:  # the divisibility checks below would only confuse (n_embd=-1 "is not divisible")
            raise LmlabError("invalid model config: " + "; ".join(problems))
        n_kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head and self.head_size is None:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % n_kv:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={n_kv}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm={self.norm!r} (choose layernorm or rmsnorm)")
        if self.norm_placement not in ("pre", "post", "sandwich"):
            problems.append(f"norm_placement={self.norm_placement!r} (choose pre, post or sandwich)")
        if self.position not in ("learned", "rope", "relative"):
            problems.append(f"position={self.position!r} (choose learned, rope or relative)")
        if self.position == "relative" and not self.encoder_decoder:
            problems.append("position='relative' needs encoder_decoder: true (the T5 stacks add the bias)")
        if self.mlp not in ("gelu", "swiglu", "geglu", "gated", "none"):
            problems.append(f"mlp={self.mlp!r} (choose gelu, swiglu, geglu, gated or none)")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation={self.activation!r} (choose one of {', '.join(_ACTIVATIONS)})")
        if self.position == "rope" and self.head_dim % 2:
            problems.append("rotary positions need an even head dimension")
        if self.type_vocab_size < 0:
            problems.append(f"type_vocab_size={self.type_vocab_size} (must be >= 0)")
        if self.sliding_window < 0 or self.global_every < 0:
            problems.append(f"sliding_window={self.sliding_window}, global_every={self.global_every} (must be >= 0)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} (must be in [0, 1))")
        if problems:
            raise LmlabError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends within the sliding window (Gemma 3: five local layers, then a global one)."""
        return self.sliding_window > 0 and not (self.global_every and (layer + 1) % self.global_every == 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmlabError(f"unknown model config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


_ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w). Gemma keeps w around 0 with offset 1 (its weights are what it stores)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight + self.offset if self.offset else self.weight, self.eps)


def make_norm(config: TransformerConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.n_embd, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(dim or config.n_embd, eps=config.norm_eps, bias=config.bias)


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim), in the half-split layout (Hugging Face's rotate_half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position; cos/sin are (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int = 0, cross: bool = False):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.head_dim
        self.causal = config.causal and not cross
        self.dropout = config.dropout
        if not config.scale_attention:  # T5 folds the 1/sqrt(d) into its initialisation
            self.scale = 1.0
        else:
            self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.window = config.sliding_window if config.is_local(layer) and not cross else 0
        inner = self.n_head * self.head_dim
        if cross:  # T5's cross-attention: queries from the decoder, keys and values from the encoder's output
            self.q = nn.Linear(config.n_embd, inner, bias=config.bias)
            self.kv = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_dim, bias=config.bias)
        else:  # one fused projection for queries, keys and values: one matmul instead of three
            self.qkv = nn.Linear(config.n_embd, inner + 2 * self.n_kv_head * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Gemma 3: each head's query and key are RMS-normalised (one weight over head_dim), which bounds the
        # attention logits without Gemma 2's soft-capping.
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values of the encoder output (B, S, n_embd): computed once per input and
        reused at every decoding step."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)

    def forward(self, x, rotary=None, attn_mask=None, cache: "KVCache | None" = None, layer: int = 0, memory_kv=None):
        """Self-attention over x (and the cache), or with memory_kv (from project_memory) cross-attention over it.
        attn_mask is boolean (True = may attend) or a float bias added to the scores (T5's position bias)."""
        B, T, _ = x.shape
        if memory_kv is not None:
            q, (k, v) = self._heads(self.q(x), self.n_head), memory_kv
            cache = None  # the encoder's keys are all there already
        else:
            q, k, v = self.qkv(x).split(
                [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
            )
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if T == 1 and not self.window and getattr(cache, "decodes_in_place", False) and (
                attn_mask is None or attn_mask.dtype == torch.bool):
            # A paged cache (lmlab.inference.paged) knows each row's keys exactly (the mask only says the same)
            # and attends over its blocks where they lie, without gathering them into one tensor first.
            y = cache.attend(layer, q, k, v, self.scale)
            return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)))
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if attn_mask is not None and attn_mask.is_floating_point():  # a score bias, in the scores' dtype
            attn_mask = attn_mask.to(q.dtype)
        if T == 1 and self.window and cache is not None and k.shape[2] > self.window:
            # A local layer's one new query sees only the window's last keys: the cache's other slots stay (the
            # global layers' positions share its timeline) but cost nothing here.
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
            attn_mask = None if attn_mask is None else attn_mask[..., -self.window:]
        # Decoding too (one query over the cache): in bf16, two plain matmuls there compiled a oneDNN kernel for
        # every cache length (551 MiB over 400 lengths, against 8 for SDPA: a server kept growing), and SDPA is
        # faster in bf16 at 32-1,500 keys, 0.8-1.3x their speed in fp32 (python bench/cpu_kernel_shapes.py).
        with self._kernel(q, k):
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                # The causal shortcut is only right when queries and keys start together (no cached prefix).
                is_causal=self.causal and attn_mask is None and T > 1 and k.shape[2] == T,
                scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))

    # Scores of at most this many elements per layer (16 MB in fp32) are small enough to keep for backward.
    MATH_KERNEL_SCORES = 2**22

    def _kernel(self, q, k):
        """The SDPA kernel for this call: on the CPU, training on short sequences, the plain softmax(QK^T)V
        ("math"); else PyTorch's choice (the flash kernel). The CPU flash kernel's backward is slow for short
        sequences: SmolLM2 on 8 x 150 tokens spent 13 ms a layer in it in fp32 and 34 ms in bf16, a third of a
        LoRA step, where the math kernel's forward and backward take a few ms. The price is memory: it keeps each
        layer's attention probabilities for backward (SmolLM2, LoRA, 4 x 256 tokens: 0.54 GB more over 30
        layers), and that grows with T^2, hence the size limit."""
        B, H, T, _ = q.shape
        training = self.training and torch.is_grad_enabled()
        if q.device.type == "cpu" and training and B * H * T * k.shape[2] <= self.MATH_KERNEL_SCORES:
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()


class KVCache:
    """Preallocated keys and values of every layer, so decoding one token writes into place instead of growing
    tensors: (n_layer, batch, n_kv_head, max_len, head_dim) each. `length` is how many positions are filled.

    Each layer writes through its own view of the stacked buffers (`_layers`): under torch.compile a write into
    `k[layer, ...]` is a mutation of the whole 30-layer buffer, which inductor copied at every layer (a decoding
    step of SmolLM2 took 2x eager's time); a write into the layer's view touches that layer alone."""

    def __init__(self, config: TransformerConfig, batch_size: int, max_len: int, device=None, dtype=None):
        n_kv = config.n_kv_head or config.n_head
        shape = (config.n_layer, batch_size, n_kv, max_len, config.head_dim)
        self._set(torch.empty(shape, device=device, dtype=dtype or torch.float32),
                  torch.empty(shape, device=device, dtype=dtype or torch.float32))
        self.length = 0  # positions filled in every layer (advanced by the model after its last layer)
        self.max_len = max_len

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self._layers = list(zip(k.unbind(0), v.unbind(0)))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values for `layer`; return all keys/values so far (views, no copy)."""
        end = self.length + k.shape[2]
        keys, values = self._layers[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        self._set(self.k.index_select(1, rows), self.v.index_select(1, rows))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.intermediate_size or 4 * config.n_embd
        self.gated = config.mlp in ("swiglu", "geglu", "gated")
        self.act = _ACTIVATIONS[{"swiglu": "silu", "geglu": "gelu_tanh"}.get(config.mlp, config.activation)]
        # SwiGLU, and the GELU-gated MLPs of T5 1.1 and Gemma: act(x W_gate) * (x W_up), fused into one matrix of
        # twice the width.
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Attention then MLP, each with a residual connection; norms before (pre) or after (post) each, or
    "sandwich" (Gemma 2 and 3): before each, and on its output before it joins the residual stream. With
    config.cross_attention (T5's decoder) a cross-attention over the encoder output sits between them. With
    mlp="none" the block is attention alone (no MLP, nor its norms): the residual stream is then a sum of
    attention heads' outputs, which is what makes induction heads readable (Elhage et al. 2021)."""

    def __init__(self, config: TransformerConfig, layer: int = 0):
        super().__init__()
        self.post_norm = config.norm_placement == "post"
        sandwich = config.norm_placement == "sandwich"
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.post_attn_norm = make_norm(config) if sandwich else nn.Identity()
        if config.cross_attention:
            self.norm_cross = make_norm(config)
            self.cross = Attention(config, cross=True)
        feed_forward = config.mlp != "none"
        self.norm2 = make_norm(config) if feed_forward else None
        self.mlp = MLP(config) if feed_forward else None
        self.post_mlp_norm = make_norm(config) if sandwich and feed_forward else nn.Identity()

    def forward(self, x, rotary=None, attn_mask=None, cache=None, layer: int = 0, memory_kv=None, memory_mask=None):
        if self.post_norm:
            x = self.norm1(x + self.attn(x, rotary, attn_mask, cache, layer))
            return x if self.mlp is None else self.norm2(x + self.mlp(x))
        x = x + self.post_attn_norm(self.attn(self.norm1(x), rotary, attn_mask, cache, layer))
        if memory_kv is not None:  # pre-norm only: T5 is the one encoder-decoder here
            x = x + self.cross(self.norm_cross(x), attn_mask=memory_mask, memory_kv=memory_kv)
        return x if self.mlp is None else x + self.post_mlp_norm(self.mlp(self.norm2(x)))


class TiedWeights:
    """Saving and loading of a model whose LM head may share the token embedding (config.tie_embeddings): the
    Transformer here and T5's EncoderDecoder."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict as saved to safetensors: a tied head is stored once, as the token embedding."""
        state = self.state_dict()
        if self.config.tie_embeddings:
            del state["lm_head.weight"]
        return state

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if self.config.tie_embeddings:
            state = {**state, "lm_head.weight": state["tok_emb.weight"]}
        self.load_state_dict(state, strict=True)


class Transformer(TiedWeights, nn.Module):
    """Decoder-only language model: token (+ position) embeddings, a stack of Blocks, a final norm, an LM head."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.type_emb = nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None
        # Post-norm blocks take normalised inputs (each ends in a norm), so the embeddings are normalised too (BERT).
        self.emb_norm = make_norm(config) if config.norm_placement == "post" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # Post-norm blocks end in a norm already; pre-norm (and sandwich) stacks need one before the head.
        self.norm_f = make_norm(config) if config.norm_placement != "post" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.pooler else None
        if config.position == "rope":
            # Not saved in checkpoints: they are a function of the config.
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            self.register_buffer("rope_local_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_local_sin", torch.empty(0), persistent=False)
            self.fill_rotary_tables()
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer), so the
        # residual's variance does not grow with depth (each block adds two such terms).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                writes = 2 if config.mlp != "none" else 1
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(writes * config.n_layer))

    @classmethod
    def from_weights(cls, config: TransformerConfig, state: dict[str, torch.Tensor]) -> "Transformer":
        """A model holding `state`, built without the random initialisation that the weights would overwrite
        (seconds for a 100M-parameter model)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        if config.tie_embeddings:  # to_empty gives every module its own new tensor, which unties a shared one
            model.lm_head.weight = model.tok_emb.weight
        model.fill_rotary_tables()
        model.load_weights(state)
        return model

    def fill_rotary_tables(self) -> None:
        """The rotary cos/sin tables of the config (buffers, not weights: also after building on the meta device)."""
        if self.config.position == "rope":
            c = self.config
            self.rope_cos, self.rope_sin = rotary_tables(c.head_dim, c.block_size, c.rope_theta)
            if self._local_layers():  # Gemma 3: the local layers rotate with their own base (10k vs 1M)
                self.rope_local_cos, self.rope_local_sin = rotary_tables(c.head_dim, c.block_size,
                                                                         c.rope_local_theta)
            else:  # unused, but a real (empty) tensor also in a model built on the meta device
                self.rope_local_cos, self.rope_local_sin = torch.empty(0), torch.empty(0)

    def _local_layers(self) -> bool:
        return any(self.config.is_local(i) for i in range(self.config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                last_only: bool = False, token_type_ids: torch.Tensor | None = None, return_hidden: bool = False,
                loss_only: bool = False, reduction: str = "mean"):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (targets of -100 are ignored).

        `loss_only` (with targets) returns (None, loss) and runs the LM head only at the positions that have a
        target: a response-only loss skips the prompt, so the vocabulary-sized matmul and softmax shrink (in
        instruction tuning about half of a batch's positions). It needs a data-dependent shape, so it is off
        by default (torch.compile prefers fixed shapes). With reduction="none" the loss is each position's
        cross-entropy, (B, T), 0 where there is no target (DPO sums it per sequence).

        For encoders and classifiers: `token_type_ids` (B, T) are the segments of a sentence pair (default 0);
        `return_hidden` returns the final hidden states (B, T, n_embd) alone, without the LM head.

        For generation: `cache` holds the keys/values of earlier positions and is extended by this call;
        `positions` (B, T) gives each token's position (default: cache.length + 0..T-1), which lets left-padded
        rows start at position 0; `key_mask` (B, cache.length + T) is False at padding, which no token attends to;
        `last_only` computes logits for the last position alone (all that sampling needs after a prefill).
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise LmlabError(f"sequence of {past + T} tokens is longer than the model's context "
                             f"(block_size {self.config.block_size})")
        if cache is not None and past + T > cache.max_len:
            raise LmlabError(f"the KV cache holds {cache.max_len} positions; {past + T} are needed")
        x = self.tok_emb(idx)
        if self.config.embed_scale:  # Gemma: sqrt(n_embd), rounded to the weights' dtype as Gemma does
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device)
        rotary = local_rotary = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rotary = self._rotary(self.rope_cos, self.rope_sin, positions)
            if self._local_layers():
                local_rotary = self._rotary(self.rope_local_cos, self.rope_local_sin, positions)
        if self.type_emb is not None:
            x = x + self.type_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(idx))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        attn_mask = self._attention_mask(B, T, past, key_mask, idx.device)
        local_mask = None
        if self._local_layers():
            local_mask = self._attention_mask(B, T, past, key_mask, idx.device, self.config.sliding_window)
        for i, block in enumerate(self.blocks):
            if self.config.is_local(i):
                x = block(x, local_rotary if local_rotary is not None else rotary, local_mask, cache, i)
            else:
                x = block(x, rotary, attn_mask, cache, i)
        if cache is not None:
            cache.length += T
        if return_hidden:
            return self.norm_f(x)
        if last_only:
            x = x[:, -1:]
        if loss_only and targets is not None:
            return None, self._head_loss(x, targets, reduction)
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """The loss_only path: the LM head and cross-entropy at the positions that have a target. The mean goes
        through linear_cross_entropy (chunked, never the full fp32 logits); reduction="none" (DPO) keeps the
        plain head."""
        if torch.compiler.is_compiling() and reduction == "mean":
            # A boolean selection has a data-dependent shape; the fused loss skips ignored targets itself.
            keep, hidden, kept = None, self.norm_f(x), targets
        else:
            keep = targets != -100
            hidden, kept = self.norm_f(x[keep]), targets[keep]
        if reduction == "mean" and type(self.lm_head) is nn.Linear:  # not a LoRA- or int8-wrapped head
            return linear_cross_entropy(hidden, self.lm_head.weight, kept)
        loss = F.cross_entropy(self.lm_head(hidden).float(), kept, reduction=reduction)
        if reduction == "none":
            per_position = torch.zeros(targets.shape, dtype=loss.dtype, device=loss.device)
            per_position[keep] = loss
            return per_position
        return loss

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(h_[CLS])), the first token's hidden state, for sentence-level heads."""
        if self.pooler is None:
            raise LmlabError("this model has no pooler (config pooler: false); pool the hidden states another way")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @staticmethod
    def _rotary(cos_table, sin_table, positions):
        cos, sin = cos_table[positions], sin_table[positions]
        # (T, D) broadcasts over batch and heads; (B, T, D) needs a head axis.
        return (cos, sin) if cos.dim() == 2 else (cos.unsqueeze(1), sin.unsqueeze(1))

    def _attention_mask(self, B: int, T: int, past: int, key_mask, device, window: int = 0):
        """A boolean (B, 1, T, past+T) mask (True = may attend), or None when SDPA's own causal flag (or no mask
        at all, for one new token) says the same thing faster. With a sliding `window`, a query at slot q sees
        the keys at slots q - window < s <= q: slots, not positions, since every row's tokens are contiguous in
        the cache (left padding and the engine's shared timeline alike). One new token needs no window mask:
        its local layers keep only the cache's last `window` keys (Attention.forward)."""
        S = past + T
        windowed = self.config.causal and 0 < window < S and T > 1
        if key_mask is None and not windowed and (past == 0 or T == 1 or not self.config.causal):
            return None
        allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
        if self.config.causal:
            q_at = torch.arange(past, S, device=device)[:, None]
            keys = torch.arange(S, device=device)[None, :]
            allowed = (keys <= q_at) & (keys > q_at - window) if windowed else keys <= q_at
            allowed = allowed[None, None]
        if key_mask is not None:
            # A padding query still attends to itself, so that no row of the softmax is empty (NaN).
            own = torch.arange(S, device=device)[None, :] == torch.arange(past, S, device=device)[:, None]
            allowed = allowed & (key_mask[:, None, None, :S].bool() | own[None, None])
        return allowed

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B: 6N + 12 L T C."""
        c = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layer * c.block_size * c.n_embd
