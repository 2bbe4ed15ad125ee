"""lmlab lab emergence: the quick run through the command line, the task and its metrics against their
definitions, and the verdict on closed-form and phenomenon-free curves."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.experiments.lab.common import RowsObjective, Size, gpt_config, seed_list, seed_summary
from lmlab.experiments.lab.emergence import (VOCAB, addition_pairs, addition_rows, addition_text, answer_scores,
                                             digit_accuracy, emergence_verdict, monotonic_exceptions, sharpness)
from lmlab.models.transformer import Transformer
from lmlab.training.metrics import read_metrics

SIZES = [12_768, 28_368, 56_640, 155_840, 233_680, 456_176]  # the CPU ladder's N


def _quick(tmp_path, seeds):
    return main(["lab", "emergence", "--quick", "--seeds", seeds, "--out", str(tmp_path / "out"), "--work",
                 str(tmp_path / "work"), "--threads", "1", "--no-progress"])


def test_quick_run_over_two_seeds_writes_the_means_the_spread_and_the_verdict(tmp_path, monkeypatch, capsys):
    """Two seeds, the first interrupted by SIGTERM part-way through its first run and resumed by the next call:
    each size's row is the mean and range of its two seeds' runs (each its own folder), the verdict is the pure
    function of the means, and a third call reads every finished run back without training."""
    draw, calls = RowsObjective.draw, []

    def draw_then_stop(self, n):  # SIGTERM at step 30 of the first run (seed 0, the smallest size)
        calls.append(n)
        if len(calls) == 30:
            os.kill(os.getpid(), signal.SIGTERM)
        return draw(self, n)

    monkeypatch.setattr(RowsObjective, "draw", draw_then_stop)
    assert _quick(tmp_path, "0,1") == 143
    # The lab has no --resume flag: the message says to run the same command again (it once said "and --resume").
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert "SIGTERM at step 30" in said and "run the same command again" in said and "--resume" not in said
    first = tmp_path / "work" / "seed0" / "quick-2d-reversed" / "xs"
    assert (first / "ckpt" / "step_0000030").is_dir() and not (first / "summary.json").exists()
    monkeypatch.setattr(RowsObjective, "draw", draw)
    assert _quick(tmp_path, "0,1") == 0
    trained = [r for r in read_metrics(first) if "loss" in r]
    assert [r["step"] for r in trained] == [20, 40, 60, 80]  # resumed at step 30, not trained again from step 1

    out = tmp_path / "out"
    summary = json.loads((out / "emergence.json").read_text())
    assert {"emergence.md", "emergence.png"} <= {p.name for p in out.iterdir()}
    assert (out / "emergence.png").stat().st_size > 10_000
    assert summary["settings"]["seeds"] == [0, 1]
    runs = summary["runs"]
    assert len(runs) == 6 and runs[-1]["params"] / runs[0]["params"] >= 30
    for r in runs:
        assert [x["seed"] for x in r["seeds"]] == [0, 1]
        for metric in ("exact_match", "token_accuracy", "answer_logprob"):
            values = [x[metric] for x in r["seeds"]]
            assert r[metric] == pytest.approx(np.mean(values))
            assert r["spread"][metric]["min"] == min(values) and r["spread"][metric]["max"] == max(values)
            assert r["spread"][metric]["std"] == pytest.approx(np.std(values, ddof=1))
        for x in r["seeds"]:
            assert 0 <= x["exact_match"] <= x["token_accuracy"] <= 1 and x["answer_logprob"] < 0
            assert x["curve"][-1]["exact_match"] == x["exact_match"]
            # The final weights' digits, read back from the checkpoint: their mean is the token accuracy.
            assert len(x["digit_accuracy"]) == 3 and np.mean(x["digit_accuracy"]) == pytest.approx(
                x["token_accuracy"], abs=1e-3)
            folder = tmp_path / "work" / f"seed{x['seed']}" / "quick-2d-reversed" / r["name"]
            assert json.loads((folder / "summary.json").read_text())["exact_match"] == x["exact_match"]
    assert any(r["seeds"][0]["answer_logprob"] != r["seeds"][1]["answer_logprob"] for r in runs)  # two real seeds
    record = summary["verdict"]
    assert {"appeared", "criterion", "value", "reading"} <= set(record)
    assert "50 %" in record["criterion"]
    again = emergence_verdict([r["params"] for r in runs], [r["exact_match"] for r in runs],
                              [r["token_accuracy"] for r in runs])
    assert again == record  # the verdict is the pure function of the means
    for i, own in enumerate(summary["verdict_per_seed"]):
        alone = emergence_verdict([r["params"] for r in runs], [r["seeds"][i]["exact_match"] for r in runs],
                                  [r["seeds"][i]["token_accuracy"] for r in runs])
        assert own == {"seed": i, "appeared": alone["appeared"], "value": alone["value"]}
    for metric, found in summary["monotonic_exceptions"].items():
        assert found == monotonic_exceptions(runs, metric)
    table = (out / "emergence.md").read_text()
    xs = runs[0]
    assert f"| {xs['exact_match']:.3f} [{xs['spread']['exact_match']['min']:.3f}, " in table

    monkeypatch.setattr(RowsObjective, "draw", lambda self, n: pytest.fail("a finished run was trained again"))
    assert _quick(tmp_path, "0,1") == 0
    assert json.loads((out / "emergence.json").read_text())["runs"] == runs


def test_the_task_text_and_rows():
    assert addition_text(123, 489, 3, reverse=True) == "123+489=2160"
    assert addition_text(123, 489, 3, reverse=False) == "123+489=0612"
    assert addition_text(7, 5, 2, reverse=False) == "07+05=012"
    rows = addition_rows(np.array([[123, 489], [999, 999]]), 3, reverse=True)
    assert rows["inputs"].shape == (2, 11)
    text = "".join(VOCAB[i] for i in rows["inputs"][1].tolist())
    assert text == "999+999=899"  # 1998 reversed, its last digit only a target
    scored = [VOCAB[t] for t in rows["targets"][0].tolist() if t != -100]
    assert "".join(scored) == "2160"
    train, held_out = addition_pairs(3, 5000, 500, seed=0)
    assert not {tuple(p) for p in train} & {tuple(p) for p in held_out}
    assert len({tuple(p) for p in train}) == 5000 and train.max() <= 999


class FixedLogits(torch.nn.Module):
    """A stand-in model that returns given logits, the next rows of them at each call (the scorer's chunks)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.served = logits, 0

    def forward(self, inputs):
        self.served += len(inputs)
        return self.logits[self.served - len(inputs):self.served], None


def test_answer_scores_match_their_definitions():
    rows = addition_rows(np.array([[123, 489], [5, 17], [640, 360], [1, 2]]), 3, reverse=True)
    logits = torch.randn(4, 11, len(VOCAB), generator=torch.Generator().manual_seed(0))
    targets = rows["targets"]
    logits[0, targets[0] != -100] += 20 * torch.nn.functional.one_hot(targets[0][targets[0] != -100], len(VOCAB))
    logits[1, 9, targets[1, 9]] += 20  # row 1: one digit right for sure, the others by chance
    scores = answer_scores(FixedLogits(logits), rows, chunk=3)
    # The definitions, digit by digit in plain Python.
    right = [[int(logits[r, i].argmax()) == int(targets[r, i]) for i in range(11) if targets[r, i] != -100]
             for r in range(4)]
    logprob = [sum(float(torch.log_softmax(logits[r, i], -1)[targets[r, i]]) for i in range(11)
                   if targets[r, i] != -100) for r in range(4)]
    assert scores["exact_match"] == sum(all(x) for x in right) / 4
    assert scores["token_accuracy"] == sum(map(sum, right)) / 16
    assert scores["answer_logprob"] == pytest.approx(sum(logprob) / 4, rel=1e-5)
    assert scores["exact_match"] >= 0.25
    by_place = digit_accuracy(FixedLogits(logits), rows, chunk=3)
    assert by_place == [sum(r[i] for r in right) / 4 for i in range(4)]
    assert by_place[2] >= 0.5  # rows 0 and 1 have their third digit right for sure


def test_teacher_forced_exact_match_is_greedy_decoding():
    """Rows whose answers are what greedy decoding writes (one token at a time, the model's own digits fed back)
    score exact match 1 in the one teacher-forced pass; the same rows with their last digit changed score 0, with
    3 of 4 digits right."""
    torch.manual_seed(0)
    model = Transformer(gpt_config(Size("t", 1, 2, 16), len(VOCAB), 11)).eval()
    pairs = np.array([[a, b] for a in range(0, 1000, 97) for b in range(3, 1000, 211)])
    rows = addition_rows(pairs, 3, reverse=True)
    with torch.no_grad():
        sequences = rows["inputs"][:, :8].clone()
        for _ in range(4):
            next_digit = model(sequences)[0][:, -1].argmax(-1, keepdim=True)
            sequences = torch.cat([sequences, next_digit], 1)
        greedy = {"inputs": sequences[:, :-1], "targets": rows["targets"].clone()}
        greedy["targets"][:, 7:] = sequences[:, 8:]
        right = answer_scores(model, greedy)
        assert right["exact_match"] == 1.0 and right["token_accuracy"] == 1.0
        wrong = {"inputs": greedy["inputs"], "targets": greedy["targets"].clone()}
        wrong["targets"][:, -1] = (wrong["targets"][:, -1] + 1) % 10
        scores = answer_scores(model, wrong)
    assert scores["exact_match"] == 0.0 and scores["token_accuracy"] == pytest.approx(0.75)


def test_the_mirage_in_closed_form_is_emergent():
    """Token accuracy rising evenly in log N and exact match = its 4th power (independent digits): exact match is
    sharper and crosses 50 % where p^4 = 0.5."""
    p = np.linspace(0.5, 0.99, 6)
    record = emergence_verdict(SIZES, list(p ** 4), list(p))
    assert record["appeared"] is True and record["sharper"] is True
    k = int(np.argmax(p ** 4 >= 0.5))
    share = (0.5 - p[k - 1] ** 4) / (p[k] ** 4 - p[k - 1] ** 4)
    expected = math.exp(math.log(SIZES[k - 1]) + share * (math.log(SIZES[k]) - math.log(SIZES[k - 1])))
    assert record["value"] == pytest.approx(expected)


@pytest.mark.parametrize("exact_match", [
    list(np.linspace(0.1, 0.95, 6)),  # as smooth as token accuracy: no jump
    [0.01] * 6,  # flat: nothing emerges
    list(np.linspace(0.6, 0.99, 6)),  # above 50 % from the smallest size: no crossing within the ladder
    [0.0, 0.0, 0.01, 0.02, 0.03, 0.3],  # a jump that never reaches 50 %
])
def test_a_phenomenon_free_input_gives_a_negative_verdict(exact_match):
    record = emergence_verdict(SIZES, exact_match, list(np.linspace(0.4, 0.99, 6)))
    assert record["appeared"] is False


def test_sharpness_of_a_step_a_line_and_a_flat_curve():
    assert sharpness(SIZES, [0, 0, 0, 1, 1, 1]) == 1.0
    assert sharpness(SIZES, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]) == pytest.approx(0.2)
    assert sharpness(SIZES, [0.3] * 6) == 0.0


