"""Every task's requests as lm-evaluation-harness 0.4.13 renders them (issue 13, item 7).

The reference is the harness's own task definitions: the YAML files (and their `!function` helpers) of the
installed lm_eval package, rendered here with the harness's rules (a doc_to_* that names a field is that field,
else a Jinja template; a choice list from a template is a Python literal; description + doc_to_text, then the
target delimiter " " before each answer; few-shot examples joined by "\\n\\n"). The same example, in the
Hugging Face schema the harness reads, goes through lmlab's own converter, and the (context, continuation)
requests must be equal, character for character. Only lm_eval's task files are needed (pip install --no-deps
lm-eval==0.4.13; `make test` does).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

import jinja2
import pytest
import yaml

from lmlab.evaluate import tasks as T
from lmlab.evaluate.tasks.base import FEWSHOT_DELIMITER
from lmlab.evaluate.tasks.hub import HUB
from tests.conftest import SHARED_DATA

_SPEC = importlib.util.find_spec("lm_eval")
if _SPEC is None:
    pytest.skip("lm-evaluation-harness's task files are the reference: pip install --no-deps lm-eval==0.4.13",
                allow_module_level=True)
HARNESS_TASKS = Path(_SPEC.submodule_search_locations[0]) / "tasks"
JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def harness_config(rel: str) -> dict:
    """A task YAML with its `include`s merged (the including file wins), as the harness loads it."""
    path = HARNESS_TASKS / rel
    config = yaml.load(path.read_text(), Loader=_Loader)
    if "include" in config:
        config = {**harness_config(str((path.parent / config.pop("include")).relative_to(HARNESS_TASKS))), **config}
    config["_folder"] = path.parent
    return config


def _function(config: dict, name: str):
    module_name, _, attr = name.rpartition(".")
    spec = importlib.util.spec_from_file_location(module_name, config["_folder"] / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    # Some helpers import `datasets` for a type hint only; a stand-in does when it is not installed.
    stand_in = importlib.util.find_spec("datasets") is None and "datasets" not in sys.modules
    if stand_in:
        sys.modules["datasets"] = types.SimpleNamespace(Dataset=list)
    try:
        spec.loader.exec_module(module)
    finally:
        if stand_in:
            del sys.modules["datasets"]
    return getattr(module, attr)


def _apply(config: dict, key: str, doc: dict):
    value = config.get(key)
    if isinstance(value, tuple):
        return _function(config, value[1])(doc)
    if isinstance(value, list):
        return value
    if value in doc:
        return doc[value]
    rendered = JINJA.from_string(value).render(**doc)
    if key == "doc_to_choice":
        return ast.literal_eval(rendered)
    return int(rendered) if key == "doc_to_target" and rendered.strip().isdigit() else rendered


class _Rows(list):
    def map(self, fn):  # what process_docs needs of a datasets.Dataset: new columns join the old ones
        return _Rows({**row, **fn(row)} for row in self)


def harness_doc(config: dict, row: dict) -> dict:
    if isinstance(config.get("process_docs"), tuple):
        return _function(config, config["process_docs"][1])(_Rows([row]))[0]
    return row


def harness_requests(config: dict, doc: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of a multiple-choice doc, zero-shot."""
    delimiter = config.get("target_delimiter", " ")
    text, choices = _apply(config, "doc_to_text", doc), _apply(config, "doc_to_choice", doc)
    if isinstance(text, int):  # Winogrande: the text picks a choice; the choices are the contexts
        target = _apply(config, "doc_to_target", doc)
        return [(config.get("description", "") + c, delimiter + target) for c in choices]
    return [(config.get("description", "") + text, delimiter + c) for c in choices]


def harness_gold(config: dict, doc: dict) -> int:
    text, target = _apply(config, "doc_to_text", doc), _apply(config, "doc_to_target", doc)
    if isinstance(text, int):  # Winogrande: the right context
        return text
    return target if isinstance(target, int) else _apply(config, "doc_to_choice", doc).index(target)


def harness_shot(config: dict, doc: dict) -> str:
    """A solved example: the context and the right answer (Winogrande: the right context and the rest)."""
    context, continuation = harness_requests(config, doc)[harness_gold(config, doc)]
    return context.removeprefix(config.get("description", "")) + continuation


# ----------------------------------------------------------------------------------------------------------------
# One example per task in the harness's (Hugging Face) schema, with the details that once went wrong

def _mc(question: str, texts: list[str], key: str, **more) -> dict:
    labels = list("ABCDE"[:len(texts)])
    return {"question": question, "choices": {"text": texts, "label": labels}, "answerKey": key, **more}


