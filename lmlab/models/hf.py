"""Hugging Face interoperability: read and write `config.json` + `*.safetensors` folders.

Two families map onto lmlab's Transformer:

GPT-2   one to one. Hugging Face's GPT-2 keeps its linear layers as `Conv1D`, whose weight is stored transposed
        (in_features, out_features); the fused `c_attn` is already our fused QKV projection.
Llama   (also SmolLM2, and other `LlamaForCausalLM` checkpoints) separate q/k/v and gate/up projections, which
        lmlab fuses by stacking their rows: `attn.qkv` = [q; k; v], `mlp.fc` = [gate; up]. Both use the same
        half-split rotary convention (`rotate_half`), so no weight is permuted. The GGUF loader (gguf_model.py)
        renames GGUF tensors to these Hugging Face names and comes through here too.
BERT    (BertModel, and the `bert.` body of BertFor* checkpoints, e.g. all-MiniLM-L6-v2) separate query/key/value,
        fused the same way; post-norm blocks, normalised embeddings, token-type embeddings and the pooler are
        switches of the same Transformer. Task heads (MLM, classifiers) are not read: lmlab.training.classification adds its own.
        A WordPiece tokenizer is read from tokenizer.json, or built from vocab.txt as BertTokenizerFast does.
Gemma 3 (Gemma3ForCausalLM, model_type gemma3_text) is Llama's table plus the query/key norms and the norms after
        attention and MLP; its `post_attention_layernorm` is such an after-norm, not Llama's pre-MLP norm (that is
        `pre_feedforward_layernorm`). Norm weights are stored as Gemma stores them (the model adds 1).
T5      (T5ForConditionalGeneration, T5 1.0 and 1.1 / Flan-T5 shapes) as lmlab.models.t5.EncoderDecoder; its
        names and config live in lmlab.models.hf_t5.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmlab.errors import LmlabError
from lmlab.models.hf_t5 import t5_from_hf, t5_to_hf
from lmlab.models.t5 import EncoderDecoder
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.util import atomic_write_text, load_safetensors, save_safetensors_atomic

_GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_FROM_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                          "relu": "relu", "silu": "silu"}

# lmlab name -> (Hugging Face GPT-2 name, stored transposed?) for one block; {i} is the layer index.
_GPT2_BLOCK = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_GPT2_TOP = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
             "norm_f.weight": "ln_f.weight", "norm_f.bias": "ln_f.bias"}

# lmlab name -> Hugging Face Llama name, outside the blocks. A tied head has no lm_head.weight of its own.
LLAMA_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LLAMA_SHAPE = dict(norm="rmsnorm", norm_placement="pre", position="rope", mlp="swiglu", bias=False, causal=True)


def llama_block(c: TransformerConfig) -> dict[str, list[tuple[str, int]]]:
    """lmlab name -> the Hugging Face Llama tensors (name under `model.layers.{i}.`, rows) stacked into it.

    One table read both ways: loading concatenates the rows, exporting splits them back."""
    hd, n_kv = c.head_dim, c.n_kv_head or c.n_head
    hidden = c.intermediate_size or 4 * c.n_embd
    return {
        "norm1.weight": [("input_layernorm.weight", c.n_embd)],
        "attn.qkv.weight": [("self_attn.q_proj.weight", c.n_head * hd), ("self_attn.k_proj.weight", n_kv * hd),
                            ("self_attn.v_proj.weight", n_kv * hd)],
        "attn.proj.weight": [("self_attn.o_proj.weight", c.n_embd)],
        "norm2.weight": [("post_attention_layernorm.weight", c.n_embd)],
        # Gate first: MLP.forward takes `gate, up = h.chunk(2)`.
        "mlp.fc.weight": [("mlp.gate_proj.weight", hidden), ("mlp.up_proj.weight", hidden)],
        "mlp.proj.weight": [("mlp.down_proj.weight", c.n_embd)],
    }


_GEMMA3_SHAPE = dict(norm="rmsnorm", norm_placement="sandwich", norm_offset=1.0, position="rope", mlp="geglu",
                     bias=False, causal=True, qk_norm=True, embed_scale=True, tie_embeddings=True)


def gemma3_block(c: TransformerConfig) -> dict[str, list[tuple[str, int]]]:
    """lmlab name -> the Hugging Face Gemma 3 tensors under `model.layers.{i}.`; read both ways like llama_block."""
    table = llama_block(c)
    return {"norm1.weight": table["norm1.weight"], "attn.qkv.weight": table["attn.qkv.weight"],
            "attn.q_norm.weight": [("self_attn.q_norm.weight", c.head_dim)],
            "attn.k_norm.weight": [("self_attn.k_norm.weight", c.head_dim)],
            "attn.proj.weight": table["attn.proj.weight"],
            "post_attn_norm.weight": [("post_attention_layernorm.weight", c.n_embd)],
            "norm2.weight": [("pre_feedforward_layernorm.weight", c.n_embd)],
            "mlp.fc.weight": table["mlp.fc.weight"], "mlp.proj.weight": table["mlp.proj.weight"],
            "post_mlp_norm.weight": [("post_feedforward_layernorm.weight", c.n_embd)]}


def is_gemma3_shaped(c: TransformerConfig) -> bool:
    return all(getattr(c, k) == v for k, v in _GEMMA3_SHAPE.items())


def gemma3_config(hf: dict, where: str = "config.json") -> TransformerConfig:
    """lmlab config for a Hugging Face Gemma 3 text config (transformers 5's rope_parameters per layer type, or
    4's rope_theta / rope_local_base_freq / sliding_window_pattern); what the block cannot express is refused."""
    n_layer = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", 6)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(n_layer)]
    every = next((i + 1 for i, t in enumerate(types) if t == "full_attention"), 0)
    rope = hf.get("rope_parameters") or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    problems = [f"{name} {hf[name]}" for name in ("final_logit_softcapping", "attn_logit_softcapping",
                                                  "use_bidirectional_attention") if hf.get(name)]
    if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {hf['hidden_activation']!r} (lmlab's GeGLU uses tanh-GELU)")
    if any(p.get("rope_type", "default") != "default" for p in (full, local, hf.get("rope_scaling") or {})):
        problems.append("rope scaling (lmlab implements plain rotary positions only)")
    config = dict(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 32768), n_layer=n_layer,
        n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"), n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], head_size=hf.get("head_dim", 256), dropout=0.0,
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(full.get("rope_theta", hf.get("rope_theta", 1e6))),
        rope_local_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256), sliding_window=hf.get("sliding_window") or 0,
        global_every=every, **_GEMMA3_SHAPE)
    ours = TransformerConfig(**config)
    if [ours.is_local(i) for i in range(n_layer)] != [t == "sliding_attention" for t in types]:
        problems.append(f"layer_types {types} (lmlab repeats local layers then one global one)")
    if problems:
        raise LmlabError(f"{where}: unsupported Gemma 3 setting: {'; '.join(problems)}; use a checkpoint without it")
    return ours


