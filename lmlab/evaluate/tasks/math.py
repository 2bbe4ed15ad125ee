"""Math word problems, scored by generation: AddSub, SingleEq, AQuA, GSM8K, SVAMP, MultiArith, MAWPS.

    lmlab eval --model smollm2-135m-instruct --tasks addsub,singleeq,aqua --limit 100

The data is LLM-Adapters' packaging (Hu et al. 2023), `llm_adapters_math/<SET>/test.json`: {"instruction" (the
problem; AQuA's ends with "Answer Choices: (A) ... (E) ..."), "answer"}. Its `output` field is a model-written
rationale, sometimes wrong, and is never used: the gold answer is `answer` (a number, a letter for AQuA).
`gsm8k` reads OpenAI's original `gsm8k/test.jsonl` (gold: the number after "####"), the same 1,319 problems.

Prompt: as LLM-Adapters evaluates, the problem inside the Alpaca template (lmlab.data.prompts.alpaca_prompt), which is also
what `lmlab sft --format alpaca|gsm8k` trains on; with --chat, the problem is a user turn of the model's chat
template instead. Zero-shot is the protocol; few-shot examples (worked solutions ending "The answer is N.") come
from GSM8K's training split for the numeric tasks, and AQuA has none. The model writes greedily until an
end-of-turn token, the header of a next Alpaca example, or MAX_NEW_TOKENS tokens.

Answer extraction: lmlab.evaluate.answers (extract_number, extract_letter, is_correct).
A completion with no number (or no letter) is wrong. The metric is exact_match: the fraction correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.data.prompts import ALPACA_STOPS, alpaca_prompt, gsm8k_solution
from lmlab.evaluate.answers import LETTERS, extract_letter, extract_number, is_correct
from lmlab.evaluate.lm import LM
from lmlab.evaluate.metrics import Scored
from lmlab.evaluate.tasks.base import FEWSHOT_DELIMITER, PROMPTS_KEPT, Doc, Settings, Split, Task
from lmlab.evaluate.tasks.files import need, read_json, read_jsonl

MAX_NEW_TOKENS = 256  # as LLM-Adapters; the math training rationales are 71 tokens long at the median, 185 at p99


def gsm8k_gold(answer: str) -> float:
    return float(answer.rpartition("####")[2].strip().replace(",", ""))


# ----------------------------------------------------------------------------------------------------------------
# Data

def _adapters_math(root: Path, folder: str, task: str) -> list[dict]:
    return read_json(need(root, f"llm_adapters_math/{folder}/test.json", task))


def _gsm8k_docs(root: Path, split: str, task: str) -> list[Doc]:
    return [Doc(f"{split}-{i}", {"question": r["question"].strip()}, gold=gsm8k_gold(r["answer"]),
                text=gsm8k_solution(r["answer"]))
            for i, r in enumerate(read_jsonl(need(root, f"gsm8k/{split}.jsonl", task)))]


def _pool(root: Path) -> tuple[list[Doc], str]:
    """GSM8K's training problems as few-shot examples, when the file is there (zero-shot needs none)."""
    if not (root / "gsm8k/train.jsonl").is_file():
        return [], "none (gsm8k/train.jsonl not found)"
    return _gsm8k_docs(root, "train", "gsm8k"), "gsm8k/train.jsonl (worked solutions)"


def _adapters_loader(folder: str, task: str, letters: bool):
    def load(root: Path) -> Split:
        docs = []
        for i, row in enumerate(_adapters_math(root, folder, task)):
            answer = str(row["answer"]).strip()
            gold = LETTERS.index(answer) if letters else float(answer)
            docs.append(Doc(f"test-{i}", {"question": row["instruction"].strip()}, gold=gold))
        pool, how = ([], "none (AQuA has no training split here)") if letters else _pool(root)
        return Split(docs, pool, f"llm_adapters_math/{folder}/test.json (gold: the answer field)", how)
    return load


def _load_gsm8k(root: Path) -> Split:
    pool, how = _pool(root)
    return Split(_gsm8k_docs(root, "test", "gsm8k"), pool, "gsm8k/test.jsonl (gold: the number after ####)", how)


# ----------------------------------------------------------------------------------------------------------------
# Scoring

@dataclass
class MathTask(Task):
    """A word-problem task: the model writes a solution, the answer is extracted and compared with the gold."""
    kind = "generation"
    letters: bool = False  # AQuA: the answer is an option letter

    def modes(self, mode: str) -> list[str]:
        return ["generate"]

    def prompt(self, doc: Doc, shots: list[Doc], chat_prompt) -> str:
        if chat_prompt is not None:  # few-shot examples as earlier turns of the conversation
            messages = []
            for e in shots:
                messages += [{"role": "user", "content": e.fields["question"]},
                             {"role": "assistant", "content": e.text}]
            return chat_prompt(messages + [{"role": "user", "content": doc.fields["question"]}])
        solved = "".join(alpaca_prompt(e.fields["question"]) + e.text + FEWSHOT_DELIMITER for e in shots)
        return solved + alpaca_prompt(doc.fields["question"])

    def score(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, mode: str, label: str,
              run: dict) -> Scored:
        """Greedy solutions, extracted answers, exact match."""
        prompts = [self.prompt(d, shots[d.subset], lm.chat_prompt if s.chat else None) for d in docs]
        run["prompts"] = prompts[:PROMPTS_KEPT]
        texts = lm.generate_until([(p, ALPACA_STOPS, MAX_NEW_TOKENS) for p in prompts], desc=label,
                                  examples=len(docs))
        if self.letters:
            preds = [extract_letter(t) for t in texts]
            correct = [p == d.gold for p, d in zip(preds, docs)]
        else:
            preds = [extract_number(t) for t in texts]
            correct = [is_correct(p, d.gold) for p, d in zip(preds, docs)]
        run["unparsed"] = sum(p is None for p in preds)
        records = [{"id": d.id, "query": d.fields["question"], "generation": t,
                    "pred": LETTERS[p] if self.letters and p is not None else p,
                    "gold": LETTERS[int(d.gold)] if self.letters else d.gold, "correct": c}
                   for d, t, p, c in zip(docs, texts, preds, correct)]
        columns = {"pred": np.array(correct, dtype=bool), "gold": np.ones(len(docs), dtype=bool)}
        return Scored(["exact_match"], columns, records)


_ABOUT = "math word problems: a generated solution, {} (lmlab/evaluate/tasks/math.py)"


def _task(name: str, folder: str, letters: bool = False) -> MathTask:
    return MathTask(name, _adapters_loader(folder, name, letters), metrics=("exact_match",),
                    group="math", letters=letters,
                    about=_ABOUT.format("the option letter extracted" if letters else "its last number"))


TASKS = [
    _task("addsub", "AddSub"),
    _task("singleeq", "SingleEq"),
    _task("aqua", "AQuA", letters=True),
    MathTask("gsm8k", _load_gsm8k, metrics=("exact_match",), group="math",
             about=_ABOUT.format("its last number")),
    _task("svamp", "SVAMP"),
    _task("multiarith", "MultiArith"),
    _task("mawps", "mawps"),
]
