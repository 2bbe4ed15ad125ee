"""Evaluation metrics, with GLUE's definitions, and bootstrap standard errors.

Every metric takes plain sequences and returns a float; `bootstrap_stderr` resamples examples with replacement
and reports the standard deviation of the metric over the resamples (so it works for any metric, including the
ones that are not a mean over examples: F1, Matthews correlation, Pearson/Spearman, corpus perplexity).

    accuracy                   fraction of predictions equal to the gold labels
    f1                         binary F1 of the positive class 1 (GLUE's MRPC and QQP: 1 = paraphrase)
    matthews_corrcoef          Matthews correlation coefficient (GLUE's CoLA), 0 when it is undefined
    pearson, spearman          correlation of predicted and gold scores (GLUE's STS-B); Spearman ranks ties by
                               their average rank; 0 when a side is constant (undefined), or what `undefined`
                               says (the evaluation reports NaN there: a number would read as a result)
    perplexity                 exp(-sum(log-likelihood) / sum(units)): words for word perplexity, examples for
                               LAMBADA (each target counts 1), tokens or characters otherwise
    bits_per_byte              -sum(log-likelihood) / sum(bytes) / ln 2
    retrieval_metrics          Recall@k, MRR@k and nDCG@k (binary relevance) of ranked results, as BEIR/MTEB
    paired_difference          mean of b - a over the same examples, with its standard error from the
                               per-example differences (two settings scored on one set: their errors cancel)

`Scored` holds one evaluation run's per-example columns and computes any metric above, by name, over any subset
of the examples (a task, a source dataset), with its bootstrap standard error.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def accuracy(preds: Sequence, golds: Sequence) -> float:
    preds, golds = np.asarray(preds), np.asarray(golds)
    return float((preds == golds).mean()) if len(golds) else float("nan")


def _confusion(preds, golds) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) with 1 as the positive class."""
    p, g = np.asarray(preds) == 1, np.asarray(golds) == 1
    return int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum()), int((~p & ~g).sum())


