"""Corpus preparation (``lmlab prepare``): text in, token ids on disk out.

``prepare(source, out)`` turns a corpus into four files, in the spirit of nanoGPT's ``prepare.py``:

    train.bin, val.bin   flat arrays of token ids (uint16 or uint32, see meta.json), read back with np.memmap
    tokenizer.json       a Hugging Face ``tokenizers`` file that encodes and decodes those ids
    meta.json            what was done: tokenizer, vocab size, dtype, split, counts, source checksum

Sources
    ``shakespeare``      the built-in default: Shakespeare's complete works, modern spelling (see shakespeare_dir)
    a .txt file          one document
    a folder             every ``*.txt`` inside it, recursively, in order of relative path; one document per file
    a .jsonl file        one JSON object per line, one document per line, text in ``text_field``
    a .parquet file      one document per row, text in column ``text_field``
    ``name``/``org/name`` a Hugging Face dataset (split "train", streamed), if the ``datasets`` package is installed

Documents are joined with "\\n\\n" between them, in the order above, into one character stream. Empty (or null)
documents are skipped. Nothing else is inserted: the ``<|endoftext|>`` special token of the bpe tokenizer is not
put between documents (yet). Text is always just text: a corpus that contains "<|endoftext|>" literally gets it
encoded as ordinary characters, never as the special token (like tiktoken's encode_ordinary), and tokenizers from
load_tokenizer() behave the same way; a special token enters a sequence only where code inserts its id.

Train/val split: by position, deterministically. The first (1 - val_fraction) of the characters of the stream
go to train and the rest to val, with the cut moved forward to the next line boundary. Held-out text is thus
one contiguous stretch at the end; for shakespeare that means the last works in alphabetical order.

Undecodable bytes: text files are read as UTF-8 (a leading byte-order mark is dropped, and line endings are
read in Python's universal-newline mode, so CRLF and CR become LF). Each invalid byte sequence becomes U+FFFD
(Python's ``errors="replace"``) rather than stopping a long job on one bad byte; the number of replacements is
stored in meta.json as ``replaced_chars`` and warned about once on stderr. Lone surrogates spelled in JSON
records ("\\ud800") are treated the same way. A file that is mostly not text (more than 10% undecodable or NUL
characters in its first 64 KiB) is refused instead.

Memory: nothing is read whole. Sources are read in pieces of about ``chunk_chars`` characters, regrouped into
chunks that end at line boundaries, and passed over twice: pass 1 counts characters, checksums (sha256 of the
UTF-8 stream, separators included) and trains the tokenizer; pass 2 encodes chunk by chunk and appends to
train.bin / val.bin. Chunks are cut only where byte-level BPE cannot tell (see _invisible_cut), so the output
does not depend on chunk_chars, except for a line too long to hold, which is cut wherever it must be.

dtype: "auto" stores ids as uint16 when every id fits (ids < 65536), else uint32.

Tokenizers (all saved as tokenizer.json):
    ``char``  one token per character seen in the corpus (ids by code point, then [UNK]); vocab_size is ignored
    ``bpe``   byte-level BPE with ``vocab_size`` tokens, GPT-2 style: round-trips any Unicode text
    ``t5``    the same BPE with T5's specials (<pad> = 0, </s> = 1) and 100 sentinels (<extra_id_N>) for span
              corruption, ``vocab_size`` tokens in all (lmlab.data.tokenizers.t5_tokenizer)
    a path    an existing tokenizer.json, reused as is
"""


from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lmlab.data.sources import DOC_SEPARATOR, StreamStats, open_source, text_chunks
from lmlab.data.tokenizers import (ENDOFTEXT, _bpe_tokenizer, _bpe_trainer, _char_tokenizer, _CharEncoder, _hf_encoder,
                                   load_tokenizer, t5_tokenizer)
from lmlab.errors import LmlabError
from lmlab.util import atomic_replace, atomic_write_json, check_writable, publish, write_error

UINT16_MAX_VOCAB = 1 << 16


# ----------------------------------------------------------------------------------------------------------------
# prepare


