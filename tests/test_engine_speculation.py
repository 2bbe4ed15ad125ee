"""Prompt-lookup speculation in the serving engine (Engine(speculate=K), `lmlab serve --speculate K`): every row
drafts from its own prompt and text, the batch checks the drafts in one pass, the paged KV cache keeps only the
accepted tokens. The reference is lmlab.inference.generate without speculation (its own contiguous cache, one
prompt alone), in fp32, on the tiny Llama-shaped model of tests/test_paged.py: its greedy text falls into loops
and out of them, so drafts are accepted and rejected."""

from __future__ import annotations

import asyncio

import pytest

from lmlab.errors import LmlabError
from lmlab.inference.engine import DoneEvent, Engine, Request, TokenEvent
from lmlab.inference.generate import SamplingParams, generate
from tests.test_paged import ids, model, tokenizer  # noqa: F401 - model is the module's fixture

assert model  # the fixture, used by name


def run(engine: Engine, requests: list[Request]) -> list[dict]:
    """Submit the requests together; each one's token ids, logprobs, text and finish reason."""
    async def go():
        loop = asyncio.get_running_loop()
        handles = [engine.submit(r, loop) for r in requests]
        out = []
        for h in handles:
            got = {"ids": [], "logprobs": [], "text": "", "finish": None, "count": None}
            async for e in h:
                if isinstance(e, TokenEvent):
                    got["ids"] += [t.id for t in e.tokens]
                    got["logprobs"] += [t.logprob for t in e.tokens]
                    got["text"] += e.text
                elif isinstance(e, DoneEvent):
                    got["finish"], got["count"] = e.finish_reason, e.completion_tokens
            out.append(got)
        return out
    return asyncio.run(go())


def greedy(max_tokens: int, speculate: int = 0, stop=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=0, stop=stop, stop_at_eos=False,
                          speculate=speculate)


# Prompts: copy-heavy ones (a pattern repeated: drafts from the first token on) and plain random ones, whose
# drafts come only once the model's own text repeats itself.
PROMPTS = [ids(0, 7) * 4, ids(10, 30), ids(1, 7) * 4, ids(11, 30), ids(3, 7) * 4, ids(12, 30)]


def test_greedy_rows_give_plain_decodings_tokens_with_and_without_drafts(model):
    """Six rows together, four speculating (K = 4 or 6) and two not, with max_tokens of 40 and of 23 (the last pass
    of a row drafts fewer tokens so as to end exactly there), and a stop string that the text reaches inside a
    looping stretch (accepted drafts): every row's tokens, text and finish reason are plain greedy decoding's."""
    plain = [generate(model, tokenizer(), [p], greedy(40))[0] for p in PROMPTS]
    # A stop string two words long from the middle of row 2's loop (its first occurrence ends the text there).
    words = plain[2].text.split()
    stop = " ".join(words[21:23])
    params = [greedy(40, 4), greedy(23, 6), greedy(40, 4, stop=[stop]), greedy(40), greedy(23, 4), greedy(40)]
    expected = [generate(model, tokenizer(), [p], SamplingParams(**{**q.__dict__, "speculate": 0}))[0]
                for p, q in zip(PROMPTS, params)]
    engine = Engine(model, tokenizer(), max_batch=8, context=128)
    try:
        got = run(engine, [Request(p, q, logprobs=0) for p, q in zip(PROMPTS, params)])
        stats = engine.stats
        assert stats.accepted_tokens > 10 and stats.draft_tokens > stats.accepted_tokens  # both paths taken
    finally:
        engine.close()
    assert expected[2].finish_reason == "stop" and len(expected[2].token_ids) < 40
    for g, e in zip(got, expected):
        assert g["ids"] == e.token_ids
        assert g["text"] == e.text and g["finish"] == e.finish_reason and g["count"] == len(e.token_ids)


def test_accepted_tokens_carry_plain_decodings_logprobs(model):
    """A drafted token's log-probability comes from its position in the drafted pass: the same as one-token steps
    give, up to rounding (one pass over 5 positions against 5 passes over 1)."""
    prompt, params = PROMPTS[1], greedy(40)
    engines = [Engine(model, tokenizer(), max_batch=4, context=128, speculate=k) for k in (0, 5)]
    try:
        (slow,), (fast,) = (run(e, [Request(prompt, params, logprobs=0)]) for e in engines)
        assert engines[1].stats.accepted_tokens > 10
    finally:
        for e in engines:
            e.close()
    assert fast["ids"] == slow["ids"]
    assert fast["logprobs"] == pytest.approx(slow["logprobs"], abs=1e-4)


def drafted_positions(engine: Engine) -> list[bool]:
    """Spy on the engine: for each token pushed, whether it was an accepted draft (pushed without being picked)."""
    marks, picking = [], []
    sample, push = engine._sample, engine._push

    def spy_sample(*args, **kwargs):
        picking.append(True)
        try:
            sample(*args, **kwargs)
        finally:
            picking.pop()

    def spy_push(*args, **kwargs):
        marks.append(not picking)
        push(*args, **kwargs)
    engine._sample, engine._push = spy_sample, spy_push
    return marks


