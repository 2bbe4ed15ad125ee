"""A retrieval index: chunks of documents, their embeddings, and exact nearest-neighbour search.

The index is a folder, written whole or not at all (built in a temp folder beside it, then renamed):

    manifest.json          the embedding model (name, fingerprint, dim, pooling, ...), the chunking, the counts
    vectors.safetensors    (N, dim) float32 unit vectors
    chunks.parquet         source, start, end, text of each chunk

Search is exact: the query's dot product with every vector (a cosine, the vectors being unit length) by one
matrix product, and the top k. At lmlab's scale (10^5 chunks x 384 dims: 150 MB, a few ms a query) nothing
approximate is needed; faiss (faiss-cpu) is an optional backend for large collections, and its exact index
(IndexFlatIP) gives the same neighbours (tested).

Retrieval is hybrid by default: the dense ranking and a lexical one (BM25 by bm25s over the same chunks, built on
first use) are fused by reciprocal rank fusion (Cormack et al., 2009: a chunk scores the sum over rankings of
1 / (10 + its rank), the constant chosen on QNLI dev), which needs no calibration between a cosine and a BM25
score. Dense retrieval misses chunks that share the question's rare words (a figure, a name, "p = 23"); BM25
misses paraphrases; docs/results/rag measures the three.

An index answers queries embedded by the model that built it only: vectors of two models live in unrelated
spaces, so loading with another model, or adding to an index of another model, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmlab.data.documents import Chunk
from lmlab.errors import Damaged, LmlabError
from lmlab.inference.embed import Embedder, EmbedSettings
from lmlab.util import atomic_write_json, first_line, load_safetensors, save_safetensors_atomic

FORMAT = 1
Backend = Literal["torch", "faiss"]
Method = Literal["hybrid", "dense", "bm25"]
RRF_K = 10  # reciprocal rank fusion's constant: Cormack et al. use 60; 10 did better on QNLI dev (bench/rag_fusion.py)
FUSION_DEPTH = 50  # how deep each ranking is read before fusing
DAMAGED = "index damaged: rebuild it with lmlab rag index"


def fingerprint(embedder: Embedder) -> str:
    """What identifies an embedding model's vector space: its config and a checksum of its token embeddings (the
    name alone would let two different folders called `model` pass for one)."""
    model = embedder.model
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update(model.tok_emb.weight[:256].detach().float().cpu().numpy().tobytes())
    digest.update(f"{embedder.pooling} {embedder.normalize} {embedder.max_length}".encode())
    return digest.hexdigest()[:16]


def describe(embedder: Embedder) -> dict:
    return {"name": embedder.name, "fingerprint": fingerprint(embedder), "dim": embedder.dim,
            "pooling": embedder.pooling, "normalize": embedder.normalize, "max_length": embedder.max_length}


@dataclass
class Hit:
    rank: int
    score: float
    chunk: Chunk


class Index:
    """Chunks and their vectors, searched by exact inner product (torch) or through faiss."""

    def __init__(self, model: dict, chunks: list[Chunk], vectors: torch.Tensor, chunking: dict | None = None):
        self.model, self.chunks, self.vectors, self.chunking = model, chunks, vectors.float(), chunking or {}
        self._faiss = None
        self._bm25 = None

    @classmethod
    def build(cls, embedder: Embedder, chunks: list[Chunk], chunking: dict | None = None,
              progress: bool = False) -> "Index":
        vectors = embedder.embed([c.text for c in chunks], progress=progress)
        return cls(describe(embedder), chunks, vectors, chunking)

    def load_embedder(self) -> Embedder:
        """The index's own embedding model, with the pooling, normalisation and length it was built with."""
        m = self.model
        embedder = Embedder.load(m["name"], EmbedSettings(pooling=m["pooling"], normalize="yes" if m["normalize"]
                                                          else "no", max_length=m["max_length"]))
        self.check_model(embedder)
        return embedder

    def check_model(self, embedder: Embedder) -> None:
        """Refuse an embedding model other than the index's own."""
        theirs = describe(embedder)
        if theirs["fingerprint"] != self.model["fingerprint"]:
            raise LmlabError(f"the index was built with embedding model {self.model['name']} (fingerprint "
                             f"{self.model['fingerprint']}), not {theirs['name']} ({theirs['fingerprint']}): "
                             "query it with its own model, or build a new index")

    def search(self, queries: torch.Tensor, k: int = 4, backend: Backend = "torch") -> list[list[Hit]]:
        """The k best chunks of each query vector (rows of `queries`), best first."""
        k = min(k, len(self.chunks))
        if backend == "faiss":
            scores, ids = self._faiss_index().search(queries.float().numpy(), k)
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        elif backend == "torch":
            scores, ids = (queries.float() @ self.vectors.T).topk(k, dim=-1)
        else:
            raise LmlabError(f"unknown search backend {backend!r} (torch or faiss)")
        return [[Hit(rank + 1, float(s), self.chunks[int(i)]) for rank, (s, i) in enumerate(zip(row_s, row_i))]
                for row_s, row_i in zip(scores, ids)]

    def retrieve(self, embedder: Embedder, question: str, k: int = 4, method: Method = "hybrid",
                 backend: Backend = "torch") -> list[Hit]:
        """The k best chunks for a question, best first: dense, BM25, or both fused by reciprocal rank (each hit's
        score stays the dense cosine, which a reader can interpret; its rank is the fused one)."""
        if method not in ("hybrid", "dense", "bm25"):
            raise LmlabError(f"unknown retrieval {method!r} (hybrid, dense or bm25)")
        query = query_vector(embedder, question)
        if method == "dense":
            return self.search(query, k, backend)[0]
        cosines = (query.float() @ self.vectors.T)[0]
        depth = min(FUSION_DEPTH, len(self.chunks))
        lexical = self.bm25_ranking(question, depth)
        rankings = [lexical] if method == "bm25" else [cosines.topk(depth).indices.tolist(), lexical]
        fused = [i for i, _ in reciprocal_rank_fusion(rankings)][:k]
        return [Hit(rank + 1, float(cosines[i]), self.chunks[i]) for rank, i in enumerate(fused)]

    def bm25_ranking(self, question: str, k: int) -> list[int]:
        """Chunk positions by BM25 score for the question, best first, those with a score above 0 only (a chunk
        sharing no word with the question is no lexical evidence)."""
        if self._bm25 is None:
            self._bm25 = _bm25_index([c.text for c in self.chunks])
        import bm25s
        tokens = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not tokens.vocab:  # only stop words: nothing to match
            return []
        ids, scores = self._bm25.retrieve(tokens, k=min(k, len(self.chunks)), show_progress=False)
        return [int(i) for i, s in zip(ids[0], scores[0]) if s > 0]

    def _faiss_index(self):
        if self._faiss is None:
            try:
                import faiss
            except ImportError:
                raise LmlabError("the faiss backend needs faiss-cpu: pip install faiss-cpu, or search with the "
                                 "default torch backend") from None
            self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
            self._faiss.add(self.vectors.numpy())
        return self._faiss

    # ------------------------------------------------------------------------------------------------------------
    # The folder

    def save(self, folder: str | Path) -> Path:
        """Write the index folder atomically: a temp folder beside it, renamed into place (an old index there is
        replaced only once the new one is whole)."""
        folder = check_destination(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            save_safetensors_atomic({"vectors": self.vectors}, tmp / "vectors.safetensors")
            table = pa.Table.from_pylist([c.to_dict() for c in self.chunks])
            pq.write_table(table, tmp / "chunks.parquet")
            atomic_write_json(tmp / "manifest.json", {"format": FORMAT, "model": self.model,
                                                      "chunking": self.chunking, "chunks": len(self.chunks)})
            os.chmod(tmp, 0o755)
            old = None
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Index":
        """The index in a folder, checked whole before anything uses it: a deleted, truncated or overwritten part
        is one error (Damaged: "index damaged: rebuild it with lmlab rag index"), never a reader's traceback.
        `rag ask`, `rag chat` and `serve --rag` all load through here."""
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise LmlabError(f"{folder} is not an lmlab index (no manifest.json); build one with lmlab rag index")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise Damaged(f"{DAMAGED} ({manifest_path}: {first_line(e)})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict) \
                or not isinstance(manifest.get("chunks"), int):
            raise Damaged(f"{DAMAGED} ({manifest_path} lacks its model or chunk count)")
        if manifest.get("format") != FORMAT:
            raise LmlabError(f"{folder}: index format {manifest.get('format')} is not {FORMAT}; rebuild the index")
        try:
            vectors = load_safetensors(folder / "vectors.safetensors")["vectors"]
            chunks = [Chunk(**row) for row in pq.read_table(folder / "chunks.parquet").to_pylist()]
        except (LmlabError, OSError, KeyError, TypeError, pa.ArrowException) as e:  # missing, truncated, foreign
            raise Damaged(f"{DAMAGED} ({folder}: {first_line(e)})") from None
        dim = manifest["model"].get("dim")
        if vectors.ndim != 2 or vectors.shape[1] != dim or not len(chunks) == vectors.shape[0] == manifest["chunks"]:
            raise Damaged(f"{DAMAGED} ({folder}: {len(chunks)} chunks, {tuple(vectors.shape)} vectors, "
                          f"{manifest['chunks']} in the manifest of dimension {dim})")
        return cls(manifest["model"], chunks, vectors, manifest.get("chunking"))


def check_destination(out: str | Path, docs: str | Path | None = None) -> Path:
    """Where an index may be written: a new path, an empty folder or an earlier index (which is replaced), never
    anything else (a document, a folder of someone's files), and never inside the documents it indexes (the next
    `rag index` would read the index as documents). Checked before any work, and again by save."""
    out = Path(out)
    if docs is not None:
        d, o = Path(docs).resolve(), out.resolve()
        if o == d or d in o.parents:
            raise LmlabError(f"--out {out} is inside {docs}, the documents being indexed: write the index outside "
                             f"them (e.g. --out {d.parent / (d.stem + '-index')})")
    if out.is_symlink() or out.exists():
        if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / "manifest.json").is_file()):
            raise LmlabError(f"--out {out} exists and is not an lmlab index: give a new folder (only an earlier "
                             "index is ever replaced)")
    return out


