"""Weights at inference (lmlab.models.quantize, the GGUF loader's quantized path): each kernel path against the
float32 reference on the same numbers.

Tolerances, and why: the int8/int4 kernels take bfloat16 activations (8 significant bits, a relative rounding of
at most 2^-9 per element) and bfloat16 scales, so a layer's output differs from the float32 product of the same
dequantized weights by about 1e-2 relative to its size; whole-model logits of a tiny model stay within a few
percent of their spread. Quantization itself (float -> int4) is bounded by half a step per weight."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models.gguf import load_gguf, q4_blocks, q4_k_blocks, read_gguf
from lmlab.models.quantize import (InferenceSettings, Int4Linear, Int8ActivationLinear, Int8Linear, compute_dtype,
                                   int8_activations, is_quantized, prepare_model, quantize_model)
from lmlab.models.transformer import Transformer, TransformerConfig
from tests.test_pretrained import _tiny_llama, byte_bpe, write_gguf  # noqa: F401 - byte_bpe is a fixture

Q = gguf.GGMLQuantizationType


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("rows", [48, 65])  # 65: not a multiple of the kernel's 16-row tiles (a char vocabulary)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_is_its_dequantized_weight(rows, group):
    torch.manual_seed(0)
    w, x = torch.randn(rows, 256), torch.randn(5, 3, 256)
    layer = Int4Linear.from_float(w, group)
    deq = layer.dequantized()
    # Rounding to 16 levels per group: at most half a step, (max - min) / 30, from the original weight.
    step = (w.reshape(rows, -1, group).amax(-1) - w.reshape(rows, -1, group).amin(-1)) / 15
    assert ((deq - w).abs().reshape(rows, -1, group) <= step[..., None] * 0.51 + 1e-2).all()
    y = layer(x)
    assert y.shape == (5, 3, rows) and y.dtype == torch.float32
    assert _relative(y, x @ deq.t()) < 2e-2
    assert _relative(layer(x.bfloat16()), x @ deq.t()) < 2e-2


def test_int8_linear_is_its_dequantized_weight():
    torch.manual_seed(0)
    w, x, b = torch.randn(70, 96), torch.randn(4, 96), torch.randn(70)
    layer = Int8Linear.from_float(w, bias=b)
    assert ((layer.dequantized() - w).abs() <= w.abs().amax(1, keepdim=True) / 254 * 1.01).all()
    assert _relative(layer(x), x @ layer.dequantized().t() + b) < 2e-2


@pytest.mark.parametrize("rows,group", [(192, 32), (65, 64), (128, 128)])  # 65: the kernel's short tail block
def test_int4_bf16_weight_is_the_kernels_own_dequantization(rows, group):
    """The prefill path's bf16 weight, unpacked from the kernel's packing, equals bit for bit what the kernel
    multiplies by (its product with the identity)."""
    torch.manual_seed(0)
    layer = Int4Linear.from_float(torch.randn(rows, 256), group)
    assert torch.equal(layer.bf16_weight()[:, :rows].t().float(), layer.dequantized())


@pytest.mark.parametrize("make", [lambda w: Int4Linear.from_float(w, 32), Int8Linear.from_float],
                         ids=["int4", "int8"])
def test_prefill_rows_go_through_bf16_against_float32(make):
    """Many rows (a prefill) take the dequantize + bf16 GEMM path, few rows (decoding) the kernel; both give the
    float32 product of the same dequantized weight within bf16 rounding (activations and, for the GEMM, the
    weight: 2^-9 relative each), and agree with each other."""
    torch.manual_seed(0)
    layer = make(torch.randn(192, 256))
    x = torch.randn(2, max(Int4Linear.BF16_FROM_ROWS, Int8Linear.BF16_FROM_ROWS), 256)
    reference = x @ layer.dequantized().t()
    with torch.inference_mode():
        prefill = layer(x)
        decode = torch.cat([layer(x[:, i:i + 1]) for i in range(x.shape[1])], 1)  # one row at a time: the kernel
    assert _relative(prefill, reference) < 1e-2 and _relative(decode, reference) < 1e-2
    assert _relative(prefill, decode) < 1e-2


def test_int4_width_not_divisible_by_the_group_is_one_line():
    with pytest.raises(LmlabError, match="divisible"):
        Int4Linear.from_float(torch.randn(16, 48), 32)


def _tiny(seed=0) -> Transformer:
    torch.manual_seed(seed)
    c = TransformerConfig(vocab_size=80, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          intermediate_size=128, bias=False, norm="rmsnorm", position="rope", mlp="swiglu")
    return Transformer(c).eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_model_against_float32_on_the_same_weights(mode, dtype):
    """The quantized model and a float32 model holding its dequantized weights: the same function up to the
    bf16 rounding of activations."""
    model = _tiny()
    quantized = prepare_model(_tiny(), InferenceSettings(dtype=dtype, quantize=mode))
    assert is_quantized(quantized) and quantized.tok_emb.weight.dtype == getattr(torch, dtype)
    assert quantized.lm_head.__class__ is Int8Linear  # the head stays 8-bit under int4 too
    for name, module in quantized.named_modules():
        if isinstance(module, (Int4Linear, Int8Linear)):
            model.get_submodule(name).weight = torch.nn.Parameter(module.dequantized())
    idx = torch.randint(0, 80, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, _ = model(idx)
        got, _ = quantized(idx)
    assert got.dtype == getattr(torch, dtype)
    assert _relative(got, ref) < 5e-2


def test_quantize_on_load_keeps_greedy_decoding_consistent():
    """Prefill + cached decoding through the quantized layers gives the logits of one full forward pass."""
    from lmlab.models.transformer import KVCache

    model = quantize_model(_tiny().to(torch.bfloat16), "int4")
    idx = torch.randint(0, 80, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full, _ = model(idx)
        cache = KVCache(model.config, 1, 20, dtype=torch.bfloat16)
        first, _ = model(idx[:, :12], cache=cache)
        steps = [model(idx[:, i:i + 1], cache=cache)[0] for i in range(12, 20)]
    stepped = torch.cat([first, *steps], dim=1)
    assert _relative(stepped, full) < 3e-2


needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="int8 activations run on PyTorch's fbgemm engine (x86 builds)")


@needs_fbgemm
def test_int8_activation_linear_against_float32():
    """Activations rounded to 8 bits per call (one scale over the call's rows): within a few percent of the float32
    product of the layer's own int8 weight; bias and leading dimensions as nn.Linear."""
    torch.manual_seed(0)
    w, b, x = torch.randn(70, 96) * 0.02, torch.randn(70), torch.randn(2, 3, 96)
    layer = Int8ActivationLinear(w, b)
    ref = x @ Int8Linear.from_float(w).dequantized().t() + b
    y = layer(x)
    assert y.shape == (2, 3, 70) and y.dtype == torch.float32
    assert _relative(y, ref) < 3e-2
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@needs_fbgemm
def test_int8_activations_switch_keeps_the_quantized_models_function():
    """int8_activations swaps every int4/int8 layer (the head included) and the model computes what it did, up to
    the activations' 8-bit rounding; cached decoding through the swapped layers equals one full pass."""
    from lmlab.models.transformer import KVCache

    model = prepare_model(_tiny(), InferenceSettings(dtype="bfloat16", quantize="int4"))
    idx = torch.randint(0, 80, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before, _ = model(idx)
        layers = sum(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules())
        assert int8_activations(model) == layers == 2 * 4 + 1  # qkv, out, gate+up, down per block; the head
        assert not is_quantized(model) and isinstance(model.lm_head, Int8ActivationLinear)
        after, _ = model(idx)
        cache = KVCache(model.config, 1, 24, dtype=torch.bfloat16)
        first, _ = model(idx[:, :16], cache=cache)
        steps = [model(idx[:, i:i + 1], cache=cache)[0] for i in range(16, 24)]
    assert _relative(after, before) < 5e-2
    assert _relative(torch.cat([first, *steps], dim=1), after) < 3e-2


@needs_fbgemm
def test_int8_activations_on_the_head_alone():
    """head_only swaps the LM head and nothing else; the logits stay within the 8-bit rounding of its input."""
    model = prepare_model(_tiny(), InferenceSettings(dtype="bfloat16", quantize="int4"))
    idx = torch.randint(0, 80, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before, _ = model(idx)
        assert int8_activations(model, head_only=True) == 1
        assert isinstance(model.lm_head, Int8ActivationLinear)
        assert isinstance(model.blocks[0].mlp.proj, Int4Linear)
        after, _ = model(idx)
    assert _relative(after, before) < 5e-2


def test_int8_activations_without_fbgemm_is_one_line(monkeypatch):
    import lmlab.models.quantize as quantize

    monkeypatch.setattr(quantize, "quantized_engines", lambda: ["qnnpack"])
    with pytest.raises(LmlabError, match="fbgemm engine"):
        int8_activations(quantize_model(_tiny(), "int4"))


def test_compiled_decoding_step_against_eager():
    """--compile: the torch.compile'd one-token step gives eager's logits step after step, for left-padded rows
    (positions and key masks), as the cache grows (its writes land in place), without recompiling for each new
    cache length; decode_steps uses it. Traced with aot_eager (the graph capture and functionalization that
    inductor compiles: seconds, where inductor's C++ takes minutes here); bench/decode_throughput.py --compile
    checks inductor's greedy tokens on SmolLM2."""
    from lmlab.models.quantize import compile_decoding
    from lmlab.inference.generate import SamplingParams, decode_steps, left_pad
    from lmlab.models.compiled import decoding_forward
    from lmlab.models.transformer import KVCache

    eager = prepare_model(_tiny(), InferenceSettings(dtype="bfloat16", quantize="int4"))
    compiled = prepare_model(_tiny(), InferenceSettings(dtype="bfloat16", quantize="int4"))
    compile_decoding(compiled, backend="aot_eager")
    assert decoding_forward(eager) is eager and decoding_forward(compiled) is not compiled
    prompts = [[3, 9, 27, 4, 50, 11, 7], [8, 1, 60]]
    ids, positions, key_mask = left_pad(prompts, "cpu")
    caches = [KVCache(m.config, 2, 20, dtype=torch.bfloat16) for m in (eager, compiled)]
    key_mask = torch.cat([key_mask, torch.ones(2, 13, dtype=torch.bool)], 1)
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        nxt = [m(ids, cache=c, positions=positions, key_mask=key_mask[:, :7], last_only=True)[0]
               for m, c in zip((eager, compiled), caches)][0].argmax(-1)
        for _ in range(6):
            positions = positions[:, -1:] + 1
            want, _ = eager(nxt, cache=caches[0], positions=positions, key_mask=key_mask[:, :caches[0].length + 1])
            got, _ = decoding_forward(compiled)(nxt, cache=caches[1], positions=positions,
                                                key_mask=key_mask[:, :caches[1].length + 1])
            assert _relative(got, want) < 2e-2
            nxt = want[:, -1:].argmax(-1)
    assert caches[1].length == caches[0].length == 13
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # not one per cache length
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_at_eos=False)
    plan, steps = compiled.__dict__["decoding"], []
    real = plan.forward
    plan.forward = lambda *args, **kwargs: steps.append(1) or real(*args, **kwargs)
    assert len(list(decode_steps(compiled, prompts, params))) == 5
    assert len(steps) == 4  # every step after the (eager) prefill


def test_compute_dtype_auto_follows_the_cpu(monkeypatch, capsys):
    from lmlab.models import quantize

    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: False)
    assert compute_dtype("auto") == torch.float32
    assert compute_dtype("bfloat16") == torch.float32  # not native: a notice, and float32
    assert "no native bfloat16" in capsys.readouterr().err
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: True)
    assert compute_dtype("auto") == torch.bfloat16 and compute_dtype("float32") == torch.float32


