"""word2vec (Mikolov et al. 2013): skip-gram and CBOW with negative sampling, as word2vec.c trains them
(`lmlab word2vec`).

    lmlab word2vec --corpus ../shared/data/wikitext-2 --out runs/word2vec-wt2 \\
        --analogies ../shared/data/word_embedding_eval/word2vec_analogy/questions-words.txt

What follows word2vec.c (and gensim, which follows it too):
- the vocabulary is the words seen at least min_count times (lmlab.data.words: the tokenisation, sentences = lines);
- frequent words are subsampled once per epoch: a word of count c in a corpus of T words is kept with probability
  (sqrt(c / (sample T)) + 1) sample T / c (`keep_probabilities`);
- negatives are drawn from the unigram distribution raised to 0.75 (`negative_distribution`; word2vec.c samples a
  10^8-entry table of it, we sample the distribution itself); a negative equal to the word predicted is skipped;
- each centre word's window is shrunk to a uniform 1..window ("b = next_random % window");
- the learning rate decays linearly from alpha to min_alpha over all epochs' words;
- input vectors start uniform in [-0.5/dim, 0.5/dim), output vectors at zero;
- skip-gram: each context word's input vector predicts the centre word; CBOW: the mean of the context's input
  vectors predicts it, and its gradient is added to every context word (cbow_mean).

The inner loop is word2vec.c's own, compiled with numba (lmlab.training.word2vec_kernel): one update per
prediction, touching only the rows of the words involved (O((1 + negative) x dim)), and threads that share the
vectors without locks, as word2vec.c's. A batched PyTorch version (all of a batch's gradients from the same
weights, summed by index_add_) was tried first: at word2vec's learning rate the summed updates of frequent
words collapsed every vector onto one direction (all cosines 1.00 after an epoch of WikiText-2), and at 3k words/s
it ran ~40x slower than gensim on this machine; the per-word loop is what word2vec's learning rate is tuned for.

The run folder: settings.json, ckpt/ (the vectors and where the run is, every ckpt_every words: --resume continues
exactly), vectors.txt and vectors.bin (word2vec's text and binary formats, lmlab.models.word_vectors),
results.json and results.md (the evaluation: lmlab.evaluate.word_vectors).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch
from tqdm import tqdm

from lmlab.data.words import EncodedCorpus, Vocabulary, read_corpus
from lmlab.errors import LmlabError
from lmlab.evaluate.word_vectors import evaluate_word_vectors, format_evaluation, read_analogies, read_word_pairs
from lmlab.models import checkpoint
from lmlab.models.word_vectors import WordVectors
from lmlab.training.loop import StopSignals, interrupted, load_newest_intact, no_checkpoint, refuse_existing_run
from lmlab.training.word2vec_kernel import cumulative_table, train_sentences, warm_up
from lmlab.util import (atomic_write_json, atomic_write_text, check_flags, check_folder, check_writable, comma_list,
                        device_memory, load_safetensors, option, save_safetensors_atomic)

WEIGHTS = "vectors.safetensors"
NEIGHBOURS = "king,france,good,three,music"


@dataclass
class Word2VecSettings:
    """`lmlab word2vec`: one field per flag."""
    corpus: str = option(help="the text: any source lmlab prepare reads (.txt file, folder of .txt, .jsonl, "
                              ".parquet, a Hugging Face dataset, shakespeare)")
    out: str = option("runs/word2vec", "run folder (vectors.txt, vectors.bin, results.json, ckpt/)")
    model: str = option("sg", "sg: skip-gram; cbow: continuous bag of words", choices=["sg", "cbow"])
    dim: int = option(100, "vector dimension")
    window: int = option(5, "largest distance of a context word (each centre draws its window from 1..this)")
    negative: int = option(5, "negative samples per prediction")
    sample: float = option(1e-3, "subsampling threshold of frequent words (0: none)")
    min_count: int = option(5, "ignore words seen fewer times")
    epochs: int = option(5, "passes over the corpus")
    alpha: float = option(0.025, "initial learning rate (decays linearly to --min-alpha)")
    min_alpha: float = option(1e-4, "final learning rate")
    batch_words: int = option(1024, "centre words per update")
    seed: int = option(1, "seed of the initialisation, subsampling, windows and negatives")
    text_field: str = option("text", "the text column of a .jsonl/.parquet/HF source")
    analogies: str | None = option(None, "evaluate on this analogy file (questions-words.txt format)")
    wordsim: str | None = option(None, "evaluate on this WordSim-353 file (word, word, score)")
    simlex: str | None = option(None, "evaluate on this SimLex-999 file")
    neighbours: str = option(NEIGHBOURS, "comma-separated words whose nearest neighbours are listed")
    ckpt_every: int = option(2_000_000, "words between checkpoints")
    threads: int | None = option(None, "CPU threads for torch")
    resume: bool = option(False, "continue the run in --out from its checkpoint", action="store_true")
    no_progress: bool = option(False, "no progress bar", action="store_true")

    def recipe(self) -> dict:
        """The settings that decide the vectors (a resumed run must have the same)."""
        skip = {"out", "analogies", "wordsim", "simlex", "neighbours", "threads", "resume", "no_progress",
                "ckpt_every"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ----------------------------------------------------------------------------------------------------------------
# The distributions

def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """word2vec.c's subsampling: P(keep) = (sqrt(c / (sample T)) + 1) sample T / c, at most 1 (sample 0: 1)."""
    counts = counts.astype(np.float64)
    if sample <= 0:
        return np.ones_like(counts)
    threshold = sample * counts.sum()
    return np.minimum(1.0, (np.sqrt(counts / threshold) + 1) * threshold / counts)


