"""lmlab lab emergence: the quick run through the command line, the task and its metrics against their
definitions, and the verdict on closed-form and phenomenon-free curves."""

import json
import math

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.experiments.lab.common import Size, gpt_config
from lmlab.experiments.lab.emergence import (VOCAB, addition_pairs, addition_rows, addition_text, answer_scores,
                                             emergence_verdict, sharpness)
from lmlab.models.transformer import Transformer

SIZES = [12_768, 28_368, 56_640, 155_840, 233_680, 456_176]  # the CPU ladder's N


def test_quick_run_writes_the_report_and_the_verdict(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["lab", "emergence", "--quick", "--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1",
               "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "emergence.json").read_text())
    assert {"emergence.md", "emergence.png"} <= {p.name for p in out.iterdir()}
    assert (out / "emergence.png").stat().st_size > 10_000
    record = summary["verdict"]
    assert {"appeared", "criterion", "value", "reading"} <= set(record)
    assert "50 %" in record["criterion"]
    runs = summary["runs"]
    assert len(runs) == 6 and runs[-1]["params"] / runs[0]["params"] >= 30
    for r in runs:
        assert 0 <= r["exact_match"] <= r["token_accuracy"] <= 1 and r["answer_logprob"] < 0
        assert r["curve"][-1]["exact_match"] == r["exact_match"]
    again = emergence_verdict([r["params"] for r in runs], [r["exact_match"] for r in runs],
                              [r["token_accuracy"] for r in runs])
    assert again == record  # the verdict is the pure function of the recorded curves


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
