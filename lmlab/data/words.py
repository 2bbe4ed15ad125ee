"""Words: the tokenisation shared by word vectors (lmlab word2vec) and the from-scratch baselines
(lmlab.models.baseline), and a corpus as sentences of word ids for word2vec.

The words of a text are those of BERT's basic tokenizer: BertNormalizer (lower-case, accents stripped, control
characters removed, CJK characters spaced), then BertPreTokenizer (split on whitespace and around each punctuation
character: "don't" is "don", "'", "t"). word2vec then drops the tokens with no letter or digit (punctuation), as
the text8 corpus does; the baselines keep them. One word vector per word the baselines' tokenizer produces, so the
vectors drop in as their embeddings.

A sentence is one line of the corpus (gensim's LineSentence), cut into pieces of at most MAX_SENTENCE words
(gensim's limit, 10,000; word2vec.c's is 1,000): a context window never crosses a line break. The corpus is any
source `lmlab prepare` reads (lmlab.data.sources: a .txt file, a folder of them, .jsonl, .parquet, a Hugging Face
dataset name, shakespeare).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from tokenizers import normalizers, pre_tokenizers

from lmlab.data.sources import StreamStats, open_source, text_chunks
from lmlab.errors import LmlabError

MAX_SENTENCE = 10_000


def normalizer() -> normalizers.Normalizer:
    return normalizers.BertNormalizer(lowercase=True)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.BertPreTokenizer()


class WordSplitter:
    """Text into word2vec's words (see the module's docstring); punctuation=True keeps the punctuation tokens,
    as the baselines' tokenizer does (the words ELMo's biLM reads)."""

    def __init__(self, punctuation: bool = False):
        self.norm, self.pre, self.punctuation = normalizer(), pre_tokenizer(), punctuation

    def __call__(self, text: str) -> list[str]:
        pieces = self.pre.pre_tokenize_str(self.norm.normalize_str(text))
        return [w for w, _ in pieces if self.punctuation or any(ch.isalnum() for ch in w)]


def corpus_sentences(source: str, text_field: str = "text", chunk_chars: int = 1 << 20,
                     punctuation: bool = False) -> Iterator[list[str]]:
    """The corpus's sentences (lines, cut at MAX_SENTENCE words) as lists of words; empty lines are skipped."""
    split = WordSplitter(punctuation)
    src = open_source(source, text_field, chunk_chars)
    for chunk in text_chunks(src, chunk_chars, StreamStats()):
        for line in chunk.splitlines():
            words = split(line)
            for start in range(0, len(words), MAX_SENTENCE):
                yield words[start:start + MAX_SENTENCE]


@dataclass
class Vocabulary:
    """The words kept (count >= min_count), most frequent first (ties: first seen first), and their counts."""
    words: list[str]
    counts: np.ndarray  # int64, aligned with words

    @classmethod
    def build(cls, sentences: Iterable[list[str]], min_count: int) -> "Vocabulary":
        counter: Counter = Counter()
        for s in sentences:
            counter.update(s)
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda wc: -wc[1])
        return cls([w for w, _ in kept], np.array([c for _, c in kept], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.words)

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


@dataclass
class EncodedCorpus:
    """Every sentence's in-vocabulary word ids, concatenated, and where each sentence starts (word2vec.c skips
    out-of-vocabulary words before it forms windows)."""
    ids: np.ndarray  # int32
    starts: np.ndarray  # int64, len = sentences + 1 (the last is len(ids))
    raw_words: int  # words before the out-of-vocabulary ones are dropped

    @property
    def sentences(self) -> int:
        return len(self.starts) - 1


def encode_corpus(sentences: Iterable[list[str]], vocab: Vocabulary) -> EncodedCorpus:
    index = vocab.index()
    ids, starts, raw = [], [0], 0
    for s in sentences:
        raw += len(s)
        kept = [index[w] for w in s if w in index]
        if kept:
            ids.extend(kept)
            starts.append(len(ids))
    return EncodedCorpus(np.array(ids, dtype=np.int32), np.array(starts, dtype=np.int64), raw)


def read_corpus(source: str, min_count: int, text_field: str = "text") -> tuple[Vocabulary, EncodedCorpus]:
    """Two passes over a source: the vocabulary, then the corpus as word ids. Refuses a corpus without words."""
    vocab = Vocabulary.build(corpus_sentences(source, text_field), min_count)
    if len(vocab) == 0:
        raise LmlabError(f"{source}: no word occurs {min_count} times or more (the corpus is empty, or too small "
                         f"for --min-count {min_count}); give a larger text corpus or a lower --min-count")
    return vocab, encode_corpus(corpus_sentences(source, text_field), vocab)