def _row(name, params, exact_match, lo=None, hi=None):
    """A size's row as seed_summary writes it, with exact match only (its seeds' range lo..hi)."""
    lo, hi = exact_match if lo is None else lo, exact_match if hi is None else hi
    return {"name": name, "params": params, "exact_match": exact_match,
            "spread": {"exact_match": {"min": lo, "max": hi, "std": 0.0}}}


def test_monotonic_exceptions_name_the_size_that_falls():
    # The committed one-seed ladder: 3x80 fell to 0.101 below 2x80's 0.999; 1x48's 0.007 under 1x32's 0.011 is a tie.
    one_seed = [_row(n, p, v) for n, p, v in zip(["1x32", "1x48", "2x48", "2x80", "3x80", "3x112"], SIZES,
                                                  [0.011, 0.007, 0.132, 0.999, 0.101, 1.0])]
    assert monotonic_exceptions(one_seed, "exact_match") == [
        {"size": "3x80", "mean": 0.101, "below": "2x80", "best": 0.999, "fall": pytest.approx(0.898), "apart": True}]
    rising = [_row(f"s{i}", n, v) for i, (n, v) in enumerate(zip(SIZES, [0.0, 0.0, 0.2, 0.5, 0.5, 0.9]))]
    assert monotonic_exceptions(rising, "exact_match") == []
    # A fall below the best smaller size, not only the neighbour; the seeds' ranges overlapping.
    wobbly = [_row("a", 1, 0.2, 0.1, 0.3), _row("b", 2, 0.6, 0.3, 0.9), _row("c", 3, 0.5, 0.2, 0.8),
              _row("d", 4, 0.4, 0.0, 0.8), _row("e", 5, 0.95)]
    found = monotonic_exceptions(wobbly, "exact_match")
    assert [(e["size"], e["below"], e["apart"]) for e in found] == [("c", "b", False), ("d", "b", False)]


