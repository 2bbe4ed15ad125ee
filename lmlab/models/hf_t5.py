"""Hugging Face T5 (`T5ForConditionalGeneration`) names and config for lmlab.models.t5.EncoderDecoder.

T5 keeps separate q/k/v projections and, in T5 1.1, two input matrices of the gated feed-forward (wi_0 through the
activation, wi_1 linear); lmlab fuses them by stacking rows as for Llama: self-attention `attn.qkv` = [q; k; v],
cross-attention `cross.kv` = [k; v], `mlp.fc` = [wi_0; wi_1]. The relative position bias lives in the first
layer of each stack in Hugging Face's names and in the stack (encoder_bias, decoder_bias) in lmlab's. One table
is read both ways: loading concatenates the rows, exporting splits them back.
"""

from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.models.t5 import EncoderDecoder
from lmlab.models.transformer import TransformerConfig

_FEED_FORWARD = {"relu": ("gelu", "relu"), "gated-gelu": ("gated", "gelu_tanh")}  # -> lmlab (mlp, activation)
_T5_SHAPE = dict(encoder_decoder=True, position="relative", norm="rmsnorm", norm_placement="pre", bias=False,
                 scale_attention=False)


def t5_config(hf: dict, where: str = "config.json", separate_head: bool = False) -> TransformerConfig:
    """lmlab config of a Hugging Face T5 config dict; what lmlab cannot express is refused in one line.

    transformers 4 marks T5 1.1 by tie_word_embeddings: false (an own lm_head, no rescaling); transformers 5 always
    writes true and says scale_decoder_outputs: false instead. The head is separate when the checkpoint has its
    own lm_head.weight (separate_head); the rescaling follows scale_decoder_outputs, else tie_word_embeddings."""
    tied = hf.get("tie_word_embeddings", True) is not False
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FEED_FORWARD:
        raise LmlabError(f"{where}: feed_forward_proj {ff!r} is not supported (supported: {', '.join(_FEED_FORWARD)})")
    mlp, activation = _FEED_FORWARD[ff]
    return TransformerConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions") or 512, n_layer=hf["num_layers"],
        n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
        head_size=hf["d_kv"], n_embd=hf["d_model"], intermediate_size=hf["d_ff"], dropout=0.0,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), mlp=mlp, activation=activation,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        tie_embeddings=tied and not separate_head, head_scale=bool(hf.get("scale_decoder_outputs", tied)),
        **_T5_SHAPE,
    )


def t5_config_dict(c: TransformerConfig) -> dict:
    off = [f"{k}={getattr(c, k)!r}" for k, v in _T5_SHAPE.items() if getattr(c, k) != v]
    ff = {shape: name for name, shape in _FEED_FORWARD.items()}.get((c.mlp, c.activation))
    if ff is None:
        off.append(f"mlp={c.mlp!r} with activation={c.activation!r}")
    if off:
        raise LmlabError(f"this model is not T5-shaped ({', '.join(off)}); only T5 encoder-decoders export as T5")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": c.vocab_size,
        "d_model": c.n_embd,
        "d_kv": c.head_dim,
        "d_ff": c.intermediate_size or 4 * c.n_embd,
        "num_layers": c.n_layer,
        "num_decoder_layers": c.n_decoder_layer or c.n_layer,
        "num_heads": c.n_head,
        "relative_attention_num_buckets": c.relative_buckets,
        "relative_attention_max_distance": c.relative_max_distance,
        "dropout_rate": c.dropout,
        "layer_norm_epsilon": c.norm_eps,
        "feed_forward_proj": ff,
        "dense_act_fn": "gelu_new" if ff == "gated-gelu" else "relu",
        "is_gated_act": ff == "gated-gelu",
        "tie_word_embeddings": c.tie_embeddings,
        "scale_decoder_outputs": c.head_scale if c.head_scale is not None else c.tie_embeddings,
        "n_positions": c.block_size,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    }


