"""What every evaluation task is made of: its examples (Doc, Split), the settings of a run, the few-shot draw,
and the Task interface that each kind of task implements (choice.py, language_modeling.py, math.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from lmlab.errors import LmlabError
from lmlab.evaluate.lm import LM
from lmlab.evaluate.metrics import Scored

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
PROMPTS_KEPT = 3  # exact prompts of the first examples, per run, in the JSON summary


@dataclass
class Doc:
    """One example in a task-independent shape."""
    id: str
    fields: dict[str, str]  # the example's input texts, by template field name (calibration blanks them out)
    choices: list[str] = field(default_factory=list)  # answers as scored, without the target delimiter
    gold: float = 0  # index of the right choice; the gold score of a regression (STS-B)
    options: list[str] | None = None  # answers as listed in the generation prompt when they differ (MMLU)
    subset: str = ""  # MMLU subject, benchmark source dataset
    text: str = ""  # perplexity tasks: the document


@dataclass
class Split:
    docs: list[Doc]  # evaluated
    pool: list[Doc]  # few-shot examples
    source: str  # what was read
    pool_source: str  # where the few-shot examples come from, in words
    notes: dict = field(default_factory=dict)  # e.g. how many benchmark questions were matched


@dataclass
class Settings:
    """The options of one `lmlab eval` run that scoring needs."""
    seed: int
    balanced: bool
    calibrate: bool
    chat: bool
    stride: int | None
    bootstrap_iters: int
    limit: int | None = None  # --limit: examples per task (a one-text perplexity task: its first windows)


@dataclass
class Task:
    """A task: its data (`load`), its prompts (the fields below, used by the kinds that prompt with text), and,
    in each subclass, how it is scored. `kind` names the subclass's family for the run's dispatch and reports:
    "choice" | "regression" | "lambada" | "perplexity" | "generation"."""
    kind: ClassVar[str] = ""
    few_shot: ClassVar[bool] = True  # False: evaluated once, with no shots (perplexity)

    name: str
    load: Callable[[Path], Split]
    template: str = ""  # the context, from doc.fields: "Question: {question}\nAnswer:"
    question: str | None = None  # generation mode: the text above the options; None: template minus "\nAnswer:"
    description: str = ""  # before the few-shot examples; {subject} is the doc's subset with spaces
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    fixed_choices: bool = False  # the same answers for every doc (a classification): calibration applies
    shots_in_order: bool = False  # the first k pool examples instead of a random draw (MMLU)
    subsets_in_table: bool = False  # a table row per subset too (the benchmark's source datasets)
    group: str = ""  # for the task list: "language modelling", "multiple choice", "classification"
    about: str = ""

    def modes(self, mode: str) -> list[str]:
        """The scoring modes this task runs under the run's --mode."""
        return ["loglikelihood"]

    def score(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, mode: str, label: str,
              run: dict) -> Scored:
        """Score the docs (the few-shot examples by subset); note the prompts and details in `run`."""
        raise NotImplementedError

    def preamble(self, subset: str) -> str:
        return self.description.format(subject=subset.replace("_", " "))


def gold_index(doc: Doc) -> int:
    return int(round(doc.gold))


def pick_shots(pool: list[Doc], k: int, seed: int, key: str, balanced: bool = False,
               in_order: bool = False) -> list[Doc]:
    """k examples of the pool: the first k (in_order), a seeded random draw, or one balanced across gold labels
    (round-robin over the classes in a random order, then shuffled)."""
    if k == 0:
        return []
    if k > len(pool):
        raise LmlabError(f"{k} shots asked for {key}, but its few-shot pool has only {len(pool)} examples; use "
                         f"--shots {len(pool)} or fewer")
    if in_order:
        return pool[:k]
    rng = random.Random(f"{seed}/{key}/{k}")  # a string seed is hashed the same way in every process
    if not balanced:
        return rng.sample(pool, k)
    classes: dict[int, list[Doc]] = {}
    for d in pool:
        classes.setdefault(gold_index(d), []).append(d)
    queues = [rng.sample(members, len(members)) for _, members in sorted(classes.items())]
    rng.shuffle(queues)
    picked: list[Doc] = []
    while len(picked) < k:
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked
