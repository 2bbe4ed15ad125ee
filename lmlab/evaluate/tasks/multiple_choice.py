"""Multiple-choice question sets: PIQA, ARC, OpenBookQA, Winogrande, BoolQ, Social IQa, CommonsenseQA, HellaSwag,
MMLU and the course's Open-LLM-Benchmark; their files, their prompts (lm-evaluation-harness's templates) and the
task table's multiple-choice rows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from lmlab.errors import LmlabError
from lmlab.evaluate.tasks.base import Doc, Split
from lmlab.evaluate.tasks.choice import Choice, PartialChoice
from lmlab.evaluate.tasks.files import GET, MissingData, carve, need, read_csv, read_json, read_jsonl, read_tsv_dicts


def _piqa_docs(root: Path, task: str = "piqa") -> list[Doc]:
    rows = read_jsonl(need(root, "piqa/valid.jsonl", task))
    labels = need(root, "piqa/valid-labels.lst", task).read_text().split()
    return [Doc(r.get("id", f"valid-{i}"), {"goal": r["goal"]}, [r["sol1"], r["sol2"]], int(label))
            for i, (r, label) in enumerate(zip(rows, labels))]


def _load_piqa(root: Path) -> Split:
    docs, pool, how = carve(_piqa_docs(root), "piqa/valid.jsonl")
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
    return read_json(need(root, f"llm_adapters_commonsense/{folder}/test.json", task))


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
        docs, pool, how = carve(docs, f"llm_adapters_commonsense/{folder}/test.json")
        return Split(docs, pool, f"llm_adapters_commonsense/{folder}/test.json", how)
    return load


def _load_boolq(root: Path) -> Split:
    docs = []
    for i, row in enumerate(_adapters(root, "boolq", "boolq")):
        m = _ADAPTERS_BOOLQ.fullmatch(row["instruction"])
        # LLM-Adapters appended a "?"; the template adds it back, as the harness does for the original questions.
        docs.append(Doc(f"test-{i}", {"question": m.group(1).strip().removesuffix("?")},
                        ["no", "yes"], int(row["answer"] == "true")))
    docs, pool, how = carve(docs, "llm_adapters_commonsense/boolq/test.json")
    return Split(docs, pool, "llm_adapters_commonsense/boolq/test.json (questions only, no passages)", how)


def _winogrande_docs(root: Path) -> list[Doc]:
    docs = []
    for i, row in enumerate(_adapters(root, "winogrande", "winogrande")):
        sentence, option1, option2 = _ADAPTERS_WINO.fullmatch(row["instruction"]).groups()
        docs.append(Doc(f"dev-{i}", {"sentence": sentence}, [option1, option2],
                        int(row["answer"].removeprefix("option")) - 1))
    return docs


def _load_winogrande(root: Path) -> Split:
    docs, pool, how = carve(_winogrande_docs(root), "llm_adapters_commonsense/winogrande/test.json")
    return Split(docs, pool, "llm_adapters_commonsense/winogrande/test.json (WinoGrande 1.1 dev)", how)


def _csqa_docs(root: Path) -> list[Doc]:
    rows = read_jsonl(need(root, "open_llm_benchmark/mcq/commonsenseqa_dev_rand_split.jsonl", "commonsense_qa"))
    return [Doc(r["id"], {"question": r["question"]}, list(r["choices"]["text"]),
                list(r["choices"]["label"]).index(r["answerKey"])) for r in rows]


def csqa_doc(question: str, answers: list[str], gold: int, i: str) -> Doc:
    """The harness's commonsense_qa: the five answers listed under the question, scored as their letters."""
    return Doc(i, {"question": question.strip(), **dict(zip("ABCDE", answers))}, list("ABCDE"), gold,
               options=list(answers))


def _load_csqa(root: Path) -> Split:
    docs = [csqa_doc(d.fields["question"], d.choices, d.gold, d.id) for d in _csqa_docs(root)]
    docs, pool, how = carve(docs, "the CommonsenseQA dev set")
    return Split(docs, pool, "open_llm_benchmark/mcq/commonsenseqa_dev_rand_split.jsonl", how)


