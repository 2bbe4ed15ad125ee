"""Load llama.cpp's GGUF files: a Llama or Gemma 3 model, its tokenizer and its chat template, from one file.

GGUF is llama.cpp's single-file format: key/value metadata (architecture, sizes, the whole tokenizer, the chat
template) followed by tensors, usually quantized to a few bits per weight in blocks of 32 or 256 values with a
scale per block. Loading one into lmlab takes four steps:

1. read the file with the `gguf` package (llama.cpp's own Python reader), keep its metadata and tensor table as
   plain values and drop the reader (MappedTensors: the tensors stay memory-mapped);
2. build the model on the meta device (no memory) and fill it one tensor at a time (`_stream_into`), renamed to
   Hugging Face Llama names and stacked as `lmlab.models.hf.llama_block` says (the fusing of q/k/v and gate/up
   lives there), so the peak memory is the loaded model plus one tensor, never a float32 copy of the whole file;
3. keep each weight quantized where PyTorch's kernels take the file's own numbers (lmlab.models.quantize):
   Q4_0/Q4_1 blocks are exactly Int4Linear's groups of 32, Q8_0 becomes per-row int8; everything else (and
   everything under --quantize none) is dequantized with `gguf.quants.dequantize` to the numbers llama.cpp
   multiplies with, in the compute dtype;
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

import gc
import mmap
import os
import re
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch
import torch.nn as nn
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmlab.errors import LmlabError
from lmlab.models.hf import LLAMA_TOP, gemma3_block, gemma3_config, llama_block, llama_config
from lmlab.models.quantize import FLOAT32, InferenceSettings, Int4Linear, compute_dtype, notice, quantized_linear, \
    replace_module
from lmlab.models.transformer import Transformer
from lmlab.util import return_freed_memory

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


SLICE_ROWS = 1024  # rows dequantized at a time: ~2.4 MB of float32 for SmolLM2, its temporaries a few times that


def _dequantized(t, where: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The tensor (or its rows start:stop) as float32."""
    data = t.data if len(t.shape) == 1 else t.data[start:stop]
    try:
        values = dequantize(data, t.tensor_type)
    except NotImplementedError:
        raise LmlabError(f"{where}: tensor {t.name} is stored as {t.tensor_type.name}, a GGUF type lmlab cannot "
                         "dequantize (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the "
                         "IQ types); use a file quantized another way") from None
    except Exception as e:  # noqa: BLE001 - damaged block data
        raise LmlabError(f"{where}: tensor {t.name} cannot be read ({_first_line(e)}); the file is damaged") from None
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
        values = values.copy()
    # GGUF lists dimensions fastest-varying first, numpy and torch slowest first.
    shape = tuple(int(d) for d in reversed(t.shape))
    return torch.from_numpy(values).reshape(shape if len(shape) == 1 else (-1, *shape[1:]))


# ----------------------------------------------------------------------------------------------------------------
# Tensors, one at a time: kept quantized where the kernels take the file's blocks, else dequantized

Q4_TYPES = {gguf.GGMLQuantizationType.Q4_0: 18, gguf.GGMLQuantizationType.Q4_1: 20}  # bytes per 32 weights
Q4_K, Q4_K_BYTES = gguf.GGMLQuantizationType.Q4_K, 144  # bytes per super-block of 256 weights
INT4_TYPES = (*Q4_TYPES, Q4_K)
Q8_TYPES = (gguf.GGMLQuantizationType.Q8_0,)
FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
KEPT_TYPES = (*INT4_TYPES, *Q8_TYPES)  # what --quantize auto keeps quantized; every other type is dequantized


