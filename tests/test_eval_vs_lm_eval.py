"""bench/eval_vs_lm_eval.py (issue 28) without running either harness: the task file it gives lm-eval is lm-eval's
own piqa task, read by lm-eval's YAML loader, over local questions that render as lmlab's requests; and lm-eval's
--log_samples records are read into the choices they scored."""

import ast
import importlib.util
import json
import sys
from pathlib import Path

import jinja2
import pytest

from lmlab.evaluate.tasks import get_task
from lmlab.evaluate.tasks.base import Doc

_SPEC = importlib.util.find_spec("lm_eval")
if _SPEC is None:
    pytest.skip("lm-evaluation-harness's task files are the reference: pip install --no-deps lm-eval==0.4.13",
                allow_module_level=True)
BENCH = Path(__file__).resolve().parents[1] / "bench"
DOCS = [Doc("valid-0", {"goal": "How do I dry a phone?"}, ["Put it in rice.", "Put it in water."], 0),
        Doc("valid-1", {"goal": "keep bread fresh"}, ["leave it open ", "wrap it in a bag"], 1)]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import eval_vs_lm_eval
    return eval_vs_lm_eval


def lm_eval_yaml_loader():
    """lm-eval's own loader module, by its file (its package's __init__ wants lm-eval's dependencies)."""
    path = Path(_SPEC.submodule_search_locations[0]) / "tasks" / "_yaml_loader.py"
    spec = importlib.util.spec_from_file_location("lm_eval_yaml_loader", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_task_file_is_lm_evals_piqa_over_the_local_questions(bench, tmp_path):
    task_file = bench.piqa_task_yaml(tmp_path, DOCS, DOCS[:1])
    config = lm_eval_yaml_loader().load_yaml(task_file)
    assert config["task"] == "piqa_local" and config["output_type"] == "multiple_choice"
    assert config["dataset_path"] == "json" and config["validation_split"] == "validation"
    files = config["dataset_kwargs"]["data_files"]
    assert set(files) == {"validation", "train"}  # piqa.yaml names a training split; it must exist

    rows = [json.loads(line) for line in Path(files["validation"]).read_text().splitlines()]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    ours = get_task("piqa")
    for row, doc in zip(rows, DOCS, strict=True):
        # lm-eval's templates (from its piqa.yaml) on the written row against lmlab's requests for the doc
        text = env.from_string(config["doc_to_text"]).render(**row)
        choices = ast.literal_eval(env.from_string(config["doc_to_choice"]).render(**row))
        assert [(text, " " + c) for c in choices] == ours.requests(doc)
        assert row[config["doc_to_target"]] == doc.gold


def test_lm_eval_samples_read_as_the_choices_scored(bench, tmp_path):
    run = tmp_path / "out" / "model-folder"
    run.mkdir(parents=True)
    (run / "results_2026.json").write_text(json.dumps(
        {"results": {"piqa_local": {"acc,none": 0.5, "acc_norm,none": 1.0}}}))
    docs = [{"goal": d.fields["goal"], "sol1": d.choices[0], "sol2": d.choices[1], "label": d.gold} for d in DOCS]
    samples = [  # written out of order, as lm-eval may: doc_id orders them
        {"doc_id": 1, "doc": docs[1], "target": 1, "filtered_resps": [["-9.5", "False"], ["-7.25", "False"]],
         "acc": 1.0, "acc_norm": 1.0},
        {"doc_id": 0, "doc": docs[0], "target": 0, "filtered_resps": [["-8.0", "False"], ["-6.0", "False"]],
         "acc": 0.0, "acc_norm": 1.0}]
    (run / "samples_piqa_local_2026.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    theirs = bench.lm_eval_scores(tmp_path / "out")
    assert (theirs["acc"], theirs["acc_norm"]) == (0.5, 1.0)
    assert theirs["pred"] == [1, 1] and theirs["pred_norm"] == [0, 1]
    assert theirs["logliks"] == [[-8.0, -6.0], [-9.5, -7.25]]

    lmlab_out = tmp_path / "lmlab"
    lmlab_out.with_suffix(".jsonl").write_text("".join(json.dumps(
        {"query": ours[0][0], "choices": d.choices, "logliks": ll, "gold": d.gold, "pred": p, "pred_norm": 0}) + "\n"
        for d, ours, ll, p in zip(DOCS, [get_task("piqa").requests(d) for d in DOCS],
                                  [[-8.0, -6.0], [-9.5, -7.0]], [1, 1])))
    same = bench.agreement(bench.lmlab_scores(lmlab_out), theirs)
    assert same["acc_predictions_differ"] == 0 and same["acc_norm_predictions_differ"] == 1
    assert not same["identical_predictions"] and same["max_abs_loglik_diff"] == 0.25
    with pytest.raises(SystemExit, match="different questions"):
        bench.agreement(bench.lmlab_scores(lmlab_out), theirs | {"questions": theirs["questions"][::-1]})
