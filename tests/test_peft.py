"""Bottleneck adapters (lmlab/peft.py): they start as the identity, compute what Houlsby's and the parallel adapter's
equations say, train alone, work with the KV cache, save small files that load onto the same base model only, and
refuse to be merged."""

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models.transformer import KVCache, Transformer, TransformerConfig
from lmlab.models.peft import (METHODS, ParallelAdapter, SeriesAdapter, add_adapterh, add_adapterp, load_peft, merge_peft,
                        save_peft)

LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
             position="rope", mlp="swiglu", bias=False, tie_embeddings=False)
GPT2 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
BERT_LIKE = dict(GPT2, causal=False, norm_placement="post")
KINDS = pytest.mark.parametrize("kind", [LLAMA, GPT2, BERT_LIKE], ids=["llama", "gpt2", "post-norm"])
ADD = {"adapterh": lambda m: add_adapterh(m, size=8), "adapterp": lambda m: add_adapterp(m, size=8)}


def _model(kind, seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**kind)).eval()


def _randomize_adapters(model):
    """Non-zero up-projections, as after training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter.up" in name:
                p.normal_(0, 0.2)


@KINDS
@pytest.mark.parametrize("method", ["adapterh", "adapterp"])
def test_zero_init_adapters_leave_the_model_unchanged(kind, method):
    model = _model(kind)
    idx = torch.randint(97, (2, 12))
    before = model(idx)[0]
    names = ADD[method](model)
    assert names == ([f"blocks.{i}.{p}" for i in range(2) for p in ("attn", "mlp")] if method == "adapterh"
                     else ["blocks.0.mlp", "blocks.1.mlp"])
    assert torch.equal(model(idx)[0], before)


@pytest.mark.parametrize("method", ["adapterh", "adapterp"])
def test_adapted_block_computes_the_adapter_equations(method):
    """One pre-norm block written out by hand from the module's weights: Houlsby's adapter on each sublayer's
    output before the residual add (h + up(tanh(down(h)))), or the parallel one next to the MLP (from its input)."""
    model = _model(GPT2)
    ADD[method](model)
    _randomize_adapters(model)
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)

    def bottleneck(adapter, h):
        return h @ adapter.down.weight.T + adapter.down.bias

    def adapter_out(adapter, h):
        return torch.tanh(bottleneck(adapter, h)) @ adapter.up.weight.T + adapter.up.bias

    with torch.no_grad():
        attn_in = block.norm1(x)
        attn = block.attn.base(attn_in) if method == "adapterh" else block.attn(attn_in)
        if method == "adapterh":
            attn = attn + adapter_out(block.attn.adapter, attn)
        h = x + attn
        mlp_in = block.norm2(h)
        mlp = block.mlp.base(mlp_in)
        mlp = mlp + adapter_out(block.mlp.adapter, mlp if method == "adapterh" else mlp_in)
        expected = h + mlp
        assert torch.allclose(block(x), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["adapterh", "adapterp"])
def test_only_adapter_parameters_learn(method):
    model = _model(LLAMA)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ADD[method](model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    idx = torch.randint(97, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("adapter." in name), name
        opt.step()
        opt.zero_grad()
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    for name, value in frozen_before.items():
        assert torch.equal(after[name], value), name  # the base never moves
    assert any(p.abs().sum() > 0 for n, p in after.items() if "adapter.up.weight" in n)  # the adapters did


@pytest.mark.parametrize("method", ["adapterh", "adapterp"])
def test_adapters_work_with_the_kv_cache(method):
    """The wrapped sublayers pass the cache through: a cached step gives the logits of a full forward pass."""
    model = _model(LLAMA)
    ADD[method](model)
    _randomize_adapters(model)
    prompt = torch.randint(97, (1, 6))
    cache = KVCache(model.config, 1, 16)
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)
        step = model(prompt[:, -1:], cache=cache)[0][:, -1]
        full = model(prompt)[0][:, -1]
    assert torch.allclose(step, full, atol=1e-5)


@pytest.mark.parametrize("method", ["adapterh", "adapterp"])
def test_saved_adapters_load_on_top_of_the_same_base_only(method, tmp_path):
    model = _model(LLAMA)
    settings = {"size": 8}
    METHODS[method](model, **settings)
    _randomize_adapters(model)
    idx = torch.randint(97, (2, 10))
    expected = model(idx)[0]
    path = tmp_path / f"{method}.safetensors"
    save_peft(model, path, method, settings)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".adapter." in k for k in keys)  # the method's own weights only: a small file
    assert sum(model.get_parameter(k).numel() for k in keys) < 0.2 * sum(p.numel() for p in model.parameters())

    fresh = _model(LLAMA, seed=0)  # the same base weights
    load_peft(fresh, path)
    assert isinstance(fresh.blocks[0].mlp, SeriesAdapter if method == "adapterh" else ParallelAdapter)
    assert torch.equal(fresh(idx)[0], expected)

    other = _model(dict(LLAMA, n_embd=48))
    with pytest.raises(LmlabError, match="another base model"):
        load_peft(other, path)


def test_adapters_cannot_be_merged_but_lora_can():
    model = _model(LLAMA)
    add_adapterh(model, size=4)
    with pytest.raises(LmlabError, match="cannot be merged"):
        merge_peft(model, "adapterh")
    with pytest.raises(LmlabError, match="already has an adapter"):
        add_adapterp(model, size=4)
    lora = _model(LLAMA)
    METHODS["lora"](lora, targets=("qkv",), r=2, alpha=4)
    assert merge_peft(lora, "lora") == 2


def test_bad_adapter_settings_are_clear_errors():
    with pytest.raises(LmlabError, match="at least 1"):
        add_adapterh(_model(LLAMA), size=0)
    with pytest.raises(LmlabError, match="unknown adapter activation"):
        add_adapterp(_model(LLAMA), activation="sigmoid")
    with pytest.raises(LmlabError, match="after 'attn' and/or 'mlp'"):
        add_adapterh(_model(LLAMA), places=("norm1",))


@pytest.mark.parametrize("method", ["lora", "adapterh", "adapterp"])
def test_frozen_matmuls_in_bf16_give_autocast_s_products(method):
    """cast_frozen_matmuls stores what autocast would cast at every step: under bf16 autocast the logits and the
    trainable parameters' gradients are those of the fp32 model, bit for bit, while the embedding (and the head
    tied to it), the norms and every trainable parameter stay fp32."""
    from lmlab.models.peft import add_lora, cast_frozen_matmuls

    adds = {**ADD, "lora": lambda m: add_lora(m, r=4)}
    kind = {**LLAMA, "tie_embeddings": True}
    idx = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(0))
    runs = []
    for cast in (False, True):
        model = _model(kind).train()
        adds[method](model)
        _randomize_adapters(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if cast:
            assert cast_frozen_matmuls(model) == 2 * 4  # qkv, attn.proj, fc, mlp.proj; not the tied head
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        loss.backward()
        runs.append((model, logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (_, plain_logits, plain_grads), (cast_model, cast_logits, cast_grads) = runs
    assert torch.equal(plain_logits, cast_logits)
    assert plain_grads.keys() == cast_grads.keys() and plain_grads
    for name in plain_grads:
        assert torch.equal(plain_grads[name], cast_grads[name]), name
    dtypes = {n: p.dtype for n, p in cast_model.named_parameters()}
    assert dtypes["tok_emb.weight"] == dtypes["norm_f.weight"] == torch.float32
    assert all(dtypes[n] == torch.float32 for n in cast_grads)
    frozen_fc = [n for n in dtypes if ".mlp." in n and n.endswith("fc.weight") or n.endswith("fc.base.weight")]
    assert frozen_fc and all(dtypes[n] == torch.bfloat16 for n in frozen_fc), frozen_fc