def q4_blocks(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 or Q4_1 tensor's own numbers in Int4Linear's terms: q (rows, cols) in 0..15, and per block of 32
    a scale and a zero with weight = (q - 8) * scale + zero. Q4_1 stores w = d * q + m (so scale = d,
    zero = m + 8d), Q4_0 w = d * (q - 8) (zero = 0); each block holds d (and m) as float16, then 16 bytes whose
    low nibbles are weights 0..15 and high nibbles 16..31."""
    rows = int(t.shape[1])
    blocks = np.asarray(t.data).reshape(rows, -1, Q4_TYPES[t.tensor_type])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero, nibbles = m + 8 * d, blocks[..., 4:]
    else:
        zero, nibbles = np.zeros_like(d), blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


def q4_k_blocks(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K tensor's own numbers in Int4Linear's terms (groups of 32). A super-block of 256 weights holds d and
    dmin (float16), 12 bytes of 6-bit scales sc and mins m for its 8 sub-blocks of 32, then 128 bytes of 4-bit q:
    w = d * sc * q - dmin * m, i.e. scale = d * sc and zero = 8 * scale - dmin * m. The 6-bit numbers are packed
    as ggml's get_scale_min_k4 reads them: sub-blocks 0..3 in the low 6 bits of bytes 0..3 (sc) and 4..7 (m);
    4..7 in the nibbles of bytes 8..11 (low: sc, high: m) plus the top 2 bits of bytes 0..3 (sc) and 4..7 (m).
    The q bytes come in 4 runs of 32: the low nibbles are sub-block 2j, the high ones 2j + 1."""
    rows = int(t.shape[1])
    blocks = np.asarray(t.data).reshape(rows, -1, Q4_K_BYTES)
    d, dmin = (blocks[..., i:i + 2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None] for i in (0, 2))
    packed = blocks[..., 4:16]
    low, high, nibbles = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 0x3F, (nibbles & 0x0F) | (low >> 6) << 4], axis=-1).astype(np.float32)
    m = np.concatenate([high & 0x3F, (nibbles >> 4) | (high >> 6) << 4], axis=-1).astype(np.float32)
    runs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)
    q = np.concatenate([runs & 0x0F, runs >> 4], axis=3).reshape(rows, -1)
    scale = d * sc
    zero = 8 * scale - dmin * m
    return torch.from_numpy(q), torch.from_numpy(scale.reshape(rows, -1)), torch.from_numpy(zero.reshape(rows, -1))


