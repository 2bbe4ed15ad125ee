"""The serving engine's paged KV cache with automatic prefix caching (lmlab.inference.paged): the tokens are those
of lmlab.inference.generate (the independent reference: its own contiguous cache, one prompt alone) with and
without shared prefixes; a shared prefix is computed once; the least recently used free blocks are evicted; a
request waits until its blocks fit, and one that never can is refused; the pool is the only KV memory taken at
start. A tiny Llama-shaped model made in code, fp32."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmlab.errors import LmlabError
from lmlab.inference.engine import Engine, Request, TokenEvent
from lmlab.inference.generate import SamplingParams, generate
from lmlab.inference.paged import BlockPool, BlockTable, PagedView
from lmlab.models.transformer import Transformer, TransformerConfig

VOCAB = 101


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                               intermediate_size=128, norm="rmsnorm", position="rope", mlp="swiglu",
                               activation="silu", bias=False, tie_embeddings=False)
    m = Transformer(config).eval()
    with torch.no_grad():  # sharp distributions: no near-ties for rounding to flip
        m.lm_head.weight.mul_(20)
    return m


def tokenizer() -> Tokenizer:
    """Token i is the word "w{i}"."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PARAMS = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False)


def expected(model, prompt, params=PARAMS) -> list[int]:
    return generate(model, tokenizer(), [prompt], params)[0].token_ids


def complete(engine, waves: list[list[list[int]]], n: int = 1, params=PARAMS) -> list[list[list[int]]]:
    """Each wave's prompts submitted together, wave after wave; every choice's generated token ids."""
    async def one_wave(prompts):
        loop = asyncio.get_running_loop()
        handles = [engine.submit(Request(p, params, n=n, logprobs=0), loop) for p in prompts]
        out = []
        for h in handles:
            tokens = [[] for _ in range(n)]
            async for e in h:
                if isinstance(e, TokenEvent):
                    tokens[e.choice] += [t.id for t in e.tokens]
            out.append(tokens)
        return out

    return [asyncio.run(one_wave(w)) for w in waves]


def engine_for(model, **kw) -> Engine:
    return Engine(model, tokenizer(), **{"max_batch": 8, "context": 128, **kw})


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_tokens_match_generate_with_and_without_shared_prefixes(model, prefix_caching):
    """A prompt alone fills the cache; then prompts sharing its 40-token prefix (one of them the same prompt, whose
    blocks are all cached: its last token is still computed), an unrelated one and two choices of one prompt (the
    partly filled block forked) run together. Each gives generate's tokens for that prompt alone."""
    prefix = ids(0, 40)
    first = prefix + ids(1, 8)  # 48 tokens: three full blocks
    together = [first, prefix + ids(2, 5), prefix + ids(3, 17), ids(4, 30)]
    engine = engine_for(model, prefix_caching=prefix_caching)
    try:
        [[alone]], wave = complete(engine, [[first], together])
        [[pair]] = complete(engine, [[prefix + ids(5, 3)]], n=2)
        hits = engine.pool.hit_tokens
    finally:
        engine.close()
    assert alone == expected(model, first)
    assert wave == [[expected(model, p)] for p in together]
    assert pair == [expected(model, prefix + ids(5, 3))] * 2
    # 32 of `first` again (its third block holds its last token), 32 of each other prompt sharing the prefix
    assert hits == (32 * 4 if prefix_caching else 0)


def test_a_shared_prefix_is_computed_once(model):
    prefix = ids(10, 50)
    a, b = prefix + ids(11, 10), prefix + ids(12, 8)
    counts = {}
    for caching in (True, False):
        engine = engine_for(model, prefix_caching=caching)
        try:
            complete(engine, [[a], [b]])
            counts[caching] = engine.stats.prefill_tokens, engine.pool.hit_tokens, engine.pool.query_tokens
        finally:
            engine.close()
    shared = 50 // 16 * 16  # the prefix's full blocks
    assert counts[False] == (len(a) + len(b), 0, len(a) + len(b))
    assert counts[True] == (len(a) + len(b) - shared, shared, len(a) + len(b))