def _resolve_tokenizer_arg(tokenizer: str) -> tuple[str, Path | None]:
    if tokenizer in ("char", "bpe", "t5"):
        return tokenizer, None
    path = Path(tokenizer).expanduser()
    if path.is_file():
        return "file", path
    if path.suffix.lower() == ".json" or "/" in tokenizer:
        raise LmlabError(f"no such tokenizer file: {tokenizer}")
    raise LmlabError(f"unknown tokenizer '{tokenizer}': use char, bpe, t5 or the path to a tokenizer.json")


def _resolve_dtype(dtype: str, vocab_size: int) -> np.dtype:
    if dtype == "uint16" and vocab_size > UINT16_MAX_VOCAB:
        raise LmlabError(f"the vocabulary has {vocab_size} tokens, more than uint16 can hold ({UINT16_MAX_VOCAB}); "
                         f"pass --dtype uint32 (or auto)")
    if dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)
    return np.dtype(dtype)


def _id_space(tok: Tokenizer) -> int:
    # One past the largest id, not the number of entries: a reused vocabulary may have gaps, and the dtype must
    # hold the largest id.
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _progress_bar(progress: bool, desc: str, total: int | None):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, dynamic_ncols=True)


@dataclass
class _Scan:
    """What pass 1 learns about the stream."""
    chars: int = 0
    bytes: int = 0
    sha256: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    charset: set = field(default_factory=set)


def _scanned(chunks: Iterator[str], scan: _Scan, bar, collect_chars: bool) -> Iterator[str]:
    """Pass chunks through while counting, checksumming and (for char) collecting the alphabet."""
    for chunk in chunks:
        raw = chunk.encode("utf-8")
        scan.chars += len(chunk)
        scan.bytes += len(raw)
        scan.sha256.update(raw)
        if collect_chars:
            scan.charset.update(chunk)
        bar.update(len(raw))
        yield chunk


def _split_index(chunk: str, pos: int, target: int) -> int | None:
    """Where val starts within a chunk that starts at stream position pos: the first line boundary at or after
    target, as an index into chunk (len(chunk) if it is the chunk's end), or None if it is not in this chunk."""
    k = max(target - pos, 1)  # a boundary at index 0 would have been found at the end of the previous chunk
    j = chunk.find("\n", k - 1)
    return None if j < 0 else j + 1


def _encode_splits(chunks: Iterable[str], encode: Callable[[list[str]], list[np.ndarray]], target: int,
                   files: dict, dtype: np.dtype, bar) -> dict:
    """Pass 2: encode chunks, appending ids to files["train"] until the line boundary at or after character
    target, then to files["val"]. Returns the counts and where the cut fell."""
    counts = {"train_tokens": 0, "val_tokens": 0, "train_chars": 0, "val_chars": 0}
    # Batches of a few chunks let encode_batch use every core while memory stays a few chunks' worth.
    batch: list[tuple[str, str]] = []
    batch_size = max(1, min(8, os.cpu_count() or 1))

    def flush() -> None:
        for (split, text), ids in zip(batch, encode([text for _, text in batch])):
            ids.astype(dtype, copy=False).tofile(files[split])
            counts[f"{split}_tokens"] += ids.size
            counts[f"{split}_chars"] += len(text)
        batch.clear()

    pos, cut = 0, None
    for chunk in chunks:
        if cut is None and (i := _split_index(chunk, pos, target)) is not None:
            cut = pos + i
            batch.append(("train", chunk[:i]))  # i >= 1: train is never empty
            if i < len(chunk):
                batch.append(("val", chunk[i:]))
        else:
            batch.append(("train" if cut is None else "val", chunk))
        pos += len(chunk)
        if len(batch) >= batch_size:
            flush()
        bar.update(len(chunk.encode("utf-8")))
    flush()
    return {"counts": counts, "cut": cut, "chars": pos}


