"""Fine-tuning: a pretrained Transformer plus a small head, trained on a labelled task (`lmlab finetune`).

The lecture's middle era: pretrain once on lots of text, then adapt to a task with a few thousand labels (BERT on
GLUE). The data are the evaluation harness's classification tasks (lmlab.evaluate.tasks: SST-2, RTE, MRPC, CoLA,
STS-B, WNLI, TREC, ...): their training split is fine-tuned on, their dev split evaluated, with the GLUE metrics of
lmlab.evaluate.metrics.

    lmlab finetune --model minilm-l6 --task sst2 --labels 1024 --method lora --epochs 3
    lmlab finetune --model bilstm --task sst2            # the era before: a from-scratch model (lmlab.models.baseline)

Heads (`SequenceClassifier`): the body's final hidden states pooled into one vector per example, dropout, one linear
layer (`score`):
    cls    the first token ([CLS]), through the body's pooler (dense + tanh) when it has one, as
           BertForSequenceClassification does
    mean   the mean over the real (non-padding) tokens, as sentence-transformers pools
    last   the last real token: in a decoder the only position that has read the whole input (GPT-style)
Classification trains with cross-entropy over the labels; regression (STS-B, 0-5) with mean squared error on one
output. Sentence pairs are encoded as the tokenizer's pair template says (BERT: [CLS] A [SEP] B [SEP], token types
0/1); a decoder reads them as one text joined by a line break.

Methods: `full` trains every parameter; `lora` freezes the body and trains low-rank updates of its linear layers
(lmlab.models.peft) and the head. The command's settings are `FinetuneSettings`, one field per flag.

`--labels N` trains on a seeded, class-balanced subset of the training set (STS-B: balanced over the rounded scores).
The subsets are nested (the 32 examples are among the 128, ...), so a learning curve adds data, not luck.

Training goes through lmlab.training.loop.fit (AdamW, warmup + cosine, clipping, DDP, checkpoints, --resume). Batches are
drawn from a seeded per-epoch shuffle and padded to their longest row (dynamic padding: SST-2 sentences are ~25
tokens, so padding every row to 128 would do 5x the work). The dev set is evaluated every `eval_every` steps; the
best evaluation is kept in run_dir/best/ and `patience` evaluations without improvement stop the run.

Outputs in the run folder, next to fit's metrics.jsonl, loss.png, ckpt/ and best/:
    results.json    the task's metrics at the end and at the best evaluation, sizes, time, settings, command
    tokenizer.json  the tokenizer the examples were encoded with
    lora.safetensors (LoRA) the trained LoRA and head parameters alone (lmlab.models.peft.load_peft puts them back)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmlab.errors import LmlabError
from lmlab.evaluate import metrics as M
from lmlab.evaluate.tasks import TASKS, Doc, Task, data_root, get_task, load_split
from lmlab.models import checkpoint
from lmlab.models.baseline import build_baseline, trained_info
from lmlab.models.hub import load_pretrained, resolve
from lmlab.models.peft import FULL, LoraConfig, add_lora, save_peft
from lmlab.models.transformer import Transformer
from lmlab.models.word_vectors import load_word_vectors
from lmlab.training.config import DEFAULT_LR, TrainConfig
from lmlab.training.loop import Objective
from lmlab.training.run import TrainingRun
from lmlab.util import option

# GLUE's metric for each name a task lists (lmlab.evaluate.tasks Task.metrics); the first one picks the best step.
METRICS = {"acc": M.accuracy, "f1": M.f1, "mcc": M.matthews_corrcoef, "pearson": M.pearson, "spearman": M.spearman}
POOLINGS = ("cls", "mean", "last")


# ----------------------------------------------------------------------------------------------------------------
# Data

@dataclass
class LabelledTask:
    """A task's labelled examples: the training split (fine-tuned on) and the dev split (evaluated)."""
    task: Task
    train: list[Doc]
    dev: list[Doc]
    source: str

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def regression(self) -> bool:
        return self.task.kind == "regression"

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.train[0].choices)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.task.metrics if m in METRICS)