def test_bad_settings_are_one_line():
    with pytest.raises(LmlabError, match="--group-size 48"):
        InferenceSettings(group_size=48).validate()
    with pytest.raises(LmlabError, match="CPU kernels"):
        prepare_model(_tiny(), InferenceSettings(quantize="int4"), device="meta")


# ----------------------------------------------------------------------------------------------------------------
# GGUF: the file's own blocks kept as they are


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_blocks_are_the_files_numbers(tmp_path, byte_bpe, qtype):  # noqa: F811
    """Q4 blocks unpacked into Int4Linear's terms give what gguf's own dequantize gives (scales to bf16)."""
    path = write_gguf(tmp_path / "q4.gguf", _tiny_llama(True, vocab=byte_bpe.get_vocab_size()), byte_bpe,
                      qtype=qtype)
    t = next(t for t in read_gguf(path).tensors if t.name == "blk.0.ffn_up.weight")
    q, scale, zero = q4_blocks(t)
    rows, cols = q.shape
    ours = ((q.float() - 8).reshape(rows, -1, 32) * scale[..., None] + zero[..., None]).reshape(rows, cols)
    theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(rows, cols)
    assert torch.allclose(ours, theirs, atol=1e-6)
    layer = Int4Linear(q, scale, zero)
    assert _relative(layer.dequantized(), theirs) < 1e-2  # bf16 scale and zero: 2^-9 relative each


