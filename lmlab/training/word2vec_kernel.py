"""word2vec.c's inner loop, compiled (numba): skip-gram and CBOW with negative sampling over a stretch of sentences.

A line-by-line port of word2vec.c's TrainModelThread for negative sampling (hs=0), with its random number
generator (next_random = next_random * 25214903917 + 11, 64-bit), its draws (subsampling from the low 16 bits,
the window shrink b = next_random % window, a negative from bits 16 and up) and its update order: for each
prediction, the output vectors of the word and its negatives are updated at once, the input vector(s) after
them. One update costs O((1 + negative) x dim): only the rows of the words involved are touched.

Threads are word2vec.c's: each takes a slice of the sentences and updates the shared vectors without locks
(Hogwild, Recht et al. 2011); with one thread a run is exactly reproducible. word2vec.c samples negatives from a
10^8-entry table of the unigram^0.75 distribution; we binary-search its cumulative table (gensim's `cum_table`),
which draws from the same distribution without rounding it to 10^-8.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

DOMAIN = 2**31 - 1  # the cumulative table's range (gensim's): a draw is an integer below it
MAX_EXP = 6.0  # word2vec.c: beyond |f| = 6 the sigmoid is taken as 0 or 1
EXP_TABLE_SIZE = 1000
# word2vec.c's expTable: the sigmoid at EXP_TABLE_SIZE points of [-MAX_EXP, MAX_EXP), looked up, not computed.
_x = np.exp((np.arange(EXP_TABLE_SIZE) / EXP_TABLE_SIZE * 2 - 1) * MAX_EXP)
SIGMOID_TABLE = (_x / (_x + 1)).astype(np.float32)
_MULTIPLIER = np.uint64(25214903917)
_INCREMENT = np.uint64(11)


def cumulative_table(probabilities: np.ndarray) -> np.ndarray:
    """The negatives' table: cum[i] = round(DOMAIN x P(word <= i)); word i is drawn for integers in
    [cum[i-1], cum[i])."""
    cum = np.round(np.cumsum(probabilities) * DOMAIN).astype(np.int64)
    cum[-1] = DOMAIN
    return cum


@njit(inline="always")
def _next(r):
    return r * _MULTIPLIER + _INCREMENT


@njit(inline="always")
def _negative(cum, r):
    return np.searchsorted(cum, np.int64((r >> np.uint64(16)) % np.uint64(DOMAIN)), side="right")


@njit(cache=True)
def draw_negatives(cum, n, seed):
    """n draws of the negatives' sampler (for tests: they should follow the unigram^0.75 distribution)."""
    r, out = np.uint64(seed), np.empty(n, dtype=np.int64)
    for i in range(n):
        r = _next(r)
        out[i] = _negative(cum, r)
    return out


@njit(cache=True)
def subsample(ids, keep, r, out):
    """word2vec.c's subsampling of one sentence into `out`: word w stays if keep[w] >= a uniform draw. Returns
    (words kept, the generator's state)."""
    n = 0
    for p in range(len(ids)):
        w = ids[p]
        r = _next(r)
        if keep[w] < np.float64(r & np.uint64(0xFFFF)) / 65536.0:
            continue
        out[n] = w
        n += 1
    return n, r


@njit(inline="always", fastmath=True)
def _predict(syn1, word, cum, negative, alpha, r, h, grad):
    """One prediction of `word` from the input vector h: the word (label 1) and `negative` draws (label 0).
    Updates syn1's rows, accumulates the input's gradient in grad; returns the generator's state."""
    dim = h.shape[0]
    for d in range(negative + 1):
        if d == 0:
            target, label = word, np.float32(1.0)
        else:
            r = _next(r)
            target = _negative(cum, r)
            if target == word:
                continue
            label = np.float32(0.0)
        f = np.float32(0.0)
        for k in range(dim):
            f += h[k] * syn1[target, k]
        if f > MAX_EXP:
            g = (label - np.float32(1.0)) * alpha
        elif f < -MAX_EXP:
            g = label * alpha
        else:
            g = (label - SIGMOID_TABLE[int((f + MAX_EXP) * (EXP_TABLE_SIZE / MAX_EXP / 2))]) * alpha
        for k in range(dim):
            grad[k] += g * syn1[target, k]
            syn1[target, k] += g * h[k]
    return r


