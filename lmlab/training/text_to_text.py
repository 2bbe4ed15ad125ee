"""Text-to-text fine-tuning of an encoder-decoder (T5): `lmlab t5-finetune`.

    lmlab t5-finetune --model runs/t5-pretrain --tasks sst2 --max-steps 600 --out runs/t5-sst2
    lmlab t5-finetune --model runs/t5-pretrain --tasks sst2,rte,stsb,cola --mixing-cap 4096 --out runs/t5-glue

Every task is rendered with T5's prefixes (lmlab.evaluate.tasks.text_to_text: "sst2 sentence: ..." -> "positive"),
so one model, one loss (the cross-entropy of the answer text) and one decoding loop serve classification and
regression alike. Several tasks train as one mixture, examples-proportional with a cap (T5 section 3.5.2): task m
is drawn with probability min(e_m, K) / sum_n min(e_n, K), e_m its training examples, K the cap. The run folder
is a run of the one training loop (checkpoints, --resume, best/ by the dev loss); the dev sets are then scored
through the evaluation harness (generation, exact match and each task's GLUE metric) into results.json.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.evaluate import run_eval
from lmlab.evaluate.lm import LM
from lmlab.evaluate.tasks import data_root, get_task, load_split
from lmlab.evaluate.tasks.text_to_text import rendering
from lmlab.models.hub import load_pretrained
from lmlab.models.t5 import DECODER_START
from lmlab.training.config import TrainConfig
from lmlab.training.loop import Objective
from lmlab.training.run import TrainingRun
from lmlab.training.span_corruption import require_encoder_decoder
from lmlab.util import check_flags, comma_list, option


def mixture_rates(sizes: dict[str, int], cap: int | None) -> dict[str, float]:
    """Examples-proportional mixing with a cap: each task's share of the training rows."""
    capped = {name: min(n, cap) if cap else n for name, n in sizes.items()}
    total = sum(capped.values())
    return {name: n / total for name, n in capped.items()}


Pairs = list[tuple[list[int], list[int]]]


def render_pairs(tokenizer, task: str, docs, eos: int, max_source: int, max_target: int) -> Pairs:
    """(input ids, target ids) of each doc, each ending with EOS; inputs cut at the end, as T5 truncates."""
    r = rendering(task)
    sources = tokenizer.encode_batch([r.source(d) for d in docs], add_special_tokens=False)
    targets = tokenizer.encode_batch([r.target(d) for d in docs], add_special_tokens=False)
    pairs = []
    for s, t in zip(sources, targets):
        if len(t.ids) + 1 > max_target:
            raise LmlabError(f"a {task} target of {len(t.ids) + 1} tokens is longer than the decoder context "
                             f"({max_target}); raise the model's block_size")
        pairs.append((s.ids[:max_source - 1] + [eos], t.ids + [eos]))
    return pairs