def _obqa_docs(root: Path, split: str) -> list[Doc]:
    docs = []
    for row in read_tsv_dicts(need(root, f"open_llm_benchmark/mcq/openbookqa_{split}.tsv", "openbookqa")):
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


def hellaswag_doc(row: dict, i: str) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Doc(str(row.get("ind", i)), {"query": _hellaswag_preprocess(row["activity_label"] + ": " + ctx)},
               [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _load_hellaswag(root: Path) -> Split:
    docs = [hellaswag_doc(r, f"val-{i}") for i, r in enumerate(read_jsonl(need(root, "hellaswag/hellaswag_val.jsonl",
                                                                            "hellaswag")))]
    train = root / "hellaswag/hellaswag_train.jsonl"
    if train.is_file():
        return Split(docs, [hellaswag_doc(r, f"train-{i}") for i, r in enumerate(read_jsonl(train))],
                     "hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_train.jsonl")
    docs, pool, how = carve(docs, "hellaswag/hellaswag_val.jsonl")
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
    return read_csv(need(root, f"open_llm_benchmark/mmlu/{split}/{subject}_{split}.csv", task))


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


def load_benchmark_local(root: Path) -> Split:
    docs, pool, matched = [], [], {}
    folder = "open_llm_benchmark/osq_questions"
    for source in BENCHMARK_SOURCES:
        questions_file = root / folder / f"{source}.csv"
        if not questions_file.is_file():
            matched[source] = {"questions": 0, "matched": 0, "note": f"{folder}/{source}.csv is not here"}
            continue
        questions = [row[0] for row in read_csv(questions_file)[1:] if row]
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



_MMLU = dict(template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:", question="{question}", metrics=("acc",),
             fixed_choices=True, shots_in_order=True, group="multiple choice",
             description="The following are multiple choice questions (with answers) about {subject}.\n\n")


def mmlu_subject(subject: str) -> Choice:
    """One MMLU subject as a task of its own: mmlu_<subject>."""
    return Choice(name=f"mmlu_{subject}", load=_mmlu([subject], f"mmlu_{subject}"), **_MMLU)


TASKS = [
    Choice("piqa", _load_piqa, "Question: {goal}\nAnswer:", question="{goal}", group="multiple choice"),
    Choice("arc_easy", _adapters_task("ARC-Easy", "arc_easy", "question"), "Question: {question}\nAnswer:",
           question="{question}", group="multiple choice"),
    Choice("arc_challenge", _adapters_task("ARC-Challenge", "arc_challenge", "question"),
           "Question: {question}\nAnswer:", question="{question}", group="multiple choice"),
    Choice("openbookqa", _load_obqa, "{question_stem}", question="{question_stem}", group="multiple choice"),
    PartialChoice("winogrande", _load_winogrande, question="{sentence}", metrics=("acc",), group="multiple choice"),
    Choice("boolq", _load_boolq, "Question: {question}?\nAnswer:", metrics=("acc",), fixed_choices=True,
           group="multiple choice", about="closed book here: the local copy has no passages"),
    Choice("social_iqa", _adapters_task("social_i_qa", "social_iqa", "question"), "Q: {question}\nA:",
           question="{question}", group="multiple choice"),
    Choice("commonsense_qa", _load_csqa, "Question: {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nE. {E}\nAnswer:",
           question="Question: {question}", metrics=("acc",), fixed_choices=True, group="multiple choice"),
    Choice("hellaswag", _load_hellaswag, "{query}", question="{query}", group="multiple choice"),
    Choice(name="mmlu", load=_mmlu(MMLU_SUBJECTS, "mmlu"), about="57 subjects, micro-averaged", **_MMLU),
    Choice("open-llm-benchmark", load_benchmark_local, "Question: {question}\nAnswer:", question="{question}",
           subsets_in_table=True, group="multiple choice", about="the course's benchmark, per source dataset"),
]
