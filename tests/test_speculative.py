"""Speculative decoding by prompt lookup (lmlab.inference.generate, --speculate N): drafts from the text itself,
checked in one forward pass; greedy text identical to plain greedy decoding, sampling distribution-preserving."""

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, _verify, adjust_logits, generate, lookup_draft
from tests.test_generate import LLAMA_LIKE, IdTokenizer, _model


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_draft([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]  # the tail 1 2 3 occurred at the start
    assert lookup_draft([1, 2, 3, 4, 1, 2, 3, 5, 2, 3], 2) == [5, 2]  # the most recent earlier occurrence wins
    assert lookup_draft([7, 8, 5, 8], 4) == [5, 8]  # no 3- or 2-gram match: the last token alone
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([5], 2) == []


class Counting:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.config, self.tok_emb = model.config, model.tok_emb

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("switches", [{}, LLAMA_LIKE])
def test_greedy_speculation_gives_plain_greedy_text_in_fewer_passes(switches):
    """A prompt that repeats itself: the model continues the pattern, the drafts are accepted, and the tokens are
    exactly those of plain greedy decoding."""
    model = _model(seed=3, scale=0.3, **switches)
    pattern = [5, 17, 33, 2, 61, 8, 40, 12, 77, 3]
    prompt = " ".join(map(str, pattern * 4))
    plain, fast = Counting(model), Counting(model)
    ref = generate(plain, IdTokenizer(), prompt, SamplingParams(max_new_tokens=40, temperature=0))[0]
    got = generate(fast, IdTokenizer(), prompt, SamplingParams(max_new_tokens=40, temperature=0, speculate=5))[0]
    assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason
    assert fast.calls < plain.calls


def test_speculation_respects_max_new_tokens_and_eos():
    model = _model(seed=3)
    prompt = " ".join(map(str, [5, 17, 33, 2, 61] * 5))
    for n in (1, 2, 7):
        ref = generate(model, IdTokenizer(), prompt, SamplingParams(max_new_tokens=n, temperature=0))[0]
        got = generate(model, IdTokenizer(), prompt, SamplingParams(max_new_tokens=n, temperature=0,
                                                                    speculate=8))[0]
        assert got.token_ids == ref.token_ids and len(got.token_ids) == n
    first = generate(model, IdTokenizer(), prompt, SamplingParams(max_new_tokens=12, temperature=0))[0].token_ids
    eos = first[5]
    ref = generate(model, IdTokenizer(), prompt, SamplingParams(max_new_tokens=12, temperature=0), eos_ids=[eos])[0]
    got = generate(model, IdTokenizer(), prompt, SamplingParams(max_new_tokens=12, temperature=0, speculate=4),
                   eos_ids=[eos])[0]
    assert got.token_ids == ref.token_ids and got.finish_reason == "stop"


def test_rejection_sampling_keeps_the_models_distribution():
    """One drafted token x against a target distribution p: accepted with probability p(x), else a token drawn
    from p without x. The token that comes out is distributed as p (checked over 20,000 draws)."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0], [0.0] * 5])
    params = SamplingParams(temperature=0.8, top_k=4)
    p = adjust_logits(logits[:1], params).softmax(-1)[0]
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for draft in ([3], [1], [4]):  # a likely draft, an unlikely one, and one that top-k removes
        counts.zero_()
        for _ in range(20000):
            accepted, banned = _verify(logits, draft, params, generator)
            if accepted:
                counts[draft[0]] += 1
                continue
            scores = adjust_logits(logits[:1], params)
            scores[:, banned] = float("-inf")
            counts[torch.multinomial(scores.softmax(-1), 1, generator=generator)] += 1
        assert torch.allclose(counts / counts.sum(), p, atol=0.012), (draft, counts / counts.sum(), p)


def test_seeded_speculative_sampling_is_reproducible():
    model = _model(seed=3)
    prompt = " ".join(map(str, [5, 17, 33, 2, 61] * 5))
    params = SamplingParams(max_new_tokens=30, temperature=0.7, seed=11, speculate=4)
    a = generate(model, IdTokenizer(), prompt, params)[0]
    assert a.token_ids == generate(model, IdTokenizer(), prompt, params)[0].token_ids and len(a.token_ids) == 30


def test_bad_speculation_input():
    model = _model()
    with pytest.raises(LmlabError, match="speculate=-1"):
        generate(model, IdTokenizer(), "1 2 3", SamplingParams(speculate=-1))
    with pytest.raises(LmlabError, match="repetition penalty"):
        generate(model, IdTokenizer(), "1 2 3", SamplingParams(speculate=2, repetition_penalty=1.2))
    with pytest.raises(LmlabError, match="one prompt at a time"):
        generate(model, IdTokenizer(), ["1 2 3", "4 5"], SamplingParams(speculate=2, temperature=0))


def test_smollm2_speculation_keeps_greedy_answers(smollm):
    """The real model on a copy-heavy chat prompt (repeat a list back): the same greedy text with and without."""
    text = "Apples, pears, plums, cherries, grapes, lemons, limes and figs."
    ids = smollm.tokenizer.encode(smollm.chat_prompt([{"role": "user", "content": f"Repeat this list exactly, "
                                                       f"then say done: {text}"}]), add_special_tokens=False).ids
    plain = generate(smollm.model, smollm.tokenizer, [ids], SamplingParams(max_new_tokens=40, temperature=0),
                     eos_ids=smollm.eos_ids)[0]
    fast = generate(smollm.model, smollm.tokenizer, [ids], SamplingParams(max_new_tokens=40, temperature=0,
                                                                          speculate=6), eos_ids=smollm.eos_ids)[0]
    assert fast.text == plain.text and fast.token_ids == plain.token_ids