def load_task(name: str, data_dir: str | Path | None = None) -> LabelledTask:
    """A classification or regression task of the evaluation harness with its training and dev splits."""
    task = get_task(name)
    if task.group != "classification":
        raise LmlabError(f"task {name} is a {task.group or 'multiple-choice'} task; fine-tuning trains sequence "
                         "classification and regression heads: use one of "
                         f"{', '.join(t for t, v in TASKS.items() if v.group == 'classification')}")
    split = load_split(task, data_root(data_dir))
    # The harness carves a few-shot pool out of evaluated files that come without a training split (its words).
    if "no training split" in split.pool_source:
        raise LmlabError(f"task {name} has no training split in this data folder ({split.pool_source}); "
                         "fine-tuning needs one: add the task's train file")
    return LabelledTask(task, split.pool, split.docs, split.source)


def doc_texts(doc: Doc) -> tuple[str, ...]:
    """The example's input texts in template order: one sentence, or a pair."""
    return tuple(doc.fields.values())


def gold_class(doc: Doc) -> int:
    return int(round(doc.gold))


def balanced_subset(docs: list[Doc], n: int | None, seed: int = 0) -> list[Doc]:
    """n examples, as equal in number per class as the data allow (round-robin over the classes, each shuffled
    with the seed). Every n takes a prefix of the same order, so smaller subsets are inside larger ones.
    n=None: all of them."""
    if n is None:
        return list(docs)
    if n < 1 or n > len(docs):
        raise LmlabError(f"--labels {n}: the training set has {len(docs)} examples; choose 1..{len(docs)} or 'all'")
    rng = random.Random(f"labels/{seed}")
    by_class: dict[int, list[Doc]] = {}
    for d in docs:
        by_class.setdefault(gold_class(d), []).append(d)
    queues = [rng.sample(members, len(members)) for _, members in sorted(by_class.items())]
    order = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return order[:n]


@dataclass
class Encoded:
    """Tokenized examples: ids and token types per example (unpadded), and the labels."""
    ids: list[list[int]]
    type_ids: list[list[int]]
    labels: torch.Tensor  # long (classes) or float (regression)
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Rows padded on the right to the longest of them, with the padding mask and each row's length."""
        rows = list(rows)
        lengths = torch.tensor([len(self.ids[r]) for r in rows])
        T = int(lengths.max())
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        type_ids = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :lengths[i]] = torch.tensor(self.ids[r])
            type_ids[i, :lengths[i]] = torch.tensor(self.type_ids[r])
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return {"ids": ids, "type_ids": type_ids, "mask": mask, "lengths": lengths, "labels": self.labels[rows]}


def encode(tokenizer: Tokenizer, docs: list[Doc], max_length: int, regression: bool, join_pairs: bool = False,
           pad_id: int = 0) -> Encoded:
    """Tokenize examples, truncated to max_length tokens (pairs: the longer text first, as BERT does).
    join_pairs: a pair becomes one text, "A\\nB" (decoders have no pair template)."""
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation settings stay local
    tok.no_padding()
    tok.enable_truncation(max_length)
    inputs = []
    for d in docs:
        texts = doc_texts(d)
        inputs.append("\n".join(texts) if join_pairs or len(texts) == 1 else texts[:2])
    encodings = tok.encode_batch(inputs)
    labels = torch.tensor([float(d.gold) if regression else gold_class(d) for d in docs],
                          dtype=torch.float32 if regression else torch.long)
    # An empty text (no tokens at all, possible with a word tokenizer) is one padding token: no row is empty.
    return Encoded([e.ids or [pad_id] for e in encodings], [e.type_ids or [0] for e in encodings], labels, pad_id)


# ----------------------------------------------------------------------------------------------------------------
# Heads

