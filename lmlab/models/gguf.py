"""Load llama.cpp's GGUF files: a Llama or Gemma 3 model, its tokenizer and its chat template, from one file.

GGUF is llama.cpp's single-file format: key/value metadata (architecture, sizes, the whole tokenizer, the chat
template) followed by tensors, usually quantized to a few bits per weight in blocks of 32 or 256 values with a
scale per block. Loading one into lmlab takes four steps:

1. read the file with the `gguf` package (llama.cpp's own Python reader);
2. dequantize every tensor to float32 with `gguf.quants.dequantize`: lmlab computes in ordinary floats, so a Q4_1
   file costs 4 bytes per weight in memory, not 0.6, but gives the same numbers llama.cpp multiplies with;
3. rename the tensors to Hugging Face Llama names and hand them to `lmlab.models.hf.llama_from_hf`, the same code that
   loads Hugging Face folders (so the fusing of q/k/v and gate/up lives in one place);
4. rebuild the tokenizer from the metadata as a Hugging Face `tokenizers.Tokenizer`.

One layout difference needs undoing. llama.cpp rotates pairs of adjacent dimensions (x0, x1), (x2, x3), ...;
Hugging Face and lmlab rotate the two halves of a head against each other (x_i, x_{i+d/2}). llama.cpp's converter
(`convert_hf_to_gguf.py`, `LlamaModel.permute`) therefore reorders the rows of the query and key projections of
each head; `unpermute_rotary` puts them back.

Gemma 3 differs in three places: llama.cpp keeps its rotary layout (no permutation), stores every norm weight
plus 1 (Gemma's RMSNorm scales by 1 + w; `convert_hf_to_gguf.py` adds the 1), and writes a SentencePiece
vocabulary (`tokenizer.ggml.model == "llama"`) without merges, rebuilt here as transformers' GGUF reader does.
What the file does not say, llama.cpp fixes for the architecture: local layers rotate with base 10,000 and every
sixth layer is global.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmlab.errors import LmlabError
from lmlab.models.hf import gemma3_from_hf, llama_from_hf
from lmlab.models.transformer import Transformer

# GGUF tensor name -> Hugging Face Llama name. Block tensors are "blk.{i}.<key>.weight".
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GEMMA3_BLOCK = {**_GGUF_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                 "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_BLOCK_NAMES = {"llama": _GGUF_BLOCK, "gemma3": _GEMMA3_BLOCK}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_GEMMA3_LOCAL_ROPE_BASE, _GEMMA3_GLOBAL_EVERY = 10000.0, 6  # llama.cpp's llama-model.cpp, LLM_ARCH_GEMMA3

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# How text is cut into words before BPE, by `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names). A vocabulary
# only tokenizes right with the split its merges were learned with.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    # GPT-2's regex, built into the ByteLevel pre-tokenizer.
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    # SmolLM: every numeral on its own, then GPT-2's regex (the model's own tokenizer.json, and llama.cpp).
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    # Llama 3.
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the others (space, control bytes)
    are moved to unused characters from 256 on, so that every token is a printable string ("Ġ" is a space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


_BYTE_TO_CHAR = _bytes_to_unicode()
_ALPHABET = set(_BYTE_TO_CHAR.values())


def read_gguf(path: str | Path):
    """Open a GGUF file (a `gguf.GGUFReader`; tensors stay on disk, memory-mapped), or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LmlabError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model "
                         "file from llama.cpp or the Hugging Face hub")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, ... on damaged files
        raise LmlabError(f"{path} is damaged or truncated ({type(e).__name__}: {_first_line(e)}); download it "
                         "again") from None
    size = os.path.getsize(path)
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise LmlabError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; download it "
                         "again")
    return reader


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no details"


