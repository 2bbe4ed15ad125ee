"""Evaluation tasks: where each one's data lives, how an example becomes a prompt, and what is measured.

Data comes from local files under a data folder (`data_dir`, else $LMLAB_DATA, else $LMLAB_HOME/data) laid out as
the course's shared/data folder is (each loader below names its files; GET says where to get them). When a file is
missing and the `datasets` package is installed, the task's Hugging Face copy is used instead (HUB below); if
that fails too, the error says where the file was looked for and how to get it.

Prompts follow EleutherAI's lm-evaluation-harness (its default task templates), so that numbers compare:
a context from the example, the answers scored as continuations after a target delimiter " ", few-shot
examples (context + " " + right answer) before it, each followed by the few-shot delimiter "\\n\\n".

Few-shot examples come from a training split, never from the evaluated examples. Where the data folder has no
training split, the first POOL_SIZE examples of the evaluated file are set aside as the few-shot pool and are not
evaluated, at any number of shots (so every row of a task has the same examples). The k examples are drawn once
per (task, subset, k, seed) and shared by all questions (as in Zhao et al. 2021, which contextual calibration
needs: one prompt, one calibration); MMLU takes the first k dev examples of each subject, as the original does.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from lmlab.errors import LmlabError

POOL_SIZE = 100  # few-shot pool carved from the front of an evaluated file that has no training split here
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTERS = "ABCDEFGHIJ"


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


class MissingData(LmlabError):
    pass


@dataclass
class Task:
    name: str
    kind: str  # "choice" | "regression" | "lambada" | "perplexity"
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

    # -- log-likelihood prompts -----------------------------------------------------------------------------------
    def context(self, doc: Doc) -> str:
        return self.template.format(**doc.fields)

    def requests(self, doc: Doc) -> list[tuple[str, str]]:
        """(context, continuation) per choice, without few-shot examples."""
        context = self.context(doc)
        return [(context, TARGET_DELIMITER + c) for c in doc.choices]

    def shot(self, doc: Doc) -> str:
        """A solved example, as it appears among the few-shot examples."""
        return self.context(doc) + TARGET_DELIMITER + doc.choices[_gold_index(doc)]

    def preamble(self, subset: str) -> str:
        return self.description.format(subject=subset.replace("_", " "))

    # -- generation prompts (the course's format) -----------------------------------------------------------------
    def gen_prompt(self, doc: Doc) -> str:
        """The question, one "{label}: {text}" line per option, "Answer:"."""
        if self.question is not None:
            question = self.question.format(**doc.fields)
        else:
            question = self.template.removesuffix("\nAnswer:").format(**doc.fields)
        lines = [f"{LETTERS[i]}: {text}" for i, text in enumerate(doc.options or doc.choices)]
        return "\n".join([question, *lines, "Answer:"])

    def gen_shot(self, doc: Doc) -> str:
        return self.gen_prompt(doc) + " " + LETTERS[_gold_index(doc)]


@dataclass
class PartialTask(Task):
    """Winogrande's partial scoring (lm-evaluation-harness): the blank is filled with each option, and the
    same rest of the sentence is scored after each filled-in beginning."""

    def requests(self, doc: Doc) -> list[tuple[str, str]]:
        sentence = doc.fields["sentence"]
        blank = sentence.index("_")
        rest = TARGET_DELIMITER + sentence[blank + 1:].strip()
        return [(sentence[:blank] + option, rest) for option in doc.choices]

    def context(self, doc: Doc) -> str:
        return self.requests(doc)[_gold_index(doc)][0]

    def shot(self, doc: Doc) -> str:
        context, rest = self.requests(doc)[_gold_index(doc)]
        return context + rest


def _gold_index(doc: Doc) -> int:
    return int(round(doc.gold))


# ----------------------------------------------------------------------------------------------------------------
# Reading files

def data_root(data_dir: str | Path | None = None) -> Path:
    """The data folder: the argument, else $LMLAB_DATA, else $LMLAB_HOME/data (~/.cache/lmlab/data)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("LMLAB_DATA"):
        return Path(os.environ["LMLAB_DATA"]).expanduser()
    from lmlab.util import lmlab_home

    return lmlab_home() / "data"


