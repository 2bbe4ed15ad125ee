"""Pretraining ELMo's biLM (`lmlab elmo`): a forward and a backward LSTM LM on words, trained jointly.

    lmlab elmo --corpus shakespeare,wiki.txt --out runs/elmo --minutes 25

The corpus is any list of sources `lmlab prepare` reads (comma-separated: .txt files or folders, .jsonl,
.parquet, a Hugging Face dataset, shakespeare). Its words are the baselines' words (lmlab.data.words: BERT's
normalizer and pre-tokenizer, punctuation kept, so the task model's tokens are the biLM's); each line ends with
`</s>`, and the lines are one stream. The last --val-fraction of each source's words is held out. The softmax's
vocabulary is the --vocab-size most frequent words ([UNK] for the rest); the character encoder reads every word.

Training is an Objective of the one loop (lmlab.training.loop.fit): random windows of --window words; the loss is
the mean of the two directions' cross-entropies (the forward LM predicts each next word, the backward LM each
previous word; Peters et al. maximise their sum). The run is timed (--minutes; the LR schedule follows the clock,
lmlab.training.schedule) and resumable (--resume) like every training command. Each evaluation reports each
direction's perplexity on the held-out words (contiguous windows, the same every time).

Why a verb of its own rather than a config of `lmlab train`: the biLM is no Transformer (lmlab train's configs
are TransformerConfig fields over a prepared token stream), and its data are words read by the character encoder;
the loop, run folder and checkpoints are the same.

Domain fine-tuning (`--init RUN`): the biLM of RUN, its config and words, trained further on another corpus,
typically a task's own unlabelled sentences. Peters et al. 2018 (3.4) did so for most tasks: "fine tuning the
biLM on domain specific data leads to significant drops in perplexity and an increase in downstream task
performance". The softmax keeps RUN's words; a word RUN never read is [UNK] to it (and to the character encoder).
results.json gives the held-out perplexity before the first step (`init_eval`) beside the trained one.

The run folder: elmo.json (the biLM's config), vocab.txt (its words), ckpt/, best/ (the best held-out loss: what
`lmlab finetune --model bilstm --elmo RUN` loads), metrics.jsonl, loss.png, results.json.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmlab.data.words import corpus_sentences
from lmlab.errors import LmlabError
from lmlab.models import checkpoint
from lmlab.models.elmo import (SPECIAL_WORDS, VOCAB_FILE, BiLM, ElmoConfig, load_bilm, read_vocab, save_run_files,
                               word_chars)
from lmlab.training.config import TrainConfig
from lmlab.training.loop import Objective
from lmlab.training.run import TrainingRun
from lmlab.util import check_flags, comma_list, option

UNK = SPECIAL_WORDS.index("[UNK]")

# The default biLM fits ~25 minutes on 1-2 CPU cores (an epoch or more of a 1.5M-word corpus); the GPU one is
# ELMo's shape at half width. Both train with the adaptive softmax (the head: the 2,000 / 8,000 most frequent
# words): on one CPU core it trains 2.1x the words/s of the full 10,000-word softmax at 256 rows
# (bench/elmo_train_speed.py, docs/results/elmo/train-speed.json).
SIZES = {
    "cpu": ElmoConfig(softmax_cutoff=2000),
    "gpu": ElmoConfig(vocab_size=32_000, max_chars=50, filters=[[1, 32], [2, 32], [3, 64], [4, 128], [5, 256],
                                                                [6, 512], [7, 1024]],
                      highway=2, proj=256, hidden=2048, softmax_cutoff=8000),
}


@dataclass
class ElmoSettings:
    """`lmlab elmo`: one field per flag."""
    corpus: str = option(help="comma-separated text sources (.txt files or folders, .jsonl, .parquet, a Hugging "
                              "Face dataset, shakespeare)")
    out: str = option("runs/elmo", "run folder (elmo.json, vocab.txt, ckpt/, best/, results.json)")
    init: str | None = option(None, "start from this biLM run's weights, config and words (Peters et al.'s domain "
                                    "fine-tuning: a pretrained biLM trained on the task's unlabelled text)")
    size: str = option("cpu", "the biLM: cpu (3.5M parameters, ~25 min on 1 core) or gpu (ELMo's shape at half "
                              "width)", choices=list(SIZES))
    vocab_size: int | None = option(None, "softmax words (default: the size's, 10,000 / 32,000)")
    window: int = option(32, "words per training row")
    batch_size: int = option(256, "rows per optimizer step (an LSTM's words/s grow with it: 256 x 32 words trains "
                                  "1.17x the words/s of 128 on a CPU core)")
    minutes: float = option(25.0, "training time (the LR schedule follows the clock)")
    max_steps: int = option(100_000, "optimizer steps at most")
    lr: float = option(2e-3, "peak learning rate (Adam)")
    dropout: float | None = option(None, "dropout (default: the size's, 0.1)")
    val_fraction: float = option(0.05, "held-out share of each source's words (the end of it)")
    eval_every: int = option(100, "steps between held-out evaluations")
    eval_words: int = option(20_000, "held-out words per evaluation (the first ones, in contiguous windows)")
    text_field: str = option("text", "the text column of a .jsonl/.parquet/HF source")
    seed: int = option(0, "seed of the initialisation and the windows")
    threads: int | None = option(None, "CPU threads for torch")
    device: str = option("auto", "auto | cpu | cuda | mps")
    resume: bool = option(False, "continue the run in --out from its checkpoint", action="store_true")
    no_progress: bool = option(False, "no progress bar", action="store_true")


# ----------------------------------------------------------------------------------------------------------------
# The corpus

@dataclass
class WordStream:
    words: list[str]  # SPECIAL_WORDS, then every word of the corpus, most frequent first
    train: torch.Tensor  # word ids, the lines in order, each ended by </s>
    val: torch.Tensor
    lines: int


def _source_lines(source: str, text_field: str) -> list[list[str]]:
    lines = [s + ["</s>"] for s in corpus_sentences(source, text_field, punctuation=True)]
    if not lines:
        raise LmlabError(f"{source} holds no words (an empty corpus); give a text file with some sentences")
    return lines


def read_stream(sources: tuple[str, ...], text_field: str, val_fraction: float,
                words: list[str] | None = None) -> WordStream:
    """The sources as one stream of word ids (the vocabulary counted from them, or `words`: a resumed run's)."""
    if not sources:
        raise LmlabError("--corpus is empty; give one or more text sources, e.g. --corpus shakespeare")
    if not 0 < val_fraction < 1:
        raise LmlabError(f"--val-fraction {val_fraction}: choose a share between 0 and 1, e.g. 0.05")
    per_source = [[w for line in _source_lines(s, text_field) for w in line] for s in sources]
    if words is None:
        counts = Counter(w for stream in per_source for w in stream if w != "</s>")
        words = list(SPECIAL_WORDS) + [w for w, _ in sorted(counts.items(), key=lambda wc: -wc[1])]
    index = {w: i for i, w in enumerate(words)}
    train, val = [], []
    for stream in per_source:
        ids = [index.get(w, UNK) for w in stream]
        cut = len(ids) - max(1, int(len(ids) * val_fraction))
        train += ids[:cut]
        val += ids[cut:]
    lines = sum(stream.count("</s>") for stream in per_source)
    return WordStream(words, torch.tensor(train), torch.tensor(val), lines)


def check_window(stream: WordStream, window: int) -> None:
    for name, ids in (("training", stream.train), ("held-out", stream.val)):
        if len(ids) <= window:
            raise LmlabError(f"the {name} words number {len(ids)}, fewer than a --window of {window}; give a "
                             "larger corpus or a smaller --window")


# ----------------------------------------------------------------------------------------------------------------
# The objective

class BiLMObjective(Objective):
    """Both directions' next-word losses on random windows of the training words; each direction's perplexity on
    the held-out words."""

    best_metric, higher_is_better = "val_loss", False

    def __init__(self, model: BiLM, stream: WordStream, window: int, seed: int, eval_words: int, device):
        self.model, self.window, self.tokens_per_row = model, window, window
        check_window(stream, window)
        self.train_ids, self.val_ids = stream.train, stream.val
        self.table = word_chars(stream.words, model.config.max_chars).to(device)
        self.generator = torch.Generator().manual_seed(seed)
        n_eval = max(1, min(eval_words, len(stream.val)) // window)
        self.eval_rows = stream.val[:n_eval * window].view(n_eval, window)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        starts = torch.randint(len(self.train_ids) - self.window, (n,), generator=self.generator)
        return {"ids": self.train_ids[starts[:, None] + torch.arange(self.window)]}

    def _losses(self, module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uniq, inverse = ids.unique(return_inverse=True)
        targets = torch.where(ids < self.model.config.vocab_size, ids, UNK)
        return module(self.table[uniq], inverse, targets)

    def loss(self, module, batch):
        forward_loss, backward_loss = self._losses(module, batch["ids"])
        return (forward_loss + backward_loss) / 2

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        f_sum = b_sum = 0.0
        for start in range(0, len(self.eval_rows), 64):
            rows = self.eval_rows[start:start + 64].to(device)
            f, b = self._losses(model, rows)
            f_sum, b_sum = f_sum + f.item() * len(rows), b_sum + b.item() * len(rows)
        f, b = f_sum / len(self.eval_rows), b_sum / len(self.eval_rows)
        return {"val_loss": (f + b) / 2, "val_ppl_forward": math.exp(f), "val_ppl_backward": math.exp(b)}

    def data_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def describe(self) -> str:
        return f"ELMo biLM, {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters"

    def save(self, model, folder: Path) -> None:
        checkpoint.save_module(model, folder)

    def load(self, model, folder: Path) -> None:
        checkpoint.load_module(model, folder)


# ----------------------------------------------------------------------------------------------------------------
# The command

def _config(s: ElmoSettings, init: ElmoConfig | None = None) -> ElmoConfig:
    """The --size's config (or the --init run's), with the flags that override it."""
    if init is not None and s.vocab_size is not None:
        raise LmlabError("--vocab-size is the --init run's (its softmax is trained over its words): leave it out")
    overrides = {k: v for k, v in (("vocab_size", s.vocab_size), ("dropout", s.dropout)) if v is not None}
    return ElmoConfig(**{**asdict(init or SIZES[s.size]), **overrides})


def _check_flags(s: ElmoSettings) -> None:
    """The flags' ranges, in the user's words, before the corpus is read or the run folder appears (TrainConfig's
    own checks would name its keys, train.min_lr for a negative --lr)."""
    at_least_one = (("--batch-size", s.batch_size), ("--eval-every", s.eval_every), ("--max-steps", s.max_steps),
                    ("--eval-words", s.eval_words))
    check_flags(("--window", s.window, s.window >= 2, "at least 2 (a word and the next)"),
                *((name, value, value >= 1, "at least 1") for name, value in at_least_one),
                ("--minutes", s.minutes, s.minutes > 0, "a positive time, e.g. 25"),
                ("--lr", s.lr, s.lr > 0, "a positive learning rate, e.g. 2e-3"),
                # The softmax's first words are the special ones (padding, [UNK], </s>): a word must follow them.
                ("--vocab-size", s.vocab_size, s.vocab_size is None or s.vocab_size > len(SPECIAL_WORDS),
                 f"more than the {len(SPECIAL_WORDS)} special words, e.g. 10000 (or leave it out)"),
                ("--dropout", s.dropout, s.dropout is None or 0 <= s.dropout < 1, "in [0, 1)"),
                ("--threads", s.threads, s.threads is None or s.threads >= 1, "at least 1"))


def _train_config(s: ElmoSettings) -> TrainConfig:
    _check_flags(s)
    return TrainConfig(run_dir=s.out, batch_size=s.batch_size, micro_batch_size=s.batch_size, max_steps=s.max_steps,
                       lr=s.lr, min_lr=s.lr / 20, warmup_steps=max(1, s.max_steps // 100), weight_decay=0.0,
                       beta1=0.9, beta2=0.999, grad_clip=1.0, eval_interval=s.eval_every, log_interval=10,
                       ckpt_interval=s.eval_every, keep_checkpoints=1, seed=s.seed, device=s.device,
                       time_limit=60 * s.minutes, threads=s.threads)


def elmo(s: ElmoSettings, command: str | None = None, on_step=None) -> dict:
    """Pretrain an ELMo biLM (character CNN, forward and backward LSTM LMs) on text; report each direction's
    held-out perplexity.

    Writes the run folder (resumable with --resume); `lmlab finetune --model bilstm --elmo RUN` uses it.
    `on_step(step, loss)` is fit's (the tests stop a run part-way with it).
    """
    t = _train_config(s)
    # A bad --init is refused before the corpus is read.
    init, init_words = load_bilm(s.init) if s.init else (None, None)
    config = _config(s, init.config if init is not None else None)
    # The corpus is read first: a bad one is refused before the run folder appears. Its words: a resumed run's,
    # else the --init run's, else counted from the corpus.
    resumed = s.resume and (Path(s.out) / VOCAB_FILE).is_file()
    words = read_vocab(Path(s.out)) if resumed else init_words
    stream = read_stream(comma_list(s.corpus), s.text_field, s.val_fraction, words)
    check_window(stream, s.window)
    with TrainingRun(t, resume=s.resume, hint="choose another --out") as run:
        if config.vocab_size > len(stream.words):
            config = ElmoConfig(**{**asdict(config), "vocab_size": len(stream.words)})
        torch.manual_seed(s.seed)
        model = BiLM(config)
        if init is not None:  # (a resumed run's checkpoint then replaces these weights)
            model.load_state_dict(init.state_dict())
        model = model.to(run.world.device)
        objective = BiLMObjective(model, stream, s.window, s.seed, s.eval_words, run.world.device)
        if run.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            save_run_files(config, stream.words, run.write_text)
        before = objective.evaluate(model.eval()) if init is not None and not s.resume else None
        started = time.perf_counter()
        summary = run.fit(objective, on_step=on_step, progress=not s.no_progress)
        best = checkpoint.best_eval(run.run_dir)
        in_vocab = float((stream.val < config.vocab_size).float().mean())
        results = {"corpus": s.corpus, "lines": stream.lines, "train_words": len(stream.train),
                   "val_words": len(stream.val), "eval_words": objective.eval_rows.numel(), "words": len(stream.words),
                   "val_in_softmax_vocab": round(in_vocab, 4), "config": config.to_dict(),
                   "parameters": sum(p.numel() for p in model.parameters()), "steps": summary["steps"],
                   "train_words_seen": summary.get("tokens"), "train_seconds": round(time.perf_counter() - started, 1),
                   "final": {k: summary.get(k) for k in ("val_ppl_forward", "val_ppl_backward", "val_loss")},
                   "best": best, "init": s.init, "init_eval": before, "settings": asdict(s), "command": command}
        run.write_json("results.json", results)
        print(f"held-out perplexity (best, step {best.get('step')}): forward {best.get('val_ppl_forward', 0):.1f}, "
              f"backward {best.get('val_ppl_backward', 0):.1f} on {results['eval_words']:,} words "
              f"({100 * in_vocab:.1f} % in the {config.vocab_size:,}-word softmax); {summary['steps']} steps, "
              f"{results['train_seconds']:.0f} s")
        return results
