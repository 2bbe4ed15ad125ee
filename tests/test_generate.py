"""The generation engine: KV cache, batching with left padding, sampling controls, streaming, beam search."""

import itertools

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inference.generate import (CompletionText, SamplingParams, TextStream, adjust_logits, beam_search, generate,
                                      stream)
from lmlab.models.hf import export_hf
from lmlab.models.transformer import Transformer, TransformerConfig
from tests.conftest import train_byte_bpe

transformers = pytest.importorskip("transformers")

LLAMA_LIKE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)


def _model(seed=0, scale=0.3, **switches) -> Transformer:
    """A random model with large enough weights that its greedy choices are far from ties."""
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=97, block_size=128, n_layer=2, n_head=4, n_embd=64, **switches)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


class IdTokenizer:
    """Token ids as space-separated numbers: enough to test the engine without a trained tokenizer."""

    def encode(self, text):
        return type("E", (), {"ids": [int(t) for t in text.split()]})()

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def _greedy_no_cache(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids


def test_greedy_matches_transformers_generate_with_and_without_cache(tmp_path):
    ours = _model()
    export_hf(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)[0].tolist()
    cached = generate(ours, IdTokenizer(), [prompt], SamplingParams(max_new_tokens=64, temperature=0))[0]
    assert prompt + cached.token_ids == expected
    assert _greedy_no_cache(ours, prompt, 64) == expected
    assert cached.finish_reason == "length"


def test_greedy_matches_transformers_generate_for_llama(tmp_path):
    """A random Llama with grouped-query attention, made and saved by transformers, loaded by lmlab."""
    from lmlab.models.hf import load_hf

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=500.0, tie_word_embeddings=False, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(15.0)  # sharper distributions: no near-ties for float noise to flip
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    prompt = [11, 22, 33, 44, 55]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                   pad_token_id=0)[0].tolist()
    cached = generate(ours, IdTokenizer(), [prompt], SamplingParams(max_new_tokens=64, temperature=0))[0]
    assert prompt + cached.token_ids == expected
    assert _greedy_no_cache(ours, prompt, 64) == expected


@pytest.mark.parametrize("switches", [{}, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_left_padded_batch_equals_one_prompt_at_a_time(switches):
    model = _model(seed=1, **switches)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    batched = generate(model, IdTokenizer(), prompts, params)
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == generate(model, IdTokenizer(), [prompt], params)[0].token_ids
        assert prompt + out.token_ids == _greedy_no_cache(model, prompt, 20)


def test_sampling_controls_match_transformers_logits_processors():
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    seen_ids = torch.randint(0, 50, (4, 6))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, seen_ids, True)
    cases = [
        (SamplingParams(repetition_penalty=1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
        (SamplingParams(temperature=0.7), lp.TemperatureLogitsWarper(0.7)),
        (SamplingParams(top_k=7), lp.TopKLogitsWarper(7)),
        (SamplingParams(top_p=0.8), lp.TopPLogitsWarper(0.8)),
        (SamplingParams(min_p=0.1), lp.MinPLogitsWarper(0.1)),
    ]
    for params, processor in cases:
        ours = adjust_logits(logits.clone(), params, seen)
        theirs = processor(seen_ids, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), params
        assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)], atol=1e-6), params


def test_repetition_penalty_ignores_left_padding():
    """A penalized padded row equals the same prompt run alone: padding (id 0) is not a token it has seen."""
    model = _model(seed=6, **LLAMA_LIKE)
    short = [3, 4]
    with torch.no_grad():
        logits = model(torch.tensor([short]))[0][0, -1]
        first = int(logits.argmax())
        assert logits[first] > 0
        # Make token 0 the greedy choice by a margin that a 1.5 penalty (wrongly applied) would undo.
        model.lm_head.weight[0] = 1.2 * model.lm_head.weight[first]
    params = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.5)
    alone = generate(model, IdTokenizer(), [short], params)[0].token_ids
    assert alone[0] == 0
    batched = generate(model, IdTokenizer(), [[5, 6, 7, 8, 9, 10], short], params)
    assert batched[1].token_ids == alone


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    model = _model(seed=2)
    run = lambda seed: generate(model, IdTokenizer(), [[1, 2, 3]],  # noqa: E731
                                SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=seed))[0]
    assert run(1).token_ids == run(1).token_ids
    assert run(1).token_ids != run(2).token_ids