def prepare(source: str, out: str | Path, *, tokenizer: str = "char", vocab_size: int = 4096,
            text_field: str = "text", val_fraction: float = 0.1, dtype: Literal["auto", "uint16", "uint32"] = "auto",
            chunk_chars: int = 1 << 20, progress: bool = True) -> dict:
    """Tokenize a corpus into train/val token files: out/{train.bin,val.bin,tokenizer.json,meta.json}.

    Documents are joined with "\\n\\n"; train is the first (1 - val_fraction) of the characters, cut at the next
    line boundary, val the rest (see the module docstring). Returns the meta dict.

    Args:
        source: 'shakespeare' (default corpus), a .txt file or folder, .jsonl, .parquet, or a Hugging Face dataset
            name
        out: output folder (train.bin, val.bin, tokenizer.json, meta.json)
        tokenizer: char | bpe (byte-level, --vocab-size tokens) | path to an existing tokenizer.json
        vocab_size: BPE vocabulary size
        text_field: field holding the text in .jsonl/.parquet
        val_fraction: the share of the characters that validates (at the end of the corpus)
        dtype: token file dtype; auto picks uint16 when the vocabulary fits, else uint32
        chunk_chars: characters read at a time (a large corpus never sits in memory)
        progress: show the progress bar
    """
    # Check everything that can be checked before reading a possibly huge corpus.
    if not (0 < val_fraction <= 0.5):
        raise LmlabError(f"val_fraction must be in (0, 0.5], got {val_fraction}; pass e.g. --val-fraction 0.1")
    if chunk_chars < 1:
        raise LmlabError(f"chunk_chars must be positive, got {chunk_chars}")
    if dtype not in ("auto", "uint16", "uint32"):
        raise LmlabError(f"unknown dtype '{dtype}': use auto, uint16 or uint32")
    kind, tokenizer_file = _resolve_tokenizer_arg(tokenizer)
    if kind == "bpe" and vocab_size < 257:
        raise LmlabError(f"vocab_size must be at least 257 for byte-level BPE (256 bytes + {ENDOFTEXT}), "
                         f"got {vocab_size}")
    tok = load_tokenizer(tokenizer_file) if kind == "file" else None
    if tok is not None:
        _resolve_dtype(dtype, _id_space(tok))
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LmlabError(f"{out} exists and is not a folder; pick another output folder")
    src = open_source(str(source), text_field, chunk_chars)
    check_writable(out)  # before reading a corpus that may take an hour, not after

    scan, stats, tok = _learn_vocabulary(src, kind, tok, vocab_size, chunk_chars, progress)
    if scan.chars == 0:
        raise LmlabError(f"no text found in {source}: the corpus is empty")
    if stats.replaced:
        print(f"lmlab: warning: {stats.replaced} undecodable byte sequence(s) in {source} were replaced with U+FFFD "
              f"(the text is read as UTF-8)", file=sys.stderr)
    np_dtype = _resolve_dtype(dtype, _id_space(tok))
    # A reused tokenizer.json may carry padding or truncation settings that must not touch our chunks.
    tok.no_padding()
    tok.no_truncation()
    encode = _CharEncoder(tok) if kind == "char" else _hf_encoder(tok)

    # Pass 2: encode into temp files next to the outputs, then publish them.
    temps: dict[str, Path] = {}
    try:
        for split in ("train", "val"):
            fd, name = tempfile.mkstemp(dir=out, prefix=f".{split}.bin.", suffix=".tmp")
            os.close(fd)
            temps[split] = Path(name)
        target = max(1, math.floor(scan.chars * (1 - val_fraction)))
        with open(temps["train"], "wb") as train_f, open(temps["val"], "wb") as val_f, \
                _progress_bar(progress, "pass 2/2: encode", scan.bytes) as bar:
            written = _encode_splits(text_chunks(src, chunk_chars, StreamStats()), encode, target,
                                     {"train": train_f, "val": val_f}, np_dtype, bar)
        if written["chars"] != scan.chars:
            raise LmlabError(f"{source} changed while it was being prepared ({scan.chars} characters on the first "
                             f"read, {written['chars']} on the second); run prepare again")
        if written["counts"]["val_chars"] == 0:
            raise LmlabError(f"the validation split of {source} is empty: its {scan.chars} characters have no line "
                             f"break after the {1 - val_fraction:.0%} mark; use a larger corpus or a larger "
                             f"--val-fraction")
        meta = _meta(source, src, kind, tok, np_dtype, val_fraction, written, scan, stats, vocab_size,
                     tokenizer_file)
        _publish(out, temps, tok, tokenizer_file, meta)
        return meta
    except OSError as e:  # a full disk while encoding
        raise write_error(out, e) from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _learn_vocabulary(src, kind: str, tok: Tokenizer | None, vocab_size: int, chunk_chars: int,
                      progress: bool) -> tuple[_Scan, StreamStats, Tokenizer]:
    """Pass 1: count, checksum, and learn the vocabulary (a char or BPE tokenizer; a given one is kept)."""
    scan, stats = _Scan(), StreamStats()
    with _progress_bar(progress, "pass 1/2: read", src.size_bytes) as bar:
        chunks = _scanned(text_chunks(src, chunk_chars, stats), scan, bar, collect_chars=(kind == "char"))
        if kind == "bpe":
            tok = _bpe_tokenizer()
            # The trainer's own progress bars would interleave with ours; ours covers the reading.
            tok.train_from_iterator(chunks, trainer=_bpe_trainer(vocab_size, progress=False))
        elif kind == "t5":
            tok = t5_tokenizer(chunks, vocab_size)
        else:
            for _ in chunks:
                pass
            if kind == "char":
                tok = _char_tokenizer(scan.charset)
        bar.total = bar.n  # the file sizes were an estimate (BOM, CRLF); end the bar at 100%
    return scan, stats, tok


