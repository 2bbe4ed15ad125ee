"""Word vectors: a vocabulary and one vector per word, in word2vec.c's two file formats (which gensim's
`KeyedVectors.load_word2vec_format` reads, and most tools since).

    text     a header line "WORDS DIM", then one line per word: the word and DIM numbers, space-separated
    binary   the same header line, then per word: the word, a space, DIM little-endian float32s (4 x DIM bytes),
             and a line break (word2vec.c writes one; gensim writes and tolerates it)

Words are in the file's order (word2vec writes the most frequent first). A file is read whole; a row of another
length than the header's DIM is an error naming the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.util import atomic_replace

FORMATS = ("text", "binary")


@dataclass
class WordVectors:
    words: list[str]
    vectors: np.ndarray  # float32 (len(words), dim)

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}
        self._unit = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self.index[word]]

    @property
    def unit(self) -> np.ndarray:
        """The vectors scaled to length 1 (cosine similarity is then a dot product); zero vectors stay zero."""
        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = (self.vectors / np.where(norms == 0, 1, norms)).astype(np.float32)
        return self._unit

    def similarity(self, a: str, b: str) -> float:
        return float(self.unit[self.index[a]] @ self.unit[self.index[b]])

    def nearest(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The k words of highest cosine similarity to `word` (itself excluded)."""
        if word not in self.index:
            raise LmlabError(f"{word!r} is not in the vocabulary ({len(self)} words); pick a word of the corpus")
        scores = self.unit @ self.unit[self.index[word]]
        scores[self.index[word]] = -np.inf
        top = np.argsort(-scores)[:k]
        return [(self.words[i], float(scores[i])) for i in top]

    def save(self, path: str | Path, format: str = "text") -> Path:
        """Write the word2vec text or binary format, atomically."""
        if format not in FORMATS:
            raise LmlabError(f"unknown word-vector format {format!r}; choose text or binary")
        path = Path(path)
        vectors = np.ascontiguousarray(self.vectors, dtype="<f4")

        def write(tmp: Path):
            with open(tmp, "wb") as f:
                f.write(f"{len(self)} {self.dim}\n".encode())
                for word, row in zip(self.words, vectors):
                    if format == "binary":
                        f.write(word.encode() + b" " + row.tobytes() + b"\n")
                    else:
                        f.write((word + " " + " ".join(f"{x:.6g}" for x in row) + "\n").encode())
        atomic_replace(path, write)
        return path


def _header(line: bytes, path: Path) -> tuple[int, int]:
    try:
        count, dim = (int(x) for x in line.split())
    except ValueError:
        raise LmlabError(f"{path} is not a word2vec file: its first line should be 'WORDS DIM' (got "
                         f"{line[:60]!r}); save vectors with lmlab word2vec or gensim's save_word2vec_format") from None
    if count < 1 or dim < 1:
        raise LmlabError(f"{path}: its header says {count} words of {dim} dimensions; the file holds no vectors")
    return count, dim


def load_word_vectors(path: str | Path, format: str | None = None) -> WordVectors:
    """Read a word2vec text or binary file (format None: binary if the file is not UTF-8 text), or the
    vectors.bin of an lmlab word2vec run folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "vectors.bin").is_file():
            raise LmlabError(f"{path} holds no vectors.bin; give a word2vec file or a finished lmlab word2vec run")
        path = path / "vectors.bin"
    if not path.is_file():
        raise LmlabError(f"no such word-vector file: {path}")
    data = path.read_bytes()
    if format is None:
        try:
            data.decode("utf-8")
            format = "text"
        except UnicodeDecodeError:
            format = "binary"
    end = data.find(b"\n")
    count, dim = _header(data[:end if end >= 0 else len(data)], path)
    if format == "text":
        return _read_text(data[end + 1:].decode("utf-8"), count, dim, path)
    return _read_binary(data, end + 1, count, dim, path)


def _read_text(body: str, count: int, dim: int, path: Path) -> WordVectors:
    words, rows = [], []
    for n, line in enumerate(body.splitlines(), start=2):
        parts = line.rstrip().split(" ")
        if not line.strip():
            continue
        if len(parts) != dim + 1:
            raise LmlabError(f"{path} line {n}: {len(parts) - 1} numbers for {parts[0]!r}, but the header says "
                             f"vectors of dimension {dim}; the file is cut or mixes vectors of another dimension")
        words.append(parts[0])
        rows.append(np.array(parts[1:], dtype=np.float32))
    if len(words) != count:
        raise LmlabError(f"{path}: the header says {count} words, the file holds {len(words)}; it is cut or edited")
    return WordVectors(words, np.stack(rows))


def _read_binary(data: bytes, pos: int, count: int, dim: int, path: Path) -> WordVectors:
    words, vectors = [], np.empty((count, dim), dtype=np.float32)
    for i in range(count):
        while pos < len(data) and data[pos:pos + 1] in (b"\n", b" "):
            pos += 1
        space = data.find(b" ", pos)
        if space < 0 or space + 1 + 4 * dim > len(data):
            raise LmlabError(f"{path}: the header says {count} vectors of dimension {dim}, the file ends at vector "
                             f"{i}; it is cut, or its vectors have another dimension")
        words.append(data[pos:space].decode("utf-8", errors="replace"))
        vectors[i] = np.frombuffer(data, dtype="<f4", count=dim, offset=space + 1)
        pos = space + 1 + 4 * dim
    if data[pos:].strip():
        raise LmlabError(f"{path}: {len(data) - pos} bytes after the {count} vectors the header announces; the "
                         "vectors have another dimension than the header's, or the file is not word2vec binary")
    return WordVectors(words, vectors)
