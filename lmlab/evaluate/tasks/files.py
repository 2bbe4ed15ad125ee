"""The data folder and its files: where it is, how its formats are read, and where to get what is missing.

Data comes from local files under a data folder (`data_dir`, else $LMLAB_DATA, else $LMLAB_HOME/data) laid out as
the course's shared/data folder is (each loader names its files; GET says where to get them). A missing file
raises MissingData, which the registry answers with the task's Hugging Face copy when it has one.

Few-shot examples come from a training split, never from the evaluated examples. Where the data folder has no
training split, the first POOL_SIZE examples of the evaluated file are set aside as the few-shot pool and are not
evaluated, at any number of shots (so every row of a task has the same examples): carve.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.evaluate.tasks.base import Doc
from lmlab.util import lmlab_home

POOL_SIZE = 100  # few-shot pool carved from the front of an evaluated file that has no training split here

_GLUE = "GLUE from https://gluebenchmark.com/tasks into glue/<TASK>/{train,dev}.tsv"
_ADAPTERS = "AGI-Edgerunners/LLM-Adapters dataset/<SET>/test.json into llm_adapters_commonsense/<SET>/"
_BENCHMARK = ("the course's shared/data/open_llm_benchmark folder (VILA-Lab/Open-LLM-Leaderboard question lists, "
              "labelled sets, MMLU from hendrycks/test)")
_MATH = ("AGI-Edgerunners/LLM-Adapters dataset/<SET>/test.json into llm_adapters_math/<SET>/ (the course's "
         "shared/data/llm_adapters_math)")
GET = {  # task -> where to get its files (mmlu_<subject> as mmlu)
    "sst2": "GLUE SST-2 from https://gluebenchmark.com/tasks into sst2/{train,dev}.tsv",
    "glue": _GLUE,
    "piqa": "https://yonatanbisk.com/piqa/ valid.jsonl + valid-labels.lst into piqa/",
    "lambada": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl into lambada/",
    "wikitext": "wikitext-2-raw-v1 (Salesforce) wiki.test.raw into wikitext-2/",
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt "
                       "into tinyshakespeare/",
    "ag_news": "Zhang et al.'s ag_news_csv test.csv into ag_news/",
    "trec": "https://cogcomp.seas.upenn.edu/Data/QA/QC/ train_5500.label + TREC_10.label into trec/",
    "hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl into "
                 "hellaswag/",
    "adapters": _ADAPTERS,
    "open-llm-benchmark": _BENCHMARK,
    **dict.fromkeys(("rte", "mrpc", "cola", "qnli", "wnli", "stsb"), _GLUE),
    **dict.fromkeys(("arc_easy", "arc_challenge", "boolq", "social_iqa", "winogrande"), _ADAPTERS),
    **dict.fromkeys(("mmlu", "openbookqa", "commonsense_qa"), _BENCHMARK),
    **dict.fromkeys(("addsub", "singleeq", "aqua", "svamp", "multiarith", "mawps"), _MATH),
    "gsm8k": "openai/grade-school-math grade_school_math/data/test.jsonl (and train.jsonl) into gsm8k/",
}


class MissingData(LmlabError):
    pass


def data_root(data_dir: str | Path | None = None) -> Path:
    """The data folder: the argument, else $LMLAB_DATA, else $LMLAB_HOME/data (~/.cache/lmlab/data)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("LMLAB_DATA"):
        return Path(os.environ["LMLAB_DATA"]).expanduser()
    return lmlab_home() / "data"


def need(root: Path, rel: str, task: str) -> Path:
    """root/rel, which task needs: MissingData (saying where to get it) when it is not there."""
    path = root / rel
    if not path.is_file():
        where = GET.get("mmlu" if task.startswith("mmlu_") else task, "see the README")
        raise MissingData(f"task {task}: {rel} not found in {root} (looked for {path}); get it ({where}) or copy "
                          f"the course's shared/data folder, and pass --data-dir or set $LMLAB_DATA to the folder "
                          f"that holds it")
    return path


def read_tsv(path: Path) -> list[list[str]]:
    # GLUE files: tab-separated, no quoting (some fields hold unbalanced double quotes), maybe a BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [line.rstrip("\r\n").split("\t") for line in f if line.strip()]


def read_tsv_dicts(path: Path) -> list[dict[str, str]]:
    rows = read_tsv(path)
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_csv(path: Path, encoding: str = "utf-8") -> list[list[str]]:
    with open(path, encoding=encoding, newline="") as f:
        return list(csv.reader(f))


def carve(docs: list[Doc], what: str) -> tuple[list[Doc], list[Doc], str]:
    """(evaluated, pool, pool description) for a set with no training split here."""
    return docs[POOL_SIZE:], docs[:POOL_SIZE], (f"the first {POOL_SIZE} examples of {what} (no training split "
                                                 "here); they are never evaluated")