def int4_blocks(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of a Q4_0, Q4_1 or Q4_K tensor, groups of 32 (Int4Linear's terms)."""
    return q4_k_blocks(t) if t.tensor_type == Q4_K else q4_blocks(t)


def tensor_table(reader) -> list[tuple]:
    """The reader's tensor records as plain Python values (MappedTensors maps them again without the reader)."""
    return [(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.n_elements), int(t.n_bytes),
             int(t.data_offset), t.data.dtype, tuple(t.data.shape)) for t in reader.tensors]


class MappedTensors:
    """A GGUF file's tensors (gguf's ReaderTensor records, their data memory-mapped) without the GGUFReader that
    parsed the file. The reader parses every metadata value into small numpy objects (a few per vocabulary entry
    and merge: ~160 MB for SmolLM2's 49k), and its tensor records are parsed last, among them: while those records
    live, the heap pages around them stay resident (~50 MB of SmolLM2's int4 load). So the load copies the table
    out (tensor_table), drops the reader whole, and maps the tensors again here."""

    def __init__(self, path: str | Path, table: list[tuple]):
        self.data = np.memmap(path, mode="r")
        self.tensors = [ReaderTensor(name=name, tensor_type=kind, shape=shape, n_elements=n_elements,
                                     n_bytes=n_bytes, data_offset=offset,
                                     data=self.data[offset:offset + n_bytes].view(dtype).reshape(data_shape),
                                     field=None)
                        for name, kind, shape, n_elements, n_bytes, offset, dtype, data_shape in table]


class TensorSource:
    """The file's tensors under Hugging Face Llama or Gemma 3 names, each read when asked for (the file stays
    memory-mapped), in Hugging Face's layout (_hf_layout: Llama's query and key rows in rotary order, Gemma's
    norms without llama.cpp's added 1). `mapped` is a GGUFReader or MappedTensors: its tensors and its map."""

    def __init__(self, mapped, hf: dict, where: str):
        self.arch = "gemma3" if hf["model_type"] == "gemma3_text" else "llama"
        names = {t.name: _hf_name(t.name, self.arch) for t in mapped.tensors}
        unknown = [n for n, hf_name in names.items() if hf_name is None]
        if unknown:  # rope_freqs (Llama 3.1 rope scaling), biases, ...: things lmlab's block does not have
            raise LmlabError(f"{where}: tensors {', '.join(unknown[:4])} have no place in lmlab's {self.arch} "
                             "block; this model variant is not supported")
        self.tensors = {names[t.name]: t for t in mapped.tensors}
        self.heads = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
        self.hf, self.where, self.mapped = hf, where, mapped

    def raw(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise LmlabError(f"{self.where} lacks tensor {name!r}; is it a complete {self.arch} checkpoint?") \
                from None

    def _rows(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return _hf_layout(name, w, self.hf)

    def slices(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor dequantized to float32 in slices of SLICE_ROWS rows (a rotary projection whole: its rows
        move within heads), so that the float32 copy of a big matrix (the 49152 x 576 embedding: 113 MB) never
        exists at once; each slice's pages of the file are dropped once it is read (the embedding's 30 MB of
        Q8_0 are read twice when the head is quantized from it)."""
        t = self.raw(name)
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        step = rows if any(name.endswith(proj) for proj in self.heads) else SLICE_ROWS
        for start in range(0, rows, step):
            yield self._rows(name, _dequantized(t, self.where, start, start + step))
            self.release()  # the slice and what was computed from it are freed by now

    def float(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(int(d) for d in reversed(self.raw(name).shape))
        out, start = torch.empty(shape, dtype=dtype), 0
        for part in self.slices(name):  # written into place: no list of slices next to the result
            out[start:start + part.shape[0]] = part
            start += part.shape[0]
        return out

    def release(self) -> None:
        """Drop the file's pages from memory, and hand freed heap back (this tensor's float32 slices and
        quantization temporaries): touched pages of the map count in the resident set until it is closed, i.e. a
        whole file's worth next to the model at the end of a load. The whole map, not just the tensor just read:
        a page fault on a file map also maps cached pages around it (Linux's fault-around; whole large folios), so
        reading a tensor maps parts of its neighbours again, and tensors dropped exactly still left 14-18 MB of
        SmolLM2's file resident at the end of the load. A page that is read again costs a page fault."""
        try:
            self.mapped.data._mmap.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):  # not a plain numpy memmap, or no madvise here
            pass
        return_freed_memory()

    def int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self._rows(name, part) for part in int4_blocks(self.raw(name)))


def _kept_as(types: set, quantize: str, head: bool) -> str:
    """What a linear layer stored in these GGUF types becomes: "int4" (the file's Q4 blocks as they are), "int8",
    "float", or "requantize" (a float or Q8_0 weight quantized as --quantize asks)."""
    if quantize == "none":
        return "float"
    if quantize == "auto":
        if types <= set(INT4_TYPES) and not head:
            return "int4"
        if types <= set(Q8_TYPES) or (head and types <= set(INT4_TYPES)):
            return "int8"
        return "float"
    if quantize == "int4" and types <= set(INT4_TYPES) and not head:
        return "int4"
    return "requantize"


def _linear(source: TensorSource, parts: list[str], settings: InferenceSettings, head: bool) -> nn.Module | None:
    """The quantized layer of these stacked Hugging Face tensors, or None where the layer stays float."""
    types = {source.raw(n).tensor_type for n in parts}
    kept = _kept_as(types, settings.quantize, head)
    odd = sorted(t.name for t in types if t not in (*KEPT_TYPES, *FLOAT_TYPES))
    if kept == "int4":
        q, scale, zero = (torch.cat(pieces) for pieces in zip(*(source.int4(n) for n in parts)))
        return Int4Linear(q, scale, zero)
    if odd and settings.quantize == "auto":
        _notice_once(f"{source.where}: {', '.join(odd)} weights cannot be kept quantized (lmlab keeps Q4_0, Q4_1, "
                     f"Q4_K and Q8_0{_WHY_NOT.get(odd[0], '')}); they are dequantized to the compute dtype")
    if odd and kept == "requantize" and settings.quantize == "int4":  # to 8 bits a second rounding costs little
        raise LmlabError(f"{source.where}: {source.raw(parts[0]).name} is stored as {odd[0]}, which lmlab cannot "
                         "keep as int4 (it keeps Q4_0, Q4_1 and Q4_K) and will not round twice; use --quantize auto "
                         "(dequantized), --quantize int8, or a Q4_0/Q4_1/Q4_K_S file")
    if kept == "float":
        return None
    rows = (piece for n in parts for piece in source.slices(n))
    out_features = sum(int(source.raw(n).shape[-1]) for n in parts)
    return quantized_linear(rows, "int8" if kept == "int8" else settings.quantize, settings.group_size, head,
                            out_features)


# Why a type has no kernel layout (said in the notice).
_WHY_NOT = {"Q6_K": "; Q6_K's 6-bit values with a scale per 16 weights fit neither int4 nor int8's one scale per "
                    "row"}
_NOTICES: set[str] = set()


def _notice_once(text: str) -> None:
    if text not in _NOTICES:
        _NOTICES.add(text)
        notice(text)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module), attr, nn.Parameter(value, requires_grad=False))