def pad_pairs(pairs: Pairs) -> dict[str, torch.Tensor]:
    """Inputs padded with T5's pad (0) and their mask; targets padded with -100 (no loss)."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    inputs = torch.full((len(pairs), S), DECODER_START, dtype=torch.long)
    mask = torch.zeros(len(pairs), S, dtype=torch.bool)
    targets = torch.full((len(pairs), T), -100, dtype=torch.long)
    for row, (s, t) in enumerate(pairs):
        inputs[row, :len(s)], mask[row, :len(s)], targets[row, :len(t)] = torch.tensor(s), True, torch.tensor(t)
    return {"inputs": inputs, "input_mask": mask, "targets": targets}


class TextToText(Objective):
    """Teacher-forced cross-entropy of the answer text, on rows drawn from a mixture of rendered tasks."""

    best_metric, higher_is_better = "val_loss", False

    def __init__(self, model, train: dict[str, Pairs], dev: dict[str, Pairs], cap: int | None, seed: int,
                 eval_rows: int = 128):
        require_encoder_decoder(model, "text-to-text fine-tuning")
        self.model, self.train = model, train
        self.names = list(train)
        rates = mixture_rates({k: len(v) for k, v in train.items()}, cap)
        self.rates = torch.tensor([rates[k] for k in self.names])
        self.dev = [p for pairs in dev.values() for p in pairs[:eval_rows]]
        lengths = [len(s) + len(t) for pairs in train.values() for s, t in pairs]
        self.tokens_per_row = round(sum(lengths) / len(lengths))
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        tasks = torch.multinomial(self.rates, n, replacement=True, generator=self.generator).tolist()
        picks = [torch.randint(len(self.train[self.names[t]]), (1,), generator=self.generator).item() for t in tasks]
        return pad_pairs([self.train[self.names[t]][i] for t, i in zip(tasks, picks)])

    def loss(self, module, batch):
        return module(batch["inputs"], batch["targets"], input_mask=batch["input_mask"], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(self.dev), 32):
            batch = {k: v.to(device) for k, v in pad_pairs(self.dev[i:i + 32]).items()}
            n = int((batch["targets"] != -100).sum())
            total, count = total + self.loss(model, batch).item() * n, count + n
        return {"val_loss": total / count}

    def data_state(self) -> dict:
        return {"data_generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.generator.set_state(state["data_generator"])

    def describe(self) -> str:
        mix = ", ".join(f"{k} {r:.0%}" for k, r in zip(self.names, self.rates.tolist()))
        return f"{self.model.num_params() / 1e6:.2f}M parameters, text to text ({mix})"


@dataclass
class T5FinetuneSettings:
    """`lmlab t5-finetune`: one field per flag."""
    model: str = option(help="an encoder-decoder: a run of `lmlab train` with a T5 config, or a T5 folder")
    tasks: str = option("sst2", "comma-separated GLUE tasks with a text-to-text rendering (sst2, rte, mrpc, cola, "
                                "stsb); several train as one mixture")
    mixing_cap: int | None = option(None, "examples-proportional mixing: count at most this many of a task's "
                                          "examples (default: no cap)")
    train_limit: int | None = option(None, "train on the first N examples of each task (a seeded shuffle)")
    eval_limit: int | None = option(None, "score the first N dev examples of each task")
    max_steps: int = option(500, "optimizer steps")
    # 3e-4, not T5's 1e-3: that is Adafactor's rate, whose steps scale with each matrix's RMS. AdamW moves every
    # weight by ~lr a step whatever its size, and T5's query matrices start at std (d_model * head_dim)^-0.5 (1/128
    # at the 10M shape; scores are not divided by sqrt(head_dim)): at 1e-3 the queries outgrow their init within
    # 250 steps, the scores reach std 12-20 and every decoder layer's cross-attention reads one input token, and a
    # random-init T5 stays on the SST-2 label prior (docs/results/t5-10m, "The plateau").
    lr: float = option(3e-4, "peak learning rate (AdamW, warmup then cosine)")
    batch_size: int = option(32, "examples per optimizer step")
    max_source: int = option(128, "input tokens per example (longer inputs are cut at the end)")
    random_init: bool = option(False, "fine-tune the model's architecture from random weights (the baseline)",
                               action="store_true")
    seed: int = option(0, "seed of the batches and of a random initialisation")
    data_dir: str | None = option(None, "folder with the task data (default: $LMLAB_DATA, else $LMLAB_HOME/data)")
    out: str = option("runs/t5-finetune", "run folder")
    threads: int | None = option(None, "CPU threads for torch")
    device: str = option("auto", "auto | cpu | cuda | mps")
    dtype: str = option("auto", "auto (bf16 autocast where bf16 is native) | float32 | bfloat16",
                        choices=["auto", "float32", "bfloat16"])
    resume: bool = option(False, "continue the run in --out from its last checkpoint", action="store_true")
    no_progress: bool = option(False, "no progress bars", action="store_true")


def _task_data(names: list[str], s: T5FinetuneSettings, tokenizer, eos: int, block: int):
    train, dev = {}, {}
    for name in names:
        rendering(name)  # a task without a rendering fails here, before anything is read
        split = load_split(get_task(f"t5_{name}"), data_root(s.data_dir))
        docs = list(split.pool)
        random.Random(s.seed).shuffle(docs)
        source = min(s.max_source, block)  # the encoder's context bounds the input too
        train[name] = render_pairs(tokenizer, name, docs[:s.train_limit], eos, source, block)
        dev[name] = render_pairs(tokenizer, name, split.docs, eos, source, block)
    return train, dev


def _check_flags(s: T5FinetuneSettings, names: tuple[str, ...]) -> None:
    """The flags' ranges, in the user's words, before the model loads (TrainConfig's own checks would name its
    keys: train.min_lr for a negative --lr, with a --set this verb does not have)."""
    optional = (("--train-limit", s.train_limit), ("--eval-limit", s.eval_limit), ("--mixing-cap", s.mixing_cap),
                ("--threads", s.threads))
    check_flags(("--tasks", s.tasks, bool(names), "one or more tasks, e.g. sst2 or sst2,rte"),
                *((name, value, value >= 1, "at least 1") for name, value in
                  (("--max-steps", s.max_steps), ("--batch-size", s.batch_size), ("--max-source", s.max_source))),
                *((name, value, value is None or value >= 1, "at least 1 (or leave it out)")
                  for name, value in optional),
                ("--lr", s.lr, s.lr > 0, "a positive learning rate, e.g. 3e-4"))
    for name in names:
        rendering(name)


def t5_finetune(s: T5FinetuneSettings, command: str | None = None) -> dict:
    """Fine-tune an encoder-decoder text to text on one task or a mixture; score the dev sets through the
    evaluation harness; write the run folder and results.json; return the results."""
    names = comma_list(s.tasks)
    _check_flags(s, names)
    pre = load_pretrained(s.model)
    require_encoder_decoder(pre.model, "lmlab t5-finetune")
    model, eos = pre.model.train(), pre.eos_token_id
    if s.random_init:
        torch.manual_seed(s.seed)
        model = type(model)(model.config)
    train, dev = _task_data(names, s, pre.tokenizer, eos, model.config.block_size)
    t = TrainConfig(run_dir=s.out, batch_size=s.batch_size, micro_batch_size=s.batch_size, max_steps=s.max_steps,
                    lr=s.lr, min_lr=s.lr / 10, warmup_steps=max(1, s.max_steps // 20), weight_decay=0.0,
                    eval_interval=max(1, s.max_steps // 5), ckpt_interval=max(1, s.max_steps // 5),
                    log_interval=max(1, s.max_steps // 50), seed=s.seed, device=s.device, dtype=s.dtype,
                    threads=s.threads, keep_checkpoints=1)
    with TrainingRun(t, resume=s.resume, hint="choose another --out") as run:
        model.to(run.world.device)
        objective = TextToText(model, train, dev, s.mixing_cap, s.seed)
        if run.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            run.write_text("tokenizer.json", pre.tokenizer.to_str())
        summary = run.fit(objective, progress=not s.no_progress)
        model.eval()
        lm = LM(model, pre.tokenizer, batch_size=64, eos_ids=[eos], progress=not s.no_progress, name=s.out)
        scores = run_eval(lm, [f"t5_{n}" for n in names], shots="0", limit=s.eval_limit, data_dir=s.data_dir,
                          out=str(Path(s.out) / "eval"))
        results = {"settings": asdict(s), "command": command, "train": summary, "mixture":
                   dict(zip(objective.names, objective.rates.tolist())), "train_examples":
                   {k: len(v) for k, v in train.items()}, "eval": scores["results"]}
        run.write_json("results.json", results)
    return results