@njit(cache=True, fastmath=True)
def _train_slice(syn0, syn1, ids, starts, s_lo, s_hi, keep, cum, cbow, window, negative, alpha, min_alpha,
                 words_before, total_words, speedup, r):
    """Sentences s_lo..s_hi-1; returns the words read. The learning rate decays linearly over all words
    (word2vec.c's word_count_actual: this slice's words, times the threads working, after words_before)."""
    dim = syn0.shape[1]
    sen = np.empty(int(np.max(starts[s_lo + 1:s_hi + 1] - starts[s_lo:s_hi])) if s_hi > s_lo else 1, np.int32)
    h, grad = np.empty(dim, np.float32), np.empty(dim, np.float32)
    done = 0
    for s in range(s_lo, s_hi):
        a = alpha - (alpha - min_alpha) * (words_before + done * speedup) / total_words
        a = np.float32(max(a, min_alpha))
        n, r = subsample(ids[starts[s]:starts[s + 1]], keep, r, sen)
        done += starts[s + 1] - starts[s]
        for i in range(n):
            r = _next(r)
            b = np.int64(r % np.uint64(window))
            lo, hi = max(0, i - window + b), min(n, i + window - b + 1)
            if cbow:
                count = hi - lo - 1
                if count == 0:
                    continue
                h[:] = 0.0
                for j in range(lo, hi):
                    if j != i:
                        for k in range(dim):
                            h[k] += syn0[sen[j], k]
                for k in range(dim):
                    h[k] /= count
                    grad[k] = 0.0
                r = _predict(syn1, sen[i], cum, negative, a, r, h, grad)
                for j in range(lo, hi):
                    if j != i:
                        for k in range(dim):
                            syn0[sen[j], k] += grad[k]
            else:
                for j in range(lo, hi):
                    if j == i:
                        continue
                    for k in range(dim):  # the context word's vector predicts the centre word
                        h[k] = syn0[sen[j], k]
                        grad[k] = 0.0
                    r = _predict(syn1, sen[i], cum, negative, a, r, h, grad)
                    for k in range(dim):
                        syn0[sen[j], k] += grad[k]
    return done


@njit(parallel=True, cache=True)
def train_sentences(syn0, syn1, ids, starts, s_lo, s_hi, keep, cum, cbow, window, negative, alpha, min_alpha,
                    words_before, total_words, seeds, threads):
    """Sentences s_lo..s_hi-1 split into len(seeds) slices of about equal words, handed to `threads` threads
    one slice at a time (more slices than threads: a thread slowed down by a busy machine holds up less)."""
    slices = len(seeds)
    bounds = np.searchsorted(starts[s_lo:s_hi + 1], np.linspace(starts[s_lo], starts[s_hi], slices + 1)) + s_lo
    bounds[0], bounds[-1] = s_lo, s_hi
    done = np.zeros(slices, np.int64)
    for t in prange(slices):
        done[t] = _train_slice(syn0, syn1, ids, starts, bounds[t], bounds[t + 1], keep, cum, cbow, window,
                               negative, alpha, min_alpha, words_before, total_words, threads, np.uint64(seeds[t]))
    return done.sum()


def warm_up() -> None:
    """Compile (or load from numba's cache) the training loop on a tiny corpus, so that timings leave it out."""
    syn0, syn1 = np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32)
    ids, starts = np.array([0, 1, 2], np.int32), np.array([0, 3], np.int64)
    train_sentences(syn0, syn1, ids, starts, 0, 1, np.ones(3), cumulative_table(np.full(3, 1 / 3)), False, 1, 1,
                    0.025, 1e-4, 0, 3, np.array([1], np.uint64), 1)