def _table(c: TransformerConfig) -> dict[str, list[tuple[str, int]]]:
    """lmlab name -> the Hugging Face tensors (full names, rows) stacked into it."""
    inner, hidden = c.n_head * c.head_dim, c.intermediate_size or 4 * c.n_embd
    table = {"tok_emb.weight": [("shared.weight", c.vocab_size)],
             "encoder_norm.weight": [("encoder.final_layer_norm.weight", c.n_embd)],
             "decoder_norm.weight": [("decoder.final_layer_norm.weight", c.n_embd)],
             "encoder_bias.embedding.weight": [
                 ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", c.relative_buckets)],
             "decoder_bias.embedding.weight": [
                 ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", c.relative_buckets)]}
    if not c.tie_embeddings:
        table["lm_head.weight"] = [("lm_head.weight", c.vocab_size)]
    fc = [("wi_0", hidden), ("wi_1", hidden)] if c.mlp == "gated" else [("wi", hidden)]
    for stack, n, ff in (("encoder", c.n_layer, 1), ("decoder", c.n_decoder_layer or c.n_layer, 2)):
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}.{i}"
            table.update({
                f"{ours}.norm1.weight": [(f"{hf}.0.layer_norm.weight", c.n_embd)],
                f"{ours}.attn.qkv.weight": [(f"{hf}.0.SelfAttention.{m}.weight", inner) for m in "qkv"],
                f"{ours}.attn.proj.weight": [(f"{hf}.0.SelfAttention.o.weight", c.n_embd)],
                f"{ours}.norm2.weight": [(f"{hf}.{ff}.layer_norm.weight", c.n_embd)],
                f"{ours}.mlp.fc.weight": [(f"{hf}.{ff}.DenseReluDense.{m}.weight", rows) for m, rows in fc],
                f"{ours}.mlp.proj.weight": [(f"{hf}.{ff}.DenseReluDense.wo.weight", c.n_embd)],
            })
            if stack == "decoder":
                table.update({
                    f"{ours}.norm_cross.weight": [(f"{hf}.1.layer_norm.weight", c.n_embd)],
                    f"{ours}.cross.q.weight": [(f"{hf}.1.EncDecAttention.q.weight", inner)],
                    f"{ours}.cross.kv.weight": [(f"{hf}.1.EncDecAttention.{m}.weight", inner) for m in "kv"],
                    f"{ours}.cross.proj.weight": [(f"{hf}.1.EncDecAttention.o.weight", c.n_embd)],
                })
    return table


def t5_from_hf(hf: dict, tensors: dict[str, torch.Tensor], where: str = "model") -> EncoderDecoder:
    """An lmlab EncoderDecoder from a Hugging Face T5 config dict and its tensors, in eval mode."""
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    config = t5_config(hf, where, separate_head=head is not None and not (shared is not None and head.equal(shared)))
    try:
        state = {name: torch.cat([tensors[n] for n, _ in parts]) for name, parts in _table(config).items()}
    except KeyError as e:
        raise LmlabError(f"{where} lacks tensor {e.args[0]!r}; is it a complete T5 checkpoint?") from None
    try:
        model = EncoderDecoder.from_weights(config, state)
    except RuntimeError as e:  # shape mismatches: the config and the tensors disagree
        raise LmlabError(f"{where}: tensors do not match the config ({str(e).splitlines()[-1].strip()})") from None
    return model.eval()


def t5_to_hf(model: EncoderDecoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Hugging Face config dict and tensors of an lmlab EncoderDecoder (the tied embedding stored once)."""
    c = model.config
    config = t5_config_dict(c)
    ours = model.state_dict()
    tensors = {}
    for name, parts in _table(c).items():
        pieces = ours[name].split([rows for _, rows in parts])
        tensors.update({n: t.contiguous() for (n, _), t in zip(parts, pieces)})
    return config, tensors
