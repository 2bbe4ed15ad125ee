"""Hugging Face interoperability: read and write `config.json` + `model.safetensors` folders.

GPT-2 checkpoints map one to one onto lmlab's Transformer. Hugging Face's GPT-2 keeps its linear layers as
`Conv1D`, whose weight is stored transposed (in_features, out_features); the fused `c_attn` is already our fused
QKV projection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmlab.errors import LmlabError
from lmlab.model import Transformer, TransformerConfig
from lmlab.util import atomic_write_text, save_safetensors_atomic

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


def _check_gpt2_compatible(c: TransformerConfig) -> None:
    wanted = dict(norm="layernorm", norm_placement="pre", position="learned", mlp="gelu", bias=True, causal=True,
                  tie_embeddings=True)
    off = [f"{k}={getattr(c, k)!r}" for k, v in wanted.items() if getattr(c, k) != v]
    if c.n_kv_head not in (None, c.n_head):
        off.append(f"n_kv_head={c.n_kv_head}")
    if off:
        raise LmlabError(f"this model is not GPT-2 shaped ({', '.join(off)}); the Hugging Face export writes "
                         "GPT-2 checkpoints")


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


def export_hf(model: Transformer, out_dir: str | Path, tokenizer_json: str | Path | None = None) -> Path:
    """Write a folder that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
    c = model.config
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
        tok = Path(tokenizer_json)
        atomic_write_text(out / "tokenizer.json", tok.read_text(encoding="utf-8"))
        atomic_write_text(out / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size}, indent=2))
    return out


def load_hf(folder: str | Path) -> Transformer:
    """Load a Hugging Face GPT-2 folder (config.json + model.safetensors) as an lmlab Transformer."""
    folder = Path(folder)
    cfg_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise LmlabError(f"{folder} is not a Hugging Face model folder: {p.name} is missing")
    hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "gpt2":
        raise LmlabError(f"{folder}: model_type {hf.get('model_type')!r} is not supported yet (supported: gpt2)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _FROM_GPT2_ACTIVATIONS:
        raise LmlabError(f"{folder}: activation_function {act!r} is not supported")
    config = TransformerConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_FROM_GPT2_ACTIVATIONS[act], dropout=0.0,
    )
    theirs = load_file(str(weights_path))
    # Checkpoints differ on whether names carry the "transformer." prefix.
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    state = {}
    try:
        for name, hf_name in _GPT2_TOP.items():
            state[name] = theirs[hf_name]
        for i in range(config.n_layer):
            for name, (hf_name, transposed) in _GPT2_BLOCK.items():
                t = theirs[f"h.{i}.{hf_name}"]
                state[f"blocks.{i}.{name}"] = t.t().contiguous() if transposed else t
    except KeyError as e:
        raise LmlabError(f"{weights_path} lacks tensor {e.args[0]!r}; is it a GPT-2 checkpoint?") from None
    model = Transformer(config)
    model.load_weights(state)
    return model.eval()
