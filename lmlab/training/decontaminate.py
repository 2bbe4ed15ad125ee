"""Decontamination: training examples whose question is an evaluation question are left out (lmlab sft and dpo
--decontaminate TASKS)."""

from __future__ import annotations

import re

from lmlab.evaluate.tasks import data_root, get_task, load_split
from lmlab.training.examples import Example


def normalize_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def decontaminate(examples: list[Example], tasks: list[str], data_dir=None) -> tuple[list[Example], dict[str, int]]:
    """Drop the training examples whose question is a question of an evaluation task (same text up to case and
    whitespace); return the kept examples and how many each task removed."""
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
