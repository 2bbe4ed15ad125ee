"""LoRA (lmlab/peft.py): zero-init B leaves outputs unchanged, merged == unmerged, only LoRA parameters learn,
the saved file loads onto the same base model and is refused by another."""

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.models.peft import LoRALinear, add_lora, load_peft, merge_lora, save_peft, trainable_state

LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
             position="rope", mlp="swiglu", bias=False, tie_embeddings=False)
GPT2 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def _model(kind, seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**kind)).eval()


@pytest.mark.parametrize("kind", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_zero_init_lora_leaves_the_model_unchanged(kind):
    model = _model(kind)
    idx = torch.randint(97, (2, 12))
    before = model(idx)[0]
    names = add_lora(model, targets=("qkv", "proj", "fc"), r=4, alpha=8)
    assert len(names) == 2 * 4  # qkv, attn.proj, mlp.fc, mlp.proj per block
    assert torch.equal(model(idx)[0], before)


def _train_a_little(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    idx = torch.randint(97, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_only_lora_parameters_receive_gradients(kind):
    model = _model(kind)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, targets=("qkv", "attn.proj"), r=4, alpha=8)
    model.train()
    loss = model(torch.randint(97, (2, 9))[:, :-1], torch.randint(97, (2, 8)))[1]
    loss.backward()
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
    _train_a_little(model)
    after = dict(model.named_parameters())
    for name, value in frozen_before.items():
        wrapped = name.replace("attn.qkv.", "attn.qkv.base.").replace("attn.proj.", "attn.proj.base.")
        assert torch.equal(after[wrapped], value), name  # the base never moves
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if "lora_B" in n)


@pytest.mark.parametrize("kind", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_merged_and_unmerged_give_the_same_logits(kind):
    model = _model(kind)
    add_lora(model, targets=("qkv", "proj", "fc", "lm_head") if not kind.get("tie_embeddings", True)
             else ("qkv", "proj", "fc"), r=4, alpha=8)
    _train_a_little(model)
    model.eval()
    idx = torch.randint(97, (2, 12))
    unmerged = model(idx)[0]
    assert merge_lora(model) > 0
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(idx)[0], unmerged, atol=1e-5, rtol=1e-5)
    assert sorted(model.state_dict()) == sorted(_model(kind).state_dict())  # a plain model again


def test_the_saved_file_holds_only_lora_and_loads_onto_the_base(tmp_path):
    model = _model(LLAMA)
    settings = {"targets": ["qkv", "fc"], "r": 4, "alpha": 8.0, "dropout": 0.0}
    add_lora(model, **settings)
    _train_a_little(model)
    model.eval()
    path = tmp_path / "lora.safetensors"
    save_peft(model, path, "lora", settings)
    assert set(trainable_state(model)) == {n for n, _ in model.named_parameters() if "lora_" in n}
    base_bytes = sum(p.numel() * 4 for p in _model(LLAMA).parameters())
    assert path.stat().st_size < 0.25 * base_bytes

    fresh = _model(LLAMA)  # the same base weights (same seed)
    assert load_peft(fresh, path)["method"] == "lora"
    idx = torch.randint(97, (2, 12))
    torch.testing.assert_close(fresh.eval()(idx)[0], model(idx)[0])


def test_a_file_for_another_base_model_is_refused(tmp_path):
    model = _model(LLAMA)
    add_lora(model, targets=("qkv",), r=2)
    save_peft(model, tmp_path / "a.safetensors", "lora", {"targets": ["qkv"], "r": 2})
    other = Transformer(TransformerConfig(**{**LLAMA, "n_embd": 64}))
    with pytest.raises(LmlabError, match="another base model"):
        load_peft(other, tmp_path / "a.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LmlabError, match="not a safetensors adapter file"):
        load_peft(_model(LLAMA), tmp_path / "junk.safetensors")
    with pytest.raises(LmlabError, match="no linear layer matches"):
        add_lora(_model(LLAMA), targets=("q_proj",))
