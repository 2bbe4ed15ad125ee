"""lmlab lab scaling: the quick run through the command line, and the fit and verdict against closed-form power
laws, scipy's curve_fit and phenomenon-free losses."""

import json

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.data.corpus import prepare
from lmlab.experiments.lab.common import LADDERS, crossing, gpt_config, non_embedding_params
from lmlab.experiments.lab.scaling import fit_power_law, isoflop, scaling_verdict
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
    assert len({r["tokens"] for r in runs}) == 1  # the same tokens for every size
    assert summary["verdict"]["value"] == pytest.approx(summary["fit"]["r2"], abs=1e-4)
    assert len(summary["isoflop"]) == 3
    for budget in summary["isoflop"]:
        assert budget["best"] == min(budget["losses"], key=budget["losses"].get)
    assert "| xxl | 2 | 64 |" in (out / "scaling.md").read_text()
    # A second call reads the finished runs back instead of training again.
    before = (tmp_path / "work" / "quick" / "xs" / "metrics.jsonl").stat().st_mtime
    assert main(["lab", "scaling", "--quick", "--source", str(corpus), "--vocab-size", "512", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--no-progress"]) == 0
    assert (tmp_path / "work" / "quick" / "xs" / "metrics.jsonl").stat().st_mtime == before


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


def test_isoflop_picks_the_compute_optimal_size_of_a_closed_form_loss():
    """Chinchilla's L(N, D) = E + A/N^a + B/D^b on dense curves: at each budget the lowest loss is where the closed
    form puts it, and the best size grows with the budget."""
    law = lambda n, d: 1.7 + 400 / n ** 0.34 + 4000 / d ** 0.28  # noqa: E731
    sizes = [3e3, 1e4, 3e4, 1e5, 3e5, 1e6]
    tokens = np.geomspace(1e5, 1e8, 200)
    runs = [{"name": f"n{k}", "params": n, "curve": [{"tokens": d, "val_loss": law(n, d)} for d in tokens]}
            for k, n in enumerate(sizes)]
    rows = isoflop(runs)
    assert len(rows) == 3
    for row in rows:
        exact = {f"n{k}": law(n, row["flops"] / (6 * n)) for k, n in enumerate(sizes) if f"n{k}" in row["losses"]}
        assert len(exact) >= 3
        assert row["best"] == min(exact, key=exact.get)
        for name, value in row["losses"].items():
            assert value == pytest.approx(exact[name], abs=2e-3)
    assert [r["best_params"] for r in rows] == sorted(r["best_params"] for r in rows)
    assert rows[0]["best_params"] < rows[-1]["best_params"]


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