def _need(root: Path, rel: str, task: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise MissingData(f"task {task}: {rel} not found in {root} (looked for {path}); get it "
                          f"({GET.get(task, 'see the README')}) or copy the course's shared/data folder, and pass "
                          f"--data-dir or set $LMLAB_DATA to the folder that holds it")
    return path


def _tsv(path: Path) -> list[list[str]]:
    # GLUE files: tab-separated, no quoting (some fields hold unbalanced double quotes), maybe a BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [line.rstrip("\r\n").split("\t") for line in f if line.strip()]


def _tsv_dicts(path: Path) -> list[dict[str, str]]:
    rows = _tsv(path)
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _csv(path: Path, encoding: str = "utf-8") -> list[list[str]]:
    with open(path, encoding=encoding, newline="") as f:
        return list(csv.reader(f))


def _carve(docs: list[Doc], what: str) -> tuple[list[Doc], list[Doc], str]:
    """(evaluated, pool, pool description) for a set with no training split here."""
    return docs[POOL_SIZE:], docs[:POOL_SIZE], (f"the first {POOL_SIZE} examples of {what} (no training split "
                                                 "here); they are never evaluated")


# ----------------------------------------------------------------------------------------------------------------
# Loaders, one per local layout. Each returns a Split.

def _glue(task: str, folder: str, to_doc: Callable[[dict, str], Doc], has_train: bool = True,
          header: list[str] | None = None) -> Callable[[Path], Split]:
    def load(root: Path) -> Split:
        def read(name: str) -> list[Doc]:
            path = _need(root, f"{folder}/{name}.tsv", task)
            rows = [dict(zip(header, r)) for r in _tsv(path)] if header else _tsv_dicts(path)
            return [to_doc(row, f"{name}-{i}") for i, row in enumerate(rows)]

        dev = read("dev")
        if has_train:
            return Split(dev, read("train"), f"{folder}/dev.tsv", f"{folder}/train.tsv")
        docs, pool, how = _carve(dev, f"{folder}/dev.tsv")
        return Split(docs, pool, f"{folder}/dev.tsv", how)
    return load


def _sst2(row, i):
    return Doc(i, {"sentence": row["sentence"].strip()}, ["negative", "positive"], int(row["label"]))


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
    rows = _csv(_need(root, "ag_news/test.csv", "ag_news"))
    # The CSV escapes line breaks as a backslash; a space reads better in a prompt.
    docs = [Doc(f"test-{i}", {"title": title.replace("\\", " ").strip(),
                               "description": desc.replace("\\", " ").strip()},
                ["World", "Sports", "Business", "Technology"], int(label) - 1)
            for i, (label, title, desc) in enumerate(rows)]
    docs, pool, how = _carve(docs, "ag_news/test.csv")
    return Split(docs, pool, "ag_news/test.csv", how)


_TREC = {"NUM": 0, "LOC": 1, "HUM": 2, "DESC": 3, "ENTY": 4, "ABBR": 5}


def _load_trec(root: Path) -> Split:
    def read(name):
        with open(_need(root, f"trec/{name}", "trec"), encoding="latin-1") as f:
            lines = [line.strip() for line in f if line.strip()]
        docs = []
        for i, line in enumerate(lines):
            label, question = line.split(" ", 1)
            docs.append(Doc(f"{name}-{i}", {"question": question},
                            ["Number", "Location", "Person", "Description", "Entity", "Abbreviation"],
                            _TREC[label.split(":")[0]]))
        return docs
    return Split(read("TREC_10.label"), read("train_5500.label"), "trec/TREC_10.label", "trec/train_5500.label")


def _piqa_docs(root: Path, task: str = "piqa") -> list[Doc]:
    rows = _jsonl(_need(root, "piqa/valid.jsonl", task))
    labels = _need(root, "piqa/valid-labels.lst", task).read_text().split()
    return [Doc(r.get("id", f"valid-{i}"), {"goal": r["goal"]}, [r["sol1"], r["sol2"]], int(label))
            for i, (r, label) in enumerate(zip(rows, labels))]


def _load_piqa(root: Path) -> Split:
    docs, pool, how = _carve(_piqa_docs(root), "piqa/valid.jsonl")
    return Split(docs, pool, "piqa/valid.jsonl + valid-labels.lst", how)


# LLM-Adapters' instruction format (llm_adapters_commonsense/<set>/test.json): the question and numbered answers
# inside one instruction string; `answer` is "answer3", "true", "option2", ...
_ADAPTERS_MC = re.compile(r"Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\n"
                          r"Answer format: \S+", re.S)
_ADAPTERS_BOOLQ = re.compile(r"Please answer the following question with true or false, question: (.*)\n\n"
                             r"Answer format: true/false", re.S)
_ADAPTERS_WINO = re.compile(r"Please choose the correct answer to fill in the blank to complete the given "
                            r"sentence: (.*)\n\nOption1: (.*) Option2: (.*) Answer format: option1/option2", re.S)


def _adapters(root: Path, folder: str, task: str) -> list[dict]:
    with open(_need(root, f"llm_adapters_commonsense/{folder}/test.json", task), encoding="utf-8") as f:
        return json.load(f)


def _adapters_mc(root: Path, folder: str, task: str) -> list[tuple[str, list[str], int]]:
    """(question, answers, gold index) of an LLM-Adapters multiple-choice file."""
    out = []
    for row in _adapters(root, folder, task):
        m = _ADAPTERS_MC.fullmatch(row["instruction"])
        if m is None:
            raise LmlabError(f"task {task}: unexpected instruction format in {folder}/test.json: "
                             f"{row['instruction'][:80]!r}")
        parts = re.split(r" ?Answer\d: ", m.group(2))[1:]
        out.append((m.group(1), [p.strip() for p in parts], int(row["answer"].removeprefix("answer")) - 1))
    return out


def _adapters_task(folder: str, task: str, field_name: str) -> Callable[[Path], Split]:
    def load(root: Path) -> Split:
        docs = [Doc(f"test-{i}", {field_name: q}, answers, gold)
                for i, (q, answers, gold) in enumerate(_adapters_mc(root, folder, task))]
        docs, pool, how = _carve(docs, f"llm_adapters_commonsense/{folder}/test.json")
        return Split(docs, pool, f"llm_adapters_commonsense/{folder}/test.json", how)
    return load


def _load_boolq(root: Path) -> Split:
    docs = []
    for i, row in enumerate(_adapters(root, "boolq", "boolq")):
        m = _ADAPTERS_BOOLQ.fullmatch(row["instruction"])
        # LLM-Adapters appended a "?"; the template adds it back, as the harness does for the original questions.
        docs.append(Doc(f"test-{i}", {"question": m.group(1).strip().removesuffix("?")},
                        ["no", "yes"], int(row["answer"] == "true")))
    docs, pool, how = _carve(docs, "llm_adapters_commonsense/boolq/test.json")
    return Split(docs, pool, "llm_adapters_commonsense/boolq/test.json (questions only, no passages)", how)


def _winogrande_docs(root: Path) -> list[Doc]:
    docs = []
    for i, row in enumerate(_adapters(root, "winogrande", "winogrande")):
        sentence, option1, option2 = _ADAPTERS_WINO.fullmatch(row["instruction"]).groups()
        docs.append(Doc(f"dev-{i}", {"sentence": sentence}, [option1, option2],
                        int(row["answer"].removeprefix("option")) - 1))
    return docs


def _load_winogrande(root: Path) -> Split:
    docs, pool, how = _carve(_winogrande_docs(root), "llm_adapters_commonsense/winogrande/test.json")
    return Split(docs, pool, "llm_adapters_commonsense/winogrande/test.json (WinoGrande 1.1 dev)", how)


def _csqa_docs(root: Path) -> list[Doc]:
    rows = _jsonl(_need(root, "open_llm_benchmark/mcq/commonsenseqa_dev_rand_split.jsonl", "commonsense_qa"))
    return [Doc(r["id"], {"question": r["question"]}, list(r["choices"]["text"]),
                list(r["choices"]["label"]).index(r["answerKey"])) for r in rows]


def _load_csqa(root: Path) -> Split:
    docs, pool, how = _carve(_csqa_docs(root), "the CommonsenseQA dev set")
    return Split(docs, pool, "open_llm_benchmark/mcq/commonsenseqa_dev_rand_split.jsonl", how)


def _obqa_docs(root: Path, split: str) -> list[Doc]:
    docs = []
    for row in _tsv_dicts(_need(root, f"open_llm_benchmark/mcq/openbookqa_{split}.tsv", "openbookqa")):
        parts = re.split(r"\(([A-D])\) ", row["Choices"])[1:]  # "(A) text (B) text ..."
        labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        docs.append(Doc(row["ID"], {"question_stem": row["Question Stem"]}, texts, labels.index(row["Answer Key"])))
    return docs


def _load_obqa(root: Path) -> Split:
    return Split(_obqa_docs(root, "test"), _obqa_docs(root, "dev"), "open_llm_benchmark/mcq/openbookqa_test.tsv",
                 "open_llm_benchmark/mcq/openbookqa_dev.tsv")


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(row: dict, i: str) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Doc(str(row.get("ind", i)), {"query": _hellaswag_preprocess(row["activity_label"] + ": " + ctx)},
               [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _load_hellaswag(root: Path) -> Split:
    docs = [_hellaswag_doc(r, f"val-{i}") for i, r in enumerate(_jsonl(_need(root, "hellaswag/hellaswag_val.jsonl",
                                                                            "hellaswag")))]
    train = root / "hellaswag/hellaswag_train.jsonl"
    if train.is_file():
        return Split(docs, [_hellaswag_doc(r, f"train-{i}") for i, r in enumerate(_jsonl(train))],
                     "hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_train.jsonl")
    docs, pool, how = _carve(docs, "hellaswag/hellaswag_val.jsonl")
    return Split(docs, pool, "hellaswag/hellaswag_val.jsonl", how)


MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law "
    "jurisprudence logical_fallacies machine_learning management marketing medical_genetics miscellaneous "
    "moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions").split()


def _mmlu_rows(root: Path, subject: str, split: str, task: str) -> list[list[str]]:
    """question, A, B, C, D, answer letter"""
    return _csv(_need(root, f"open_llm_benchmark/mmlu/{split}/{subject}_{split}.csv", task))


def _mmlu_docs(root: Path, subject: str, split: str, task: str) -> list[Doc]:
    return [Doc(f"{subject}-{split}-{i}", {"question": q.strip(), "A": a, "B": b, "C": c, "D": d},
                ["A", "B", "C", "D"], "ABCD".index(answer.strip()), options=[a, b, c, d], subset=subject)
            for i, (q, a, b, c, d, answer) in enumerate(_mmlu_rows(root, subject, split, task))]


def _mmlu(subjects: list[str], task: str) -> Callable[[Path], Split]:
    def load(root: Path) -> Split:
        docs = [d for s in subjects for d in _mmlu_docs(root, s, "test", task)]
        pool = [d for s in subjects for d in _mmlu_docs(root, s, "dev", task)]
        return Split(docs, pool, "open_llm_benchmark/mmlu/test/<subject>_test.csv",
                     "open_llm_benchmark/mmlu/dev/<subject>_dev.csv (5 per subject, taken in order)")
    return load


def _load_lambada(root: Path) -> Split:
    rows = _jsonl(_need(root, "lambada/lambada_test.jsonl", "lambada"))
    docs, pool, how = _carve([Doc(f"test-{i}", {}, text=r["text"]) for i, r in enumerate(rows)],
                             "lambada/lambada_test.jsonl")
    return Split(docs, pool, "lambada/lambada_test.jsonl (OpenAI's detokenized LAMBADA test)", how)


def wikitext_pages(text: str) -> list[str]:
    """Split a WikiText file into articles at its top-level headings " = Title = ", as lm-evaluation-harness's
    wikitext_document_level dataset does."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def wikitext_detokenize(text: str) -> str:
    """lm-evaluation-harness's wikitext_detokenizer: undo WikiText's tokenization (" @-@ ", " , ", ...)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(a, b)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(a, b)
    return text


def _load_wikitext(root: Path) -> Split:
    # Universal newlines: the file has CRLF line ends, the Hugging Face copy LF.
    text = _need(root, "wikitext-2/wiki.test.raw", "wikitext").read_text(encoding="utf-8")
    docs = [Doc(f"article-{i}", {"page": page}, text=wikitext_detokenize(page))
            for i, page in enumerate(wikitext_pages(text))]
    return Split(docs, [], "wikitext-2/wiki.test.raw (wikitext-2-raw-v1 test, split into articles)", "none")


def prepared_val_text(source: str = "shakespeare", val_fraction: float = 0.1) -> str:
    """The validation text of `lmlab prepare SOURCE` (the characters after the line break at or after the
    (1 - val_fraction) mark of the joined documents), read through lmlab.data.corpus's own document stream."""
    from lmlab.data.corpus import _open_source, _stream, _StreamStats

    chunk = 1 << 20
    text = "".join(_stream(_open_source(source, "text", chunk), chunk, _StreamStats()))
    target = max(1, math.floor(len(text) * (1 - val_fraction)))
    cut = text.find("\n", target - 1)
    return "" if cut < 0 else text[cut + 1:]


def _load_shakespeare(root: Path) -> Split:
    return Split([Doc("val", {}, text=prepared_val_text("shakespeare"))], [],
                 "the validation split of `lmlab prepare shakespeare` (last 10% of the 42 works)", "none")


def _load_tinyshakespeare(root: Path) -> Split:
    text = _need(root, "tinyshakespeare/input.txt", "tinyshakespeare").read_text(encoding="utf-8")
    return Split([Doc("val", {}, text=text[int(len(text) * 0.9):])], [],
                 "tinyshakespeare/input.txt, last 10% of the characters (nanoGPT's split)", "none")


# ----------------------------------------------------------------------------------------------------------------
# The course's Open-LLM-Benchmark, rebuilt from the authors' question lists when the hub is out of reach

BENCHMARK_SOURCES = ("ARC", "CommonsenseQA", "Hellaswag", "MMLU", "MedMCQA", "OpenbookQA", "Winogrande", "piqa",
                     "race")


def _benchmark_labelled(root: Path, source: str) -> list[Doc]:
    """The labelled questions of one source set, as Docs with field "question"; [] where none are here."""
    def as_doc(i, question, answers, gold):
        return Doc(f"{source}-{i}", {"question": question}, list(answers), gold, subset=source)

    task = "open-llm-benchmark"
    if source == "ARC":
        items = [it for level in ("ARC-Easy", "ARC-Challenge") for it in _adapters_mc(root, level, task)]
        return [as_doc(i, *it) for i, it in enumerate(items)]
    if source == "CommonsenseQA":
        return [as_doc(i, d.fields["question"], d.choices, d.gold) for i, d in enumerate(_csqa_docs(root))]
    if source == "MMLU":  # the question as in the file (the mmlu task strips it, as the harness does)
        rows = [r for s in MMLU_SUBJECTS for r in _mmlu_rows(root, s, "test", task)]
        return [as_doc(i, q, [a, b, c, d], "ABCD".index(answer.strip())) for i, (q, a, b, c, d, answer) in
                enumerate(rows)]
    if source == "OpenbookQA":
        return [as_doc(i, d.fields["question_stem"], d.choices, d.gold)
                for i, d in enumerate(_obqa_docs(root, "test") + _obqa_docs(root, "dev"))]
    if source == "Winogrande":
        return [as_doc(i, d.fields["sentence"], d.choices, d.gold) for i, d in enumerate(_winogrande_docs(root))]
    if source == "piqa":
        return [as_doc(i, d.fields["goal"], d.choices, d.gold) for i, d in enumerate(_piqa_docs(root, task))]
    if source == "Hellaswag" and (root / "hellaswag/hellaswag_val.jsonl").is_file():
        return [as_doc(i, d.fields["query"], d.choices, d.gold) for i, d in enumerate(_load_hellaswag(root).docs)]
    return []


def _load_benchmark_local(root: Path) -> Split:
    docs, pool, matched = [], [], {}
    folder = "open_llm_benchmark/osq_questions"
    for source in BENCHMARK_SOURCES:
        questions_file = root / folder / f"{source}.csv"
        if not questions_file.is_file():
            matched[source] = {"questions": 0, "matched": 0, "note": f"{folder}/{source}.csv is not here"}
            continue
        questions = [row[0] for row in _csv(questions_file)[1:] if row]
        labelled = _benchmark_labelled(root, source)
        by_text: dict[str, list[Doc]] = {}
        for d in labelled:  # exact text, apart from whitespace at either end
            by_text.setdefault(d.fields["question"].strip(), []).append(d)
        used, found = set(), 0
        for q in questions:
            # Equal texts (a question listed twice, or asked twice in the set) take the labelled copies in order.
            candidates = by_text.get(q.strip(), [])
            found += bool(candidates)
            if candidates:
                d = candidates.pop(0) if len(candidates) > 1 else candidates[0]
                if d.id not in used:
                    used.add(d.id)
                    docs.append(d)
        # Labelled questions outside the benchmark are its few-shot pool.
        pool += [d for d in labelled if d.id not in used]
        # matched: questions given a labelled copy of their own; text_found: questions whose text is in the set.
        matched[source] = {"questions": len(questions), "matched": len(used), "text_found": found}
        if not labelled:
            matched[source]["note"] = "no labelled copy of this set in the data folder"
    if not docs:
        raise MissingData(f"task open-llm-benchmark: no question of {root / folder} matched a labelled question; "
                          f"get the folder (see {GET['open-llm-benchmark']}) or pip install datasets to load "
                          "Open-Style/Open-LLM-Benchmark from the Hugging Face hub")
    return Split(docs, pool, f"rebuilt from {folder}/*.csv by exact question text (ends stripped)",
                 "labelled questions of the same source set that are not in the benchmark (for sources without "
                 "any: all of those)", {"matched": matched})


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face copies: (dataset, config, evaluated split, few-shot split, row -> Doc). Used when the local file is
# missing and the `datasets` package is installed (not exercised offline: the hub is out of reach in our tests).

def _hub_mc(question_key: str, field_name: str):
    def to_doc(row, i):
        return Doc(str(row.get("id", i)), {field_name: row[question_key]}, list(row["choices"]["text"]),
                   list(row["choices"]["label"]).index(row["answerKey"]))
    return to_doc


HUB = {
    "sst2": ("nyu-mll/glue", "sst2", "validation", "train", _sst2),
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
    "commonsense_qa": ("tau/commonsense_qa", None, "validation", "train", _hub_mc("question", "question")),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "train",
                   lambda r, i: Doc(i, {"sentence": r["sentence"]}, [r["option1"], r["option2"]],
                                    int(r["answer"]) - 1)),
    # Closed book like the local copy (no passage), so that the number does not depend on where the data came from.
    "boolq": ("google/boolq", None, "validation", "train",
              lambda r, i: Doc(i, {"question": r["question"]}, ["no", "yes"], int(r["answer"]))),
    "social_iqa": ("allenai/social_i_qa", None, "validation", "train",
                   lambda r, i: Doc(i, {"question": r["context"] + " " + r["question"]},
                                    [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1)),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "train", _hellaswag_doc),
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


def _load_from_hub(name: str) -> Split:
    dataset, config, split, pool_split, to_doc = HUB[name]
    docs = [to_doc(r, f"{split}-{i}") for i, r in enumerate(_hub_rows(dataset, config, split))]
    pool = [to_doc(r, f"{pool_split}-{i}") for i, r in enumerate(_hub_rows(dataset, config, pool_split))] \
        if pool_split else []
    return Split(docs, pool, f"Hugging Face {dataset} ({config or 'default'}) {split}",
                 f"Hugging Face {dataset} {pool_split}" if pool_split else "none")


def _load_benchmark_hub() -> Split:
    rows = _hub_rows("Open-Style/Open-LLM-Benchmark", "questions", "train")
    docs = [Doc(f"{r['dataset']}-{i}", {"question": r["question"]}, [o["text"] for o in r["options"]],
                [o["label"] for o in r["options"]].index(r["answerKey"]), subset=r["dataset"])
            for i, r in enumerate(rows)]
    return Split(docs, [], "Hugging Face Open-Style/Open-LLM-Benchmark (questions)", "none (zero-shot only)")


def load_split(task: Task, root: Path) -> Split:
    """The task's data: local files first, else the Hugging Face copy (except the benchmark: hub first)."""
    if task.name == "open-llm-benchmark":
        try:
            return _load_benchmark_hub()
        except LmlabError as hub_error:
            split = _load_benchmark_local(root)
            split.notes["hub"] = f"not used: {hub_error}"
            return split
    hub_name = "mmlu" if task.name.startswith("mmlu") else task.name
    try:
        return task.load(root)
    except MissingData as missing:
        if hub_name not in HUB:
            raise
        try:
            return _load_from_hub(hub_name)
        except LmlabError as hub_error:
            raise LmlabError(f"{missing}; or pip install datasets for the Hugging Face copy ({hub_error})") from None


# ----------------------------------------------------------------------------------------------------------------
# The task table

GET = {
    "sst2": "GLUE SST-2 from https://gluebenchmark.com/tasks into sst2/{train,dev}.tsv",
    "glue": "GLUE from https://gluebenchmark.com/tasks into glue/<TASK>/{train,dev}.tsv",
    "piqa": "https://yonatanbisk.com/piqa/ valid.jsonl + valid-labels.lst into piqa/",
    "lambada": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl into lambada/",
    "wikitext": "wikitext-2-raw-v1 (Salesforce) wiki.test.raw into wikitext-2/",
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt "
                       "into tinyshakespeare/",
    "ag_news": "Zhang et al.'s ag_news_csv test.csv into ag_news/",
    "trec": "https://cogcomp.seas.upenn.edu/Data/QA/QC/ train_5500.label + TREC_10.label into trec/",
    "hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl into "
                 "hellaswag/",
    "adapters": "AGI-Edgerunners/LLM-Adapters dataset/<SET>/test.json into llm_adapters_commonsense/<SET>/",
    "open-llm-benchmark": "the course's shared/data/open_llm_benchmark folder (VILA-Lab/Open-LLM-Leaderboard "
                          "question lists, labelled sets, MMLU from hendrycks/test)",
}
for _name in ("rte", "mrpc", "cola", "qnli", "wnli", "stsb"):
    GET[_name] = GET["glue"]
for _name in ("arc_easy", "arc_challenge", "boolq", "social_iqa", "winogrande"):
    GET[_name] = GET["adapters"]
for _name in ["mmlu", "openbookqa", "commonsense_qa"] + [f"mmlu_{s}" for s in MMLU_SUBJECTS]:
    GET[_name] = GET["open-llm-benchmark"]

_MMLU = dict(kind="choice", template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
             question="{question}", metrics=("acc",), fixed_choices=True, shots_in_order=True,
             description="The following are multiple choice questions (with answers) about {subject}.\n\n",
             group="multiple choice")

_TASK_LIST = [
    # Language modelling
    Task("wikitext", "perplexity", _load_wikitext, metrics=("word_perplexity", "byte_perplexity", "bits_per_byte"),
         group="language modelling", about="WikiText-2 raw test, 62 articles, rolling windows"),
    Task("lambada", "lambada", _load_lambada, metrics=("acc", "perplexity"), group="language modelling",
         about="LAMBADA (OpenAI): the last word, greedy accuracy and per-word perplexity"),
    Task("shakespeare", "perplexity", _load_shakespeare, metrics=("nats_per_char", "bits_per_byte"),
         group="language modelling", about="the validation split of `lmlab prepare shakespeare`"),
    Task("tinyshakespeare", "perplexity", _load_tinyshakespeare, metrics=("nats_per_char", "bits_per_byte"),
         group="language modelling", about="tiny Shakespeare, last 10% (nanoGPT)"),
    # Multiple choice
    Task("piqa", "choice", _load_piqa, "Question: {goal}\nAnswer:", question="{goal}", group="multiple choice"),
    Task("arc_easy", "choice", _adapters_task("ARC-Easy", "arc_easy", "question"), "Question: {question}\nAnswer:",
         question="{question}", group="multiple choice"),
    Task("arc_challenge", "choice", _adapters_task("ARC-Challenge", "arc_challenge", "question"),
         "Question: {question}\nAnswer:", question="{question}", group="multiple choice"),
    Task("openbookqa", "choice", _load_obqa, "{question_stem}", question="{question_stem}", group="multiple choice"),
    PartialTask("winogrande", "choice", _load_winogrande, question="{sentence}", metrics=("acc",),
                group="multiple choice"),
    Task("boolq", "choice", _load_boolq, "Question: {question}?\nAnswer:", metrics=("acc",),
         fixed_choices=True, group="multiple choice", about="closed book here: the local copy has no passages"),
    Task("social_iqa", "choice", _adapters_task("social_i_qa", "social_iqa", "question"), "Q: {question}\nA:",
         question="{question}", group="multiple choice"),
    Task("commonsense_qa", "choice", _load_csqa, "Question: {question}\nAnswer:", question="{question}",
         group="multiple choice"),
    Task("hellaswag", "choice", _load_hellaswag, "{query}", question="{query}", group="multiple choice"),
    Task(name="mmlu", load=_mmlu(MMLU_SUBJECTS, "mmlu"), about="57 subjects, micro-averaged", **_MMLU),
    Task("open-llm-benchmark", "choice", lambda root: _load_benchmark_local(root), "Question: {question}\nAnswer:",
         question="{question}", subsets_in_table=True, group="multiple choice",
         about="the course's benchmark, per source dataset"),
    # Classification by verbalizers
    Task("sst2", "choice", _glue("sst2", "sst2", _sst2), "{sentence}\nQuestion: Is this sentence positive or "
         "negative?\nAnswer:", metrics=("acc",), fixed_choices=True, group="classification"),
    Task("rte", "choice", _glue("rte", "glue/RTE", _rte), "{sentence1}\nQuestion: {sentence2} True or False?\n"
         "Answer:", metrics=("acc",), fixed_choices=True, group="classification"),
    Task("mrpc", "choice", _glue("mrpc", "glue/MRPC", _mrpc), "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
         "Question: Do both sentences mean the same thing?\nAnswer:", metrics=("acc", "f1"), fixed_choices=True,
         group="classification"),
    Task("cola", "choice", _glue("cola", "glue/CoLA", _cola, header=["source", "label", "mark", "sentence"]),
         "{sentence}\nQuestion: Does this sentence make sense?\nAnswer:", metrics=("mcc", "acc"),
         fixed_choices=True, group="classification"),
    Task("qnli", "choice", _glue("qnli", "glue/QNLI", _qnli, has_train=False), "{question}\n{sentence}\nQuestion: "
         "Does this response answer the question?\nAnswer:", metrics=("acc",), fixed_choices=True,
         group="classification"),
    Task("wnli", "choice", _glue("wnli", "glue/WNLI", _wnli), "{sentence1}\nQuestion: {sentence2} True or False?\n"
         "Answer:", metrics=("acc",), fixed_choices=True, group="classification"),
    Task("stsb", "regression", _glue("stsb", "glue/STS-B", _stsb), "Sentence 1: {sentence1}\nSentence 2: "
         "{sentence2}\nQuestion: How similar are the two sentences, on a scale from 0 to 5?\nAnswer:",
         metrics=("pearson", "spearman"), fixed_choices=True, group="classification",
         about="0-5 regression: expected value of the verbalized scores 0..5"),
    Task("ag_news", "choice", _load_ag_news, "Title: {title}\nArticle: {description}\nAnswer:", metrics=("acc",),
         description="Classify the news articles into the categories of World, Sports, Business, and "
                     "Technology.\n\n", fixed_choices=True, group="classification"),
    Task("trec", "choice", _load_trec, "Question: {question}\nAnswer Type:", question="Question: {question}\n"
         "What type of answer does it ask for?", metrics=("acc",), fixed_choices=True,
         description="Classify the questions based on whether their answer type is a Number, Location, Person, "
                     "Description, Entity, or Abbreviation.\n\n", group="classification"),
]

from lmlab.evaluate.math import MATH_TASKS  # noqa: E402 - the math word problems build on the classes above
_TASK_LIST += MATH_TASKS
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
for _subject in MMLU_SUBJECTS:
    TASKS[f"mmlu_{_subject}"] = Task(name=f"mmlu_{_subject}", load=_mmlu([_subject], f"mmlu_{_subject}"), **_MMLU)


def known_tasks() -> str:
    return ", ".join(t.name for t in _TASK_LIST) + ", mmlu_<subject> (57 subjects)"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LmlabError(f"unknown task {name!r}; known tasks: {known_tasks()}")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------------------
# Few-shot examples

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
        classes.setdefault(_gold_index(d), []).append(d)
    queues = [rng.sample(members, len(members)) for _, members in sorted(classes.items())]
    rng.shuffle(queues)
    picked: list[Doc] = []
    while len(picked) < k:
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked


def content_free(doc: Doc, text: str) -> Doc:
    """The doc with every input field replaced by a content-free text (contextual calibration)."""
    return replace(doc, fields={k: text for k in doc.fields})
