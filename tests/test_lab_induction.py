"""Experiment 3 (lmlab lab induction): the attention-only switch of the shared block, the measurements (prefix
matching, the key->value prompts, the data generator), the verdict on phenomenon-free and clear curves, and a
--quick run's files."""

import json
import math

import torch
import torch.nn.functional as F

from lmlab.cli import main
from lmlab.experiments.lab import induction as ind
from lmlab.models.transformer import Transformer, TransformerConfig


def tiny(mlp: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, mlp=mlp, **kw))


def test_attention_only_switch_removes_the_mlp_and_its_norm():
    with_mlp, attention_only = tiny("gelu"), tiny("none")
    block = with_mlp.blocks[0]
    removed = sum(p.numel() for p in block.mlp.parameters()) + sum(p.numel() for p in block.norm2.parameters())
    assert removed == (8 * 32 + 32) + (32 * 8 + 8) + 2 * 8  # fc, proj (with biases), norm2 (weight, bias)
    assert with_mlp.num_params() - attention_only.num_params() == removed
    assert attention_only.blocks[0].mlp is None
    assert not any("mlp" in name or "norm2" in name for name, _ in attention_only.named_parameters())


def test_attention_only_output_is_attention_arithmetic_by_hand():
    model = tiny("none").eval()
    idx = torch.tensor([[3, 1, 4, 1, 5, 9]])
    T, block = idx.shape[1], model.blocks[0]
    x = model.tok_emb.weight[idx[0]] + model.pos_emb.weight[:T]  # (T, C)
    h = F.layer_norm(x, (8,), block.norm1.weight, block.norm1.bias, 1e-5)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(8, dim=-1)
    heads = []
    for head in range(2):  # 2 heads of width 4, causal softmax(q k^T / sqrt(4)) v
        s = slice(4 * head, 4 * head + 4)
        scores = q[:, s] @ k[:, s].T / 2.0
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, s])
    x = x + torch.cat(heads, -1) @ block.attn.proj.weight.T + block.attn.proj.bias  # no MLP after it
    logits = F.layer_norm(x, (8,), model.norm_f.weight, model.norm_f.bias, 1e-5) @ model.tok_emb.weight.T
    with torch.no_grad():
        ours, _ = model(idx)
    assert torch.allclose(ours[0], logits, atol=1e-5)
    with torch.no_grad():  # the same weights with an MLP give another output: the comparison can fail
        assert not torch.allclose(tiny("gelu").eval()(idx)[0][0], logits, atol=1e-3)


def test_repeated_runs_repeat_a_run_of_the_stated_length():
    size = ind.Size(context=64, vocab_size=50)
    seqs = ind.repeated_runs(200, size, torch.Generator().manual_seed(0))
    assert seqs.shape == (200, 65) and seqs.max() < 50
    for s in seqs:
        period = next(L for L in range(8, 17) if torch.equal(s[L:], s[:-L]))  # the run length, 64/8 .. 64/4
        assert 8 <= period <= 16
    early, late = ind.positions(size)
    assert (early, late) == (4, 57) and early < 8


def test_prefix_matching_scores_attention_to_the_token_after_an_earlier_occurrence():
    idx = torch.tensor([[5, 6, 7, 5, 6, 7]])
    perfect = torch.zeros(1, 1, 6, 6)
    for i, j in ((3, 1), (4, 2), (5, 3)):  # the token after the earlier 5, 6, 7
        perfect[0, 0, i, j] = 1.0
    uniform = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]
    scores = ind.prefix_matching([perfect, uniform[None, None]], idx)
    assert scores[0] == [1.0]
    assert math.isclose(scores[1][0], (1 / 4 + 1 / 5 + 1 / 6) / 3, abs_tol=1e-4)


def test_key_value_prompts_hold_the_answer_after_the_query_key():
    size = ind.Size(vocab_size=40)
    prompts, answers = ind.key_value_prompts(4, 100, size, torch.Generator().manual_seed(1))
    assert prompts.shape == (100, 9)
    for p, a in zip(prompts.tolist(), answers.tolist()):
        keys, values = p[0:8:2], p[1:8:2]
        assert len(set(keys)) == 4 and p[-1] in keys and values[keys.index(p[-1])] == a
    zero, _ = ind.key_value_prompts(0, 10, size, torch.Generator().manual_seed(1))
    assert zero.shape == (10, 1)


def _shots(zero: float, most: float, n: int = 500) -> dict:
    se = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731
    return {"0": {"accuracy": zero, "se": se(zero)}, "8": {"accuracy": most, "se": se(most)}}


def test_verdict_is_negative_without_a_phase_change_and_positive_on_a_clear_one():
    steps = list(range(0, 1001, 20))
    jump = [0.0 if s < 400 else -6.0 if s > 460 else -0.1 * (s - 400) for s in steps]  # plateau, then a fall
    gradual = [-6.0 * s / 1000 for s in steps]  # a steady decline over the whole run
    fast_start = [-6.0 * (1 - math.exp(-s / 40)) for s in steps]  # an ordinary, fast learning curve
    flat = [0.0 for _ in steps]
    shots_ok = {"2-layer": _shots(0.01, 0.95), "1-layer": _shots(0.01, 0.06)}
    clear = ind.judge({"2-layer": {"step": steps, "icl_score": jump}}, shots_ok, 1000)
    assert clear["appeared"] and clear["value"]["phase_change"]["window"] <= 200
    for curve in (gradual, fast_start, flat):
        assert not ind.judge({"2-layer": {"step": steps, "icl_score": curve}}, shots_ok, 1000)["appeared"]
    control_too = {"2-layer": _shots(0.01, 0.95), "1-layer": _shots(0.01, 0.9)}
    no_gain = {"2-layer": _shots(0.01, 0.05), "1-layer": _shots(0.01, 0.05)}
    for shots in (control_too, no_gain):
        assert not ind.judge({"2-layer": {"step": steps, "icl_score": jump}}, shots, 1000)["appeared"]


def test_quick_run_writes_the_report_through_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["lab", "induction", "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
                 "--threads", "1", "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"induction.json", "induction.md", "induction.png"}
    summary = json.loads((out / "induction.json").read_text())
    # the command that ran it: main's arguments, not the process's (pytest's, or a pytest-xdist worker's)
    assert summary["command"].startswith("lmlab lab induction --quick --out ")
    v = summary["verdict"]
    assert set(v) == {"appeared", "criterion", "value", "reading"} and isinstance(v["appeared"], bool)
    assert v == ind.judge(summary["curves"], summary["shots"], summary["size"]["steps"])
    two = summary["curves"]["2-layer"]
    assert two["step"] == list(range(20, 201, 20)) and len(two["icl_score"]) == 10
    assert {"prefix_L0H0", "prefix_L1H3"} <= set(two) and "prefix_L1H0" not in summary["curves"]["1-layer"]
    assert two["loss_early"][-1] > 3.0  # the first copy of a random run cannot be predicted (ln 64 = 4.16)
    assert set(summary["shots"]["1-layer"]) == {"0", "1", "2", "4", "8"}
    assert "Verdict" in (out / "induction.md").read_text() and "Verdict" in capsys.readouterr().out
