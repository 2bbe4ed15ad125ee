"""Sentence embeddings: a text -> one unit vector, as sentence-transformers computes them (`lmlab embed`).

    lmlab embed --model minilm-l6 --input sentences.txt --out vectors.npy

An encoder (all-MiniLM-L6-v2) reads the tokens of a sentence; its final hidden states are pooled into one vector
(mean over the real tokens, padding excluded, for this model: what its 1_Pooling/config.json says) and scaled to
unit length (its modules.json lists a Normalize step), so that a dot product is the cosine similarity. Inputs are
truncated at the model's max_seq_length (sentence_bert_config.json: 256 for MiniLM) as sentence-transformers does.

Why it is faster than sentence-transformers with the same vectors: sentences are sorted by length and batched
by a token budget rather than a fixed count, so a batch of short sentences is large and one of long sentences
small and little is spent on padding; a batch whose rows all have one length runs without an attention mask
(SDPA's fastest path); and q, k, v come from one fused projection (lmlab.models.transformer).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from lmlab.data.records import read_records
from lmlab.errors import LmlabError
from lmlab.models.hub import Pretrained, load_pretrained, resolve
from lmlab.util import atomic_replace, check_writable, option

Pooling = Literal["mean", "cls", "last"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class EmbedSettings:
    """How sentences become vectors (the flags of `lmlab embed`; the server's embedding model takes them too)."""
    pooling: Literal["auto", "mean", "cls", "last"] = option(
        "auto", "how token states become one vector: mean over real tokens, the first ([CLS]) or the last token; "
                "auto: the model's sentence-transformers config (1_Pooling), else mean")
    normalize: Literal["auto", "yes", "no"] = option(
        "auto", "scale vectors to unit length; auto: as the model's modules.json says (a Normalize step), else yes")
    max_length: int | None = option(None, "tokens kept per input (default: the model's maximum sequence length, "
                                          "else its context)")
    batch_tokens: int = option(1024, "tokens (padding included) per forward pass; sentences are sorted by length")
    dtype: Literal["float32", "bfloat16"] = option("float32", "compute precision (bfloat16: faster on CPUs with "
                                                              "AVX512-BF16 or AMX, vectors within ~1e-2)")

    def check(self) -> None:
        """Refuse settings that cannot work, naming the flag as typed, before a model loads."""
        if self.max_length is not None and self.max_length < 2:
            raise LmlabError(f"--max-length {self.max_length}: give at least 2 tokens ([CLS] and [SEP] take 2), or "
                             "leave it out for the model's own max_seq_length")
        if self.batch_tokens < 2:
            raise LmlabError(f"--batch-tokens {self.batch_tokens}: give at least --max-length tokens per pass")


def _json(path: Path) -> dict | list:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


Recipe = tuple[str | None, bool | None, int | None]


def sentence_config(folder: Path, fix: str | None = "pass --pooling to choose one") -> Recipe:
    """(pooling, normalize, max_seq_length) from a sentence-transformers folder; None where it says nothing. `fix`
    ends the error of a pooling lmlab lacks: what the user's command can do about it; None: the caller pools as it
    chose, and the folder's pooling is not read."""
    if not folder.is_dir():
        return None, None, None
    modules = _json(folder / "modules.json") or []
    pooling, normalize = None, None
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith(".Pooling") and fix is not None:
            config = _json(folder / module.get("path", "") / "config.json")
            modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_lasttoken": "last"}
            chosen = [mode for key, mode in modes.items() if config.get(key)]
            others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in modes]
            if others or len(chosen) != 1:
                raise LmlabError(f"{folder}: pooling {others or chosen} is not supported (lmlab pools by one of "
                                 f"mean, cls, last); {fix}")
            pooling = chosen[0]
        normalize = normalize or kind.endswith(".Normalize")
    if modules:
        normalize = bool(normalize)
    max_length = (_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length")
    return pooling, normalize, max_length


class Embedder:
    """A sentence encoder: texts (or token ids) in, (N, dim) float32 unit vectors out, in the inputs' order.

    `flag` is the command line's flag that named the model, and `pooling_flag` whether that command takes
    --pooling (only `lmlab embed` does): an error's advice names what the user can type."""

    def __init__(self, pretrained: Pretrained, settings: EmbedSettings = EmbedSettings(), folder: Path | None = None,
                 flag: str = "--model", pooling_flag: bool = False):
        settings.check()
        fix = None if settings.pooling != "auto" else "pass --pooling to choose one" if pooling_flag \
            else f"give {flag} an encoder pooled by one of them"
        pooling, normalize, max_length = sentence_config(folder, fix) if folder is not None else (None, None, None)
        self.pooling: Pooling = (pooling or "mean") if settings.pooling == "auto" else settings.pooling
        if pretrained.model.config.causal and self.pooling != "last":
            raise LmlabError(f"{pretrained.name} is a decoder-only language model, not a sentence encoder: give "
                             f"{flag} an encoder such as minilm-l6" + (" (or choose --pooling last for a decoder "
                                                                        "trained to embed)" if pooling_flag else ""))
        self.normalize = (normalize is not False) if settings.normalize == "auto" else settings.normalize == "yes"
        context = pretrained.model.config.block_size
        # `is not None`: an explicit 0 is refused by check(), never read as "the default".
        wanted = settings.max_length if settings.max_length is not None else max_length or context
        self.max_length = min(wanted, context)
        if self.max_length < 2 or settings.batch_tokens < self.max_length:
            raise LmlabError(f"need --max-length >= 2 and --batch-tokens >= --max-length (got {self.max_length}, "
                             f"{settings.batch_tokens})")
        self.pretrained, self.name = pretrained, pretrained.name
        self.model = pretrained.model.to(DTYPES[settings.dtype]).eval()
        self.batch_tokens = settings.batch_tokens
        # A copy of the tokenizer that truncates as Hugging Face's does (the special tokens stay inside the limit).
        self.tokenizer = Tokenizer.from_str(pretrained.tokenizer.to_str())
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = pretrained.tokenizer.token_to_id("[PAD]") or 0

    @classmethod
    def load(cls, spec: str | Path, settings: EmbedSettings = EmbedSettings(), flag: str = "--model",
             pooling_flag: bool = False) -> "Embedder":
        """The embedding model named by a registry name or path (anything load_pretrained accepts)."""
        settings.check()  # before the load, which takes seconds
        return cls(load_pretrained(spec), settings, resolve(spec), flag, pooling_flag)

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    @functools.cached_property
    def max_chars(self) -> int:
        """The most characters, spaces not counted, that max_length tokens can stand for: max_length times the
        longest vocabulary entry (a WordPiece continuation without its '##'). A longer text cannot fit, whatever
        its tokens are, unless words too long for the tokenizer became [UNK]s (a 3 MB word is one [UNK]): so it is
        too long, and this says so without tokenizing it."""
        longest = max(len(piece.removeprefix("##")) for piece in self.pretrained.tokenizer.get_vocab())
        return self.max_length * longest

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated to max_length."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Iterable[str], progress: bool = False) -> torch.Tensor:
        """The vectors of texts, (N, dim) float32."""
        return self.embed_ids(self.encode(list(texts)), progress)

    def embed_ids(self, ids: list[list[int]], progress: bool = False) -> torch.Tensor:
        """The vectors of token id lists (each at most max_length long, not empty), (N, dim) float32."""
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with tqdm(total=len(ids), desc="embed", unit="sent", disable=not progress, dynamic_ncols=True) as bar:
            start = 0
            while start < len(order):
                # The longest sentence of a batch is its last one (sorted); grow the batch while it fits the budget.
                end = start + 1
                while end < len(order) and (end + 1 - start) * len(ids[order[end]]) <= self.batch_tokens:
                    end += 1
                rows = order[start:end]
                out[rows] = self._batch([ids[i] for i in rows])
                bar.update(len(rows))
                start = end
        return out

    @torch.inference_mode()
    def _batch(self, batch: list[list[int]]) -> torch.Tensor:
        T = max(map(len, batch))
        lengths = torch.tensor([len(row) for row in batch])
        device = self.model.tok_emb.weight.device
        idx = torch.tensor([row + [self.pad_id] * (T - len(row)) for row in batch], device=device)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        same_length = bool(mask.all())
        hidden = self.model(idx, key_mask=None if same_length else mask.to(device), return_hidden=True).float().cpu()
        if self.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None]
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden[torch.arange(len(batch)), lengths - 1]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


