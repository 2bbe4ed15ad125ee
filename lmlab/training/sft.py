"""Instruction tuning (SFT) and preference tuning (DPO): the two steps that turn a pretrained LM into an assistant.

    lmlab sft --model smollm2-135m-instruct --data alpaca.json --format alpaca --method lora --run-dir runs/sft
    lmlab dpo --model runs/sft --data ../shared/data/instruction_sft/alpaca_en_demo.json --format alpaca

Both are Objectives for lmlab.training.loop.fit, the loop that pretraining uses (checkpoints, --resume, progress, metrics,
torchrun), not a second loop. The model is trained whole (--method full) or through a parameter-efficient method
of lmlab.models.peft (lora, adapterh, adapterp), whose run then holds only the method's own weights.

Data formats (--format), each read as a JSON array or as JSON lines; a bad row is reported with its line number:
    alpaca  {"instruction", "input" (optional), "output"}: the Alpaca prompt template (Taori et al. 2023) around
            the instruction, the output as the response
    gsm8k   GSM8K's {"question", "answer"}: the worked answer without its calculator annotations <<...>>, and its
            final "#### N" written "The answer is N." as in LLM-Adapters' math data; then the Alpaca template
    chat    {"messages": [{"role", "content"}, ...]}: rendered with the model's own chat template; every
            assistant turn is a response (its end-of-turn token included, so the model learns to stop)
    jsonl   {"prompt", "response"}: plain text, no template

Loss on responses only: the text of an example is tokenized whole, and a token is a target when it starts inside
a response (found from the tokenizer's character offsets); every other label is -100, which the model's loss
ignores, so the prompt conditions the response but is never a target. Responses of the alpaca, gsm8k and jsonl
formats end with the model's EOS token.

Batches: by default length-bucketed (each epoch is shuffled, cut into groups of 64 batches, and each group is
sorted by length before it is cut into batches, so a batch pads little); with --packing, examples are
concatenated (in shuffled order) and cut into rows of exactly --seq-len tokens, as in GPT-style packing: no
padding at all, but a row's tokens also attend to the end of the example before them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmlab.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, ALPACA_STOPS, alpaca_prompt, gsm8k_solution  # noqa: F401
from lmlab.data.records import read_records
from lmlab.errors import LmlabError
from lmlab.training.loop import Objective

FORMATS = ("alpaca", "gsm8k", "chat", "jsonl")

@dataclass
class Example:
    """One training example as text: segments in order, each a response (trained on) or not."""
    segments: list[tuple[str, bool]]
    eos: bool  # end the last response with the EOS token
    where: str  # "FILE line N", for messages
    question: str = ""  # the user's text, to compare with evaluation questions (decontamination)

    @property
    def text(self) -> str:
        return "".join(s for s, _ in self.segments)


def _field(row: dict, name: str, where: str, fmt: str, needed: str) -> str:
    if not isinstance(row, dict):
        raise LmlabError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise LmlabError(f"{where}: missing field {name!r} (--format {fmt} rows need {needed})")
    value = row[name]
    if not isinstance(value, str):
        raise LmlabError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def to_example(fmt: str, row: dict, where: str, chat_prompt=None) -> Example:
    """A row of the given format as an Example (see the module docstring)."""
    if fmt == "alpaca":
        needed = "instruction and output (input is optional)"
        instruction = _field(row, "instruction", where, fmt, needed)
        output = _field(row, "output", where, fmt, needed)
        extra = _field(row, "input", where, fmt, needed) if "input" in row else ""
        return Example([(alpaca_prompt(instruction, extra), False), (output.strip(), True)], True, where,
                       instruction + "\n" + extra if extra.strip() else instruction)
    if fmt == "gsm8k":
        question = _field(row, "question", where, fmt, "question and answer")
        answer = _field(row, "answer", where, fmt, "question and answer")
        if "####" not in answer:
            raise LmlabError(f"{where}: a GSM8K answer ends with '#### <number>'; this one has no '####'")
        return Example([(alpaca_prompt(question), False), (gsm8k_solution(answer), True)], True, where, question)
    if fmt == "jsonl":
        prompt = _field(row, "prompt", where, fmt, "prompt and response")
        response = _field(row, "response", where, fmt, "prompt and response")
        return Example([(prompt, False), (response, True)], True, where, prompt)
    if fmt == "chat":
        return _chat_example(row, where, chat_prompt)
    raise LmlabError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _chat_example(row: dict, where: str, chat_prompt) -> Example:
    if chat_prompt is None:
        raise LmlabError("--format chat needs a model with a chat template; use --format alpaca or jsonl for this "
                         "model")
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise LmlabError(f"{where}: missing field 'messages' (--format chat rows need a non-empty list of "
                         "{\"role\", \"content\"} objects)")
    messages = row["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LmlabError(f"{where}: message {i} needs a string 'role' and a string 'content'")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise LmlabError(f"{where}: the conversation has no assistant message to train on")
    # Render the conversation once, and find each assistant turn as the text between the conversation up to it
    # (with the generation prompt) and the conversation including it.
    full = chat_prompt(messages, add_generation_prompt=False)
    segments, done = [], 0
    for i in turns:
        before = chat_prompt(messages[:i], add_generation_prompt=True)
        through = chat_prompt(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise LmlabError(f"{where}: the model's chat template does not render a conversation as its turns "
                             "one after another, so assistant turns cannot be located; use --format jsonl")
        segments += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    segments.append((full[done:], False))
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    return Example([s for s in segments if s[0]], False, where, user)


def load_examples(paths: list[str | Path], formats: list[str], chat_prompt=None) -> list[Example]:
    """Examples from data files; `formats` has one format for all files or one per file."""
    if not paths:
        raise LmlabError("no training data: pass --data FILE")
    if len(formats) == 1:
        formats = formats * len(paths)
    if len(formats) != len(paths):
        raise LmlabError(f"{len(paths)} --data files but {len(formats)} --format values; give one format for all "
                         "files or one per file")
    for fmt in formats:
        if fmt not in FORMATS:
            raise LmlabError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    examples = []
    for path, fmt in zip(paths, formats):
        rows = [to_example(fmt, row, f"{path} line {line}", chat_prompt) for line, row in read_records(path)]
        if not rows:
            raise LmlabError(f"{path} holds no examples")
        examples += rows
    return examples


@dataclass
class Pair:
    """A preference pair: a prompt (plain text, any template already applied), a chosen and a rejected response."""
    prompt: str
    chosen: str
    rejected: str
    where: str

    @property
    def question(self) -> str:
        return self.prompt

    def sides(self) -> tuple[Example, Example]:
        return tuple(Example([(self.prompt, False), (response, True)], True, self.where, self.prompt)
                     for response in (self.chosen, self.rejected))


def load_pairs(path: str | Path) -> list[Pair]:
    """--format pairs: rows {"prompt", "chosen", "rejected"} (what `lmlab dpo` writes to its pairs.jsonl)."""
    needed = "prompt, chosen and rejected"
    pairs = [Pair(*(_field(row, k, f"{path} line {line}", "pairs", needed) for k in ("prompt", "chosen", "rejected")),
                  f"{path} line {line}") for line, row in read_records(path)]
    if not pairs:
        raise LmlabError(f"{path} holds no pairs")
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Tokens and labels

IGNORE = -100  # the label of a token that is not a target (the model's cross-entropy skips it)


def encode_example(example: Example, tokenizer, eos_id: int | None) -> tuple[list[int], list[int]]:
    """(token ids, labels): labels are the ids of response tokens and IGNORE elsewhere. A token belongs to a
    response when its first character does."""
    text = example.text
    encoding = tokenizer.encode(text, add_special_tokens=False)
    spans, pos = [], 0
    for segment, trained in example.segments:
        if trained:
            spans.append((pos, pos + len(segment)))
        pos += len(segment)
    ids = list(encoding.ids)
    labels = [tid if any(a <= start < b for a, b in spans) else IGNORE
              for tid, (start, _) in zip(ids, encoding.offsets)]
    if example.eos:
        if eos_id is None:
            raise LmlabError("the model has no EOS token to end responses with; use --format chat or a model "
                             "with an EOS token")
        ids.append(eos_id)
        labels.append(eos_id)
    return ids, labels


def normalize_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def decontaminate(examples: list[Example], tasks: list[str], data_dir=None) -> tuple[list[Example], dict[str, int]]:
    """Drop the training examples whose question is a question of an evaluation task (same text up to case and
    whitespace); return the kept examples and how many each task removed."""
    from lmlab.evaluate.tasks import data_root, get_task, load_split

    removed: dict[str, int] = {}
    kept = examples
    for name in tasks:
        task = get_task(name)
        split = load_split(task, data_root(data_dir))
        questions = {normalize_question(" ".join(d.fields.values()) or d.text) for d in split.docs}
        before = len(kept)
        kept = [e for e in kept if normalize_question(e.question) not in questions]
        removed[name] = before - len(kept)
    return kept, removed


def encode_all(examples: list[Example], tokenizer, eos_id: int | None, seq_len: int,
               context: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Token ids and labels of each example, and how many were left out for being longer than seq_len + 1 tokens
    (the training length). A response that cannot fit the model's context at all is an error."""
    encoded, skipped = [], 0
    for example in examples:
        ids, labels = encode_example(example, tokenizer, eos_id)
        targets = sum(label != IGNORE for label in labels)
        if targets >= context:
            raise LmlabError(f"{example.where}: the response is {targets} tokens long, longer than the model's "
                             f"context of {context} tokens; shorten it or leave the example out")
        if targets == 0:
            raise LmlabError(f"{example.where}: the response is empty")
        if len(ids) > seq_len + 1:
            skipped += 1
            continue
        encoded.append((ids, labels))
    return encoded, skipped


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs (the tokens but the last) and next-token targets (the labels but the first), right-padded to the
    longest row with pad_id / IGNORE: a causal model never looks right, so padding changes nothing before it."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, :len(ids) - 1] = torch.tensor(labels[1:])
    return {"inputs": inputs, "targets": targets}