def test_least_recently_used_free_blocks_are_evicted_first():
    """Blocks of 2 tokens, 4 of them: a sequence's freed blocks stay findable; new blocks come from the never-used
    ones first, then from the cached ones, the sequence's last block before its first (vLLM's order)."""
    config = TransformerConfig(vocab_size=8, block_size=16, n_layer=1, n_head=1, n_embd=4)
    pool = BlockPool(config, num_blocks=4, block_size=2)

    def sequence(tokens):
        table = BlockTable(pool, reserve=pool.blocks_for(len(tokens)))
        table.grow(len(tokens))
        table.commit(tokens)
        return table

    a = sequence([1, 2, 3, 4])
    first_block = a.blocks[0]
    a.close()
    assert len(pool.lookup([1, 2, 3, 4, 5], 2)[0]) == 2 and pool.free() == 4
    b = sequence([5, 6])  # a never-used block: [1 2][3 4] stay cached
    assert len(pool.lookup([1, 2, 3, 4], 2)[0]) == 2
    c = sequence([7, 7, 7])  # the last never-used block, then the least recently used: [3 4], not [1 2]
    assert pool.lookup([1, 2, 3, 4], 2)[0] == [first_block]
    assert pool.used() == 3 and pool.free() == 1
    b.close()
    c.close()
    assert pool.free() == 4 and pool.reserved == 0


def test_eviction_under_a_small_pool_keeps_the_tokens_right(model):
    """A pool of 4 blocks (64 tokens), one request at a time: a later request evicts the tail of an earlier
    prompt's cached blocks; that prompt again finds only its first block, and every answer is still generate's."""
    first, other = ids(20, 33), ids(21, 33)  # 33 + 8 tokens: three blocks each
    engine = engine_for(model, max_batch=1, kv_cache_tokens=64)
    try:
        got = complete(engine, [[first], [other], [first]])
        hits = engine.pool.hit_tokens
    finally:
        engine.close()
    assert got == [[[expected(model, first)]], [[expected(model, other)]], [[expected(model, first)]]]
    assert hits == 16  # `other` took the fresh block and the LRU one: `first`'s second block


def test_a_request_waits_until_its_blocks_fit(model):
    """Room for one request's blocks only: two arrive together, the second is admitted when the first ends."""
    prompts = [ids(30, 33), ids(31, 30)]  # 41 and 38 tokens with max_tokens: three blocks each
    engine = engine_for(model, max_batch=4, kv_cache_tokens=48)
    running = []
    decode = engine._decode_step
    engine._decode_step = lambda: (running.append(len(engine.rows)), decode())
    try:
        [got] = complete(engine, [prompts])
        with pytest.raises(LmlabError, match=r"max_tokens \(20\).*--kv-cache-tokens"):
            engine.submit(Request(ids(32, 40), SamplingParams(max_new_tokens=20)), asyncio.new_event_loop())
    finally:
        engine.close()
    assert got == [[expected(model, p)] for p in prompts]
    assert max(running) == 1
    assert engine.pool.used() == 0 and engine.pool.reserved == 0
    assert engine.stats.kv_cache_waits == 1  # the second, counted once however many steps it waited (/metrics)