def gguf_metadata(reader) -> dict[str, Any]:
    """Every key/value of the file as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row order for a query or key projection with n_head heads (its key projection is permuted
    with the key/value head count): within each head, rows 0,2,4,...,1,3,5,... -> 0,1,2,...

    llama.cpp's converter does `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`; this is its inverse."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GGUF_TOP:
        return _GGUF_TOP[gguf_name]
    m = _BLOCK_NAME.fullmatch(gguf_name)
    block = _BLOCK_NAMES[arch]
    if m and m[2] in block:
        return f"model.layers.{m[1]}.{block[m[2]]}.weight"
    return None


def _hf_layout(name: str, w: torch.Tensor, hf: dict) -> torch.Tensor:
    """A tensor under its Hugging Face name as Hugging Face stores it: llama.cpp's Llama rotary rows put back,
    Gemma's norm weights without the 1 llama.cpp added."""
    if hf["model_type"] == "gemma3_text":
        return w - 1 if name.endswith("norm.weight") else w
    for proj, n_head in (("self_attn.q_proj", hf["num_attention_heads"]),
                         ("self_attn.k_proj", hf["num_key_value_heads"])):
        if name.endswith(f"{proj}.weight"):
            return unpermute_rotary(w, n_head)
    return w


def gguf_hf_config(meta: dict, vocab_size: int, tied: bool, where: str) -> dict:
    """The Hugging Face Llama config.json that the file's metadata describes (lmlab.models.hf.llama_config reads it)."""
    arch = meta.get("general.architecture")
    if arch not in _BLOCK_NAMES:
        raise LmlabError(f"{where}: GGUF architecture {arch!r} is not supported (supported: llama, as in "
                         "SmolLM and Llama 3; gemma3)")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise LmlabError(f"{where}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return value

    if arch == "gemma3":
        return _gemma3_hf_config(get, vocab_size)

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    rope_dim = meta.get("llama.rope.dimension_count", n_embd // n_head)
    scaling = meta.get("llama.rope.scaling.type", "none")
    hf = {
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": n_embd,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": meta.get("llama.attention.key_length", n_embd // n_head),
        "max_position_embeddings": get("context_length"), "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0), "tie_word_embeddings": tied,
        "rope_scaling": None if scaling == "none" else {"rope_type": scaling},
    }
    if rope_dim != n_embd // n_head:
        raise LmlabError(f"{where}: rotary positions on {rope_dim} of {n_embd // n_head} head dimensions are not "
                         "supported (lmlab rotates whole heads)")
    return hf


def _gemma3_hf_config(get, vocab_size: int) -> dict:
    """The Hugging Face Gemma 3 text config.json of the file. The attention scale is llama.cpp's
    1/sqrt(key_length), i.e. query_pre_attn_scalar = head_dim (Gemma 3 27B alone differs)."""
    n_layer, head_dim = get("block_count"), get("attention.key_length")
    return {
        "model_type": "gemma3_text", "vocab_size": vocab_size, "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": n_layer,
        "num_attention_heads": get("attention.head_count"), "num_key_value_heads": get("attention.head_count_kv"),
        "head_dim": head_dim, "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "query_pre_attn_scalar": head_dim,
        "sliding_window": get("attention.sliding_window"), "tie_word_embeddings": True,
        "layer_types": ["sliding_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY else "full_attention"
                        for i in range(n_layer)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": get("rope.freq_base")},
                            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_BASE}},
    }


def _dequantized(t, where: str) -> torch.Tensor:
    try:
        values = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise LmlabError(f"{where}: tensor {t.name} is stored as {t.tensor_type.name}, a GGUF type lmlab cannot "
                         "dequantize (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the "
                         "IQ types); use a file quantized another way") from None
    except Exception as e:  # noqa: BLE001 - damaged block data
        raise LmlabError(f"{where}: tensor {t.name} cannot be read ({_first_line(e)}); the file is damaged") from None
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
        values = values.copy()
    # GGUF lists dimensions fastest-varying first, numpy and torch slowest first.
    return torch.from_numpy(values).reshape(tuple(int(d) for d in reversed(t.shape)))


def gguf_tensors(reader, hf: dict, where: str) -> dict[str, torch.Tensor]:
    """All tensors, dequantized to float32, under Hugging Face names and in Hugging Face's layout."""
    arch = "gemma3" if hf["model_type"] == "gemma3_text" else "llama"
    names = {t.name: _hf_name(t.name, arch) for t in reader.tensors}
    unknown = [n for n, hf_name in names.items() if hf_name is None]
    if unknown:  # rope_freqs (Llama 3.1 rope scaling), biases, ...: things lmlab's block does not have
        raise LmlabError(f"{where}: tensors {', '.join(unknown[:4])} have no place in lmlab's {arch} block; "
                         "this model variant is not supported")
    return {names[t.name]: _hf_layout(names[t.name], _dequantized(t, where), hf) for t in reader.tensors}


def gguf_tokenizer(meta: dict, where: str = "GGUF file") -> Tokenizer:
    """The file's tokenizer as a Hugging Face Tokenizer: byte-level BPE (`tokenizer.ggml.model == "gpt2"`: the
    vocabulary and merges, the split rule llama.cpp applies for `tokenizer.ggml.pre`) or Gemma's SentencePiece BPE
    ("llama", see _sentencepiece_bpe), with the control tokens added as special tokens, so that "<|im_start|>"
    typed in a prompt encodes to its one id. Built like transformers' GGUF converter, and giving the same ids,
    except where transformers lacks llama.cpp's split rule (SmolLM: a space before a non-ASCII numeral such as
    " ²")."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama") or (kind == "llama" and meta.get("general.architecture") != "gemma3"):
        raise LmlabError(f"{where}: tokenizer type {kind!r} is not supported (supported: gpt2, the byte-level BPE "
                         "of GPT-2, SmolLM and Llama 3; llama, the SentencePiece BPE of Gemma 3)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok, vocab = _byte_level_bpe(meta, tokens, where) if kind == "gpt2" else _sentencepiece_bpe(tokens)
    spelled = _ALPHABET if kind == "gpt2" else None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == _TOKEN_CONTROL and (spelled is None or set(t) <= spelled)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                    if k == _TOKEN_USER_DEFINED and t in vocab])
    bos, bos_id = special_token(meta, "bos")
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token"):
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def _byte_level_bpe(meta: dict, tokens: list[str], where: str) -> tuple[Tokenizer, dict[str, int]]:
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise LmlabError(f"{where}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(_PRE_TOKENIZERS)})")
    # Byte-level vocabularies spell every byte as a printable character; a token spelled with other characters
    # (llama.cpp writes some added tokens as plain text) is respelled the byte-level way.
    vocab = {t if set(t) <= _ALPHABET else "".join(_BYTE_TO_CHAR[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def _sentencepiece_bpe(tokens: list[str]) -> tuple[Tokenizer, dict[str, int]]:
    """Gemma's SentencePiece BPE: spaces are "▁", bytes outside the vocabulary fall back to <0xNN> tokens. The file
    lists no merges; SentencePiece ranks a merge by its result's place in the vocabulary (earlier merges first),
    so the merges are every split of a token into two vocabulary tokens, ordered by that place (longer left
    parts first), which is how transformers rebuilds them. Gemma stores its all-space tokens as spaces; the model
    sees them as "▁"s."""
    spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = sorted(((rank, -cut, token[:cut], token[cut:]) for token, rank in vocab.items()
                     for cut in range(1, len(token)) if token[:cut] in vocab and token[cut:] in vocab),
                    key=lambda m: (m[0], m[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for _, _, left, right in merges], fuse_unk=True,
                               unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, vocab


def special_token(meta: dict, which: str) -> tuple[str | None, int | None]:
    """(text, id) of the file's "bos", "eos", "unknown" or "padding" token, or (None, None)."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    i = meta.get(f"tokenizer.ggml.{which}_token_id")
    return (tokens[i], i) if i is not None and 0 <= i < len(tokens) else (None, None)


def load_gguf(path: str | Path) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The model (float32, eval mode), its tokenizer and the file's metadata."""
    where = str(path)
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise LmlabError(f"{where}: no token_embd.weight tensor; this is not a language model GGUF")
    hf = gguf_hf_config(meta, vocab_size=shapes["token_embd.weight"][1], tied="output.weight" not in shapes,
                        where=where)
    from_hf = gemma3_from_hf if hf["model_type"] == "gemma3_text" else llama_from_hf
    model = from_hf(hf, gguf_tensors(reader, hf, where), where)
    return model, gguf_tokenizer(meta, where), meta