def _bm25_index(corpus: list[str]):
    try:
        import bm25s
    except ImportError:
        raise LmlabError("BM25 retrieval needs bm25s: pip install bm25s (or retrieve with --retrieval dense)") \
            from None
    retriever = bm25s.BM25()  # Lucene's BM25, k1=1.5, b=0.75
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def bm25_rankings(corpus: list[str], queries: list[str], k: int) -> list[list[int]]:
    """The top k corpus positions of each query by BM25 (bm25s, English stop words removed)."""
    import bm25s
    ids, _ = _bm25_index(corpus).retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                          k=min(k, len(corpus)), show_progress=False)
    return ids.tolist()


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """(item, fused score) best first: an item scores the sum over the rankings that hold it of 1 / (k + rank),
    rank counted from 1. Ties go to the item ranked best in any one ranking, then to the smaller item."""
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], best[pair[0]], pair[0]))


# ----------------------------------------------------------------------------------------------------------------
# From retrieved chunks to a prompt

SYSTEM = ("Answer the question using the numbered sources below. Cite the sources you use as [1], [2]. If the "
          "sources do not contain the answer, say so.")


def grounded_messages(question: str, hits: list[Hit], history: list[dict] = ()) -> list[dict]:
    """Chat messages that put the retrieved chunks before the question, numbered, for the model's chat template
    (after the conversation so far, whose turns keep only their questions and answers)."""
    sources = "\n\n".join(f"[{h.rank}] {h.chunk.text.strip()}" for h in hits)
    return [{"role": "system", "content": SYSTEM}, *history,
            {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"}]


def citations(hits: list[Hit]) -> list[dict]:
    """The sources as the answer lists them: number, file, offsets, score, and the start of the text."""
    return [{"n": h.rank, "source": h.chunk.source, "start": h.chunk.start, "end": h.chunk.end,
             "score": round(h.score, 4), "text": h.chunk.text} for h in hits]


def query_vector(embedder: Embedder, question: str) -> torch.Tensor:
    """The question's vector; a question longer than the embedding model reads is refused, not cut silently."""
    n = len(embedder.pretrained.tokenizer.encode(question).ids)
    if n > embedder.max_length:
        raise LmlabError(f"the question is {n} tokens; the embedding model {embedder.name} reads at most "
                         f"{embedder.max_length}: shorten it")
    if not question.strip():
        raise LmlabError("the question is empty; ask something")
    return embedder.embed([question])


# ----------------------------------------------------------------------------------------------------------------
# From the answer back to its sources

CITATION = re.compile(r" ?\[(\d+(?:\s*,\s*\d+)*)\]")
_OPEN = re.compile(r" ?\[[\d,\s]*$| $")  # an end that may still become a citation: held back until it is whole
_WORD = re.compile(r"\w+")
_STOP = frozenset("""a an and are as at be by for from has have in is it its of on or that the this to was were with
which what how many much does do did not no yes there their they them than then so such can into also about answer
answers question""".split())


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and (len(w) > 2 or w.isdigit())}


def supporting_source(answer: str, hits: list[Hit], question: str = "") -> int | None:
    """The source an uncited answer rests on: the retrieved chunk sharing the most of what the answer adds to
    the question (its content words not in the question; a tie goes to the better rank), provided that is a
    figure of two or more digits or at least two words. Else None: nothing to cite ("The answer is: 1." shares a
    digit with every page; "the sources do not say" shares nothing)."""
    words = content_words(answer) - content_words(question)
    best, best_shared = None, 0
    for h in hits:
        shared = words & content_words(h.chunk.text)
        if (len(shared) >= 2 or any(w.isdigit() and len(w) >= 2 for w in shared)) and len(shared) > best_shared:
            best, best_shared = h.rank, len(shared)
    return best


class CitationCheck:
    """Checks the [n] of an answer against the n sources it was given, while the answer streams.

    Small models cite sources that were not given ("[7]" of 4) or none at all, though the prompt asks them to. So
    the app enforces it: a citation of a source not given is dropped; an answer that ends citing nothing gets the
    source that supports it added (supporting_source), so that every answer shown points at a source that was
    retrieved, or at none when no source shares its content. Post-checking keeps the model's own wording and
    sampling (constraining decoding to valid "[n]" would need a grammar in the engine and still not add a missing
    one). `feed` takes the text deltas and returns what may be shown; `finish` the rest."""

    def __init__(self, hits: list[Hit], question: str = ""):
        self.hits, self.valid, self.question = hits, {h.rank for h in hits}, question
        self.held, self.text, self.raw = "", "", ""  # what is held back, what was shown, what the model wrote
        self.cited: list[int] = []  # valid citations, in order, as shown
        self.dropped: list[int] = []  # citations of sources that were not given
        self.model_cited = False  # whether the model cited any given source itself
        self.added: int | None = None  # the source added to an answer that cited none

    def _rewrite(self, match: re.Match) -> str:
        numbers = [int(n) for n in re.split(r"\s*,\s*", match.group(1))]
        keep = [n for n in numbers if n in self.valid]
        self.dropped += [n for n in numbers if n not in self.valid]
        self.cited += [n for n in keep if n not in self.cited]
        if not keep:
            return ""
        self.model_cited = True
        return match.group(0)[:match.start(1) - match.start(0) - 1] + "[" + ", ".join(map(str, keep)) + "]"

    def feed(self, delta: str) -> str:
        self.raw += delta
        text = self.held + delta
        tail = _OPEN.search(text)
        cut = tail.start() if tail else len(text)
        self.held = text[cut:]
        shown = CITATION.sub(self._rewrite, text[:cut])
        self.text += shown
        return shown

    def finish(self) -> str:
        shown = CITATION.sub(self._rewrite, self.held)
        self.held = ""
        if not self.cited:
            self.added = supporting_source(self.text + shown, self.hits, self.question)
            if self.added is not None:
                self.cited.append(self.added)
                shown = shown.rstrip() + f" [{self.added}]"
        self.text += shown
        return shown

    def check(self, text: str) -> str:
        """The whole answer at once, checked."""
        return self.feed(text) + self.finish()