def _q4_k_bytes(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks of a float (rows, cols) matrix, written as llama.cpp's block_q4_K lays them out (an encoder
    written here from ggml's struct: d, dmin, 12 bytes of packed 6-bit scales and mins, 4 runs of 32 bytes)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // 256, 8, 32).astype(np.float32)
    low, high = np.minimum(g.min(-1), 0), g.max(-1)
    step = (high - low) / 15
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = ((-low).max(-1) / 63).astype(np.float16)
    sc = np.clip(np.round(step / np.maximum(d.astype(np.float32), 1e-8)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-low / np.maximum(dmin.astype(np.float32), 1e-8)[..., None]), 0, 63).astype(np.uint8)
    scale, mins = d.astype(np.float32)[..., None] * sc, dmin.astype(np.float32)[..., None] * m
    q = np.clip(np.round((g + mins[..., None]) / np.maximum(scale, 1e-8)[..., None]), 0, 15).astype(np.uint8)
    packed = np.concatenate([(sc[..., :4] & 63) | (sc[..., 4:] >> 4) << 6, (m[..., :4] & 63) | (m[..., 4:] >> 4) << 6,
                             (sc[..., 4:] & 15) | (m[..., 4:] & 15) << 4], -1)
    qs = (q[:, :, 0::2] | q[:, :, 1::2] << 4).reshape(rows, -1, 128)
    return np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), packed, qs],
                          -1).reshape(rows, -1)