ROWS = {
    "sst2": ("glue/sst2/default.yaml", [{"sentence": "it 's a charming and often affecting journey . ", "label": 1},
                                        {"sentence": "unflinchingly bleak and desperate ", "label": 0}]),
    "rte": ("glue/rte/default.yaml", [{"sentence1": "Dana Reeve died.", "sentence2": "Dana Reeve is dead.",
                                       "label": 0},
                                      {"sentence1": "Yet, the fire came.", "sentence2": "No fire.", "label": 1}]),
    "mrpc": ("glue/mrpc/default.yaml", [{"sentence1": "He said so .", "sentence2": "So he said .", "label": 1},
                                        {"sentence1": "A cat .", "sentence2": "A dog .", "label": 0}]),
    "cola": ("glue/cola/default.yaml", [{"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1},
                                        {"sentence": "The more we study verbs.", "label": 0}]),
    "qnli": ("glue/qnli/default.yaml", [{"question": "When did it open?", "sentence": "It opened in 1901.",
                                         "label": 0},
                                        {"question": "Who?", "sentence": "Nobody knows why.", "label": 1}]),
    "wnli": ("glue/wnli/default.yaml", [{"sentence1": "I stuck a pin through a carrot.",
                                         "sentence2": "The carrot had a hole.", "label": 1},
                                        {"sentence1": "John saw Bill.", "sentence2": "Bill saw John.", "label": 0}]),
    "piqa": ("piqa/piqa.yaml", [{"goal": "How do I ready a guinea pig cage?", "sol1": "Use paper.",
                                 "sol2": "Use  sand .", "label": 0},
                                {"goal": "dry a phone", "sol1": "rice", "sol2": "oven", "label": 0}]),
    "arc_easy": ("arc/arc_easy.yaml", [_mc("Which is a gas?", ["ice", "steam", "wood", "rock"], "B"),
                                       _mc("What is 1+1?", ["1", "2", "3"], "B")]),
    "arc_challenge": ("arc/arc_challenge.yaml", [_mc("Which lasts?", ["a", "b", "c", "d"], "D"),
                                                 _mc("Why?", ["x", "y", "z", "w"], "A")]),
    "openbookqa": ("openbookqa/openbookqa.yaml", [
        {"question_stem": "The sun is responsible for", "choices": {"text": ["puppies", "plants growing", "a", "b"],
                                                                    "label": list("ABCD")}, "answerKey": "B"},
        {"question_stem": "Ice is", "choices": {"text": ["cold", "hot", "red", "loud"], "label": list("ABCD")},
         "answerKey": "A"}]),
    "commonsense_qa": ("commonsense_qa/default.yaml", [
        _mc("  The sanctions against the school were a punishing blow. ", ["ignore", "enforce", "authoritarian",
                                                                           "yell at", "avoid"], "A"),
        _mc("Where is a cow?", ["farm", "sea", "moon", "car", "shop"], "A")]),
    "winogrande": ("winogrande/default.yaml", [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "The trophy did not fit the suitcase because _ was too big.", "option1": "trophy",
         "option2": "suitcase", "answer": "1"}]),
    "social_iqa": ("siqa/siqa.yaml", [
        {"context": "Tracy didn't go home that evening.", "question": "What does Tracy need to do before this?",
         "answerA": "make a new plan", "answerB": "Go home", "answerC": "Find somewhere to go", "label": "3"},
        {"context": "Sydney walked past.", "question": "How would you describe Sydney?", "answerA": "sympathetic",
         "answerB": "like", "answerC": "guilty", "label": "1"}]),
    "hellaswag": ("hellaswag/hellaswag.yaml", [
        {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "endings": [", the man adds wax [title] to the wind.", ", the man puts on a christmas coat.",
                                      ", the man continues.", ", the man  drives."], "label": "3"},
        {"activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.", "ctx_b": "she",
         "endings": ["bakes it.", "eats it.", "throws it.", "sings."], "label": "0"}]),
}
# boolq: the harness's passage line is the one difference (the local copy has no passages: closed book here).
# (lmlab reads google/boolq, whose `answer` is super_glue's `label`.)
BOOLQ = ("super_glue/boolq/default.yaml", [{"question": "is the sky blue", "passage": "The sky is blue.",
                                            "label": 1, "answer": True},
                                           {"question": "do fish fly", "passage": "They swim.", "label": 0,
                                            "answer": False}])
# Tasks the harness does not define (or defines differently on purpose), and why.
NOT_IN_HARNESS = {
    "stsb": "the harness's glue group has no STS-B task",
    "ag_news": "no ag_news task in the harness (only unitxt's, a different template)",
    "trec": "no TREC classification task in the harness",
    "open-llm-benchmark": "the course's benchmark, not a harness task",
    "shakespeare": "the course's own validation text", "tinyshakespeare": "nanoGPT's split, not a harness task",
    **dict.fromkeys(("addsub", "singleeq", "aqua", "gsm8k", "svamp", "multiarith", "mawps"),
                    "scored as LLM-Adapters does (the Alpaca prompt, lmlab/evaluate/tasks/math.py)"),
    **dict.fromkeys(("t5_sst2", "t5_rte", "t5_mrpc", "t5_cola", "t5_stsb"),
                    "T5's text-to-text renderings (Raffel et al. 2020, lmlab/evaluate/tasks/text_to_text.py), not harness "
                    "tasks; tests/test_text_to_text.py checks them against the paper's prefixes"),
}