def test_stop_strings_are_cut_and_streaming_gives_the_same_text():
    model = _model(seed=3)
    tok = IdTokenizer()
    full = generate(model, tok, [[4, 4, 2]], SamplingParams(max_new_tokens=40, temperature=0))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 4]  # a piece of the text that greedy decoding will produce
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=[stop])
    cut = generate(model, tok, [[4, 4, 2]], params)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.find(stop)]
    assert "".join(stream(model, tok, [4, 4, 2], params)) == cut.text


class CharTokenizer:
    """One character per token id (its code point)."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_completion_text_holds_back_a_stop_string_that_may_be_arriving():
    """Released text never holds the start of a stop string that then completes, across token boundaries, and the
    text is cut at the earliest stop; with no stop string every character is released at once."""
    text = CompletionText(CharTokenizer(), stop=["END", "\n\n"])
    released = []
    for ch in "ab\nxEN\nEN":
        assert not text.push(ord(ch))
        released.append(text.release())
    assert "".join(released) == "ab\nxEN\n"  # holdback 2: the last "EN" waits
    assert text.push(ord("D"))  # "END" is complete: the text ends before it, and the held "EN" is never sent
    assert text.text == "ab\nxEN\n" and text.release(final=True) == ""
    plain = CompletionText(CharTokenizer())
    plain.push(ord("a"))
    assert plain.release() == "a"


def test_eos_stops_generation():
    model = _model(seed=4)
    greedy = generate(model, IdTokenizer(), [[9, 9]], SamplingParams(max_new_tokens=10, temperature=0))[0]
    eos = greedy.token_ids[3]
    out = generate(model, IdTokenizer(), [[9, 9]], SamplingParams(max_new_tokens=10, temperature=0), eos_ids=[eos])
    first = greedy.token_ids.index(eos)
    assert out[0].finish_reason == "stop" and out[0].token_ids == greedy.token_ids[:first]


def test_text_stream_never_splits_a_character():
    tok = train_byte_bpe(["hello world, plain ascii text"] * 20, 300)
    text = "naïve café — 東京 🎉🚀 done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # unseen characters fall apart into bytes, several tokens each
    s = TextStream(tok)
    deltas = [s.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_beam_search_finds_the_most_probable_sequence():
    model = _model(seed=5, scale=1.0)
    model.config.vocab_size  # noqa: B018
    small_vocab = 97
    prompt = [1, 2]
    with torch.no_grad():
        def logprob(seq):
            ids = torch.tensor([prompt + list(seq)])
            lp = torch.log_softmax(model(ids)[0][0].float(), -1)
            return sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))
        # Exhaustive over 2 steps (97^2 sequences), then beam search wide enough to keep every prefix.
        best = max(itertools.product(range(small_vocab), repeat=2), key=logprob)
    hyps = beam_search(model, prompt, num_beams=small_vocab, max_new_tokens=2, length_penalty=0.0)
    assert tuple(hyps[0][0]) == best
    assert hyps[0][1] == pytest.approx(logprob(best), abs=1e-4)
    # One beam is greedy decoding.
    greedy = generate(model, IdTokenizer(), [prompt], SamplingParams(max_new_tokens=6, temperature=0))[0]
    assert beam_search(model, prompt, num_beams=1, max_new_tokens=6)[0][0] == greedy.token_ids


def test_bad_generation_input():
    model = _model()
    with pytest.raises(LmlabError, match="more than the model's context of 128"):
        generate(model, IdTokenizer(), [list(range(1, 90)) * 2], SamplingParams(max_new_tokens=1))
    with pytest.raises(LmlabError, match="temperature=-1"):
        generate(model, IdTokenizer(), [[1]], SamplingParams(temperature=-1))
    with pytest.raises(LmlabError, match="top_p=1.5"):
        generate(model, IdTokenizer(), [[1]], SamplingParams(top_p=1.5))


def test_context_full_finishes_with_length():
    model = _model()
    out = generate(model, IdTokenizer(), [list(range(1, 97)) + list(range(1, 31))],
                   SamplingParams(max_new_tokens=10, temperature=0))[0]
    # 126 + 2 fed tokens fill the 128 positions; the third token is predicted from them, not fed.
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
