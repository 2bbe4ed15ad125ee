"""word2vec training speed: lmlab's (word2vec.c's loop, numba) against gensim 4.4's (Cython), same corpus, same
vocabulary, same settings, same number of threads, timed in alternation in this one process (the machine may be
shared: only the ratio of neighbouring timings means something).

    python bench/word2vec_throughput.py [--corpus ../shared/data/wikitext-2] [--threads 2] [--rounds 3] [--model sg]
        [--dim 100]

Words/s counts the corpus's in-vocabulary words (before subsampling) times the epochs, over the training time
alone (gensim's vocabulary building and lmlab's compilation left out). Prints one JSON object: each round's
figures, the median words/s of each and their ratio (lmlab / gensim; the goal is >= 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from lmlab.data.words import corpus_sentences, read_corpus
from lmlab.models.word_vectors import WordVectors
from lmlab.training.word2vec import Word2VecSettings, fit_word2vec

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def train_gensim(sentences: list[list[str]], s: Word2VecSettings, threads: int) -> tuple[WordVectors, float]:
    """gensim's Word2Vec with the same settings; the vectors and the seconds of train() alone."""
    from gensim.models import Word2Vec as GensimWord2Vec

    model = GensimWord2Vec(vector_size=s.dim, window=s.window, min_count=s.min_count, sample=s.sample,
                           negative=s.negative, hs=0, sg=int(s.model == "sg"), cbow_mean=1, alpha=s.alpha,
                           min_alpha=s.min_alpha, epochs=s.epochs, workers=threads, seed=s.seed)
    model.build_vocab(sentences)
    started = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=s.epochs)
    seconds = time.perf_counter() - started
    return WordVectors(list(model.wv.index_to_key), model.wv.vectors.copy()), seconds


def train_lmlab(vocab, corpus, s: Word2VecSettings, threads: int) -> tuple[WordVectors, float]:
    model, at = fit_word2vec(vocab, corpus, s, threads)
    return WordVectors(vocab.words, model.syn0.copy()), at.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="any source lmlab word2vec reads")
    ap.add_argument("--threads", type=int, default=2, help="threads of each (gensim's workers)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of lmlab and gensim")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per timing")
    ap.add_argument("--model", default="sg", choices=["sg", "cbow"], help="skip-gram or CBOW")
    ap.add_argument("--dim", type=int, default=Word2VecSettings.dim, help="vector width (where a step's time goes: "
                                                                          "it grows with the width)")
    args = ap.parse_args()
    s = Word2VecSettings(corpus=args.corpus, model=args.model, epochs=args.epochs, dim=args.dim)
    vocab, corpus = read_corpus(s.corpus, s.min_count)
    sentences = list(corpus_sentences(s.corpus))
    words = s.epochs * len(corpus.ids)
    rounds = []
    for _ in range(args.rounds):
        _, lm_seconds = train_lmlab(vocab, corpus, s, args.threads)
        _, gs_seconds = train_gensim(sentences, s, args.threads)
        rounds.append({"lmlab_words_per_s": round(words / lm_seconds), "gensim_words_per_s": round(words / gs_seconds),
                       "ratio": round(gs_seconds / lm_seconds, 3)})
    lm = statistics.median(r["lmlab_words_per_s"] for r in rounds)
    gs = statistics.median(r["gensim_words_per_s"] for r in rounds)
    print(json.dumps({"bench": "word2vec_throughput", "corpus": s.corpus, "model": s.model, "threads": args.threads,
                      "words_per_epoch": len(corpus.ids), "vocabulary": len(vocab), "epochs": s.epochs,
                      "dim": s.dim, "window": s.window, "negative": s.negative, "rounds": rounds,
                      "lmlab_words_per_s": lm, "gensim_words_per_s": gs,
                      "ratio_median_of_rounds": statistics.median(r["ratio"] for r in rounds),
                      "machine": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