def _ours(name: str, row: dict, i: int):
    return HUB[name][4](row, f"x-{i}")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_zero_and_one_shot_requests_equal_the_harness(name):
    config = harness_config(ROWS[name][0])
    task = T.get_task(name)
    shot_row, row = ROWS[name][1]
    ours, shot = _ours(name, row, 0), _ours(name, shot_row, 1)
    expected = harness_requests(config, harness_doc(config, row))
    assert task.requests(ours) == expected
    assert ours.gold == harness_gold(config, harness_doc(config, row))
    prefix = harness_shot(config, harness_doc(config, shot_row)) + config.get("fewshot_delimiter", FEWSHOT_DELIMITER)
    assert task.prefix("", [shot]) + task.requests(ours)[0][0] == prefix + expected[0][0]


def test_boolq_is_the_harness_template_without_the_passage():
    config = harness_config(BOOLQ[0])
    assert config["doc_to_text"].startswith("{{passage}}\n")
    closed_book = {**config, "doc_to_text": config["doc_to_text"].removeprefix("{{passage}}\n")}
    task = T.get_task("boolq")
    for i, row in enumerate(BOOLQ[1]):
        assert task.requests(_ours("boolq", row, i)) == harness_requests(closed_book, row)


def test_mmlu_local_files_render_as_the_harness(tmp_path):
    config = harness_config("mmlu/default/mmlu_high_school_us_history.yaml")
    folder = tmp_path / "open_llm_benchmark/mmlu"
    rows = {"test": ["  Which war ended in 1783? ", "Civil", "Revolutionary", "1812", "Korean", "B"],
            "dev": ["Who was first?", "Adams", "Washington", "Lincoln", "Grant", "B"]}
    for split, row in rows.items():
        (folder / split).mkdir(parents=True)
        (folder / split / f"high_school_us_history_{split}.csv").write_text(",".join(f'"{c}"' for c in row) + "\n")
    task = T.get_task("mmlu_high_school_us_history")
    split = task.load(tmp_path)
    doc, shot = split.docs[0], split.pool[0]

    def hf(row):  # cais/mmlu's schema
        return {"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5])}
    assert [(task.preamble(doc.subset) + c, x) for c, x in task.requests(doc)] == harness_requests(config,
                                                                                                  hf(rows["test"]))
    assert task.prefix(doc.subset, [shot]) + task.requests(doc)[0][0] == (
        config["description"] + harness_shot(config, hf(rows["dev"])) + "\n\n" + _apply(config, "doc_to_text",
                                                                                        hf(rows["test"])))


def test_lambada_and_wikitext_equal_the_harness():
    lambada = harness_config("lambada/lambada_openai.yaml")
    row = {"text": "he said , `` no . '' and then she left the  room"}
    ours = T.get_task("lambada").request(_ours("lambada", row, 0))
    assert ours == (_apply(lambada, "doc_to_text", row), _apply(lambada, "doc_to_target", row))
    wikitext = harness_config("wikitext/wikitext.yaml")
    page = " = Title = \n \n It is 1 @,@ 000 km ( 620 mi ) long , and the river 's \" name \" @-@ word . \n"
    assert _ours("wikitext", {"page": page}, 0).text == _apply(wikitext, "doc_to_target", {"page": page})


def test_every_task_is_audited():
    audited = set(ROWS) | {"boolq", "mmlu", "lambada", "wikitext"} | set(NOT_IN_HARNESS)
    names = {n for n in T.TASKS if not n.startswith("mmlu_")}
    assert names == audited, names ^ audited
    assert {n for n in ROWS} <= set(HUB)


@pytest.mark.skipif(not (SHARED_DATA / "sst2/dev.tsv").is_file(), reason=f"{SHARED_DATA}/sst2 is absent")
def test_sst2_local_file_keeps_the_sentence_as_the_harness_does():
    config = harness_config("glue/sst2/default.yaml")
    task = T.get_task("sst2")
    split = task.load(SHARED_DATA)
    lines = (SHARED_DATA / "sst2/dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(lines) == len(split.docs)
    for line, doc in zip(lines, split.docs):
        sentence, label = line.split("\t")
        assert task.requests(doc) == harness_requests(config, {"sentence": sentence, "label": int(label)})
    assert all(d.fields["sentence"].endswith(" ") for d in split.docs)  # as every GLUE dev sentence does


@pytest.mark.skipif(not (SHARED_DATA / "open_llm_benchmark/mcq").is_dir(), reason=f"{SHARED_DATA} is absent")
def test_commonsense_qa_local_file_renders_as_the_harness():
    config = harness_config("commonsense_qa/default.yaml")
    task = T.get_task("commonsense_qa")
    split = task.load(SHARED_DATA)
    path = SHARED_DATA / "open_llm_benchmark/mcq/commonsenseqa_dev_rand_split.jsonl"
    rows = [types.SimpleNamespace(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    by_id = {r.id: r for r in rows}
    for doc in split.docs[:50]:
        r = by_id[doc.id]
        row = {"question": r.question["stem"] if isinstance(r.question, dict) else r.question,
               "choices": r.choices, "answerKey": r.answerKey}
        assert task.requests(doc) == harness_requests(config, row)
        assert doc.gold == "ABCDE".index(r.answerKey)
