"""lmlab lab scaling: the quick run through the command line, and the fit and verdict against closed-form power
laws, scipy's curve_fit and phenomenon-free losses."""

import json

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.data.corpus import prepare
from lmlab.experiments.lab.common import LADDERS, crossing, gpt_config, non_embedding_params
from lmlab.experiments.lab.scaling import (SCALES, SCALING_LADDERS, TokenRule, fit_power_law, isoflop_profiles,
                                           optimum_exponent, plan_runs, scaling_verdict)
from lmlab.models.transformer import Transformer

from .conftest import SHARED_DATA

SIZES = [12_768, 28_368, 56_640, 155_840, 233_680, 456_176]  # the CPU ladder's N


def test_quick_run_writes_the_report_and_the_verdict(tmp_path, capsys):
    shakespeare = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not shakespeare.is_file():
        pytest.skip(f"{shakespeare} is absent (the shared data folder holds Tiny Shakespeare)")
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(shakespeare.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["lab", "scaling", "--quick", "--source", str(corpus), "--vocab-size", "512", "--out", str(out),
               "--work", str(tmp_path / "work"), "--threads", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "scaling.json").read_text())
    assert {"scaling.md", "scaling.png"} <= {p.name for p in out.iterdir()}
    assert (out / "scaling.png").stat().st_size > 10_000
    assert set(summary["verdict"]) == {"appeared", "criterion", "value", "reading"}
    assert "R^2 >= 0.95" in summary["verdict"]["criterion"]
    runs = summary["runs"]
    assert len(runs) == 6 and runs[-1]["params"] / runs[0]["params"] >= 30
    tokens = [r["tokens"] for r in runs]
    assert tokens == sorted(tokens) and tokens[-1] > tokens[0]  # budgets grow with size
    rule, per_step = SCALES["quick"].rule, summary["settings"]["tokens_per_step"]
    assert tokens == [rule.steps(r["params"], per_step) * per_step for r in runs]
    assert summary["verdict"]["value"] == pytest.approx(summary["fit"]["r2"], abs=1e-4)
    assert summary["goal"] == {"r2": 0.98, "met": summary["fit"]["r2"] >= 0.98}
    assert len(summary["isoflop"]) == len(SCALES["quick"].isoflop_centres)
    params = {r["name"]: r["params"] for r in runs}
    for budget in summary["isoflop"]:
        assert len(budget["losses"]) == 3
        assert budget["best"] == min(budget["losses"], key=budget["losses"].get)
        for name, d in budget["tokens"].items():  # each size annealed at D = C / 6N, to the nearest step
            assert abs(6 * params[name] * d - budget["flops"]) <= 3 * params[name] * per_step
    # every IsoFLOP run not in the ladder was trained as its own run, to its own end
    assert {(r["name"], r["tokens"]) for r in summary["isoflop_runs"]} == {
        (n, d) for b in summary["isoflop"] for n, d in b["tokens"].items()} - {(r["name"], r["tokens"]) for r in runs}
    assert "| xxl | 2 | 64 |" in (out / "scaling.md").read_text()
    # A second call reads the finished runs back instead of training again.
    first = tmp_path / "work" / "quick" / f"xs-{runs[0]['tokens'] // per_step}" / "metrics.jsonl"
    before = first.stat().st_mtime
    assert main(["lab", "scaling", "--quick", "--source", str(corpus), "--vocab-size", "512", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--no-progress"]) == 0
    assert first.stat().st_mtime == before
    # The ladder alone, read back: no IsoFLOP runs planned or reported.
    assert main(["lab", "scaling", "--quick", "--no-isoflop", "--source", str(corpus), "--vocab-size", "512", "--out",
                 str(tmp_path / "ladder"), "--work", str(tmp_path / "work"), "--no-progress"]) == 0
    ladder_only = json.loads((tmp_path / "ladder" / "scaling.json").read_text())
    assert ladder_only["isoflop"] == [] and ladder_only["plan"]["isoflop"] == []
    assert ladder_only["fit"] == summary["fit"] and first.stat().st_mtime == before
    assert "IsoFLOP: not run (--no-isoflop)." in (tmp_path / "ladder" / "scaling.md").read_text()


def test_a_floor_of_no_steps_is_refused_before_any_work(tmp_path, capsys):
    rc = main(["lab", "scaling", "--quick", "--min-steps", "0", "--work", str(tmp_path / "work"),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmlab lab scaling: error: --min-steps 0: must be at least 1"
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_another_corpus_in_the_same_work_folder_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("to be or not to be\n" * 400)
    (tmp_path / "b.txt").write_text("that is the question\n" * 400)
    (tmp_path / "work" / "data").mkdir(parents=True)
    prepare(str(tmp_path / "a.txt"), tmp_path / "work" / "data", tokenizer="char", progress=False)
    rc = main(["lab", "scaling", "--quick", "--source", str(tmp_path / "b.txt"), "--tokenizer", "char",
               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab lab scaling: error:") and "another --work" in err and "\n" not in err


def test_the_fit_recovers_a_closed_form_power_law():
    losses = [1.7 + 40.0 * n ** -0.3 for n in SIZES]
    fit = fit_power_law(SIZES, losses)
    assert fit["E"] == pytest.approx(1.7, abs=1e-3)
    assert fit["alpha"] == pytest.approx(0.3, abs=1e-3)
    assert fit["A"] == pytest.approx(40.0, rel=1e-2)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
    record = scaling_verdict(SIZES, losses)
    assert record["appeared"] is True and record["value"] >= 0.999


def test_the_fit_matches_scipy_on_noisy_losses():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    n = np.array(SIZES, dtype=float)
    losses = 2.1 + 25.0 * n ** -0.25 + rng.normal(0, 0.01, len(n))
    ours = fit_power_law(list(n), list(losses))
    law = lambda x, e, a, alpha: e + a * (x / n.min()) ** -alpha  # noqa: E731
    (e, a, alpha), _ = optimize.curve_fit(law, n, losses, p0=(2.0, 1.0, 0.3), maxfev=20000)
    theirs = 1 - ((law(n, e, a, alpha) - losses) ** 2).sum() / ((losses - losses.mean()) ** 2).sum()
    assert ours["r2"] == pytest.approx(theirs, abs=1e-4)
    assert ours["alpha"] == pytest.approx(alpha, rel=0.02)
    assert ours["E"] == pytest.approx(e, abs=0.01)


@pytest.mark.parametrize("losses", [
    [4.0] * 6,  # flat: nothing scales
    [3.0, 3.2, 3.1, 3.4, 3.5, 3.7],  # worse with size
    list(4.0 + np.random.default_rng(1).normal(0, 0.05, 6)),  # noise around a constant
    [4.0, 4.0, 4.0, 4.0, 4.0, 2.0],  # one outlier: a step, not a power law
])
def test_a_phenomenon_free_input_gives_a_negative_verdict(losses):
    record = scaling_verdict(SIZES, losses)
    assert record["appeared"] is False
    assert record["value"] < 0.95


def test_the_token_rule_is_chinchilla_below_the_knee_and_grows_as_sqrt_above():
    rule = TokenRule(knee=100_000, min_steps=150)
    assert rule.steps(50_000, 1000) == 1000  # 20 tokens a parameter
    assert rule.steps(100_000, 1000) == 2000
    assert rule.steps(400_000, 1000) == 4000  # 20 x knee x sqrt(4): twice the knee's tokens, 10 a parameter
    assert rule.steps(1_000, 1000) == 150  # the floor: 20k tokens would be 20 steps
    assert TokenRule(knee=10, min_steps=1, per_param=1.0).steps(90, 1) == 30


def _ladder_params(level: str) -> list[tuple[str, int]]:
    return [(s.name, _gpt2_params(s)) for s in SCALING_LADDERS[level]]


def test_the_cpu_ladder_spans_100x_with_budgets_growing_with_size():
    params = _ladder_params("cpu")
    assert len(params) >= 7 and params[-1][1] / params[0][1] >= 100
    assert [n for _, n in params] == sorted(n for _, n in params)
    scale = SCALES["cpu"]
    steps = [r["steps"] for r in plan_runs(scale, params, 16 * 128)["ladder"]]
    assert steps == sorted(steps) and len(set(steps)) >= len(steps) - 1  # only the floor repeats
    assert steps[-1] * 16 * 128 <= 4 * 1_670_000  # the largest sees Shakespeare's training split at most 4 times


def test_plan_trains_each_isoflop_size_to_its_own_d():
    scale = SCALES["cpu"]
    params = _ladder_params("cpu")
    plan = plan_runs(scale, params, 2048)
    n = dict(params)
    for centre, budget in zip(scale.isoflop_centres, plan["isoflop"]):
        ladder_run = plan["ladder"][centre]
        assert budget["flops"] == 6 * ladder_run["params"] * ladder_run["steps"] * 2048
        assert budget["steps"][ladder_run["name"]] == ladder_run["steps"]  # the ladder run is read back
        assert len(budget["steps"]) == 2 * scale.isoflop_width + 1
        for name, steps in budget["steps"].items():
            assert steps == round(budget["flops"] / (6 * n[name] * 2048))


def _chinchilla(n, d):
    """Hoffmann et al.'s fitted form L(N, D) = E + A/N^a + B/D^b (their constants' shape, smaller scale)."""
    return 1.7 + 400 / n ** 0.34 + 4000 / d ** 0.28


def test_isoflop_profiles_find_the_closed_form_optimum():
    """Annealed runs of a closed-form L(N, D): the lowest point is the true best of the sizes trained, the parabola
    in ln N lands near the exact optimum (a dense grid's), and N_opt ~ C^a with a = b / (a + b) = 0.45."""
    sizes = np.geomspace(1e3, 1e7, 21)
    budgets, exact = [], []
    for flops in (1e12, 1e13, 1e14):
        points = [{"name": f"n{n:.0f}", "params": n, "tokens": flops / (6 * n),
                   "val_loss": _chinchilla(n, flops / (6 * n))} for n in sizes]
        dense = np.geomspace(1e3, 1e7, 20001)
        exact.append(dense[np.argmin(_chinchilla(dense, flops / (6 * dense)))])
        optimum = min(points, key=lambda p: p["val_loss"])
        near = [p for p in points if 1 / 3 <= p["params"] / optimum["params"] <= 3]  # 5 sizes around it
        budgets.append({"flops": flops, "points": near})
    rows = isoflop_profiles(budgets)
    for row, budget, true in zip(rows, budgets, exact):
        assert row["best"] == min(budget["points"], key=lambda p: p["val_loss"])["name"]
        assert row["optimum_params"] == pytest.approx(true, rel=0.05)
        assert row["optimum_tokens"] == pytest.approx(row["flops"] / (6 * row["optimum_params"]))
    assert [r["optimum_params"] for r in rows] == sorted(r["optimum_params"] for r in rows)
    assert optimum_exponent(rows) == pytest.approx(0.28 / (0.34 + 0.28), abs=0.02)


def test_an_isoflop_profile_without_an_interior_minimum_gives_no_optimum():
    falling = [{"name": f"n{k}", "params": 10.0 ** k, "tokens": 1.0, "val_loss": 5.0 - k} for k in range(3, 7)]
    peaked = [{**p, "val_loss": -((p["params"] / 1e4 - 1) ** 2)} for p in falling]  # opens downwards
    rows = isoflop_profiles([{"flops": 1e9, "points": falling}, {"flops": 1e10, "points": peaked},
                             {"flops": 1e11, "points": falling[:2]}])
    assert [r["optimum_params"] for r in rows] == [None, None, None]
    assert [r["best"] for r in rows] == ["n6", "n6", "n4"]
    assert optimum_exponent(rows) is None


def test_crossing_interpolates_in_log_size():
    assert crossing([1e3, 1e4, 1e5], [0.1, 0.2, 0.8], 0.5) == pytest.approx(10 ** 4.5)
    assert crossing([1e3, 1e4], [0.1, 0.2], 0.5) is None
    assert crossing([1e3, 1e4], [0.6, 0.9], 0.5) is None


def _gpt2_params(size) -> int:
    """GPT-2's non-embedding parameters in closed form: per block 12 d^2 (attention 4 d^2, MLP 8 d^2) plus 13 d
    (their biases and two layernorms), and the final layernorm."""
    return size.n_layer * (12 * size.n_embd ** 2 + 13 * size.n_embd) + 2 * size.n_embd


def test_every_ladder_has_six_sizes_spanning_30x():
    for name, ladder in LADDERS.items():
        params = [_gpt2_params(s) for s in ladder]
        assert len(params) == 6 and params == sorted(params), name
        assert params[-1] / params[0] >= 30, name
    built = [non_embedding_params(Transformer(gpt_config(s, 64, 32))) for s in LADDERS["cpu"] + LADDERS["quick"]]
    assert built == [_gpt2_params(s) for s in LADDERS["cpu"] + LADDERS["quick"]]
    assert built[:6] == SIZES