def f1(preds: Sequence[int], golds: Sequence[int]) -> float:
    """F1 = 2 tp / (2 tp + fp + fn) of the positive class 1; 0 when there are no positives on either side
    (scikit-learn's zero_division=0)."""
    tp, fp, fn, _ = _confusion(preds, golds)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(preds: Sequence[int], golds: Sequence[int]) -> float:
    """The multi-class form (Gorodkin 2004), equal to (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) for two
    classes; 0 when a denominator factor is 0, as scikit-learn does."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    labels = np.union1d(preds, golds)
    if len(golds) == 0:
        return 0.0
    c = np.zeros((len(labels), len(labels)), dtype=np.float64)  # rows: gold, columns: predicted
    np.add.at(c, (np.searchsorted(labels, golds), np.searchsorted(labels, preds)), 1)
    t, p = c.sum(axis=1), c.sum(axis=0)  # how often each class truly occurs / is predicted
    n, correct = c.sum(), np.trace(c)
    cov_pg = correct * n - t @ p
    cov_pp = n * n - p @ p
    cov_gg = n * n - t @ t
    if cov_pp * cov_gg == 0:
        return 0.0
    return float(cov_pg / math.sqrt(cov_pp * cov_gg))


def pearson(preds: Sequence[float], golds: Sequence[float], undefined: float = 0.0) -> float:
    x, y = np.asarray(preds, dtype=np.float64), np.asarray(golds, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom else undefined


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Boundaries of runs of equal values; each run gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(preds: Sequence[float], golds: Sequence[float], undefined: float = 0.0) -> float:
    """Pearson correlation of the ranks."""
    return pearson(_ranks(np.asarray(preds, dtype=np.float64)), _ranks(np.asarray(golds, dtype=np.float64)),
                   undefined)


def retrieval_metrics(rankings: Sequence[Sequence], relevant: Sequence[set], ks: Sequence[int] = (1, 5, 10),
                      cutoff: int = 10) -> dict[str, float]:
    """Means over queries: Recall@k = |relevant in the top k| / |relevant|; MRR@cutoff = 1/rank of the first
    relevant result (0 past the cutoff); nDCG@cutoff = sum over relevant results at rank r of 1/log2(r + 1),
    divided by its best possible value (all relevant results first)."""
    scores = {f"recall@{k}": 0.0 for k in ks} | {f"mrr@{cutoff}": 0.0, f"ndcg@{cutoff}": 0.0}
    for ranked, rel in zip(rankings, relevant, strict=True):
        hits = [r for r, item in enumerate(ranked, 1) if item in rel]
        for k in ks:
            scores[f"recall@{k}"] += sum(r <= k for r in hits) / len(rel)
        scores[f"mrr@{cutoff}"] += 1 / hits[0] if hits and hits[0] <= cutoff else 0.0
        ideal = sum(1 / math.log2(r + 1) for r in range(1, min(len(rel), cutoff) + 1))
        scores[f"ndcg@{cutoff}"] += sum(1 / math.log2(r + 1) for r in hits if r <= cutoff) / ideal
    return {name: value / len(rankings) for name, value in scores.items()}


def perplexity(logliks: Sequence[float], units: Sequence[float] | None = None) -> float:
    """exp of the negative log-likelihood per unit; one unit per item when units is None."""
    total = float(np.sum(logliks))
    count = float(np.sum(units)) if units is not None else len(logliks)
    return math.exp(-total / count)


def bits_per_byte(logliks: Sequence[float], n_bytes: Sequence[int]) -> float:
    return -float(np.sum(logliks)) / float(np.sum(n_bytes)) / math.log(2)


def per_unit(logliks: Sequence[float], units: Sequence[float]) -> float:
    """Negative log-likelihood per unit in nats (e.g. nats per character)."""
    return -float(np.sum(logliks)) / float(np.sum(units))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean of b - a, its standard error sd(b - a) / sqrt(n), sd with n - 1) for two scores of the same examples
    (e.g. correct or not at 0 and at 5 shots). Correlated settings give a far smaller error than the unpaired
    sqrt(se_a^2 + se_b^2)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(d) != len(a) or len(a) != len(b) or len(d) < 2:
        raise ValueError(f"paired_difference needs two equally long sequences of at least 2 (got {len(a)}, {len(b)})")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def bootstrap_stderr(metric: Callable[..., float], *columns: Sequence, iters: int = 1000, seed: int = 0) -> float:
    """Standard deviation of metric(*columns) over `iters` resamples of the examples (rows) with replacement.
    Accuracy-like means are vectorised; other metrics are recomputed per resample. NaN for fewer than 2 rows or
    resamples (`lmlab eval --bootstrap-iters 0`: no standard errors)."""
    arrays = [np.asarray(c) for c in columns]
    n = len(arrays[0])
    if n < 2 or iters < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    if metric is accuracy:
        correct = (arrays[0] == arrays[1]).astype(np.float64)
        means = np.concatenate([correct[rng.integers(0, n, size=(min(100, iters - i), n))].mean(axis=1)
                                for i in range(0, iters, 100)])  # 100 resamples at a time: bounded memory
        return float(means.std(ddof=1))
    values = []
    for _ in range(iters):
        idx = rng.integers(0, n, size=n)
        values.append(metric(*(a[idx] for a in arrays)))
    return float(np.std(values, ddof=1))


class Scored:
    """Per-example predictions of one run, and how to turn any subset of them into a metric."""

    def __init__(self, metrics: list[str], columns: dict[str, np.ndarray], records: list[dict],
                 note: str | None = None):
        self.metrics, self.columns, self.records = metrics, columns, records
        self.note = note  # what the task's rows should say beside their numbers (e.g. how many answers parsed)

    # metric -> (function, its argument columns)
    _DEFS: dict[str, tuple[Callable, tuple[str, ...]]] = {
        "acc": (accuracy, ("pred", "gold")),
        "acc_norm": (accuracy, ("pred_norm", "gold")),
        "exact_match": (accuracy, ("pred", "gold")),
        "f1": (f1, ("pred", "gold")),
        "mcc": (matthews_corrcoef, ("pred", "gold")),
        "pearson": (pearson, ("pred", "gold")),
        "spearman": (spearman, ("pred", "gold")),
        "perplexity": (perplexity, ("loglik",)),
        "word_perplexity": (lambda ll, n: perplexity(ll, n), ("loglik", "words")),
        "byte_perplexity": (lambda ll, n: perplexity(ll, n), ("loglik", "bytes")),
        "bits_per_byte": (bits_per_byte, ("loglik", "bytes")),
        "nats_per_char": (per_unit, ("loglik", "chars")),
    }

    # Metrics with no value on some inputs (a correlation with a constant side): (NaN, NaN) there, not a number.
    _UNDEFINED = {"pearson": lambda *cols: pearson(*cols, undefined=math.nan),
                  "spearman": lambda *cols: spearman(*cols, undefined=math.nan)}

    def compute(self, metric: str, idx: list[int], iters: int) -> tuple[float, float]:
        """(value, bootstrap standard error) of a metric over the examples idx; (NaN, NaN) where undefined."""
        base = metric.removesuffix("_calibrated")
        fn, names = self._DEFS[base]
        cols = [self.columns[("pred_cal" if base != metric and n == "pred" else n)][idx] for n in names]
        if base in self._UNDEFINED and math.isnan(self._UNDEFINED[base](*cols)):
            return math.nan, math.nan
        return float(fn(*cols)), bootstrap_stderr(fn, *cols, iters=iters, seed=0)