def test_eos_inside_an_accepted_run_ends_the_row_there(model):
    """The end-of-sequence token arriving as an accepted draft (not as the pass's picked token) ends the row at
    it: nothing after it is sent, as plain decoding stops there."""
    found = []  # (prompt, a token whose first appearance in the prompt's text is an accepted draft)
    # Prompts that end with the start of the model's own text: what follows repeats the prompt's tail.
    for base in PROMPTS:
        prompt = base + generate(model, tokenizer(), [base], greedy(20))[0].token_ids
        engine = Engine(model, tokenizer(), max_batch=2, context=128, speculate=4)
        try:
            drafted = drafted_positions(engine)
            (free,) = run(engine, [Request(prompt, greedy(40), logprobs=0)])
        finally:
            engine.close()
        tokens = free["ids"]
        found += [(prompt, t) for i, t in enumerate(tokens) if drafted[i] and t not in tokens[:i]]
    prompt, eos = found[0]
    expected = generate(model, tokenizer(), [prompt], SamplingParams(max_new_tokens=40, temperature=0),
                        eos_ids=[eos])[0]
    engine = Engine(model, tokenizer(), [eos], max_batch=2, context=128, speculate=4)
    try:
        drafted = drafted_positions(engine)
        (got,) = run(engine, [Request(prompt, SamplingParams(max_new_tokens=40, temperature=0), logprobs=0)])
    finally:
        engine.close()
    # generate's token_ids leave the EOS token out; the engine sends its entry (as OpenAI lists it).
    assert expected.finish_reason == "stop" and got["finish"] == "stop"
    assert got["ids"] == expected.token_ids + [eos] and drafted[-1]


def test_sampling_rows_follow_generates_rejection_rule(model):
    """Sampling with top_k=1 is greedy decoding through the sampling path: each draft is accepted with probability
    p(x), which is 1 for the argmax and 0 for any other token, and after a rejection the rejected token is banned
    from the pick. So a speculating sampled row gives exactly the greedy tokens, drafts rejected and accepted."""
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=1, seed=0, stop_at_eos=False, speculate=4)
    expected = [generate(model, tokenizer(), [p], greedy(40))[0].token_ids for p in PROMPTS[:4]]
    engine = Engine(model, tokenizer(), max_batch=8, context=128)
    try:
        got = run(engine, [Request(p, params, logprobs=0) for p in PROMPTS[:4]])
        assert engine.stats.draft_tokens > engine.stats.accepted_tokens > 10
    finally:
        engine.close()
    assert [g["ids"] for g in got] == expected


def test_rejected_drafts_never_enter_the_prefix_cache(model):
    """After speculating rows finish, a prompt made of one of them plus its text finds its blocks in the prefix
    cache, and continuing from there gives plain decoding's tokens: the cached blocks hold the accepted tokens'
    keys/values, not a rejected draft's."""
    prompt = PROMPTS[1]
    first = generate(model, tokenizer(), [prompt], greedy(40))[0].token_ids
    longer = prompt + first
    expected = generate(model, tokenizer(), [longer], greedy(20))[0].token_ids
    engine = Engine(model, tokenizer(), max_batch=4, context=128, speculate=4)
    try:
        run(engine, [Request(prompt, greedy(40))])
        assert engine.stats.draft_tokens > engine.stats.accepted_tokens > 0
        hits = engine.pool.hit_tokens
        (again,) = run(engine, [Request(longer, greedy(20), logprobs=0)])
        assert engine.pool.hit_tokens - hits >= 64  # the first 4 blocks came from the cache
    finally:
        engine.close()
    assert again["ids"] == expected


def test_bad_speculate_settings_are_refused(model):
    with pytest.raises(LmlabError, match="--speculate must be >= 0"):
        Engine(model, tokenizer(), speculate=-1)
    with pytest.raises(LmlabError, match="--batch-invariant"):
        Engine(model, tokenizer(), speculate=4, batch_invariant=True)


def test_draft_length_follows_the_heuristic_schedule(model):
    """A row's next draft may be 2 tokens longer after a draft accepted whole and is 1 shorter otherwise (at least 1,
    at most K): transformers' "heuristic" schedule, so an answer that stops copying drafts little."""
    K = 6
    engine = Engine(model, tokenizer(), max_batch=2, context=128, speculate=K)
    passes = []  # (draft length, accepted)
    step = engine._speculative_step

    def spy(drafts):
        before = engine.stats.accepted_tokens
        step(drafts)
        passes.append((len(drafts[0]), engine.stats.accepted_tokens - before))
    engine._speculative_step = spy
    try:
        run(engine, [Request(PROMPTS[1], greedy(60))])
    finally:
        engine.close()
    limit = K
    for length, accepted in passes:
        assert 1 <= length <= limit
        limit = min(K, limit + 2) if accepted == length else max(1, limit - 1)
    assert any(accepted < length for length, accepted in passes)  # some drafts were rejected: the limit fell