def gemma3_config_dict(c: TransformerConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A `Gemma3ForCausalLM` config.json, with the rotary bases both the transformers 5 and 4 ways."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size or 4 * c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head or c.n_head,
        "head_dim": c.head_dim, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps, "query_pre_attn_scalar": c.query_pre_attn_scalar or c.head_dim,
        "sliding_window": c.sliding_window or None,
        "layer_types": ["sliding_attention" if c.is_local(i) else "full_attention" for i in range(c.n_layer)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}},
        "rope_theta": c.rope_theta, "rope_local_base_freq": c.rope_local_theta, "tie_word_embeddings": True,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }


def gemma3_from_hf(hf: dict, tensors: dict[str, torch.Tensor], where: str = "model") -> Transformer:
    """An lmlab Transformer from a Hugging Face Gemma 3 text config and its tensors (Hugging Face names; a
    Gemma3ForConditionalGeneration's language model under `model.language_model.` is read too)."""
    config = gemma3_config(hf, where)
    tensors = {k.replace("model.language_model.", "model."): v for k, v in tensors.items()}
    top = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    return _stacked_model(config, top, gemma3_block(config), "model.layers.", tensors, where, "Gemma 3")


def _check_shape(c: TransformerConfig, family: str, wanted: dict) -> None:
    off = [f"{k}={getattr(c, k)!r}" for k, v in wanted.items() if getattr(c, k) != v]
    if family == "GPT-2" and c.n_kv_head not in (None, c.n_head):
        off.append(f"n_kv_head={c.n_kv_head}")
    if off:
        hint = " (or Llama checkpoints, for rmsnorm/rope/swiglu models without biases)" if family == "GPT-2" else ""
        raise LmlabError(f"this model is not {family} shaped ({', '.join(off)}); the Hugging Face export writes "
                         f"{family} checkpoints{hint}")