def _meta(source, src, kind: str, tok: Tokenizer, np_dtype, val_fraction: float, written: dict, scan: _Scan,
          stats: StreamStats, vocab_size: int, tokenizer_file: Path | None) -> dict:
    """meta.json: what prepare did (tokenizer, vocabulary, dtype, split, counts, the source and its checksum)."""
    meta = {
        "tokenizer": kind,
        "vocab_size": _id_space(tok),
        "dtype": np_dtype.name,
        "split": {"method": "position", "val_fraction": val_fraction, "boundary": "line",
                  "cut_char": written["cut"]},
        "counts": {**written["counts"], "documents": stats.documents},
        "source": {"name": str(source), "kind": src.kind, "sha256": scan.sha256.hexdigest(),
                   "chars": scan.chars, "bytes": scan.bytes, **src.extra},
        "replaced_chars": stats.replaced,
        "document_separator": DOC_SEPARATOR,
    }
    if kind == "bpe":
        meta["vocab_size_requested"] = vocab_size
    if tokenizer_file is not None:
        meta["tokenizer_file"] = str(tokenizer_file)
    return meta


def _publish(out: Path, temps: dict[str, Path], tok: Tokenizer, tokenizer_file: Path | None, meta: dict) -> None:
    """Move the encoded splits into place. meta.json goes first and comes back last, so a folder caught half-way
    is never taken for a complete one (load_tokens needs meta.json)."""
    (out / "meta.json").unlink(missing_ok=True)
    for split, tmp in temps.items():
        publish(tmp, out / f"{split}.bin")  # mode 0644 like any file, on disk before the rename
    if tokenizer_file is not None:
        atomic_replace(out / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer_file, tmp))
    else:
        atomic_replace(out / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    atomic_write_json(out / "meta.json", meta)


# ----------------------------------------------------------------------------------------------------------------
# Reading prepared data back


def load_meta(data_dir: str | Path) -> dict:
    """The meta.json of a prepared data folder."""
    path = Path(data_dir).expanduser() / "meta.json"
    if not path.is_file():
        raise LmlabError(f"{data_dir} has no meta.json: it is not a prepared data folder; run `lmlab prepare` "
                         f"to make one")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmlabError(f"{path} is not valid JSON ({exc}); run `lmlab prepare` again") from None


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split ("train" or "val") as a read-only 1-D memmap, in the dtype meta.json names."""
    if split not in ("train", "val"):
        raise LmlabError(f"unknown split '{split}': use train or val")
    meta = load_meta(data_dir)
    path = Path(data_dir).expanduser() / f"{split}.bin"
    if not path.is_file():
        raise LmlabError(f"{path} is missing; run `lmlab prepare` again")
    dtype = np.dtype(meta["dtype"])
    expected = meta["counts"][f"{split}_tokens"]
    if path.stat().st_size != expected * dtype.itemsize or expected == 0:
        raise LmlabError(f"{path} has {path.stat().st_size} bytes but meta.json says {expected} {dtype.name} "
                         f"tokens; the folder is damaged: run `lmlab prepare` again")
    return np.memmap(path, dtype=dtype, mode="r")

