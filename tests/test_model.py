"""The Transformer block against Hugging Face `transformers` on identical weights, and its config switches."""

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models.hf import export_hf, load_hf
from lmlab.models.transformer import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")


def _perturbed(config: TransformerConfig, seed: int = 0) -> Transformer:
    """A model whose biases and norm gains are not at their init values, so every parameter matters."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_export_matches_transformers_gpt2(tmp_path, activation):
    config = TransformerConfig(vocab_size=101, block_size=48, n_layer=3, n_head=4, n_embd=64, activation=activation)
    ours = _perturbed(config)
    export_hf(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        their_logits = theirs(idx).logits
    assert ours_logits.shape == their_logits.shape
    assert torch.allclose(ours_logits, their_logits, atol=1e-4, rtol=0), (ours_logits - their_logits).abs().max()


def test_loads_folder_written_by_transformers(tmp_path):
    hf_config = transformers.GPT2Config(vocab_size=77, n_positions=40, n_embd=48, n_layer=2, n_head=3,
                                        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(3)
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    idx = torch.randint(0, 77, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=0)


def test_export_round_trip_is_exact(tmp_path):
    ours = _perturbed(TransformerConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    export_hf(ours, tmp_path)
    back = load_hf(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_refuses_models_of_no_hugging_face_family(tmp_path):
    hybrid = Transformer(TransformerConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                           norm="rmsnorm", position="learned"))
    with pytest.raises(LmlabError, match="not GPT-2 shaped"):
        export_hf(hybrid, tmp_path)


LLAMA_LIKE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False)


@pytest.mark.parametrize("switches", [{}, LLAMA_LIKE, {**LLAMA_LIKE, "n_kv_head": 2}])
def test_causal_no_future_leak(switches):
    """Logits at position t depend only on tokens <= t: P(w_t | w_<t) is a conditional LM."""
    model = _perturbed(TransformerConfig(vocab_size=40, block_size=24, n_layer=2, n_head=4, n_embd=32, **switches))
    a = torch.randint(0, 40, (1, 24), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 7) % 40
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    assert torch.allclose(la[0, :12], lb[0, :12], atol=1e-6)
    assert not torch.allclose(la[0, 12:], lb[0, 12:], atol=1e-3)


def test_bidirectional_switch_sees_the_future():
    model = _perturbed(TransformerConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                         causal=False, norm_placement="post"))
    a = torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % 40
    with torch.no_grad():
        assert not torch.allclose(model(a)[0][0, 0], model(b)[0][0, 0], atol=1e-4)


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with k/v heads shared by groups of query heads = MHA whose k/v projections repeat those heads."""
    gqa = _perturbed(TransformerConfig(vocab_size=30, block_size=12, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                                       **LLAMA_LIKE))
    mha = Transformer(TransformerConfig(vocab_size=30, block_size=12, n_layer=1, n_head=4, n_embd=32, **LLAMA_LIKE))
    state = gqa.state_dict()
    hd, nh, nkv = 8, 4, 2
    w = state["blocks.0.attn.qkv.weight"]
    q, k, v = w.split([nh * hd, nkv * hd, nkv * hd])
    rep = lambda t: t.view(nkv, hd, -1).repeat_interleave(nh // nkv, dim=0).reshape(nh * hd, -1)  # noqa: E731
    state["blocks.0.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(gqa(idx)[0], mha.eval()(idx)[0], atol=1e-5)


def test_rotary_relative_positions():
    """RoPE makes q.k depend on the offset between positions only."""
    from lmlab.models.transformer import apply_rotary, rotary_tables

    cos, sin = rotary_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        return (apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()

    assert torch.allclose(score(3, 1), score(20, 18), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_gpt2_initialisation_scales_residual_projections():
    config = TransformerConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=256)
    model = Transformer(config)
    std_proj = model.blocks[0].attn.proj.weight.std().item()
    std_qkv = model.blocks[0].attn.qkv.weight.std().item()
    assert std_qkv == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert model.lm_head.weight is model.tok_emb.weight


def test_bad_config_messages():
    with pytest.raises(LmlabError, match="not divisible by n_head"):
        TransformerConfig(n_embd=100, n_head=3)
    with pytest.raises(LmlabError, match="norm='batchnorm'"):
        TransformerConfig(norm="batchnorm")
    model = Transformer(TransformerConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(LmlabError, match=r"longer than the model's context \(block_size 8\)"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_only_is_the_same_loss_and_gradients():
    """loss_only runs the head at the target positions alone: the loss and every gradient are those of the whole
    head's cross-entropy with the other positions ignored."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32))
    idx = torch.randint(97, (3, 16))
    targets = torch.where(torch.rand(3, 16) < 0.4, torch.randint(97, (3, 16)), -100)
    results = []
    for loss_only in (False, True):
        model.zero_grad()
        logits, loss = model(idx, targets, loss_only=loss_only)
        assert (logits is None) == loss_only
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
    # reduction="none": each position's cross-entropy, 0 without a target.
    with torch.no_grad():
        logits = model(idx)[0]
        per_position = model(idx, targets, loss_only=True, reduction="none")[1]
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert per_position.shape == targets.shape and torch.allclose(per_position, expected, atol=1e-5)
    assert (per_position[targets == -100] == 0).all()


def test_training_attention_kernel_choice_does_not_change_gradients(monkeypatch):
    """On the CPU, training on short sequences uses SDPA's math kernel (its backward is faster there); with the
    limit at 0 the default (flash) kernel runs. Both give the same loss and gradients."""
    from lmlab.models.transformer import Attention

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**LLAMA_LIKE, n_kv_head=2, vocab_size=97, block_size=32, n_layer=2,
                                          n_head=4, n_embd=32)).train()
    idx = torch.randint(97, (2, 24))
    results = []
    for limit in (Attention.MATH_KERNEL_SCORES, 0):
        monkeypatch.setattr(Attention, "MATH_KERNEL_SCORES", limit)
        model.zero_grad()
        with torch.profiler.profile() as prof:
            loss = model(idx, idx)[1]
            loss.backward()
        ops = {e.key for e in prof.key_averages()}
        flash = any("flash_attention" in op for op in ops)
        assert flash == (limit == 0), sorted(op for op in ops if "attention" in op)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-5)