class SequenceClassifier(nn.Module):
    """A pretrained Transformer body, a pooling of its final hidden states, dropout and a linear layer."""

    def __init__(self, body: Transformer, num_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        c = body.config
        if pooling not in POOLINGS:
            raise LmlabError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if pooling == "cls" and c.causal:
            raise LmlabError("--pooling cls does not fit a decoder: in a causal model the first token sees nothing "
                             "after it; use --pooling last (or mean)")
        self.body, self.pooling = body, pooling
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(c.n_embd, num_labels)
        nn.init.normal_(self.score.weight, std=0.02)  # BERT's initializer_range
        nn.init.zeros_(self.score.bias)

    def forward(self, ids, type_ids, mask, lengths):
        c = self.body.config
        # A decoder reads right-padded rows without a mask: no real token attends to the padding after it.
        hidden = self.body(ids, token_type_ids=type_ids if c.type_vocab_size else None,
                           key_mask=None if c.causal else mask, return_hidden=True)
        if self.pooling == "cls":
            pooled = self.body.pool(hidden) if self.body.pooler is not None else hidden[:, 0]
        elif self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
        else:
            pooled = hidden[torch.arange(len(ids), device=ids.device), lengths - 1]
        return self.score(self.dropout(pooled))


# ----------------------------------------------------------------------------------------------------------------
# The objective

LORA_FILE = "lora.safetensors"  # a LoRA run's checkpoints, and its best LoRA and head alone in the run folder


class Classification(Objective):
    """Sequence classification (cross-entropy) or regression (mean squared error) for `fit`.

    `model` is any module called as model(ids, type_ids, mask, lengths) -> (B, num_labels) scores: a
    SequenceClassifier, or a from-scratch baseline (lmlab.models.baseline). Batches come from a seeded shuffle per epoch,
    grouped by length: within each stretch of GROUP batches of the shuffle, rows are sorted by length and cut into
    batches, and the batches are shuffled (as transformers' group_by_length does). SST-2 sentences run from 3 to 60
    tokens, so a random batch is mostly padding; grouped, a training epoch costs about a third. The data position
    is (epoch, offset). Checkpoints hold the whole model (full) or the trainable parameters alone (LoRA, with
    lmlab.models.peft's metadata)."""

    GROUP = 50

    def __init__(self, model: nn.Module, train: Encoded, dev: Encoded, metrics: tuple[str, ...], regression: bool,
                 seed: int = 0, eval_batch_size: int = 64, lora: dict | None = None, describe: str = ""):
        self.model, self.train, self.dev = model, train, dev
        self.metrics, self.regression, self.seed = metrics, regression, seed
        # LoRA: add_lora's settings, which lmlab.models.peft's file keeps so that load_peft can apply them again.
        self.eval_batch_size, self.lora, self._describe = eval_batch_size, lora, describe
        self.best_metric = f"dev_{metrics[0]}"
        self.epoch, self.offset = 0, 0
        self._order: list[int] | None = None  # the epoch's order, made at the first draw (it needs the batch size)

    def _shuffle(self, epoch: int, n: int) -> list[int]:
        """The order of epoch `epoch` for batches of n rows: a function of (seed, epoch, n) alone."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train), generator=g).tolist()
        batches = []
        for start in range(0, len(perm), n * self.GROUP):
            stretch = sorted(perm[start:start + n * self.GROUP], key=lambda i: len(self.train.ids[i]))
            batches += [stretch[i:i + n] for i in range(0, len(stretch), n)]
        return [row for b in torch.randperm(len(batches), generator=g).tolist() for row in batches[b]]

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        if self._order is None:
            self._order = self._shuffle(self.epoch, n)
        rows = []
        while len(rows) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch, n)
            take = min(n - len(rows), len(self._order) - self.offset)
            rows += self._order[self.offset:self.offset + take]
            self.offset += take
        return self.train.batch(rows)

    def loss(self, module, batch):
        # fit cuts micro-batches out of a batch padded to its longest row: trim to this micro-batch's longest.
        T = int(batch["lengths"].max())
        scores = module(batch["ids"][:, :T], batch["type_ids"][:, :T], batch["mask"][:, :T], batch["lengths"])
        return self._loss(scores, batch["labels"])

    def _loss(self, scores, labels):
        if self.regression:
            return F.mse_loss(scores.squeeze(-1).float(), labels)
        return F.cross_entropy(scores.float(), labels)

    def predict(self, model, data: Encoded) -> tuple[np.ndarray, float]:
        """Predictions (classes, or scores for regression) for every example, and the mean loss. Batches of
        similar lengths, so that little is padded."""
        device = next(model.parameters()).device
        order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
        preds = np.zeros(len(data), dtype=np.float64 if self.regression else np.int64)
        total = 0.0
        for start in range(0, len(order), self.eval_batch_size):
            rows = order[start:start + self.eval_batch_size]
            b = {k: v.to(device) for k, v in data.batch(rows).items()}
            scores = model(b["ids"], b["type_ids"], b["mask"], b["lengths"]).float()
            total += self._loss(scores, b["labels"]).item() * len(rows)
            out = scores.squeeze(-1) if self.regression else scores.argmax(-1)
            preds[rows] = out.cpu().numpy()
        return preds, total / len(data)

    def evaluate(self, model) -> dict[str, float]:
        preds, loss = self.predict(model, self.dev)
        golds = self.dev.labels.numpy()
        return {"dev_loss": loss, **{f"dev_{m}": float(METRICS[m](preds, golds)) for m in self.metrics}}

    def data_state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_data_state(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = None

    def describe(self) -> str:
        return self._describe or super().describe()

    # Checkpoints: a tied LM head is the token embedding again and no head of a classifier: it is not saved.
    def save(self, model, folder: Path) -> None:
        if self.lora is not None:
            checkpoint.save_weights(model, folder, "lora", self.lora, peft_file=LORA_FILE)
        else:
            checkpoint.save_module(model, folder, skip="lm_head.weight")

    def load(self, model, folder: Path) -> None:
        if self.lora is not None:  # the model has its LoRA layers already
            checkpoint.load_weights(model, folder, "lora", peft_file=LORA_FILE)
        else:
            checkpoint.load_module(model, folder, skip="lm_head.weight")


# ----------------------------------------------------------------------------------------------------------------
# The command

BASELINES = ("bilstm", "cnn")
WARMUP = 0.06  # of the steps: BERT's GLUE recipe warms up over the first 6 %


def parse_labels(text: str | int | None) -> int | None:
    """'all' (None) or a number of labelled training examples."""
    if text is None or str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise LmlabError(f"--labels takes a number of examples or 'all' (got {text!r})") from None


@dataclass
class FinetuneSettings:
    """`lmlab finetune`: one field per flag (lmlab.cli makes `--max-length` of `max_length`, and `--lora-r` of the
    `r` of the `lora` field)."""
    model: str = option(help="a pretrained model (registry name, Hugging Face folder, .gguf, run folder, hub id), "
                             "or bilstm / cnn: a from-scratch baseline")
    task: str = option(help="sst2, rte, mrpc, cola, stsb, wnli, trec, ... (lmlab eval's tasks with a training "
                            "split)")
    labels: int | str | None = option("all", "train on N labelled examples (a seeded, class-balanced subset), or all",
                                type=parse_labels)
    method: str = option(FULL, "what is trained", choices=[FULL, "lora"])
    pooling: str | None = option(None, "sentence vector: cls (encoders' default), mean, last (decoders' default)",
                                 choices=list(POOLINGS))
    epochs: float = option(3.0, "passes over the labelled examples")
    max_steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    lr: float | None = option(None, "peak learning rate (default 1e-4 full, 1e-3 LoRA, 2e-3 baselines)")
    batch_size: int = option(32, "examples per optimizer step")
    micro_batch_size: int | None = option(None, "rows per forward pass (gradient accumulation)")
    max_length: int = option(128, "tokens per example (longer ones are truncated)")
    dropout: float = option(0.1, "dropout before the classification head")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)")
    # lmlab finetune: LoRA with dropout 0.05 on its input (the paradigms and GLUE results were made so).
    lora: LoraConfig = option(lambda: LoraConfig(dropout=0.05), "LoRA's settings (--lora-r, --lora-alpha, "
                                                                "--lora-dropout, --lora-targets)")
    vectors: str | None = option(None, "bilstm/cnn: start the word embeddings from these word vectors (a word2vec "
                                       ".txt/.bin file, or an lmlab word2vec run folder)")
    freeze_vectors: bool = option(False, "with --vectors: keep the embeddings as pretrained", action="store_true")
    elmo: str | None = option(None, "bilstm: ELMo vectors of this biLM run (lmlab elmo) beside its word embeddings "
                                    "(the biLM frozen, its layers mixed by a learned ScalarMix)")
    elmo_words: bool = option(True, "with --elmo: the BiLSTM reads its own word embedding beside ELMo (Peters et "
                                    "al.'s [words; ELMo]); off: ELMo alone")
    elmo_random: bool = option(False, "with --elmo: the same biLM with random weights (the control)",
                               action="store_true")
    attention: bool = option(False, "bilstm: pool its states with learned attention instead of max-pooling",
                             action="store_true")
    patience: int = option(0, "stop after N evaluations without a better dev metric")
    eval_every: int | None = option(None, "steps between dev evaluations (default: 10 a run)")
    seed: int = option(0, "seed of the label subset, the head, the batches")
    data_dir: str | None = option(None, "folder with the task data (default: $LMLAB_DATA, else $LMLAB_HOME/data)")
    out: str | None = option(None, "run folder (default runs/finetune-TASK-MODEL-METHOD-LABELS)")
    threads: int | None = option(None, "CPU threads for torch")
    device: str = option("auto", "auto | cpu | cuda | mps")
    compile: bool = option(False, "compile the training step from the start (default: only when the run is long "
                                  "enough to repay compiling)", action="store_true")
    resume: bool = option(False, "continue the run in --out from its checkpoint", action="store_true")
    no_progress: bool = option(False, "no progress bar", action="store_true")


def _count(model: nn.Module, trainable: bool = False) -> int:
    """Parameters, a tied LM head counted once (parameters() deduplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def build(model_spec: str, data: LabelledTask, train_docs: list[Doc], *, method: str, pooling: str | None,
          dropout: float, seed: int, lora: dict, vectors: str | None = None, freeze_vectors: bool = False,
          elmo: str | None = None, elmo_random: bool = False, elmo_words: bool = True,
          attention: bool = False) -> tuple[nn.Module, Tokenizer, bool, dict]:
    """The model to train, its tokenizer, whether pairs are joined into one text, and what it is (for results)."""
    torch.manual_seed(seed)
    if model_spec in BASELINES:
        if method != FULL or pooling is not None:
            raise LmlabError(f"--model {model_spec} is trained from scratch: --method lora and --pooling apply to "
                             "pretrained models only")
        model, tokenizer, embedding = build_baseline(model_spec, train_docs, data.num_labels,
                                                     dropout=max(dropout, 0.5),
                                                     vectors=load_word_vectors(vectors) if vectors else None,
                                                     freeze_vectors=freeze_vectors, elmo=elmo,
                                                     elmo_random=elmo_random, attention=attention, seed=seed,
                                                     elmo_words=elmo_words)
        info = {"model": model_spec, "pretrained": False, **embedding}
        return model, tokenizer, False, {**info, "vectors": vectors} if vectors else info
    if vectors:
        raise LmlabError(f"--vectors gives word embeddings to the from-scratch models ({', '.join(BASELINES)}); "
                         f"{model_spec} has its own: leave --vectors out")
    if elmo or attention:
        raise LmlabError(f"--elmo and --attention apply to the from-scratch bilstm; {model_spec} has its own "
                         "embeddings and pooling: leave them out")
    pre = load_pretrained(model_spec)
    body = pre.model
    # Loaded models carry dropout 0 (inference); fine-tuning uses it as BERT does, so rebuild with it.
    body = Transformer.from_weights(replace(body.config, dropout=dropout), body.weights())
    pooling = pooling or ("last" if body.config.causal else "cls")
    model = SequenceClassifier(body, data.num_labels, pooling, dropout)
    info = {"model": model_spec, "pretrained": True, "pooling": pooling, "body_parameters": _count(body)}
    if method == "lora":
        # On the whole classifier, so that a saved file re-applies itself (load_peft); the new head stays trained.
        info["lora_layers"] = len(add_lora(model, **lora))
        model.score.requires_grad_(True)
    return model, pre.tokenizer, body.config.causal, info


def _check_budget(s: FinetuneSettings) -> None:
    """The numbers of the run's length as one-line errors before anything loads (--epochs 0 trained one step)."""
    if s.batch_size < 1:
        raise LmlabError(f"--batch-size {s.batch_size}: use at least 1 example per step")
    if s.micro_batch_size is not None and s.micro_batch_size < 1:
        raise LmlabError(f"--micro-batch-size {s.micro_batch_size}: use at least 1 (or leave it out)")
    if s.max_steps is None and not s.epochs > 0:
        raise LmlabError(f"--epochs {s.epochs}: use a positive number of passes (e.g. 0.5, 3), or --max-steps N")
    if s.max_steps is not None and s.max_steps < 1:
        raise LmlabError(f"--max-steps {s.max_steps}: use at least 1, or leave it out for --epochs")


def _train_config(s: FinetuneSettings, kind: str, n_train: int, run_dir: Path) -> TrainConfig:
    steps_per_epoch = math.ceil(n_train / s.batch_size)
    steps = s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch))
    t = TrainConfig(run_dir=str(run_dir), batch_size=s.batch_size, micro_batch_size=s.micro_batch_size or s.batch_size,
                    max_steps=steps, lr=s.lr or DEFAULT_LR["finetune"][kind], min_lr=0.0,
                    warmup_steps=max(1, round(WARMUP * steps)), weight_decay=s.weight_decay, beta1=0.9, beta2=0.999,
                    grad_clip=1.0, eval_interval=s.eval_every or max(1, math.ceil(steps / 10)),
                    log_interval=max(1, min(10, steps // 20)), ckpt_interval=max(1, steps // 4), keep_checkpoints=1,
                    seed=s.seed, device=s.device, compile="on" if s.compile else "auto", patience=s.patience,
                    threads=s.threads)
    if t.batch_size % t.micro_batch_size:
        raise LmlabError(f"--batch-size {s.batch_size} must be a multiple of --micro-batch-size {s.micro_batch_size}")
    return t


def finetune(s: FinetuneSettings, echo=print, command: str | None = None) -> dict:
    """Fine-tune `s.model` (a pretrained model, or a from-scratch baseline: bilstm, cnn) on `s.task`; write the
    run folder and results.json; return the results."""
    if s.method not in (FULL, "lora"):
        raise LmlabError(f"unknown method {s.method!r}; choose one of {FULL}, lora")
    _check_budget(s)
    if s.model not in BASELINES:
        resolve(s.model)  # an unknown model is named before any data is read
    labels = parse_labels(s.labels)
    data = load_task(s.task, s.data_dir)
    train_docs = balanced_subset(data.train, labels, s.seed)
    lora = s.lora.settings()
    kind = "baseline" if s.model in BASELINES else s.method
    run_dir = Path(s.out or f"runs/finetune-{s.task}-{Path(str(s.model)).name}-{s.method}-{labels or 'all'}")
    t = _train_config(s, kind, len(train_docs), run_dir)
    with TrainingRun(t, resume=s.resume) as run:
        model, tokenizer, join_pairs, info = build(s.model, data, train_docs, method=s.method, pooling=s.pooling,
                                                   dropout=s.dropout, seed=s.seed, lora=lora, vectors=s.vectors,
                                                   freeze_vectors=s.freeze_vectors, elmo=s.elmo,
                                                   elmo_random=s.elmo_random, elmo_words=s.elmo_words,
                                                   attention=s.attention)
        pad_id = tokenizer.token_to_id("[PAD]") or 0
        enc = {name: encode(tokenizer, docs, s.max_length, data.regression, join_pairs, pad_id)
               for name, docs in (("train", train_docs), ("dev", data.dev))}
        model.to(run.world.device)
        trained = _count(model, trainable=True)
        objective = Classification(model, enc["train"], enc["dev"], data.metrics, data.regression, s.seed,
                                   lora=lora if kind == "lora" else None,
                                   describe=f"{info['model']} {kind} on {s.task}: {_count(model) / 1e6:.2f}M "
                                            f"parameters")
        if run.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            run.write_text("tokenizer.json", tokenizer.to_str())
        started = time.perf_counter()
        summary = run.fit(objective, progress=not s.no_progress)
        info.update(trained_info(model))
        results = _results(s, data, train_docs, labels, kind, info, summary, trained, _count(model), t, run,
                           time.perf_counter() - started, lora, command)
        if run.main:
            if kind == "lora":
                # The best evaluation's LoRA and head, alone: a small file next to the base model.
                objective.load(model, checkpoint.best(run_dir))
                save_peft(model, run_dir / LORA_FILE, "lora", lora)
            run.write_json("results.json", results)
            if echo:
                echo(format_results([results]))
        return results


def _results(s: FinetuneSettings, data: LabelledTask, train_docs, labels, kind, info, summary, trained, parameters,
             t: TrainConfig, run: TrainingRun, train_seconds: float, lora: dict, command) -> dict:
    final = {m: summary[f"dev_{m}"] for m in data.metrics}
    best_eval = checkpoint.best_eval(run.run_dir)
    return {
        "task": s.task, "model": info["model"], "method": kind, "labels": len(train_docs),
        "labels_requested": labels or "all", "train_size": len(data.train), "dev_size": len(data.dev),
        "metrics": final, "best": {"step": best_eval.get("step"),
                                   **{m: best_eval.get(f"dev_{m}") for m in data.metrics}},
        "main_metric": data.metrics[0], "parameters": parameters, "trained_parameters": trained,
        "steps": summary["steps"], "epochs": round(summary["steps"] * s.batch_size / len(train_docs), 2),
        "train_seconds": round(train_seconds, 1), "stopped": summary.get("stopped"),
        "info": info, "data": data.source, "command": command,
        "settings": {"lr": t.lr, "batch_size": s.batch_size, "max_length": s.max_length, "dropout": s.dropout,
                     "weight_decay": s.weight_decay, "warmup_steps": t.warmup_steps, "seed": s.seed,
                     "patience": s.patience, "eval_every": t.eval_interval, "threads": s.threads,
                     "device": str(run.world.device), **({"lora": lora} if kind == "lora" else {})},
    }


def format_results(rows: list[dict]) -> str:
    """A readable table: one line per run and metric (final, and best over the evaluations)."""
    lines = [f"{'task':6} {'model':22} {'method':8} {'labels':>7} {'metric':8} {'final':>7} {'best':>7} "
             f"{'trained':>9} {'seconds':>8}"]
    for r in rows:
        for m, v in r["metrics"].items():
            best = r["best"].get(m)
            lines.append(f"{r['task']:6} {str(r['model'])[:22]:22} {r['method']:8} {r['labels']:>7} {m:8} "
                         f"{v:7.4f} {best if best is None else format(best, '7.4f'):>7} "
                         f"{r['trained_parameters'] / 1e6:8.2f}M {r['train_seconds']:8.0f}")
    return "\n".join(lines)