@pytest.fixture
def q4_k_file(tmp_path, byte_bpe, monkeypatch):  # noqa: F811
    """A Llama GGUF whose matrices are Q4_K (widths of 256: a K-quant super-block) and norms F32."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=byte_bpe.get_vocab_size(), hidden_size=256, intermediate_size=256,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None,
                                      eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    encode = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", lambda a, qtype: _q4_k_bytes(a) if qtype == Q.Q4_K
                        else encode(a, qtype))
    return write_gguf(tmp_path / "q4_k.gguf", model, byte_bpe, qtype=Q.Q4_K)


def test_q4_k_blocks_are_the_files_numbers(q4_k_file):
    """Q4_K super-blocks unpacked into int4 groups of 32 give gguf's own dequantization of the same tensor
    (float32, to rounding: (q - 8) * scale + zero is d * sc * q - dmin * m regrouped); the Int4Linear built
    from them holds those numbers up to the bf16 rounding of scale and zero (2^-9 relative each)."""
    for t in read_gguf(q4_k_file).tensors:
        if t.tensor_type != Q.Q4_K:
            continue
        q, scale, zero = q4_k_blocks(t)
        rows, cols = q.shape
        ours = ((q.float() - 8).reshape(rows, -1, 32) * scale[..., None] + zero[..., None]).reshape(rows, cols)
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(rows, cols)
        assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max(), t.name
        assert _relative(Int4Linear(q, scale, zero).dequantized(), theirs) < 1e-2


def test_q4_k_gguf_kept_as_int4_against_its_dequantized_load(q4_k_file):
    """--quantize auto keeps Q4_K matrices as int4 (the head as int8); logits within the kernels' bf16 rounding
    of the float32 load of the same file."""
    reference, _, _ = load_gguf(q4_k_file)
    kept, _, _ = load_gguf(q4_k_file, InferenceSettings(dtype="float32", quantize="auto"))
    assert isinstance(kept.blocks[0].attn.qkv, Int4Linear) and isinstance(kept.blocks[0].mlp.proj, Int4Linear)
    assert isinstance(kept.lm_head, Int8Linear)
    idx = torch.randint(0, reference.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, _ = reference(idx)
        got, _ = kept(idx)
    assert _relative(got, ref) < 3e-2


@pytest.mark.parametrize("qtype,kind", [(Q.Q4_1, Int4Linear), (Q.Q4_0, Int4Linear), (Q.Q8_0, Int8Linear)])
def test_gguf_kept_quantized_against_its_dequantized_load(tmp_path, byte_bpe, qtype, kind):  # noqa: F811
    """--quantize auto keeps Q4_0/Q4_1 as int4 and Q8_0 as int8; the logits match the float32 load of the same
    file (gguf's dequantize, the reference) within the kernels' bf16 rounding, and greedy next tokens agree."""
    path = write_gguf(tmp_path / "q.gguf", _tiny_llama(False, vocab=byte_bpe.get_vocab_size()), byte_bpe,
                      qtype=qtype)
    reference, _, _ = load_gguf(path)
    kept, _, _ = load_gguf(path, InferenceSettings(dtype="float32", quantize="auto"))
    assert isinstance(kept.blocks[0].attn.qkv, kind) and isinstance(kept.blocks[1].mlp.proj, kind)
    idx = torch.randint(0, reference.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, _ = reference(idx)
        got, _ = kept(idx)
    assert _relative(got, ref) < 3e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_gguf_type_that_cannot_stay_quantized(tmp_path, byte_bpe, capsys):  # noqa: F811
    """Q5_0: auto dequantizes it with a one-line notice; --quantize int4 asked for explicitly refuses."""
    path = write_gguf(tmp_path / "q5.gguf", _tiny_llama(True, vocab=byte_bpe.get_vocab_size()), byte_bpe,
                      qtype=Q.Q5_0)
    model, _, _ = load_gguf(path, InferenceSettings(dtype="float32", quantize="auto"))
    assert not isinstance(model.blocks[0].attn.qkv, (Int4Linear, Int8Linear))
    assert "Q5_0 weights cannot be kept quantized" in capsys.readouterr().err
    with pytest.raises(LmlabError, match="stored as Q5_0.*cannot keep as int4"):
        load_gguf(path, InferenceSettings(quantize="int4"))
    int8, _, _ = load_gguf(path, InferenceSettings(dtype="float32", quantize="int8"))  # 5 -> 8 bits is allowed
    assert isinstance(int8.blocks[0].attn.qkv, Int8Linear)


@pytest.mark.parametrize("mode,head", [("int4", False), ("int8", False), ("int4", True)])
def test_quantized_linear_from_slices_is_the_whole_weights(mode, head):
    """A big matrix quantized slice by slice into place (the GGUF loader's path) holds the same numbers as the
    whole matrix quantized at once; slices that do not add up to out_features are refused."""
    from lmlab.models.quantize import quantized_linear

    torch.manual_seed(0)
    w = torch.randn(100, 64)
    whole = quantized_linear(w, mode, head=head)
    sliced = quantized_linear(iter(w.split(32)), mode, head=head, out_features=100)
    assert type(sliced) is type(whole) and sliced.out_features == 100
    assert all(torch.equal(a, b) for a, b in zip(whole.buffers(), sliced.buffers()))
    with pytest.raises(ValueError, match="out_features=101"):
        quantized_linear(iter(w.split(32)), mode, head=head, out_features=101)
    with pytest.raises(TypeError, match="out_features"):
        quantized_linear(iter(w.split(32)), mode, head=head)


PEAK_PROBE = """
import json, resource, sys, torch
torch.set_num_threads(1)
from lmlab.models.hub import load_pretrained
from lmlab.models.quantize import InferenceSettings, weight_bytes
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
pre = load_pretrained(sys.argv[1], inference=InferenceSettings(dtype="bfloat16", quantize="auto", compile="off"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"runtime_mb": runtime, "peak_mb": peak, "weights_mb": weight_bytes(pre.model) / 2**20}))
"""


def test_smollm2_int4_load_peak_memory_within_goal(smollm_path):
    """Issue 28: a fresh process's peak resident memory while it loads SmolLM2's Q4_1 file as int4 is at most 1.5x
    the loaded weights plus the runtime's own (torch and lmlab imported). 657 MB against a 549 MB limit before the
    loader dropped the GGUF reader whole, quantized the head into place next to the embedding and dropped the
    mapped file's pages as it went (docs/results/quantized-inference/README.md)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(smollm_path)], capture_output=True, text=True,
                          check=True)
    r = json.loads(done.stdout.splitlines()[-1])
    assert 140 < r["weights_mb"] < 150  # int4 blocks and the int8 head, as loaded
    assert r["peak_mb"] <= 1.5 * r["weights_mb"] + r["runtime_mb"], r