def test_the_pool_is_the_kv_memory_taken_at_start():
    """The KV memory is the pool asked for, not max_batch x context: a server of 16 rows of 4096 positions with a
    256-token pool grows by about the pool (the contiguous cache took 16 x 4096 x 512 bytes = 32 MiB here)."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    config = TransformerConfig(vocab_size=VOCAB, block_size=4096, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                               norm="rmsnorm", position="rope", mlp="swiglu", bias=False)
    model = Transformer(config).eval()
    per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * 4  # keys and values, fp32
    before = rss()
    engine = Engine(model, tokenizer(), max_batch=16, kv_cache_tokens=256)
    try:
        grown = rss() - before
        assert engine.context == 4096
        assert engine.pool.bytes == (256 + engine.pool.block_size) * per_token  # the pool and its spare block
        assert grown <= engine.pool.bytes + 4 * 2**20  # 4 MiB for the engine thread and the allocator
    finally:
        engine.close()
    default = Engine(model, tokenizer(), max_batch=2)
    try:
        assert default.pool.num_blocks * default.pool.block_size == 2 * 4096  # without the flag: today's size
    finally:
        default.close()


def test_server_refuses_what_the_pool_cannot_hold_and_shows_the_cache(tmp_path):
    """Through `lmlab serve`'s app: a request whose prompt plus max_tokens exceeds the pool (not the context) is an
    OpenAI 400 naming max_tokens; the same prompt twice is a prefix-cache hit in /metrics, with blocks used/free."""
    from lmlab.inference.server import build
    from tests.test_serve import RunningServer, make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "tiny-chat")
    running = RunningServer(build(str(folder), max_batch=2, context=256, kv_cache_tokens=128))
    try:
        prompt = "alice sees bob and carol at the market with erin and frank " * 3
        status, _, body = running.request("POST", "/v1/completions",
                                          {"model": "tiny-chat", "prompt": prompt, "max_tokens": 150})
        assert status == 400, body
        assert "max_tokens (150)" in body["error"]["message"] and "--kv-cache-tokens" in body["error"]["message"]
        client = running.client()
        sizes = [client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4).usage.prompt_tokens
                 for _ in range(2)]
        status, _, text = running.request("GET", "/metrics")
    finally:
        running.close()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    hits = (sizes[1] - 1) // 16 * 16  # the second request's full blocks, but for the one with its last token
    assert sizes[0] == sizes[1] > 16
    assert values["lmlab_prefix_cache_hits_total"] == hits
    assert values["lmlab_prefix_cache_queries_total"] == 2 * sizes[0]
    assert values["lmlab_prefix_cache_hit_rate"] == pytest.approx(hits / (2 * sizes[0]))
    assert values["lmlab_prefill_tokens_total"] == 2 * sizes[0] - hits
    assert values["lmlab_kv_cache_blocks_used"] == 0 and values["lmlab_kv_cache_blocks_free"] == 128 // 16
    # layers x keys and values x (128 tokens + the spare block of 16) x kv heads x head dim x fp32
    assert values["lmlab_kv_cache_bytes"] == 2 * 2 * (128 + 16) * 2 * 16 * 4
    assert values["lmlab_kv_cache_waits_total"] == 0  # one request at a time: none waited for blocks


def test_decoding_in_place_equals_the_gather(model):
    """A decoding step attends over each row's runs of blocks where they lie (merged by log-sum-exp); the same step
    through the gather into SDPA gives the same logits. Rows of 0, 21 and 40 tokens over shuffled blocks, two of
    them sharing a prefix block, and a padding row."""
    pool = BlockPool(model.config, num_blocks=12, block_size=16)
    order = [7, 2, 3, 9, 0, 11, 5]
    with torch.no_grad():
        pool.k.normal_()
        pool.v.normal_()
    tables = []
    for blocks, length in (([order[0]], 0), ([order[0], order[1]], 21), ([order[0], *order[2:5]], 40)):
        table = BlockTable(pool)
        table.blocks, table.tokens = blocks[:max(1, -(-(length + 1) // 16))], [1] * length
        tables.append(table)
    tables.append(None)
    tokens = torch.tensor([[3], [5], [7], [0]])
    logits = []
    for in_place in (True, False):
        view = PagedView(pool, tables, [1, 1, 1, 0], 1, model.config.block_size - 1, "cpu", decode_in_place=in_place)
        assert view.decodes_in_place == in_place
        with torch.no_grad():
            logits.append(model(tokens, cache=view, positions=view.positions, key_mask=view.key_mask)[0][:3])
    assert torch.allclose(logits[0], logits[1], atol=1e-4, rtol=0)


def test_a_pool_smaller_than_a_block_is_refused_before_the_model_loads():
    from lmlab.inference.server import build

    with pytest.raises(LmlabError, match=r"^--kv-cache-tokens must hold at least one block of 16 tokens \(got 8\)$"):
        build("no-such-model-is-loaded", kv_cache_tokens=8)