def test_seed_summary_is_the_mean_and_the_spread_of_the_seeds():
    records = [{"name": "m", "n_layer": 2, "n_embd": 32, "params": 100, "exact_match": v, "elapsed_s": 10.0 * k,
                "curve": [{"step": 1, "exact_match": v}]} for k, v in enumerate([0.2, 0.5, 0.9], 1)]
    row = seed_summary(records, [3, 4, 5], ("exact_match", "elapsed_s"))
    assert row["exact_match"] == pytest.approx(1.6 / 3) and row["elapsed_s"] == pytest.approx(20.0)
    # The sample standard deviation by hand: deviations -1/3, -1/30, 11/30 from 1.6/3.
    assert row["spread"]["exact_match"] == {"min": 0.2, "max": 0.9, "std": pytest.approx(math.sqrt((1 / 9 + 1 / 900 + 121 / 900) / 2))}
    assert [(x["seed"], x["exact_match"], x["curve"]) for x in row["seeds"]] == [
        (3, 0.2, [{"step": 1, "exact_match": 0.2}]), (4, 0.5, [{"step": 1, "exact_match": 0.5}]),
        (5, 0.9, [{"step": 1, "exact_match": 0.9}])]
    one = seed_summary(records[:1], [0], ("exact_match",))
    assert one["exact_match"] == 0.2 and one["spread"]["exact_match"] == {"min": 0.2, "max": 0.2, "std": 0.0}


def test_seed_list_reads_distinct_whole_numbers():
    assert seed_list("0,1,2") == [0, 1, 2] and seed_list(" 7, 3,") == [7, 3]
    for bad in ("", "a", "0,0", "-1", "1.5"):
        with pytest.raises(LmlabError, match="--seeds"):
            seed_list(bad)


def test_other_steps_train_every_size_that_long_in_folders_of_their_own(tmp_path):
    assert main(["lab", "emergence", "--quick", "--seeds", "3", "--steps", "40", "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "work"), "--threads", "1", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "emergence.json").read_text())
    assert summary["settings"]["steps"] == 40 and summary["settings"]["seeds"] == [3]
    for r in summary["runs"]:
        assert r["seeds"][0]["curve"][-1]["step"] == 40
        folder = tmp_path / "work" / "seed3" / "quick-2d-reversed-40steps" / r["name"]
        assert json.loads((folder / "summary.json").read_text())["steps"] == 40