def _check_gpt2_compatible(c: TransformerConfig) -> None:
    _check_shape(c, "GPT-2", dict(norm="layernorm", norm_placement="pre", position="learned", mlp="gelu", bias=True,
                                  causal=True, tie_embeddings=True))


def is_llama_shaped(c: TransformerConfig) -> bool:
    return all(getattr(c, k) == v for k, v in _LLAMA_SHAPE.items())


def gpt2_config_dict(c: TransformerConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.intermediate_size,
        "activation_function": _GPT2_ACTIVATIONS[c.activation],
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        # Our tokenizers have no GPT-2 <|endoftext|> at id 50256; leave the special ids unset.
        "bos_token_id": None,
        "eos_token_id": None,
    }


def llama_config_dict(c: TransformerConfig, dtype: torch.dtype = torch.float32,
                      bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """A `LlamaForCausalLM` config.json. The rotary base is written both the transformers 4 way (rope_theta)
    and the transformers 5 way (rope_parameters), so either version reads it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size or 4 * c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head or c.n_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def llama_config(hf: dict, where: str = "config.json") -> TransformerConfig:
    """lmlab config for a Hugging Face Llama config dict; anything lmlab's block cannot express is refused."""
    rope = hf.get("rope_parameters") or {}  # transformers >= 5
    scaling = hf.get("rope_scaling") or {}  # transformers 4
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    problems = []
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r} (lmlab implements plain rotary positions only)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (lmlab's SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (lmlab's Llama blocks have no biases)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        problems.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise LmlabError(f"{where}: unsupported Llama setting: {'; '.join(problems)}; use a checkpoint without it")
    return TransformerConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd, intermediate_size=hf["intermediate_size"], dropout=0.0, bias=False,
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), mlp="swiglu", activation="silu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def llama_from_hf(hf: dict, tensors: dict[str, torch.Tensor], where: str = "model") -> Transformer:
    """An lmlab Transformer from a Hugging Face Llama config dict and its tensors (Hugging Face names)."""
    config = llama_config(hf, where)
    top = {name: hf_name for name, hf_name in LLAMA_TOP.items()
           if not (name == "lm_head.weight" and config.tie_embeddings)}
    return _stacked_model(config, top, llama_block(config), "model.layers.", tensors, where, "Llama")


def _stacked_model(config: TransformerConfig, top: dict[str, str], block: dict[str, list[tuple[str, int]]],
                   prefix: str, tensors: dict[str, torch.Tensor], where: str, family: str) -> Transformer:
    """A model from Hugging Face tensors named by `top` (outside the blocks) and `block` (the tensors under
    `{prefix}{i}.` stacked into each lmlab block tensor; see llama_block)."""
    try:
        state = {name: tensors[hf_name] for name, hf_name in top.items()}
        for i in range(config.n_layer):
            for name, parts in block.items():
                state[f"blocks.{i}.{name}"] = torch.cat([tensors[f"{prefix}{i}.{n}"] for n, _ in parts])
    except KeyError as e:
        raise LmlabError(f"{where} lacks tensor {e.args[0]!r}; is it a complete {family} checkpoint?") from None
    return _built(config, state, where)


def _split_blocks(c: TransformerConfig, ours: dict[str, torch.Tensor], block: dict[str, list[tuple[str, int]]],
                  prefix: str) -> dict[str, torch.Tensor]:
    """The other way: each lmlab block tensor split back into its Hugging Face tensors."""
    tensors = {}
    for i in range(c.n_layer):
        for name, parts in block.items():
            pieces = ours[f"blocks.{i}.{name}"].split([rows for _, rows in parts])
            tensors.update({f"{prefix}{i}.{n}": t for (n, _), t in zip(parts, pieces)})
    return tensors