def _stream_into(model: Transformer, source: TensorSource, settings: InferenceSettings, dtype: torch.dtype):
    """Fill a model built on the meta device, one lmlab tensor at a time: each is read, dequantized or kept
    quantized, stacked and cast before the next is touched, so no float copy of the whole model ever exists."""
    c = model.config
    top = {name: [hf_name] for name, hf_name in LLAMA_TOP.items() if not (name == "lm_head.weight" and
                                                                           c.tie_embeddings)}
    block = gemma3_block(c) if source.arch == "gemma3" else llama_block(c)
    tensors = [(name, parts) for name, parts in top.items()]
    for i in range(c.n_layer):
        tensors += [(f"blocks.{i}.{name}", [f"model.layers.{i}.{n}" for n, _ in parts])
                    for name, parts in block.items()]
    if c.tie_embeddings:  # the head is the embedding matrix; quantized, it gets its own copy
        # Next to the embedding, while little else is loaded: its quantization is the load's biggest temporary.
        tensors.insert(1, ("lm_head.weight", top["tok_emb.weight"]))
    for name, parts in tensors:
        module_name = name.removesuffix(".weight")
        if isinstance(model.get_submodule(module_name), nn.Linear):
            layer = _linear(source, parts, settings, head=module_name == "lm_head")
            if layer is not None:
                replace_module(model, module_name, layer)
                source.release()
                continue
            if name == "lm_head.weight" and c.tie_embeddings:
                model.lm_head.weight = model.tok_emb.weight
                continue
        _set_tensor(model, name, torch.cat([source.float(n, dtype) for n in parts]))
        source.release()


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


def load_gguf(path: str | Path, settings: InferenceSettings = FLOAT32
              ) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The model (eval mode, weights as `settings` ask: float32 and dequantized by default), its tokenizer and
    the file's metadata. The tensors are read one by one into a model built without memory (the meta device)."""
    settings.validate()
    where = str(path)
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    table = tensor_table(reader)
    # The reader's parse is in `meta` and `table` now as plain Python values: dropped whole (MappedTensors says why).
    del reader
    gc.collect()
    return_freed_memory()
    mapped = MappedTensors(path, table)
    shapes = {t.name: [int(d) for d in t.shape] for t in mapped.tensors}
    if "token_embd.weight" not in shapes:
        raise LmlabError(f"{where}: no token_embd.weight tensor; this is not a language model GGUF")
    hf = gguf_hf_config(meta, vocab_size=shapes["token_embd.weight"][1], tied="output.weight" not in shapes,
                        where=where)
    config = gemma3_config(hf, where) if hf["model_type"] == "gemma3_text" else llama_config(hf, where)
    # Before the weights: building it from the vocabulary and merges takes more memory than it keeps.
    tokenizer = gguf_tokenizer(meta, where)
    with torch.device("meta"):
        model = Transformer(config)
    dtype = compute_dtype(settings.dtype)
    try:
        _stream_into(model, TensorSource(mapped, hf, where), settings, dtype)
    except RuntimeError as e:  # shape mismatches: the metadata and the tensors disagree
        raise LmlabError(f"{where}: tensors do not match the metadata ({str(e).splitlines()[-1].strip()})") from None
    model.fill_rotary_tables()
    for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
        setattr(model, name, getattr(model, name).to(dtype))
    return model.eval(), tokenizer, meta
