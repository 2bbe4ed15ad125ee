"""Instruction and preference data for lmlab sft and dpo: the example formats, tokens with response-only labels,
and batches.

Data formats (--format), each read as a JSON array or as JSON lines; a bad row is reported with its line number:
    alpaca  {"instruction", "input" (optional), "output"}: the Alpaca prompt template (Taori et al. 2023) around
            the instruction, the output as the response
    gsm8k   GSM8K's {"question", "answer"}: the worked answer without its calculator annotations <<...>>, and its
            final "#### N" written "The answer is N." as in LLM-Adapters' math data; then the Alpaca template
    chat    {"messages": [{"role", "content"}, ...]}: rendered with the model's own chat template; every
            assistant turn is a response (its end-of-turn token included, so the model learns to stop)
    jsonl   {"prompt", "response"}: plain text, no template
    pairs   (lmlab dpo) {"prompt", "chosen", "rejected"}

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

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.data.prompts import alpaca_prompt, gsm8k_solution
from lmlab.data.records import read_records
from lmlab.errors import LmlabError

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


def prompt_and_reference(example: Example) -> tuple[str, str]:
    """The text before the first response (what a model is asked) and that response."""
    first = next(i for i, (_, trained) in enumerate(example.segments) if trained)
    return "".join(s for s, _ in example.segments[:first]), example.segments[first][0]


def split_examples(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """(training, held-out): a seeded shuffle, the first val_size held out."""
    if not 0 < val_size < len(examples):
        raise LmlabError(f"--val-size {val_size} must be at least 1 and less than the {len(examples)} examples")
    order = random.Random(f"{seed}/split").sample(range(len(examples)), len(examples))
    return [examples[i] for i in order[val_size:]], [examples[i] for i in order[:val_size]]

