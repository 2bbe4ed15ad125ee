"""bench/int8_act_matvec.py times like with like: on a tiny layer, every path it can run here computes the product
of its own weight within int8 rounding of the float32 product (an independent reference), and the symmetric int4
weight it hands torch's _dyn_quant_matmul_4bit is the weight that op multiplies by."""

import importlib
from pathlib import Path

import pytest
import torch

from lmlab.models.quantize import Int4Linear

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("int8_act_matvec")


@pytest.mark.parametrize("rows", [1, 8])
def test_every_runnable_path_multiplies_by_its_own_weight(bench, rows):
    torch.manual_seed(0)
    in_features, out_features = 64, 96
    layer4 = Int4Linear.from_float(torch.randn(out_features, in_features) * 0.02, 32)
    # dequantized() is a transposed view: the bench must not hand such a weight's strides to a prepacking op
    weight = layer4.dequantized()
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    paths = bench.candidates(layer4, weight, rows)
    ran = {name: path for name, path in paths.items() if not isinstance(path, str)}
    assert {"int4 (today)", "int8 w (today)", "int_mm"} <= set(ran), paths
    for name, (fn, own_weight) in ran.items():
        with torch.inference_mode():
            y = fn(x).float()
        ref = x.float() @ own_weight.t()
        assert y.shape == ref.shape, name
        # int8 activations: a rounding step of 1/127 of the row's (or tensor's) largest value, bf16 output
        assert (y - ref).abs().max() <= 0.03 * ref.abs().max(), name


def test_symmetric_int4_packing_is_what_the_op_reads(bench):
    torch.manual_seed(1)
    weight = torch.randn(48, 64)
    packed, scale, dequant = bench.symmetric_int4(weight, 32)
    q = torch.stack([packed & 0x0F, packed >> 4], -1).reshape(48, 64).float() - 8
    assert torch.equal(q.reshape(48, 2, 32) * scale.float()[..., None], dequant.reshape(48, 2, 32))
    # one rounding step of each group's scale at most
    assert ((dequant - weight).abs().reshape(48, 2, 32) <= scale.float()[..., None] * 0.5 + 1e-6).all()
