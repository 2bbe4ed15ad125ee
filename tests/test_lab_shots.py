"""Experiment 5 (lmlab lab shots): the harness's rows as the table, the verdict on phenomenon-free and clear
tables, bad flags, and a --quick run on SmolLM2 against the harness's own output."""

import json
import math

import pytest

from lmlab.cli import main
from lmlab.experiments.lab import shots as lab_shots
from tests.conftest import SHARED_DATA, SMOLLM


def _row(task, k, value, stderr, metric="acc"):
    return {"task": task, "shots": k, "mode": "loglikelihood", "metric": metric, "value": value, "stderr": stderr,
            "n": 100}


def test_table_keeps_the_accuracy_rows():
    rows = [_row("sst2", 0, 0.5, 0.05), _row("sst2", 0, 0.6, 0.05, "acc_norm"), _row("sst2", 5, 0.7, 0.04)]
    assert lab_shots.table(rows) == {"sst2": {"0": {"accuracy": 0.5, "se": 0.05, "n": 100},
                                              "5": {"accuracy": 0.7, "se": 0.04, "n": 100}}}


def test_verdict_is_negative_on_flat_or_noisy_tables_and_positive_on_a_clear_rise():
    def tables(gain_a, gain_b, se=0.05):
        by_task = lambda g: {"0": {"accuracy": 0.5, "se": se}, "5": {"accuracy": 0.5 + g, "se": se}}  # noqa: E731
        return {"m": {"sst2": by_task(gain_a), "arc_easy": by_task(gain_b)}}

    rise = lab_shots.judge(tables(0.2, 0.1))
    assert rise["appeared"] and rise["value"]["m"]["gain"] == pytest.approx(0.15)
    assert rise["value"]["m"]["se"] == pytest.approx((4 * 0.05 ** 2) ** 0.5 / 2)  # sqrt(sum of variances) / 2
    assert not lab_shots.judge(tables(0.0, 0.0))["appeared"]
    assert not lab_shots.judge(tables(0.03, 0.03))["appeared"]  # below one standard error (0.05)
    assert not lab_shots.judge(tables(0.3, -0.3))["appeared"]
    two = {**tables(0.2, 0.1), "other": tables(0.0, 0.0)["m"]}  # the experiment: every model must rise
    assert not lab_shots.judge(two)["appeared"] and lab_shots.judge(two)["value"]["m"]["rises"]


def test_only_language_models_count(smollm_path, minilm_path):
    names = lab_shots.pulled_language_models()
    assert SMOLLM in names and "minilm-l6" not in names  # an encoder is not scored by shots


def test_shots_must_include_zero(capsys):
    assert main(["lab", "shots", "--models", SMOLLM, "--shots", "1,5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab lab shots: error: --shots 1,5: give 0") and "\n" not in err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared data folder {SHARED_DATA} is absent (SST-2)")
def test_quick_run_reports_the_harness_figures(tmp_path, smollm_path):
    out, work = tmp_path / "out", tmp_path / "work"
    induction = tmp_path / "induction.json"
    induction.write_text(json.dumps({"shots": {"2-layer": {"0": {"accuracy": 0.0, "se": 0.0},
                                                           "4": {"accuracy": 0.9, "se": 0.02}}}}))
    assert main(["lab", "shots", "--quick", "--models", SMOLLM, "--out", str(out), "--work", str(work),
                 "--data-dir", str(SHARED_DATA), "--threads", "1", "--no-progress", "--induction",
                 str(induction)]) == 0
    assert {p.name for p in out.iterdir()} == {"shots.json", "shots.md", "shots.png"}
    summary = json.loads((out / "shots.json").read_text())
    harness = json.loads((work / SMOLLM / "sst2.json").read_text())
    assert summary["tables"][SMOLLM] == lab_shots.table(harness["results"])
    assert set(summary["tables"][SMOLLM]["sst2"]) == {"0", "1"} and summary["limit"] == 8
    assert summary["verdict"] == lab_shots.judge(summary["tables"])
    # The paired gain is the difference of the table's accuracies, on the same 8 examples.
    same, sst2 = summary["paired"][SMOLLM]["per_task"]["sst2"], summary["tables"][SMOLLM]["sst2"]
    assert same["n"] == 8 and same["gain"] == pytest.approx(sst2["1"]["accuracy"] - sst2["0"]["accuracy"], abs=1e-3)
    assert summary["synthetic"]["2-layer"]["4"]["accuracy"] == 0.9
    assert "2-layer attention-only" in (out / "shots.md").read_text()


def test_paired_gain_joins_the_same_examples():
    def rec(task, k, i, right):
        return {"task": task, "shots": k, "mode": "loglikelihood", "id": i, "gold": 1, "pred": 1 if right else 0}

    # sst2: 0 shots right on a, b; 5 shots right on a, b, c, d (d = [0, 0, 1, 1]); the 1-shot run is not compared.
    records = [rec("sst2", 0, i, i in "ab") for i in "abcd"] + [rec("sst2", 5, i, True) for i in "dcba"]
    records += [rec("sst2", 1, i, False) for i in "abcd"] + [{**rec("sst2", 0, "a", False), "mode": "generate"}]
    # arc: 5 shots lose one of four (d = [0, 0, 0, -1]).
    records += [rec("arc", 0, i, True) for i in "wxyz"] + [rec("arc", 5, i, i != "z") for i in "wxyz"]
    same = lab_shots.paired(lab_shots.correct_by_example(records))
    sst2, arc = same["per_task"]["sst2"], same["per_task"]["arc"]
    assert sst2 == {"shots": 5, "gain": 0.5, "se": pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-4), "n": 4}
    assert arc["gain"] == -0.25 and arc["se"] == pytest.approx(0.25, abs=1e-4)
    assert same["gain"] == pytest.approx(0.125)
    assert same["se"] == pytest.approx(math.sqrt(sst2["se"] ** 2 + arc["se"] ** 2) / 2, abs=1e-4)