# ----------------------------------------------------------------------------------------------------------------
# `lmlab embed`: a file of texts -> a file of vectors

def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The texts of a file: one per line (.txt and anything else), or the `field` of each row (.jsonl/.json)."""
    path = Path(path)
    if path.is_dir():
        raise LmlabError(f"--input {path} is a folder; give a file of texts, one per line, or JSON lines (to index "
                         "a folder of documents for retrieval: lmlab rag index)")
    if not path.is_file():
        raise LmlabError(f"no such input file: {path}")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for line, row in read_records(path):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise LmlabError(f"{path} line {line}: no text field {field!r}; give --field the name of the field "
                                 "that holds the text")
            texts.append(row[field])
        return texts
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LmlabError(f"{path} is not UTF-8 text; give a text file (one input per line) or JSON lines") from None


def write_vectors(vectors: torch.Tensor, out: str | Path, texts: list[str] | None = None) -> Path:
    """Vectors as .npy (float32, N x dim) or .parquet (a `text` and an `embedding` column), written atomically."""
    out = Path(out)
    array = vectors.numpy().astype(np.float32)
    if out.suffix == ".npy":
        atomic_replace(out, lambda tmp: np.save(open(tmp, "wb"), array))
    elif out.suffix == ".parquet":
        column = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
        table = pa.table({"text": texts or [""] * len(array), "embedding": column})
        atomic_replace(out, lambda tmp: pq.write_table(table, tmp))
    else:
        raise LmlabError(f"--out {out}: write .npy or .parquet")
    return out


def embed(model: str, input: str, out: str, field: str = "text", progress: bool = True,
          settings: EmbedSettings = EmbedSettings()) -> dict:
    """Embed the texts of a file into vectors (mean pooling + L2 normalisation, as sentence-transformers).

    Args:
        model: registry name or Hugging Face folder of a sentence encoder (minilm-l6)
        input: a text file (one input per line) or JSON lines (see --field)
        out: where to write the vectors: .npy (float32, one row per input) or .parquet (text + embedding)
        field: the field holding the text in JSON lines rows
        progress: show the progress bar
    """
    if Path(out).suffix not in (".npy", ".parquet"):
        raise LmlabError(f"--out {out}: write .npy or .parquet")
    if Path(out).is_dir():
        raise LmlabError(f"--out {out} is a folder; give the file to write, e.g. {Path(out) / 'vectors.npy'}")
    settings.check()
    texts = read_texts(input, field)
    if not texts:
        raise LmlabError(f"{input} holds no texts; give one input per line")
    check_writable(Path(out).expanduser().parent)  # before every vector is computed, not after
    embedder = Embedder.load(model, settings, pooling_flag=True)
    vectors = embedder.embed(texts, progress=progress)
    write_vectors(vectors, out, texts)
    return {"out": str(out), "count": len(texts), "dim": embedder.dim, "pooling": embedder.pooling,
            "normalize": embedder.normalize, "max_length": embedder.max_length}