def negative_distribution(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    p = counts.astype(np.float64) ** power
    return p / p.sum()


def check_settings(s: Word2VecSettings) -> None:
    """The flags' ranges, before the corpus is read or anything is written."""
    sizes = (("--dim", s.dim), ("--window", s.window), ("--negative", s.negative), ("--epochs", s.epochs),
             ("--batch-words", s.batch_words), ("--min-count", s.min_count), ("--ckpt-every", s.ckpt_every))
    check_flags(*((name, value, value >= 1, "at least 1") for name, value in sizes),
                ("--alpha", s.alpha, s.alpha > 0, "a positive learning rate, e.g. 0.025"),
                # min_alpha above alpha makes the rate grow; word2vec's rate then diverges (every vector NaN).
                ("--min-alpha", s.min_alpha, 0 <= s.min_alpha <= s.alpha, f"between 0 and --alpha {s.alpha}"),
                ("--sample", s.sample, s.sample >= 0, "at least 0 (0: no subsampling), e.g. 1e-3"),
                ("--threads", s.threads, s.threads is None or s.threads >= 1, "at least 1"))


def check_memory(vocab_size: int, dim: int) -> None:
    """Refuse vectors that cannot fit in memory before allocating them: the input and output vectors, and the
    copy the run saves, each vocabulary x dim float32."""
    need, have = 3 * 4 * vocab_size * dim, device_memory(torch.device("cpu"))
    if have and need > have:
        raise LmlabError(f"--dim {dim} x {vocab_size:,} words needs {need / 2 ** 30:,.1f} GiB, more than this "
                         f"machine's {have / 2 ** 30:,.1f} GiB; choose a smaller --dim (word2vec's usual: 100-300) "
                         "or a higher --min-count")


def check_vocabulary(vocab: Vocabulary, corpus: EncodedCorpus, s: Word2VecSettings) -> None:
    check_settings(s)
    if len(vocab) <= s.negative:
        raise LmlabError(f"the vocabulary has {len(vocab)} words, too few for --negative {s.negative} (a negative "
                         "sample should rarely be the word itself); give a larger corpus, a lower --min-count or "
                         "fewer --negative")
    if int(np.diff(corpus.starts).max()) < 2:
        raise LmlabError(f"no sentence (line) of the corpus has two words of the vocabulary ({len(vocab)} words), "
                         f"so a --window {s.window} finds no context; give a larger corpus or a lower --min-count")


# ----------------------------------------------------------------------------------------------------------------
# The model

class Word2Vec:
    """Input vectors (`syn0`, the word vectors) and output vectors (`syn1neg`), named as in word2vec.c and
    initialised as it does: syn0 uniform in [-0.5/dim, 0.5/dim), syn1neg zero."""

    def __init__(self, vocab_size: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.syn0 = ((rng.random((vocab_size, dim), dtype=np.float32) - 0.5) / dim).astype(np.float32)
        self.syn1neg = np.zeros((vocab_size, dim), dtype=np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"syn0": torch.from_numpy(self.syn0), "syn1neg": torch.from_numpy(self.syn1neg)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["syn0"].shape) != self.syn0.shape:
            raise LmlabError(f"the checkpoint holds {tuple(state['syn0'].shape)} vectors, this run "
                             f"{self.syn0.shape}: vectors of another dimension or vocabulary; resume with the "
                             "settings the run was started with")
        self.syn0[:] = state["syn0"].numpy()
        self.syn1neg[:] = state["syn1neg"].numpy()

# ----------------------------------------------------------------------------------------------------------------
# Training

@dataclass
class Position:
    """Where a run is: the epoch, the next batch of it, the words done (all epochs), the training seconds."""
    epoch: int = 0
    batch: int = 0
    words: int = 0
    seconds: float = 0.0


class Trainer:
    """Epochs over the encoded corpus in chunks of about CHUNK words (the progress bar and the checkpoints move
    between chunks). Each chunk's random streams are a function of (seed, epoch, chunk, thread), so a resumed run
    continues as the interrupted one would have (exactly, with one thread)."""

    CHUNK = 100_000

    def __init__(self, model: Word2Vec, vocab: Vocabulary, corpus: EncodedCorpus, s: Word2VecSettings,
                 threads: int):
        self.model, self.corpus, self.s, self.threads = model, corpus, s, threads
        self.keep = keep_probabilities(vocab.counts, s.sample)
        self.cum = cumulative_table(negative_distribution(vocab.counts))
        words = len(corpus.ids)
        self.total = s.epochs * words
        # Chunk boundaries at sentence starts, about CHUNK words apart.
        cuts = np.searchsorted(corpus.starts, np.arange(0, words, self.CHUNK), side="left")
        self.chunks = np.unique(np.r_[cuts, corpus.sentences]).astype(np.int64)

    SLICES_PER_THREAD = 4

    def seeds(self, epoch: int, chunk: int) -> np.ndarray:
        """One random stream per slice of the chunk (a function of the seed, the position and the slice)."""
        base = (self.s.seed * 1_000_003 + epoch) * 1_000_003 + chunk
        return np.array([base * 64 + t for t in range(self.threads * self.SLICES_PER_THREAD)], dtype=np.uint64)

    def run(self, at: Position, save, bar, signals: StopSignals | None = None) -> Position:
        """Train from `at` to the end; `save(position)` is called every ckpt_every words, and when `signals` caught
        SIGINT or SIGTERM (then the chunk in progress finishes, is saved, and Interrupted is raised)."""
        s, c = self.s, self.corpus
        next_save = (at.words // s.ckpt_every + 1) * s.ckpt_every
        started = time.perf_counter() - at.seconds
        for epoch in range(at.epoch, s.epochs):
            for k in range(at.batch if epoch == at.epoch else 0, len(self.chunks) - 1):
                lo, hi = int(self.chunks[k]), int(self.chunks[k + 1])
                done = train_sentences(self.model.syn0, self.model.syn1neg, c.ids, c.starts, lo, hi, self.keep,
                                       self.cum, s.model == "cbow", s.window, s.negative, s.alpha, s.min_alpha,
                                       at.words, self.total, self.seeds(epoch, k), self.threads)
                bar.update(int(done))
                at = Position(epoch, k + 1, at.words + int(done), time.perf_counter() - started)
                if signals is not None and signals.signum is not None:
                    raise interrupted(signals.signum, f"{at.words:,} words", save(at))
                if at.words >= next_save and at.words < self.total:
                    save(at)
                    next_save = (at.words // s.ckpt_every + 1) * s.ckpt_every
            at = Position(epoch + 1, 0, at.words, time.perf_counter() - started)
        return at


def _save_checkpoint(run_dir: Path, model: Word2Vec, at: Position) -> Path:
    return checkpoint.save_step(run_dir, lambda folder: save_safetensors_atomic(model.state_dict(), folder / WEIGHTS),
                                {"step": at.words, **dataclasses.asdict(at)}, keep=1)


def _check_resume(run_dir: Path, s: Word2VecSettings) -> None:
    """Before the corpus is read: --resume needs an earlier run (with its settings), a new run a free --out."""
    refuse_existing_run(run_dir, s.resume, "choose another --out")
    if not s.resume:
        return
    if not checkpoint.step_checkpoints(run_dir):
        raise no_checkpoint(run_dir)
    settings = json.loads((run_dir / "settings.json").read_text())
    if settings != s.recipe():
        changed = ", ".join(f"--{k.replace('_', '-')} {settings.get(k)} (now {v})" for k, v in s.recipe().items()
                            if settings.get(k) != v)
        raise LmlabError(f"{run_dir} was trained with other settings: {changed}; resume with the run's settings, "
                         "or choose another --out")


def _resume(run_dir: Path, model: Word2Vec, s: Word2VecSettings) -> Position:
    if not s.resume:
        return Position()

    def load(ckpt: Path) -> dict:
        weights, state = load_safetensors(ckpt / WEIGHTS), checkpoint.load_train_state(ckpt)
        model.load_state_dict(weights)
        return state

    state = load_newest_intact(run_dir, load)
    return Position(state["epoch"], state["batch"], state["words"], state["seconds"])


def fit_word2vec(vocab: Vocabulary, corpus: EncodedCorpus, s: Word2VecSettings, threads: int,
                 model: Word2Vec | None = None, at: Position | None = None, save=None,
                 progress: bool = False, signals: StopSignals | None = None) -> tuple[Word2Vec, Position]:
    """Train vectors on an encoded corpus with `threads` threads (from `at` in `model`, or from scratch): the
    model and where it ended (its seconds: training alone, compilation left out). With `signals` (and `save`), a
    SIGINT or SIGTERM saves the run and raises Interrupted."""
    check_vocabulary(vocab, corpus, s)
    check_memory(len(vocab), s.dim)
    model = model or Word2Vec(len(vocab), s.dim, s.seed)
    at = at or Position()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_parallel_chunksize(1)  # slices are handed out one at a time, to whichever thread is free
    trainer = Trainer(model, vocab, corpus, s, threads)
    warm_up()
    with tqdm(total=trainer.total, initial=at.words, unit="word", unit_scale=True, dynamic_ncols=True,
              desc=f"word2vec {s.model}", disable=not progress) as bar:
        at = trainer.run(at, save or (lambda position: None), bar, signals)
    return model, at


def train_word2vec(s: Word2VecSettings) -> tuple[WordVectors, dict]:
    """Train on s.corpus into the run folder s.out (resumable); the vectors and the run's figures."""
    check_settings(s)
    run_dir = check_folder(s.out, "--out")
    _check_resume(run_dir, s)
    if s.threads:
        torch.set_num_threads(s.threads)
    read_started = time.perf_counter()
    vocab, corpus = read_corpus(s.corpus, s.min_count, s.text_field)
    check_vocabulary(vocab, corpus, s)
    check_memory(len(vocab), s.dim)
    read_seconds = time.perf_counter() - read_started
    model = Word2Vec(len(vocab), s.dim, s.seed)
    at = _resume(run_dir, model, s)
    check_writable(run_dir, "--out")  # the inputs are checked: now the run folder may appear
    atomic_write_json(run_dir / "settings.json", s.recipe())
    threads = min(s.threads or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    with StopSignals() as signals:
        model, at = fit_word2vec(vocab, corpus, s, threads, model, at,
                                 lambda position: _save_checkpoint(run_dir, model, position), not s.no_progress,
                                 signals)
    _save_checkpoint(run_dir, model, at)
    stats = {"sentences": corpus.sentences, "raw_words": corpus.raw_words, "words": len(corpus.ids),
             "vocabulary": len(vocab), "read_seconds": round(read_seconds, 1), "train_seconds": round(at.seconds, 1),
             "words_per_second": round(s.epochs * len(corpus.ids) / max(at.seconds, 1e-9)), "threads": threads}
    return WordVectors(vocab.words, model.syn0.copy()), stats


def word2vec(s: Word2VecSettings, command: str | None = None) -> dict:
    """Train word vectors (skip-gram or CBOW with negative sampling, as word2vec.c) and evaluate them.

    Writes vectors.txt and vectors.bin (word2vec's formats, which gensim reads), results.json and results.md into
    the run folder; --resume continues an interrupted run.
    """
    # The evaluation files are read now, so that a missing or malformed one is refused before the training run.
    if s.analogies:
        read_analogies(s.analogies)
    for path in (s.wordsim, s.simlex):
        if path:
            read_word_pairs(path)
    vectors, stats = train_word2vec(s)
    run_dir = Path(s.out)
    vectors.save(run_dir / "vectors.txt", "text")
    vectors.save(run_dir / "vectors.bin", "binary")
    similarity = {name: path for name, path in (("wordsim353", s.wordsim), ("simlex999", s.simlex)) if path}
    evaluation = evaluate_word_vectors(vectors, s.analogies, similarity, comma_list(s.neighbours))
    results = {"settings": dataclasses.asdict(s), "corpus": s.corpus, **stats, "evaluation": evaluation,
               "command": command}
    atomic_write_json(run_dir / "results.json", results)
    table = format_evaluation(evaluation)
    atomic_write_text(run_dir / "results.md", f"# word2vec {s.model} on {s.corpus}\n\n```\n{table}\n```\n")
    print(f"{stats['words']:,} words ({stats['vocabulary']:,} in the vocabulary) x {s.epochs} epochs in "
          f"{stats['train_seconds']} s: {stats['words_per_second']:,} words/s\n{table}")
    return results
