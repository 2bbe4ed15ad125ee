"""bench/peft_vs_hf.py compares like with like: on a tiny Llama made in code, its transformers + peft model computes
lmlab's LoRA model's loss (same weights, same LoRA function, same targets), and at step 0 both of its timed steps
report the same loss in each precision."""

import copy
import importlib
import tempfile
from pathlib import Path

import pytest
import torch

from lmlab.models.peft import LoraConfig, add_lora
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training.examples import IGNORE

pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench imports its sibling scripts, as when run from bench/
    return importlib.import_module("peft_vs_hf")


def _tiny_llama() -> Transformer:
    config = TransformerConfig(vocab_size=97, block_size=32, n_layer=2, n_head=8, n_kv_head=2, n_embd=64,
                               intermediate_size=96, bias=False, norm="rmsnorm", position="rope", mlp="swiglu",
                               activation="silu", tie_embeddings=True)
    torch.manual_seed(0)
    return Transformer(config)


def _batch() -> dict:
    """Three rows: prompt targets -100, a response, right padding -100 (as collate makes them)."""
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 97, (3, 20), generator=g)
    targets = torch.randint(0, 97, (3, 20), generator=g)
    for row, (prompt, end) in enumerate([(5, 20), (8, 16), (2, 11)]):
        targets[row, :prompt] = IGNORE
        targets[row, end:] = IGNORE
    return {"inputs": inputs, "targets": targets}


def test_peft_model_computes_lmlabs_lora_function(bench, tmp_path):
    """With non-zero B (a trained LoRA), peft on the mapped projections gives lmlab's loss: the fused qkv / fc
    LoRA is the per-projection LoRA with a shared A and B split by rows, at the same scale."""
    base = _tiny_llama()
    ours = copy.deepcopy(base)
    lora = LoraConfig()
    add_lora(ours, lora.targets, lora.r, lora.alpha, lora.dropout)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    from lmlab.models.hf import export_hf
    export_hf(base, tmp_path)
    theirs, mapping = bench.peft_model(ours, tmp_path, lora)
    assert mapping == {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                       "attn.proj": ["self_attn.o_proj"], "mlp.fc": ["mlp.gate_proj", "mlp.up_proj"],
                       "mlp.proj": ["mlp.down_proj"]}
    batch = _batch()
    with torch.no_grad():
        lmlab_loss = ours.eval()(batch["inputs"], batch["targets"], loss_only=True)[1]
        base_loss = base.eval()(batch["inputs"], batch["targets"], loss_only=True)[1]
        peft_loss = theirs.eval()(input_ids=batch["inputs"], labels=batch["targets"],
                                  shift_labels=batch["targets"], use_cache=False).loss
    assert abs(float(lmlab_loss) - float(base_loss)) > 1e-2  # the LoRA update matters here
    assert float(peft_loss) == pytest.approx(float(lmlab_loss), abs=1e-5)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_both_timed_steps_start_from_the_same_loss(bench, precision, tolerance):
    base = _tiny_llama()
    batch = _batch()
    steps, facts = bench.contenders(base, batch, precision, compiled=False)
    losses = {name: float(step()) for name, step in steps.items()}
    assert set(losses) == {"lmlab", "transformers+peft"}
    # Independent reference: the untouched base model's loss (LoRA's B starts at zero) in fp32.
    with torch.no_grad():
        reference = float(base.eval()(batch["inputs"], batch["targets"], loss_only=True)[1])
    for name, loss in losses.items():
        assert loss == pytest.approx(reference, abs=tolerance), name
    # A fused layer has one A for its parts, peft one per part: peft trains more, by the extra A matrices.
    c, r = base.config, LoraConfig().r
    extra_a = c.n_layer * r * c.n_embd * (2 + 1)  # k_proj and v_proj's own A, up_proj's own A
    assert facts["trainable_parameters"]["transformers+peft"] == facts["trainable_parameters"]["lmlab"] + extra_a