BUCKET_BATCHES = 64  # batches per length-sorted group


def epoch_batches(rows: list[tuple[list[int], list[int]]], n: int, seed: int, epoch: int, packing: bool,
                  seq_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """The batches of one epoch, each of n rows, in a seeded order (see the module docstring). The rows that do
    not fill a last batch are left for this epoch (another shuffle leaves out others the next time)."""
    rng = random.Random(f"{seed}/{epoch}")  # a string seed gives the same stream in every process
    order = rng.sample(range(len(rows)), len(rows))
    if packing:
        stream_ids, stream_labels = [], []
        for i in order:
            stream_ids += rows[i][0]
            stream_labels += rows[i][1]
        # Windows of seq_len + 1 tokens that overlap by one, so every token is a target once; a window without
        # any response token teaches nothing and is dropped.
        windows = [(stream_ids[a:a + seq_len + 1], stream_labels[a:a + seq_len + 1])
                   for a in range(0, len(stream_ids) - seq_len, seq_len)]
        packed = [w for w in windows if any(label != IGNORE for label in w[1][1:])]
        return [packed[i:i + n] for i in range(0, len(packed) - n + 1, n)]
    batches = []
    group = n * BUCKET_BATCHES
    for start in range(0, len(order), group):
        members = sorted(order[start:start + group], key=lambda i: len(rows[i][0]), reverse=True)
        batches += [[rows[i] for i in members[a:a + n]] for a in range(0, len(members) - n + 1, n)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Objectives for lmlab.training.loop.fit

PEFT_FILE = "peft.safetensors"
METHODS = ("full", "lora", "adapterh", "adapterp")


class Tuning(Objective):
    """What SFT and DPO share: the weights a checkpoint holds (the whole model, or the PEFT method's own weights),
    and a seeded walk through epochs of batches."""

    best_metric = "val_loss"
    higher_is_better = False

    def __init__(self, model, method: str, settings: dict, seed: int):
        self.model, self.method, self.settings, self.seed = model, method, settings, seed
        self.epoch, self.index, self._batches = 0, 0, None

    def _next_rows(self, n: int, make_batches) -> list:
        """The next batch of n rows; a new epoch (a new shuffle) when this one is used up."""
        if self._batches is None or self._batches[0] != (self.epoch, n):
            self._batches = ((self.epoch, n), make_batches(self.epoch))
            if not self._batches[1]:
                raise LmlabError(f"the training data does not fill one batch of {n} rows; use a smaller batch size "
                                 "or more data")
        if self.index >= len(self._batches[1]):
            self.epoch, self.index = self.epoch + 1, 0
            return self._next_rows(n, make_batches)
        self.index += 1
        return self._batches[1][self.index - 1]

    def data_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_data_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def save(self, model, folder: Path) -> None:
        if self.method == "full":
            return super().save(model, folder)
        from lmlab.models.peft import save_peft

        save_peft(model, folder / PEFT_FILE, self.method, self.settings)

    def load(self, model, folder: Path) -> None:
        if self.method == "full":
            return super().load(model, folder)
        from lmlab.models.peft import load_peft

        load_peft(model, folder / PEFT_FILE, apply=False)


class InstructionTuning(Tuning):
    """Supervised fine-tuning on prompt/response examples: the mean cross-entropy of the response tokens."""

    def __init__(self, model, train: list, val: list, *, method: str = "full", settings: dict | None = None,
                 seq_len: int = 512, packing: bool = False, pad_id: int = 0, seed: int = 0, eval_batch_size: int = 8):
        super().__init__(model, method, settings or {}, seed)
        self.train, self.val, self.seq_len, self.packing, self.pad_id = train, val, seq_len, packing, pad_id
        self.eval_batch_size = eval_batch_size
        # For the tokens/s figure: a packed row is seq_len tokens, a bucketed row as long as an average example.
        self.tokens_per_row = seq_len if packing else round(sum(len(ids) - 1 for ids, _ in train) / len(train))

    def draw(self, n: int) -> dict:
        rows = self._next_rows(n, lambda epoch: epoch_batches(self.train, n, self.seed, epoch, self.packing,
                                                              self.seq_len))
        return collate(rows, self.pad_id)

    def loss(self, module, batch):
        return module(batch["inputs"], batch["targets"], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        """val_loss: the mean cross-entropy per response token over the held-out examples (all their tokens
        together, so a long response weighs by its length)."""
        total, count = 0.0, 0
        device = next(model.parameters()).device
        rows = sorted(self.val, key=lambda r: len(r[0]))
        for start in range(0, len(rows), self.eval_batch_size):
            batch = collate(rows[start:start + self.eval_batch_size], self.pad_id)
            targets = batch["targets"].to(device)
            n = int((targets != IGNORE).sum())
            total += float(model(batch["inputs"].to(device), targets, loss_only=True)[1]) * n
            count += n
        return {"val_loss": total / max(count, 1)}

    def describe(self) -> str:
        return f"instruction tuning ({self.method}), {len(self.train)} examples, {len(self.val)} held out"


def sequence_logprobs(module, inputs, targets):
    """The summed log-probability of each row's target tokens (IGNORE positions count 0). The LM head runs only
    at the target positions (the model's loss_only)."""
    return -module(inputs, targets, loss_only=True, reduction="none")[1].sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Direct Preference Optimization (Rafailov et al., 2023), per pair:
        loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
    with y_w the chosen and y_l the rejected response (summed log-probabilities of their tokens). Returns the loss
    and the implicit rewards beta * (log pi - log ref) of the chosen and the rejected response."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


class Preference(Tuning):
    """DPO on (chosen, rejected) pairs. The reference model is the model as it starts (DPO's pi_ref: the SFT
    model), so its log-probabilities are constants: they are computed once, here, before any update, and no
    second copy of the model is kept."""

    best_metric = "val_dpo_loss"

    def __init__(self, model, train: list, val: list, *, beta: float = 0.1, method: str = "full",
                 settings: dict | None = None, pad_id: int = 0, seed: int = 0, eval_batch_size: int = 4,
                 progress: bool = True):
        super().__init__(model, method, settings or {}, seed)
        self.train, self.val, self.beta, self.pad_id = train, val, beta, pad_id
        self.eval_batch_size = eval_batch_size
        self.tokens_per_row = round(sum(len(c[0]) + len(r[0]) - 2 for c, r in train) / len(train))
        self.train_ref = self._logprobs(model, train, progress, "reference log-probs (train)")
        self.val_ref = self._logprobs(model, val, progress, "reference log-probs (held out)")

    def _collate(self, pairs) -> dict:
        batch = collate([side for pair in pairs for side in pair], self.pad_id)  # chosen, rejected, chosen, ...
        return {k: v.view(len(pairs), 2, -1) for k, v in batch.items()}

    def _logprobs(self, model, pairs, progress: bool, desc: str):
        """(n, 2) summed log-probabilities of the chosen and the rejected response of each pair."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in tqdm(range(0, len(pairs), self.eval_batch_size), desc=desc, disable=not progress,
                              leave=False):
                batch = self._collate(pairs[start:start + self.eval_batch_size])
                out.append(sequence_logprobs(model, batch["inputs"].flatten(0, 1).to(device),
                                             batch["targets"].flatten(0, 1).to(device)).view(-1, 2).cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 2)

    def draw(self, n: int) -> dict:
        def batches(epoch):
            order = random.Random(f"{self.seed}/{epoch}").sample(range(len(self.train)), len(self.train))
            return [order[a:a + n] for a in range(0, len(order) - n + 1, n)]

        picked = self._next_rows(n, batches)
        batch = self._collate([self.train[i] for i in picked])
        batch["reference"] = self.train_ref[picked]
        return batch

    def loss(self, module, batch):
        n = batch["inputs"].shape[0]
        policy = sequence_logprobs(module, batch["inputs"].flatten(0, 1), batch["targets"].flatten(0, 1)).view(n, 2)
        ref = batch["reference"]
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)[0].mean()

    def evaluate(self, model) -> dict[str, float]:
        """On the held-out pairs: the DPO loss, the mean reward margin (chosen minus rejected implicit reward),
        the reward accuracy (how often the chosen response has the higher reward), and each mean reward."""
        policy = self._logprobs(model, self.val, False, "")
        losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], self.val_ref[:, 0], self.val_ref[:, 1],
                                            self.beta)
        margin = chosen - rejected
        return {"val_dpo_loss": float(losses.mean()), "val_reward_margin": float(margin.mean()),
                "val_reward_accuracy": float((margin > 0).float().mean()),
                "val_chosen_reward": float(chosen.mean()), "val_rejected_reward": float(rejected.mean())}

    def describe(self) -> str:
        return f"DPO ({self.method}, beta {self.beta}), {len(self.train)} pairs, {len(self.val)} held out"


# ----------------------------------------------------------------------------------------------------------------
# Models: the method on a base model, and a tuned run as a ready model

RUN_FILE = "sft.json"  # in a run folder: the base model, the method and its settings (what load_tuned needs)
DEFAULT_LR = {"full": 2e-5, "lora": 3e-4, "adapterh": 3e-4, "adapterp": 3e-4}  # LLM-Adapters' 3e-4 for PEFT


def method_settings(method: str, *, lora_r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    lora_targets=("qkv", "proj", "fc"), adapter_size: int | None = None,
                    adapter_activation: str = "tanh", adapter_dropout: float = 0.0) -> dict:
    """The settings a method is applied (and saved) with."""
    if method not in METHODS:
        raise LmlabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "lora":
        return {"targets": list(lora_targets), "r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout}
    if method == "adapterh":
        return {"size": adapter_size or 32, "places": ["attn", "mlp"], "activation": adapter_activation,
                "dropout": adapter_dropout}
    if method == "adapterp":
        return {"size": adapter_size or 64, "activation": adapter_activation, "dropout": adapter_dropout}
    return {}


def apply_method(model, method: str, settings: dict) -> None:
    """Make `model` trainable by `method`: every parameter (full), or a frozen base plus the PEFT method's own."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    from lmlab.models.peft import METHODS as PEFT_METHODS

    PEFT_METHODS[method](model, **settings)


def load_tuned(path: str | Path, merge: bool = True):
    """A run of `lmlab sft` or `lmlab dpo` as an lmlab.models.hub.Pretrained: its base model (loaded as lmlab.models.hub loads
    any model), the method re-applied and its weights taken from best/ (else the newest checkpoint). A LoRA is
    merged into the weights (merge=True); bottleneck adapters stay modules on top of the base."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from lmlab.models.hub import load_pretrained
    from lmlab.models.peft import load_peft, merge_peft
    from lmlab.training.loop import latest_checkpoint

    path = Path(path)
    info = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    folder = path / "best" if (path / "best").is_dir() else latest_checkpoint(path)
    if folder is None:
        raise LmlabError(f"{path} has no checkpoint yet; train it first (lmlab {info.get('command', 'sft')})")
    base = load_pretrained(info["base"])
    if info["method"] == "full":
        base.model.load_weights(load_file(str(folder / "model.safetensors")))
    else:
        load_peft(base.model, folder / PEFT_FILE)
        if merge and info["method"] == "lora":
            merge_peft(base.model, "lora")
    return replace(base, name=str(path), model=base.model.eval())


def trainable_parameters(model) -> tuple[int, int]:
    """(parameters being trained, all parameters); a tied embedding counts once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class PeakMemory:
    """The peak resident memory of this process while the block runs, sampled every 50 ms from /proc (Linux),
    so that loading a model before the block does not count."""

    def __init__(self):
        import threading

        self.peak, self._stop, self._thread = 0, threading.Event(), threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's high-water mark instead
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# ----------------------------------------------------------------------------------------------------------------
# The commands

def _train_config(run_dir: Path, method: str, steps: int, batch_size: int, micro_batch_size: int | None,
                  lr: float | None, seed: int, overrides: list[str]):
    from lmlab.training.config import TrainConfig, _coerce, apply_overrides

    lr = lr or DEFAULT_LR[method]
    values = dict(run_dir=str(run_dir), max_steps=steps, batch_size=batch_size,
                  micro_batch_size=micro_batch_size or batch_size, lr=lr, min_lr=lr / 10,
                  warmup_steps=max(1, steps // 20), weight_decay=0.0, beta2=0.999,
                  eval_interval=max(1, steps // 5), log_interval=max(1, min(10, steps // 50)),
                  ckpt_interval=max(1, steps // 5), keep_checkpoints=1, seed=seed)
    raw = apply_overrides({"train": values}, overrides)
    if set(raw) != {"train"}:
        raise LmlabError("--set takes train.X=VALUE here (the model and data come from --model and --data)")
    t = TrainConfig(**_coerce(TrainConfig, "train", raw["train"]))
    if t.batch_size % t.micro_batch_size:
        raise LmlabError(f"batch size {t.batch_size} must be a multiple of the micro-batch size {t.micro_batch_size}")
    return t


def training_precision(t) -> str:
    """train.dtype for lmlab sft and dpo: "auto" is bf16 autocast where the hardware multiplies bf16 natively
    (CUDA; a CPU with AMX or AVX512-BF16, where bf16 matmuls run several times faster than fp32), fp32 elsewhere.
    The trained weights keep fp32 master copies either way, so small updates are not lost to bf16 rounding."""
    if t.dtype != "auto":
        return t.dtype
    from lmlab.util import pick_device

    device = pick_device(t.device)
    native = device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available()
                                       and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "bfloat16" if native else "float32"


def prepare_model(model, method: str, settings: dict, *, bf16: bool, device, seed: int = 0) -> None:
    """The method on the model, on the training device, as lmlab sft and dpo train it. Under bf16 autocast a PEFT
    method's frozen matmul weights are stored in bf16 once (lmlab.models.peft.cast_frozen_matmuls: the products autocast
    computes, without a cast per step); the run saves only the method's weights, and its results and load_tuned
    use the fp32 base."""
    from lmlab.models.peft import cast_frozen_matmuls

    torch.manual_seed(seed)  # the method's random initialisation (LoRA's A, the adapters' down)
    apply_method(model, method, settings)
    if bf16 and method != "full":
        cast_frozen_matmuls(model, torch.bfloat16)
    model.to(device)


def _prompt_and_reference(example: Example) -> tuple[str, str]:
    """The text before the first response (what a model is asked) and that response."""
    first = next(i for i, (_, trained) in enumerate(example.segments) if trained)
    return "".join(s for s, _ in example.segments[:first]), example.segments[first][0]


def answer_prompts(pretrained, model, prompts: list[str], max_new_tokens: int, progress: bool = True,
                   desc: str = "answers") -> list[str]:
    """Greedy answers of `model` (with pretrained's tokenizer and end tokens) to prompts, up to an end-of-turn
    token, the header of a next Alpaca example, or max_new_tokens."""
    from dataclasses import replace

    from lmlab.evaluate import LM

    if not prompts:
        return []
    lm = LM.from_pretrained(replace(pretrained, model=model), batch_size=8, progress=progress)
    return lm.generate_until([(p, ALPACA_STOPS, max_new_tokens) for p in prompts], desc=desc)


def _split(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """(training, held-out): a seeded shuffle, the first val_size held out."""
    if not 0 < val_size < len(examples):
        raise LmlabError(f"--val-size {val_size} must be at least 1 and less than the {len(examples)} examples")
    order = random.Random(f"{seed}/split").sample(range(len(examples)), len(examples))
    return [examples[i] for i in order[val_size:]], [examples[i] for i in order[:val_size]]


@dataclass
class TuneSettings:
    """What `lmlab sft` and `lmlab dpo` share."""
    model: str
    data: list[str]
    formats: list[str]
    run_dir: str
    method: str = "lora"
    settings: dict | None = None  # the method's (method_settings); None: its defaults
    seq_len: int = 512
    val_size: int = 50
    steps: int = 300
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    threads: int | None = None
    overrides: tuple[str, ...] = ()  # train.X=VALUE
    samples: int = 5  # held-out prompts answered before and after training
    sample_tokens: int = 128
    decontaminate: tuple[str, ...] = ()  # evaluation tasks whose questions are removed from the training data
    data_dir: str | None = None
    eval_tasks: tuple[str, ...] = ()  # evaluated after training (lmlab eval), with eval_limit examples each
    eval_limit: int | None = None
    resume: bool = False
    progress: bool = True
    command: str | None = None


def _prepare(s: TuneSettings, kind: str, echo):
    """Threads, the base model, the examples (decontaminated, split) and the train config."""
    from lmlab.models.hub import load_pretrained

    from lmlab.training.loop import latest_checkpoint

    if s.threads:
        torch.set_num_threads(s.threads)
    if s.method not in METHODS:
        raise LmlabError(f"unknown method {s.method!r}; choose one of {', '.join(METHODS)}")
    run_dir = Path(s.run_dir)
    if not s.resume and latest_checkpoint(run_dir) is not None:
        raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --run-dir")
    t = _train_config(run_dir, s.method, s.steps, s.batch_size, s.micro_batch_size, s.lr, s.seed, list(s.overrides))
    settings = s.settings if s.settings is not None else method_settings(s.method)
    if s.seq_len < 2:
        raise LmlabError(f"--seq-len must be at least 2 (got {s.seq_len})")
    allowed = ("pairs",) if kind == "dpo" and s.formats == ["pairs"] else FORMATS
    for fmt in s.formats:  # bad input fails before the model is loaded
        if fmt not in allowed:
            raise LmlabError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}"
                             + (" (or pairs, alone)" if kind == "dpo" else ""))
    for path in s.data:
        if not Path(path).is_file():
            raise LmlabError(f"no such data file: {path}")
    pretrained = load_pretrained(s.model)
    chat = pretrained.chat_prompt if pretrained.chat_template else None
    if kind == "dpo" and s.formats == ["pairs"]:
        examples = [pair for path in s.data for pair in load_pairs(path)]
    else:
        examples = load_examples(s.data, s.formats, chat)
    info = {"command": kind, "base": str(Path(s.model).resolve()) if Path(s.model).exists() else s.model,
            "method": s.method, "settings": settings, "data": [str(d) for d in s.data], "formats": s.formats,
            "examples": len(examples), "seq_len": s.seq_len, "seed": s.seed}
    if s.decontaminate:
        examples, removed = decontaminate(examples, list(s.decontaminate), s.data_dir)
        info["decontaminated"] = removed
        if echo:
            echo("removed training examples whose question is an evaluation question: "
                 + ", ".join(f"{k} {v}" for k, v in removed.items()))
    train, val = _split(examples, s.val_size, s.seed)
    return pretrained, train, val, t, settings, info


def _finish(s: TuneSettings, pretrained, objective, t, info: dict, samples: list[dict], world, echo) -> dict:
    """Train, then the results: figures, before/after answers, and the optional evaluation."""
    from lmlab.training.loop import fit
    from lmlab.util import atomic_write_json, atomic_write_text

    model = objective.model
    run_dir = Path(s.run_dir)
    trained, total = trainable_parameters(model)
    info["precision"] = "bf16 autocast" if world.bf16 else "fp32"
    if world.main:
        atomic_write_json(run_dir / RUN_FILE, info)
    if not s.resume:  # the held-out figures of the starting model, for before/after
        with torch.no_grad(), world.autocast():
            model.eval()
            info["before"] = objective.evaluate(model)
    with PeakMemory() as memory:
        summary = fit(objective, t, run_dir, world=world, resume=s.resume, progress=s.progress)
    results = {**info, "summary": summary, "trainable_parameters": trained, "parameters": total,
               "trainable_fraction": round(trained / total, 5), "train_seconds": summary["elapsed_s"],
               "seconds_per_step": round(summary["elapsed_s"] / max(1, summary["steps"]), 3),
               "peak_memory_mb": round(memory.peak / 2**20), "threads": torch.get_num_threads(),
               "train_config": {k: getattr(t, k) for k in ("lr", "min_lr", "warmup_steps", "batch_size",
                                                           "micro_batch_size", "max_steps", "weight_decay")},
               "command_line": s.command}
    if not world.main:
        return results
    if (run_dir / "best").is_dir():
        results["best"] = json.loads((run_dir / "best" / "eval.json").read_text())
    if any(p.dtype != torch.float32 for p in model.parameters()):
        # Answer with the run as saved (the fp32 base, the trained weights of best/ or the last checkpoint),
        # which is what load_tuned gives later, not with the bf16 training copy.
        model = load_tuned(run_dir, merge=False).model.to(world.device)
    elif (run_dir / "best").is_dir():
        objective.load(model, run_dir / "best")
    if samples:
        after = answer_prompts(pretrained, model, [x["prompt"] for x in samples], s.sample_tokens, s.progress,
                               "answers after")
        for x, text in zip(samples, after):
            x["after"] = text
        atomic_write_json(run_dir / "samples.json", samples)
        atomic_write_text(run_dir / "samples.md", format_samples(samples))
    if s.eval_tasks:
        from dataclasses import replace

        from lmlab.evaluate import run_eval

        tuned = replace(pretrained, model=model.eval(), name=str(run_dir))
        evaluation = run_eval(tuned, list(s.eval_tasks), limit=s.eval_limit, data_dir=s.data_dir,
                              out=run_dir / "eval.json", progress=s.progress, echo=echo,
                              command=s.command)
        results["eval"] = evaluation["results"]
    atomic_write_json(run_dir / "results.json", results)
    if echo:
        echo(format_results(results))
    return results


def _samples_before(pretrained, val: list[Example], s: TuneSettings, world) -> list[dict]:
    """The first held-out prompts, their reference responses and the base model's answers; kept in the run folder
    so that a resumed run does not answer them again with a half-trained model."""
    run_dir = Path(s.run_dir)
    if not world.main or s.samples <= 0:
        return []
    cached = run_dir / "samples.json"
    if s.resume and cached.is_file():
        return [{k: v for k, v in x.items() if k != "after"} for x in json.loads(cached.read_text())]
    from lmlab.util import atomic_write_json

    pairs = [(e.prompt, e.chosen) if isinstance(e, Pair) else _prompt_and_reference(e) for e in val[:s.samples]]
    before = answer_prompts(pretrained, pretrained.model, [p for p, _ in pairs], s.sample_tokens, s.progress,
                            "answers before")
    samples = [{"where": e.where, "prompt": p, "reference": r, "before": b}
               for e, (p, r), b in zip(val, pairs, before)]
    atomic_write_json(cached, samples)
    return samples


def format_samples(samples: list[dict]) -> str:
    parts = []
    for i, x in enumerate(samples, 1):
        parts.append(f"## {i}. {x['where']}\n\n**Prompt**\n\n```\n{x['prompt'].strip()}\n```\n\n**Reference**\n\n"
                     f"```\n{x['reference'].strip()}\n```\n\n**Before**\n\n```\n{x['before'].strip()}\n```\n\n"
                     f"**After**\n\n```\n{x.get('after', '').strip()}\n```\n")
    return "\n".join(parts)


def format_results(r: dict) -> str:
    summary = r["summary"]
    lines = [f"{r['command']} {r['method']}: {r['trainable_parameters'] / 1e6:.2f}M of {r['parameters'] / 1e6:.1f}M "
             f"parameters trained ({100 * r['trainable_fraction']:.2f} %), {summary['steps']} steps in "
             f"{r['train_seconds']:.0f} s ({r['seconds_per_step']:.2f} s/step), peak memory {r['peak_memory_mb']} MB"]
    evals = {k: v for k, v in summary.items() if k.startswith("val_")}
    before = r.get("before", {})
    lines.append("held out: " + ", ".join(f"{k} {before[k]:.4f} -> {v:.4f}" if k in before else f"{k} {v:.4f}"
                                          for k, v in evals.items()))
    for row in r.get("eval", []):
        lines.append(f"{row['task']:10} exact_match {row['value']:.4f} ± {row['stderr']:.4f} (n={row['n']})")
    return "\n".join(lines)


def run_sft(s: TuneSettings, packing: bool = False, echo=print) -> dict:
    """`lmlab sft`: instruction tuning of s.model on s.data with s.method. Returns results.json's content."""
    from lmlab.training.loop import Dist

    pretrained, train, val, t, settings, info = _prepare(s, "sft", echo)
    context = pretrained.model.config.block_size
    encoded_train, skipped_train = encode_all(train, pretrained.tokenizer, pretrained.eos_token_id, s.seq_len,
                                              context)
    encoded_val, skipped_val = encode_all(val, pretrained.tokenizer, pretrained.eos_token_id, s.seq_len, context)
    if not encoded_train or not encoded_val:
        raise LmlabError(f"no example fits --seq-len {s.seq_len}; raise it")
    info.update(train_examples=len(encoded_train), val_examples=len(encoded_val), packing=packing,
                skipped_longer_than_seq_len=skipped_train + skipped_val)
    if echo and skipped_train + skipped_val:
        echo(f"left out {skipped_train + skipped_val} examples longer than --seq-len {s.seq_len} tokens")
    world = Dist(t.device, training_precision(t))
    try:
        samples = _samples_before(pretrained, val, s, world)
        model = pretrained.model
        prepare_model(model, s.method, settings, bf16=world.bf16, device=world.device, seed=s.seed)
        objective = InstructionTuning(model, encoded_train, encoded_val, method=s.method, settings=settings,
                                      seq_len=s.seq_len, packing=packing, pad_id=pretrained.eos_token_id or 0,
                                      seed=s.seed)
        return _finish(s, pretrained, objective, t, info, samples, world, echo)
    finally:
        world.close()


def build_pairs(pretrained, examples: list[Example], max_new_tokens: int,
                progress: bool = True) -> list[Pair | None]:
    """Preference pairs from instruction data, one per example: the data's response is chosen, the model's own
    greedy answer to the same prompt is rejected (the model that DPO starts from, so the pairs say "answer like
    the data, not like you do now"). None where the model's answer is empty or the data's response itself."""
    prompts = [_prompt_and_reference(e) for e in examples]
    answers = answer_prompts(pretrained, pretrained.model, [p for p, _ in prompts], max_new_tokens, progress,
                             "rejected answers")
    return [Pair(p, r.strip(), a.strip(), e.where) if a.strip() and a.strip() != r.strip() else None
            for e, (p, r), a in zip(examples, prompts, answers)]


def _encode_pairs(pairs: list[Pair], pretrained, seq_len: int) -> tuple[list, int]:
    context = pretrained.model.config.block_size
    encoded, skipped = [], 0
    for pair in pairs:
        sides, dropped = encode_all(list(pair.sides()), pretrained.tokenizer, pretrained.eos_token_id, seq_len, context)
        if dropped:
            skipped += 1
        else:
            encoded.append(tuple(sides))
    return encoded, skipped


def run_dpo(s: TuneSettings, beta: float = 0.1, rejected_tokens: int = 128, max_pairs: int | None = None,
            echo=print) -> dict:
    """`lmlab dpo`: preference tuning of s.model. With --format pairs the pairs are read; with instruction data
    they are built (build_pairs) and kept in the run folder's pairs.jsonl. Returns results.json's content."""
    from lmlab.training.loop import Dist
    from lmlab.util import atomic_write_text

    if beta <= 0:
        raise LmlabError(f"--beta must be positive (got {beta})")
    pretrained, train, val, t, settings, info = _prepare(s, "dpo", echo)
    if max_pairs:
        train = train[:max_pairs]
    run_dir = Path(s.run_dir)
    world = Dist(t.device, training_precision(t))
    try:
        if not isinstance(train[0], Pair):
            cached = run_dir / "pairs.jsonl"
            if world.main and not (s.resume and cached.is_file()):
                built = build_pairs(pretrained, train + val, rejected_tokens, s.progress)
                atomic_write_text(cached, "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen,
                                                              "rejected": p.rejected, "where": p.where,
                                                              "held_out": i >= len(train)},
                                                             ensure_ascii=False) + "\n"
                                                  for i, p in enumerate(built) if p is not None))
            world.barrier()
            rows = [row for _, row in read_records(cached)]
            train = [Pair(r["prompt"], r["chosen"], r["rejected"], r["where"]) for r in rows if not r["held_out"]]
            val = [Pair(r["prompt"], r["chosen"], r["rejected"], r["where"]) for r in rows if r["held_out"]]
            info["pairs"] = (f"chosen: the data's response; rejected: {s.model}'s greedy answer (at most "
                             f"{rejected_tokens} tokens), in {cached}")
            if not train or not val:
                raise LmlabError(f"{s.model} answered {'no held-out' if train else 'no training'} prompt with a "
                                 "text of its own (empty answers and copies of the data's response are left out), "
                                 "so there are no pairs; give pairs (--format pairs) or other prompts")
        encoded_train, skipped_train = _encode_pairs(train, pretrained, s.seq_len)
        encoded_val, skipped_val = _encode_pairs(val, pretrained, s.seq_len)
        if not encoded_train or not encoded_val:
            raise LmlabError(f"no pair fits --seq-len {s.seq_len}; raise it")
        info.update(train_pairs=len(encoded_train), val_pairs=len(encoded_val), beta=beta,
                    skipped_longer_than_seq_len=skipped_train + skipped_val)
        samples = _samples_before(pretrained, val, s, world)
        model = pretrained.model
        prepare_model(model, s.method, settings, bf16=world.bf16, device=world.device, seed=s.seed)
        with world.autocast():  # the reference log-probabilities in the precision the policy's are computed in
            objective = Preference(model, encoded_train, encoded_val, beta=beta, method=s.method,
                                   settings=settings, pad_id=pretrained.eos_token_id or 0, seed=s.seed,
                                   progress=s.progress)
        return _finish(s, pretrained, objective, t, info, samples, world, echo)
    finally:
        world.close()
