"""Experiment 4 (lmlab lab grokking): the modular-addition split, the verdict on phenomenon-free and clear
curves, and a --quick run's files."""

import json

import torch

from lmlab.cli import main
from lmlab.experiments.lab import grokking as grok


def test_split_covers_every_pair_once_with_the_right_answers():
    (x_train, y_train), (x_test, y_test) = grok.split(23, 0.3, seed=0)
    assert len(y_train) == round(0.3 * 23 * 23) and len(y_train) + len(y_test) == 23 * 23
    pairs = {tuple(r[:2]) for r in torch.cat([x_train, x_test]).tolist()}
    assert len(pairs) == 23 * 23  # disjoint and complete
    both = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    assert torch.equal(both[1], (both[0][:, 0] + both[0][:, 1]) % 23) and (both[0][:, 2] == 23).all()
    assert not torch.equal(grok.split(23, 0.3, seed=1)[0][0], x_train)  # the seed picks the split


def test_verdict_needs_both_to_reach_99_percent_with_test_5x_later():
    steps = [10 * 2 ** i for i in range(10)]  # 10 .. 5120
    train = [0.3, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # 99 % at step 40
    grokked = [0.0, 0.05, 0.1, 0.1, 0.1, 0.2, 0.995, 1.0, 1.0, 1.0]  # 99 % at step 640: 16x
    together = [0.2, 0.85, 0.995, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # generalises as it learns
    never = [0.0, 0.05, 0.1, 0.1, 0.1, 0.2, 0.3, 0.5, 0.9, 0.97]
    clear = grok.judge(steps, train, grokked)
    assert clear["appeared"] and clear["value"] | {} == {"train_step": 40, "test_step": 640, "ratio": 16.0,
                                                        "max_test_accuracy": 1.0, "max_train_accuracy": 1.0}
    assert not grok.judge(steps, train, together)["appeared"]
    no_test = grok.judge(steps, train, never)
    assert not no_test["appeared"] and no_test["value"]["test_step"] is None and "97.0%" in no_test["reading"]
    assert not grok.judge(steps, [0.5] * 10, [0.5] * 10)["appeared"]


def test_quick_run_writes_the_report_through_the_cli(tmp_path):
    out = tmp_path / "out"
    assert main(["lab", "grokking", "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
                 "--threads", "1", "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"grokking.json", "grokking.md", "grokking.png"}
    summary = json.loads((out / "grokking.json").read_text())
    c = summary["curves"]
    assert summary["size"]["p"] == 23 and c["step"] == list(range(10, 401, 10))
    assert summary["verdict"] == grok.judge(c["step"], c["train_accuracy"], c["test_accuracy"])
    assert summary["verdict"]["value"]["train_step"] is not None  # the full-batch model memorises 50 % of 23^2
    assert summary["train_examples"] + summary["test_examples"] == 23 * 23
    # The first half of grokking: the training set is memorised well ahead of the test set.
    assert c["train_accuracy"][-1] - c["test_accuracy"][-1] > 0.2
    assert len(c["weight_norm"]) == len(c["step"]) and min(c["weight_norm"]) > 0
