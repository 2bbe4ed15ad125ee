"""The evaluation tasks: the task table, assembled from each family's rows, and how a task's data is loaded.

    task = get_task("piqa"); split = load_split(task, data_root())   # split.docs evaluated, split.pool few-shot

Families (each module holds its data loaders, prompts and table rows): language_modeling.py (WikiText, LAMBADA,
Shakespeare), multiple_choice.py (PIQA, ARC, ..., MMLU, the course's benchmark), glue.py (classification by
verbalizers), math.py (word problems, scored by generation), text_to_text.py (GLUE
with T5's prefixes, scored by generation). Kinds of task and their scoring: choice.py
(multiple choice, classification, regression), language_modeling.py (perplexity, LAMBADA), math.py. The
vocabulary they share (Doc, Split, Task, the few-shot draw) is base.py; the data folder and its readers files.py;
the Hugging Face copies hub.py.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.evaluate.tasks import glue, language_modeling, math, multiple_choice, text_to_text
from lmlab.evaluate.tasks.base import FEWSHOT_DELIMITER, TARGET_DELIMITER, Doc, Settings, Split, Task, pick_shots
from lmlab.evaluate.tasks.choice import content_free
from lmlab.evaluate.tasks.files import MissingData, data_root
from lmlab.evaluate.tasks.hub import HUB, load_benchmark_hub, load_from_hub

__all__ = ["TASKS", "get_task", "known_tasks", "load_split", "data_root", "Doc", "Split", "Task", "Settings",
           "MissingData", "pick_shots", "content_free", "TARGET_DELIMITER", "FEWSHOT_DELIMITER"]

_TASK_LIST: list[Task] = [*language_modeling.TASKS, *multiple_choice.TASKS, *glue.TASKS, *math.TASKS,
                          *text_to_text.TASKS]
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
TASKS.update({t.name: t for t in map(multiple_choice.mmlu_subject, multiple_choice.MMLU_SUBJECTS)})


def known_tasks() -> str:
    return ", ".join(t.name for t in _TASK_LIST) + ", mmlu_<subject> (57 subjects)"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LmlabError(f"unknown task {name!r}; known tasks: {known_tasks()}")
    return TASKS[name]


def load_split(task: Task, root: Path) -> Split:
    """The task's data: local files first, else the Hugging Face copy (except the benchmark: hub first)."""
    if task.name == "open-llm-benchmark":
        try:
            return load_benchmark_hub()
        except LmlabError as hub_error:
            split = multiple_choice.load_benchmark_local(root)
            split.notes["hub"] = f"not used: {hub_error}"
            return split
    hub_name = "mmlu" if task.name.startswith("mmlu") else task.name
    try:
        return task.load(root)
    except MissingData as missing:
        if hub_name not in HUB:
            raise
        try:
            return load_from_hub(hub_name)
        except LmlabError as hub_error:
            raise LmlabError(f"{missing}; or pip install datasets for the Hugging Face copy ({hub_error})") from None