def test_smollm2_q4_1_kept_as_int4_against_float32(smollm, smollm_path):
    """The registry's Q4_1 file as shipped (int4 blocks, Q8_0 head as int8, bf16 compute) against its float32
    dequantized load: next-token logits over a real prompt within 3 % of their range, the same greedy tokens."""
    from lmlab.models.hub import load_pretrained

    prompt = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
    ids = torch.tensor([smollm.tokenizer.encode(prompt).ids])
    with torch.inference_mode():
        ref, _ = smollm.model(ids)
        kept = load_pretrained(smollm_path, inference=InferenceSettings(dtype="bfloat16", quantize="auto"))
        got, _ = kept.model(ids)
    assert isinstance(kept.model.blocks[0].mlp.fc, Int4Linear) and isinstance(kept.model.lm_head, Int8Linear)
    assert _relative(got, ref) < 5e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert got[0, -1].argmax() == ref[0, -1].argmax()


def test_readme_greedy_chat_example_unchanged_by_the_default_formats(smollm, smollm_path):
    """The README's greedy example (lmlab generate --chat --prompt "What is the capital of France?"
    --temperature 0) answers the same with the command line's defaults (--dtype auto --quantize auto: here the
    file's int4 blocks and bf16) as in float32. (The dequantized model cast to bf16 does not: its first token
    differs, fp32's top two being close; see the README.)"""
    from lmlab.inference.generate import SamplingParams, generate
    from lmlab.models.hub import load_pretrained

    default = load_pretrained(smollm_path, inference=InferenceSettings())
    answers = []
    for pre in (smollm, default):
        ids = pre.tokenizer.encode(pre.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]),
                                   add_special_tokens=False).ids
        answers.append(generate(pre.model, pre.tokenizer, [ids], SamplingParams(max_new_tokens=24, temperature=0),
                                eos_ids=pre.eos_ids)[0].text)
    assert answers[0] == answers[1] and "Paris" in answers[0]