def _built(config: TransformerConfig, state: dict[str, torch.Tensor], where: str) -> Transformer:
    try:
        model = Transformer.from_weights(config, state)
    except RuntimeError as e:  # shape mismatches: the config and the tensors disagree
        raise LmlabError(f"{where}: tensors do not match the config ({str(e).splitlines()[-1].strip()})") from None
    return model.eval()


def _gpt2_from_hf(hf: dict, tensors: dict[str, torch.Tensor], where: str) -> Transformer:
    act = hf.get("activation_function", "gelu_new")
    if act not in _FROM_GPT2_ACTIVATIONS:
        raise LmlabError(f"{where}: activation_function {act!r} is not supported")
    config = TransformerConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_FROM_GPT2_ACTIVATIONS[act], dropout=0.0,
    )
    # Checkpoints differ on whether names carry the "transformer." prefix.
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    state = {}
    try:
        for name, hf_name in _GPT2_TOP.items():
            state[name] = tensors[hf_name]
        for i in range(config.n_layer):
            for name, (hf_name, transposed) in _GPT2_BLOCK.items():
                t = tensors[f"h.{i}.{hf_name}"]
                state[f"blocks.{i}.{name}"] = t.t().contiguous() if transposed else t
    except KeyError as e:
        raise LmlabError(f"{where} lacks tensor {e.args[0]!r}; is it a GPT-2 checkpoint?") from None
    return _built(config, state, where)


# lmlab name -> Hugging Face BERT name, outside the blocks (and the pooler, when the checkpoint has one).
_BERT_TOP = {"tok_emb.weight": "embeddings.word_embeddings.weight",
             "pos_emb.weight": "embeddings.position_embeddings.weight",
             "type_emb.weight": "embeddings.token_type_embeddings.weight",
             "emb_norm.weight": "embeddings.LayerNorm.weight", "emb_norm.bias": "embeddings.LayerNorm.bias"}
_BERT_POOLER = {"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"}
_BERT_SHAPE = dict(norm="layernorm", norm_placement="post", position="learned", mlp="gelu", bias=True, causal=False,
                   tie_embeddings=True)
_FROM_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                          "silu": "silu"}
_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _bert_block(c: TransformerConfig) -> dict[str, list[tuple[str, int]]]:
    """lmlab name -> the Hugging Face BERT tensors (under `encoder.layer.{i}.`, rows) stacked into it; read both
    ways like llama_block. The block is post-norm: norm1 follows attention, norm2 the MLP, as in BERT."""
    C, hidden = c.n_embd, c.intermediate_size or 4 * c.n_embd
    table = {"attn.qkv": [("attention.self.query", C), ("attention.self.key", C), ("attention.self.value", C)],
             "attn.proj": [("attention.output.dense", C)], "norm1": [("attention.output.LayerNorm", C)],
             "mlp.fc": [("intermediate.dense", hidden)], "mlp.proj": [("output.dense", C)],
             "norm2": [("output.LayerNorm", C)]}
    return {f"{name}.{kind}": [(f"{n}.{kind}", rows) for n, rows in parts]
            for name, parts in table.items() for kind in ("weight", "bias")}


def is_bert_shaped(c: TransformerConfig) -> bool:
    return all(getattr(c, k) == v for k, v in _BERT_SHAPE.items()) and c.n_kv_head in (None, c.n_head)


def bert_config(hf: dict, where: str = "config.json", pooler: bool = False) -> TransformerConfig:
    act = hf.get("hidden_act", "gelu")
    problems = []
    if act not in _FROM_BERT_ACTIVATIONS:
        problems.append(f"hidden_act {act!r}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf['position_embedding_type']!r} (lmlab reads absolute only)")
    if problems:
        raise LmlabError(f"{where}: unsupported BERT setting: {'; '.join(problems)}; use a checkpoint without it")
    return TransformerConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 512),
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size"), dropout=0.0, bias=True, norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12), norm_placement="post", position="learned", mlp="gelu",
        activation=_FROM_BERT_ACTIVATIONS[act], causal=False, tie_embeddings=True,
        type_vocab_size=hf.get("type_vocab_size", 2), pooler=pooler,
    )


