"""Documents for retrieval: a folder (or file) of text, markdown and JSON lines, cut into overlapping chunks of
tokens, each chunk keeping where it came from (its file, JSON line, and character offsets in the document).

Chunks are counted in the embedding model's tokens, because that model reads at most its max_seq_length of them
(256 for MiniLM): a chunk longer than that would be embedded by its beginning only. The overlap keeps a sentence
cut by a chunk boundary whole in one of the two chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer

from lmlab.data.records import read_records
from lmlab.data.sources import check_looks_like_text
from lmlab.errors import LmlabError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class Chunk:
    source: str  # the file, with ":LINE" for a JSON lines row
    start: int  # character offsets of the chunk in its document
    end: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def document_files(root: str | Path) -> list[Path]:
    """The text, markdown and JSON lines files under root (or root itself), sorted; other files are skipped,
    binary files refused."""
    root = Path(root)
    if not root.exists():
        raise LmlabError(f"no such document file or folder: {root}")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                  and not any(part.startswith(".") for part in p.parts))
    files = [p for p in paths if p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES]
    if not files:
        raise LmlabError(f"{root} holds no documents: give a folder of .txt, .md or .jsonl files (JSON lines with a "
                         "'text' field)")
    for path in files:
        check_looks_like_text(path)
    return files


def documents(root: str | Path, field: str = "text") -> Iterator[tuple[str, str]]:
    """(source, text) of every document under root: a text file is one document, a JSON lines row another."""
    for path in document_files(root):
        if path.suffix.lower() in JSON_SUFFIXES:
            for line, row in read_records(path):
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise LmlabError(f"{path} line {line}: no text field {field!r}; each row needs one")
                yield f"{path}:{line}", row[field]
        else:
            try:
                yield str(path), path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise LmlabError(f"{path} is not UTF-8 text; convert it or leave it out") from None


def chunk_text(source: str, text: str, tokenizer: Tokenizer, size: int, overlap: int) -> list[Chunk]:
    """Windows of `size` tokens, `overlap` tokens shared by neighbours, as character spans of the text (so the
    chunk is the document's own text, not a detokenised approximation of it)."""
    if not 0 <= overlap < size:
        raise LmlabError(f"need 0 <= --overlap < --chunk-tokens (got {overlap}, {size})")
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    chunks, step = [], size - overlap
    for first in range(0, max(len(offsets) - overlap, 1), step):
        window = offsets[first:first + size]
        if not window:
            break
        start, end = window[0][0], window[-1][1]
        chunks.append(Chunk(source, start, end, text[start:end]))
    return [c for c in chunks if c.text.strip()]


def chunk_documents(root: str | Path, tokenizer: Tokenizer, size: int = 200, overlap: int = 40,
                    field: str = "text") -> list[Chunk]:
    """Every document under root, chunked (see chunk_text)."""
    chunks = [c for source, text in documents(root, field) for c in chunk_text(source, text, tokenizer, size,
                                                                                   overlap)]
    if not chunks:
        raise LmlabError(f"the documents under {root} hold no text to index (all empty)")
    return chunks
