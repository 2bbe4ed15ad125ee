"""The training step's speed levers: the fused head + cross-entropy, and train.compile (auto | on | off).

The fused loss is checked against the unfused computation it replaces (F.linear + F.cross_entropy) on the same
inputs: the loss and both gradients, with ignored targets, several chunks, fp32 and bf16 autocast. train.compile
auto is checked against its rule, (time left) x (fraction saved) > (compile time), with a world that needs no
processes, and end to end on a tiny model through `fit` (dynamo's aot_eager backend: the tracing and the swap of
the forward are real, inductor's C++ compile is left out to keep the test fast)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.models.head_loss import linear_cross_entropy
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training import compile as train_compile
from lmlab.training.compile import StepCompiler, normalize_mode


def _unfused(hidden, weight, targets):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def _loss_and_grads(fn, hidden, weight, targets, bf16: bool):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("bf16, tol", [(False, 1e-5), (True, 2e-2)])
@pytest.mark.parametrize("chunk_rows", [7, 64, 1024])
def test_fused_head_loss_matches_the_unfused_loss_and_gradients(bf16, tol, chunk_rows):
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 50, 32), torch.randn(301, 32) * 0.3
    targets = torch.randint(0, 301, (3, 50))
    targets[0, :11] = -100  # ignored positions count for nothing, as in F.cross_entropy
    ref = _loss_and_grads(_unfused, hidden, weight, targets, bf16)
    fused = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=chunk_rows),
                            hidden, weight, targets, bf16)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), ref, fused):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = float((a - b).abs().max() / a.abs().max())
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_fused_head_loss_scales_with_the_incoming_gradient_and_has_a_no_grad_path():
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (40,))
    (3.0 * linear_cross_entropy(hidden, weight, targets, chunk_rows=9)).backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (3.0 * _unfused(h_ref, w_ref, targets)).backward()
    assert torch.allclose(hidden.grad, h_ref.grad, atol=1e-6) and torch.allclose(weight.grad, w_ref.grad, atol=1e-6)
    with torch.no_grad():
        assert torch.isclose(linear_cross_entropy(hidden, weight, targets, chunk_rows=9),
                             _unfused(hidden, weight, targets), atol=1e-6)


def test_the_models_loss_only_path_equals_its_full_logits_loss_with_a_tied_head():
    torch.manual_seed(2)
    model = Transformer(TransformerConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (3, 16))
    targets[1, :5] = -100
    _, full = model(idx, targets)
    full.backward()
    tied_grad = model.tok_emb.weight.grad.clone()
    model.zero_grad()
    _, fused = model(idx, targets, loss_only=True)
    fused.backward()
    assert torch.isclose(full, fused, atol=1e-5)
    # The tied head's gradient joins the embedding's: both paths give the embedding the same total gradient.
    assert torch.allclose(model.tok_emb.weight.grad, tied_grad, atol=1e-6)


@pytest.mark.parametrize("given, mode", [(True, "on"), (False, "off"), ("auto", "auto"), ("true", "on"),
                                         ("off", "off"), ("ON", "on")])
def test_train_compile_modes(given, mode):
    assert normalize_mode(given) == mode


def test_a_bad_train_compile_value_names_the_key_and_the_choices():
    with pytest.raises(LmlabError, match=r"train\.compile='maybe' is invalid: it must be auto, true or false"):
        normalize_mode("maybe")


class _OneProcess:
    """The part of lmlab.training.distributed.Dist that StepCompiler reads, for one process."""
    device, bf16, main = torch.device("cpu"), False, True

    @staticmethod
    def any(flag):
        return bool(flag)


def _compiler(tmp_path, monkeypatch, max_steps, time_limit=None, record=None):
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    said = []
    model = torch.nn.Linear(2, 2)
    compiler = StepCompiler("auto", model, _OneProcess(), max_steps, time_limit, say=said.append)
    if record is not None:
        compiler.folder.mkdir(parents=True)
        (compiler.folder / train_compile.RECORD).write_text(json.dumps(record))
    return compiler, said


def _probe(compiler, step_s=1.0):
    """The eager steps auto times before it decides; returns what it decided at the last one."""
    return [compiler.step_done(i, step_s, i, i * step_s) for i in range(1, train_compile.PROBE_STEPS + 2)][-1]


def test_auto_compiles_a_run_long_enough_to_repay_the_estimated_compile(tmp_path, monkeypatch):
    # 1 s a step; 90 s to compile and 30 % saved (the estimates): 300 steps left repay it (90 s), 200 do not.
    long_run, said = _compiler(tmp_path / "a", monkeypatch, max_steps=4 + 310)
    assert _probe(long_run) is True and "compiling now" in said[0] and "not yet measured" in said[0]
    short_run, said = _compiler(tmp_path / "b", monkeypatch, max_steps=4 + 200)
    assert _probe(short_run) is False and "staying eager" in said[0]
    assert str(short_run.folder).startswith(str(tmp_path / "b" / "compiled" / "train-Linear-"))


def test_auto_uses_what_the_last_compile_measured_and_the_time_limit(tmp_path, monkeypatch):
    # A warm cache compiled in 4 s last time and saved half a step: 20 steps left repay it.
    warm, said = _compiler(tmp_path / "a", monkeypatch, max_steps=4 + 20, record={"compile_s": 4.0, "saving": 0.5})
    assert _probe(warm) is True and "measured here before" in said[0]
    # The same record, but a time limit 5 s away: not worth it.
    limited, _ = _compiler(tmp_path / "b", monkeypatch, max_steps=10_000, time_limit=4 + 5,
                           record={"compile_s": 4.0, "saving": 0.5})
    assert _probe(limited) is False


def test_after_compiling_it_records_the_compile_time_and_the_saving(tmp_path, monkeypatch):
    compiler, said = _compiler(tmp_path, monkeypatch, max_steps=10_000)
    assert _probe(compiler, step_s=1.0) is True
    compiler.step_done(99, 31.0, 0, 0)  # the first compiled step carries the compile
    for _ in range(train_compile.TIMED_COMPILED_STEPS):
        compiler.step_done(99, 0.5, 0, 0)
    record = compiler.record()
    assert record["compile_s"] == pytest.approx(30.5) and record["saving"] == pytest.approx(0.5)
    assert "2.00x" in said[-1]


def test_fit_compiles_part_way_with_auto_and_keeps_training(tmp_path, monkeypatch, capsys):
    """End to end through fit: auto decides after the probe steps (the record says compiling is nearly free),
    swaps in the compiled forward, and the run finishes with a finite loss and its checkpoint."""
    from lmlab.training.config import TrainConfig
    from lmlab.training.loop import Objective, fit

    monkeypatch.setenv("LMLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled = []
    real_compile = torch.compile

    def aot_eager(module, **kw):
        compiled.append(module)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))

    class Tokens(Objective):
        tokens_per_row = 8

        def __init__(self):
            self.model = model

        def draw(self, n):
            x = torch.randint(0, 50, (n, 9))
            return {"inputs": x[:, :-1], "targets": x[:, 1:]}

        def loss(self, module, batch):
            return module(batch["inputs"], batch["targets"], loss_only=True)[1]

    t = TrainConfig(batch_size=4, micro_batch_size=4, max_steps=8, eval_interval=100, ckpt_interval=100,
                    log_interval=1, warmup_steps=1, dtype="float32", device="cpu", compile="auto")
    folder = train_compile.cache_folder(model, torch.device("cpu"), False)
    folder.mkdir(parents=True)
    (folder / train_compile.RECORD).write_text(json.dumps({"compile_s": 0.0, "saving": 0.5}))
    summary = fit(Tokens(), t, tmp_path / "run", progress=False)
    assert compiled == [model]
    assert summary["steps"] == 8 and torch.isfinite(torch.tensor(summary["train_loss"]))
    out = capsys.readouterr()
    assert "train.compile auto: compiling now" in out.out + out.err


def test_compile_on_records_its_cost_and_keeps_the_saving_measured_before(tmp_path, monkeypatch):
    """A run with train.compile on (no eager steps to compare) records what its compile cost, so that the next
    auto decision reads a warm cache's cost, and keeps the saving an earlier auto run measured."""
    compiler, said = _compiler(tmp_path, monkeypatch, max_steps=100, record={"compile_s": 80.0, "saving": 0.4})
    compiler.mode = "on"
    assert compiler.compile_first
    compiler.step_done(1, 5.5, 1, 5.5)  # the first step compiles (from a warm cache here)
    for i in range(train_compile.TIMED_COMPILED_STEPS):
        compiler.step_done(i + 2, 0.5, i + 2, 6 + i)
    record = compiler.record()
    assert record["compile_s"] == pytest.approx(5.0) and record["saving"] == pytest.approx(0.4)
    assert said[-1].startswith("train.compile: compiled in 5 s")