def _bert_from_hf(hf: dict, tensors: dict[str, torch.Tensor], where: str) -> Transformer:
    # BertFor* checkpoints keep the body under "bert."; TF-era ones name LayerNorm parameters gamma/beta.
    tensors = {k.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
               .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in tensors.items()}
    config = bert_config(hf, where, pooler="pooler.dense.weight" in tensors)
    top = {**_BERT_TOP, **(_BERT_POOLER if config.pooler else {})}
    return _stacked_model(config, top, _bert_block(config), "encoder.layer.", tensors, where, "BERT")


def bert_tokenizer(folder: str | Path) -> Tokenizer:
    """The WordPiece tokenizer of a BERT folder, ready for lmlab: [CLS] A [SEP] (B [SEP]) with token types 0/1,
    no padding and no truncation (callers pad and truncate per batch). From tokenizer.json when there is one,
    else built from vocab.txt with the pieces BertTokenizerFast uses (BERT normaliser and pre-tokenizer,
    WordPiece with ## continuations, lower-casing as tokenizer_config.json's do_lower_case says)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file():
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (folder / "tokenizer_config.json").is_file() else {}
        tok = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
            strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if tok.token_to_id(t) is not None]
        tok.add_special_tokens(specials)
        if tok.token_to_id("[CLS]") is None or tok.token_to_id("[SEP]") is None:
            raise LmlabError(f"{folder}/vocab.txt has no [CLS] or [SEP]; is it a BERT vocabulary?")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    else:
        raise LmlabError(f"{folder} has neither tokenizer.json nor vocab.txt; a BERT folder needs one of them")
    tok.no_padding()
    tok.no_truncation()
    return tok


_LOADERS = {"gpt2": _gpt2_from_hf, "llama": llama_from_hf, "bert": _bert_from_hf, "gemma3_text": gemma3_from_hf,
            "t5": t5_from_hf}


def load_hf(folder: str | Path) -> Transformer | EncoderDecoder:
    """Load a Hugging Face folder (config.json + model.safetensors, or sharded *.safetensors) of a GPT-2, Llama,
    BERT or T5 model as an lmlab Transformer (EncoderDecoder for T5), in eval mode."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    weight_files = sorted(folder.glob("*.safetensors"))
    if not cfg_path.exists():
        raise LmlabError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    if not weight_files:
        raise LmlabError(f"{folder} is not a Hugging Face model folder: model.safetensors is missing "
                         "(only safetensors weights are read, not pytorch_model.bin)")
    hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    loader = _LOADERS.get(hf.get("model_type"))
    if loader is None:
        raise LmlabError(f"{folder}: model_type {hf.get('model_type')!r} is not supported yet "
                         f"(supported: {', '.join(_LOADERS)})")
    tensors = {}
    for path in weight_files:
        tensors.update(load_safetensors(path))
    return loader(hf, tensors, str(folder))


def _tokenizer_text(tokenizer: str | Path | Tokenizer) -> str:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.to_str()
    return Path(tokenizer).read_text(encoding="utf-8")


def _write_tokenizer(out: Path, tokenizer: str | Path | Tokenizer, block_size: int, **special) -> None:
    """tokenizer.json plus the tokenizer_config.json that makes AutoTokenizer use it as is."""
    atomic_write_text(out / "tokenizer.json", _tokenizer_text(tokenizer))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
    config.update({k: v for k, v in special.items() if v is not None})
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def export_hf(model: Transformer, out_dir: str | Path, tokenizer_json: str | Path | Tokenizer | None = None,
              **chat) -> Path:
    """Write a folder that `transformers` loads: GPT2LMHeadModel for GPT-2-shaped models, LlamaForCausalLM for
    Llama-shaped ones (`chat` passes chat_template / bos_token / eos_token on to export_hf_llama)."""
    c = model.config
    if isinstance(model, EncoderDecoder):
        return export_hf_t5(model, out_dir, tokenizer_json)
    if is_llama_shaped(c) or is_gemma3_shaped(c):
        return export_hf_llama(model, out_dir, tokenizer_json, **chat)
    if is_bert_shaped(c):
        return export_hf_bert(model, out_dir, tokenizer_json)
    _check_gpt2_compatible(c)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    tensors = {}
    for name, hf_name in _GPT2_TOP.items():
        tensors[f"transformer.{hf_name}"] = ours[name]
    for i in range(c.n_layer):
        for name, (hf_name, transposed) in _GPT2_BLOCK.items():
            t = ours[f"blocks.{i}.{name}"]
            tensors[f"transformer.h.{i}.{hf_name}"] = t.t() if transposed else t
    save_safetensors_atomic(tensors, out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(gpt2_config_dict(c), indent=2))
    if tokenizer_json is not None:
        _write_tokenizer(out, tokenizer_json, c.block_size)
    return out


