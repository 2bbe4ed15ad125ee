"""Hugging Face copies of the tasks' data: (dataset, config, evaluated split, few-shot split, row -> Doc). Used when
the local file is missing and the `datasets` package is installed (not exercised offline: the hub is out of reach
in our tests); the course's benchmark is read from the hub first."""

from __future__ import annotations

from lmlab.errors import LmlabError
from lmlab.evaluate.tasks.base import Doc, Split
from lmlab.evaluate.tasks.glue import sst2_doc
from lmlab.evaluate.tasks.language_modeling import wikitext_detokenize
from lmlab.evaluate.tasks.multiple_choice import csqa_doc, hellaswag_doc


def _hub_mc(question_key: str, field_name: str):
    def to_doc(row, i):
        return Doc(str(row.get("id", i)), {field_name: row[question_key]}, list(row["choices"]["text"]),
                   list(row["choices"]["label"]).index(row["answerKey"]))
    return to_doc


HUB = {
    "sst2": ("nyu-mll/glue", "sst2", "validation", "train", sst2_doc),
    "rte": ("nyu-mll/glue", "rte", "validation", "train",
            lambda r, i: Doc(i, {"sentence1": r["sentence1"], "sentence2": r["sentence2"]}, ["True", "False"],
                             r["label"])),
    "mrpc": ("nyu-mll/glue", "mrpc", "validation", "train",
             lambda r, i: Doc(i, {"sentence1": r["sentence1"], "sentence2": r["sentence2"]}, ["no", "yes"],
                              r["label"])),
    "cola": ("nyu-mll/glue", "cola", "validation", "train",
             lambda r, i: Doc(i, {"sentence": r["sentence"]}, ["no", "yes"], r["label"])),
    "qnli": ("nyu-mll/glue", "qnli", "validation", "train",
             lambda r, i: Doc(i, {"question": r["question"], "sentence": r["sentence"]}, ["yes", "no"], r["label"])),
    "wnli": ("nyu-mll/glue", "wnli", "validation", "train",
             lambda r, i: Doc(i, {"sentence1": r["sentence1"], "sentence2": r["sentence2"]}, ["False", "True"],
                              r["label"])),
    "stsb": ("nyu-mll/glue", "stsb", "validation", "train",
             lambda r, i: Doc(i, {"sentence1": r["sentence1"], "sentence2": r["sentence2"]},
                              [str(k) for k in range(6)], float(r["label"]))),
    "ag_news": ("fancyzhx/ag_news", None, "test", "train",
                lambda r, i: Doc(i, {"title": "", "description": r["text"]},
                                 ["World", "Sports", "Business", "Technology"], r["label"])),
    "piqa": ("ybisk/piqa", None, "validation", "train",
             lambda r, i: Doc(i, {"goal": r["goal"]}, [r["sol1"], r["sol2"]], r["label"])),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "train", _hub_mc("question", "question")),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "train", _hub_mc("question", "question")),
    "openbookqa": ("allenai/openbookqa", "main", "test", "train", _hub_mc("question_stem", "question_stem")),
    "commonsense_qa": ("tau/commonsense_qa", None, "validation", "train",
                       lambda r, i: csqa_doc(r["question"], list(r["choices"]["text"]),
                                             list(r["choices"]["label"]).index(r["answerKey"]), str(r.get("id", i)))),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "train",
                   lambda r, i: Doc(i, {"sentence": r["sentence"]}, [r["option1"], r["option2"]],
                                    int(r["answer"]) - 1)),
    # Closed book like the local copy (no passage), so that the number does not depend on where the data came from.
    "boolq": ("google/boolq", None, "validation", "train",
              lambda r, i: Doc(i, {"question": r["question"]}, ["no", "yes"], int(r["answer"]))),
    "social_iqa": ("allenai/social_i_qa", None, "validation", "train",
                   lambda r, i: Doc(i, {"question": r["context"] + " " + r["question"]},
                                    [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1)),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "train", hellaswag_doc),
    "lambada": ("EleutherAI/lambada_openai", "default", "test", None, lambda r, i: Doc(i, {}, text=r["text"])),
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", None,
                 lambda r, i: Doc(i, {"page": r["page"]}, text=wikitext_detokenize(r["page"]))),
}


def _hub_rows(dataset: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise LmlabError("the datasets package is not installed") from None
    try:
        return list(datasets.load_dataset(dataset, config, split=split))
    except Exception as e:  # noqa: BLE001 - offline, renamed, gated...: one line for all of them
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LmlabError(f"cannot load {dataset} ({config or 'default'}, {split}) from the Hugging Face hub: "
                         f"{first}") from None


def load_from_hub(name: str) -> Split:
    dataset, config, split, pool_split, to_doc = HUB[name]
    docs = [to_doc(r, f"{split}-{i}") for i, r in enumerate(_hub_rows(dataset, config, split))]
    pool = [to_doc(r, f"{pool_split}-{i}") for i, r in enumerate(_hub_rows(dataset, config, pool_split))] \
        if pool_split else []
    return Split(docs, pool, f"Hugging Face {dataset} ({config or 'default'}) {split}",
                 f"Hugging Face {dataset} {pool_split}" if pool_split else "none")


def load_benchmark_hub() -> Split:
    rows = _hub_rows("Open-Style/Open-LLM-Benchmark", "questions", "train")
    docs = [Doc(f"{r['dataset']}-{i}", {"question": r["question"]}, [o["text"] for o in r["options"]],
                [o["label"] for o in r["options"]].index(r["answerKey"]), subset=r["dataset"])
            for i, r in enumerate(rows)]
    return Split(docs, [], "Hugging Face Open-Style/Open-LLM-Benchmark (questions)", "none (zero-shot only)")
