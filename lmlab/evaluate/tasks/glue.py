"""Classification by verbalizers: GLUE (SST-2, RTE, MRPC, CoLA, QNLI, WNLI, STS-B), AG News and TREC; their files,
their prompts (lm-evaluation-harness's templates) and the task table's classification rows."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lmlab.evaluate.tasks.base import Doc, Split
from lmlab.evaluate.tasks.choice import Classification, Regression
from lmlab.evaluate.tasks.files import carve, need, read_csv, read_tsv, read_tsv_dicts


def _glue(task: str, folder: str, to_doc: Callable[[dict, str], Doc], has_train: bool = True,
          header: list[str] | None = None) -> Callable[[Path], Split]:
    def load(root: Path) -> Split:
        def read(name: str) -> list[Doc]:
            path = need(root, f"{folder}/{name}.tsv", task)
            rows = [dict(zip(header, r)) for r in read_tsv(path)] if header else read_tsv_dicts(path)
            return [to_doc(row, f"{name}-{i}") for i, row in enumerate(rows)]

        dev = read("dev")
        if has_train:
            return Split(dev, read("train"), f"{folder}/dev.tsv", f"{folder}/train.tsv")
        docs, pool, how = carve(dev, f"{folder}/dev.tsv")
        return Split(docs, pool, f"{folder}/dev.tsv", how)
    return load


def sst2_doc(row, i):
    # The sentence as it is: every GLUE dev sentence ends with a space, which the harness keeps (and so do we).
    return Doc(i, {"sentence": row["sentence"]}, ["negative", "positive"], int(row["label"]))


def _rte(row, i):
    return Doc(i, {"sentence1": row["sentence1"], "sentence2": row["sentence2"]}, ["True", "False"],
               0 if row["label"] == "entailment" else 1)


def _mrpc(row, i):
    return Doc(i, {"sentence1": row["#1 String"], "sentence2": row["#2 String"]}, ["no", "yes"],
               int(row["Quality"]))


def _cola(row, i):
    return Doc(i, {"sentence": row["sentence"]}, ["no", "yes"], int(row["label"]))


def _qnli(row, i):
    return Doc(i, {"question": row["question"], "sentence": row["sentence"]}, ["yes", "no"],
               0 if row["label"] == "entailment" else 1)


def _wnli(row, i):
    return Doc(i, {"sentence1": row["sentence1"], "sentence2": row["sentence2"]}, ["False", "True"],
               int(row["label"]))


def _stsb(row, i):
    return Doc(i, {"sentence1": row["sentence1"], "sentence2": row["sentence2"]}, [str(k) for k in range(6)],
               float(row["score"]))


def _load_ag_news(root: Path) -> Split:
    rows = read_csv(need(root, "ag_news/test.csv", "ag_news"))
    # The CSV escapes line breaks as a backslash; a space reads better in a prompt.
    docs = [Doc(f"test-{i}", {"title": title.replace("\\", " ").strip(),
                               "description": desc.replace("\\", " ").strip()},
                ["World", "Sports", "Business", "Technology"], int(label) - 1)
            for i, (label, title, desc) in enumerate(rows)]
    docs, pool, how = carve(docs, "ag_news/test.csv")
    return Split(docs, pool, "ag_news/test.csv", how)


_TREC = {"NUM": 0, "LOC": 1, "HUM": 2, "DESC": 3, "ENTY": 4, "ABBR": 5}


def _load_trec(root: Path) -> Split:
    def read(name):
        with open(need(root, f"trec/{name}", "trec"), encoding="latin-1") as f:
            lines = [line.strip() for line in f if line.strip()]
        docs = []
        for i, line in enumerate(lines):
            label, question = line.split(" ", 1)
            docs.append(Doc(f"{name}-{i}", {"question": question},
                            ["Number", "Location", "Person", "Description", "Entity", "Abbreviation"],
                            _TREC[label.split(":")[0]]))
        return docs
    return Split(read("TREC_10.label"), read("train_5500.label"), "trec/TREC_10.label", "trec/train_5500.label")


TASKS = [
    Classification("sst2", _glue("sst2", "sst2", sst2_doc), "{sentence}\nQuestion: Is this sentence positive or "
                   "negative?\nAnswer:"),
    Classification("rte", _glue("rte", "glue/RTE", _rte), "{sentence1}\nQuestion: {sentence2} True or False?\n"
                   "Answer:"),
    Classification("mrpc", _glue("mrpc", "glue/MRPC", _mrpc), "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                   "Question: Do both sentences mean the same thing?\nAnswer:", metrics=("acc", "f1")),
    Classification("cola", _glue("cola", "glue/CoLA", _cola, header=["source", "label", "mark", "sentence"]),
                   "{sentence}\nQuestion: Does this sentence make sense?\nAnswer:", metrics=("mcc", "acc")),
    Classification("qnli", _glue("qnli", "glue/QNLI", _qnli, has_train=False), "{question}\n{sentence}\n"
                   "Question: Does this response answer the question?\nAnswer:"),
    Classification("wnli", _glue("wnli", "glue/WNLI", _wnli), "{sentence1}\nQuestion: {sentence2} True or False?\n"
                   "Answer:"),
    Regression("stsb", _glue("stsb", "glue/STS-B", _stsb), "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
               "Question: How similar are the two sentences, on a scale from 0 to 5?\nAnswer:",
               metrics=("pearson", "spearman"), about="0-5 regression: expected value of the verbalized scores 0..5"),
    Classification("ag_news", _load_ag_news, "Title: {title}\nArticle: {description}\nAnswer:",
                   description="Classify the news articles into the categories of World, Sports, Business, and "
                               "Technology.\n\n"),
    Classification("trec", _load_trec, "Question: {question}\nAnswer Type:", question="Question: {question}\n"
                   "What type of answer does it ask for?",
                   description="Classify the questions based on whether their answer type is a Number, Location, "
                               "Person, Description, Entity, or Abbreviation.\n\n"),
]