def export_hf_llama(model: Transformer, out_dir: str | Path, tokenizer: str | Path | Tokenizer | None = None,
                    chat_template: str | None = None, bos_token: str | None = None,
                    eos_token: str | None = None) -> Path:
    """Write a folder that `transformers.LlamaForCausalLM.from_pretrained` (Gemma3ForCausalLM for a Gemma 3
    shaped model; and AutoTokenizer, when a tokenizer is given: tokenizer.json, a path or a
    `tokenizers.Tokenizer`) loads."""
    c = model.config
    gemma = is_gemma3_shaped(c)
    if not gemma:
        _check_shape(c, "Llama", _LLAMA_SHAPE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    tensors = {hf_name: ours[name] for name, hf_name in LLAMA_TOP.items()
               if not (name == "lm_head.weight" and c.tie_embeddings)}
    tensors.update(_split_blocks(c, ours, gemma3_block(c) if gemma else llama_block(c), "model.layers."))
    save_safetensors_atomic(tensors, out / "model.safetensors", metadata={"format": "pt"})
    tok = Tokenizer.from_str(_tokenizer_text(tokenizer)) if tokenizer is not None else None
    ids = {f"{k}_id": tok.token_to_id(v) if tok is not None and v is not None else None
           for k, v in (("bos_token", bos_token), ("eos_token", eos_token))}
    dtype = model.tok_emb.weight.dtype
    hf_config = {**gemma3_config_dict(c, dtype), **{k: v for k, v in ids.items() if v is not None}} if gemma \
        else llama_config_dict(c, dtype, **ids)
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2))
    if tok is not None:
        _write_tokenizer(out, tok, c.block_size, chat_template=chat_template, bos_token=bos_token,
                         eos_token=eos_token)
    return out


def bert_config_dict(c: TransformerConfig) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.intermediate_size or 4 * c.n_embd,
        "hidden_act": _BERT_ACTIVATIONS[c.activation],
        "max_position_embeddings": c.block_size,
        "type_vocab_size": max(1, c.type_vocab_size),
        "layer_norm_eps": c.norm_eps,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def export_hf_bert(model: Transformer, out_dir: str | Path, tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Write a folder that `transformers.BertModel.from_pretrained` (and AutoTokenizer, given a tokenizer) loads.
    A model without token types gets one all-zero type row, which adds nothing: the same hidden states."""
    c = model.config
    _check_shape(c, "BERT", _BERT_SHAPE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    if c.type_vocab_size == 0:
        ours["type_emb.weight"] = torch.zeros(1, c.n_embd, dtype=ours["tok_emb.weight"].dtype)
    top = {**_BERT_TOP, **(_BERT_POOLER if c.pooler else {})}
    tensors = {hf_name: ours[name] for name, hf_name in top.items()}
    tensors.update(_split_blocks(c, ours, _bert_block(c), "encoder.layer."))
    save_safetensors_atomic(tensors, out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(bert_config_dict(c), indent=2))
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_str(_tokenizer_text(tokenizer))
        named = (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]"), ("unk", "[UNK]"))
        specials = {f"{w}_token": t for w, t in named if tok.token_to_id(t) is not None}
        _write_tokenizer(out, tok, c.block_size, **specials)
    return out


def export_hf_t5(model: EncoderDecoder, out_dir: str | Path, tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Write a folder that `transformers.T5ForConditionalGeneration.from_pretrained` (and AutoTokenizer, given a
    tokenizer with T5's <pad>, </s> and <unk>) loads."""
    config, tensors = t5_to_hf(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_str(_tokenizer_text(tokenizer))
        named = (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))
        specials = {f"{w}_token": t for w, t in named if tok.token_to_id(t) is not None}
        _write_tokenizer(out, tok, model.config.block_size, **specials)
    return out
