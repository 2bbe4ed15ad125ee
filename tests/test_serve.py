"""lmlab serve: the OpenAI HTTP API, checked with the official `openai` client against a real server on a free
loopback port, and the continuous-batching engine behind it.

Most tests serve a tiny random Llama-shaped model with a real byte-level BPE tokenizer and a ChatML template,
exported as a Hugging Face folder: the server loads it through lmlab.models.hub.load_pretrained, and transformers loads
the same folder as the independent reference for log-probabilities. One test serves SmolLM2 with its own template.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests use the openai client: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="lmlab serve needs fastapi and uvicorn: pip install -e .")
from lmlab.inference.generate import SamplingParams, generate  # noqa: E402
from lmlab.inference.server import Server, build, create_app  # noqa: E402
from tests.conftest import synthetic_corpus, train_byte_bpe  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# ----------------------------------------------------------------------------------------------------------------
# A tiny model and a running server


def make_tiny_model_folder(folder):
    """A random Llama-shaped model, a BPE tokenizer and a ChatML template as a Hugging Face folder."""
    from lmlab.models.hf import export_hf
    from lmlab.models.transformer import Transformer, TransformerConfig

    tok = train_byte_bpe(synthetic_corpus(400).splitlines(), 320, ["<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tok.get_vocab_size(), block_size=4096, n_layer=2, n_head=4, n_kv_head=2,
                               n_embd=64, intermediate_size=128, norm="rmsnorm", position="rope", mlp="swiglu",
                               activation="silu", bias=False, tie_embeddings=False)
    model = Transformer(config)
    with torch.no_grad():  # sharper distributions than the 0.02 initialisation, so that texts differ by seed
        model.lm_head.weight.mul_(20)
    export_hf(model, folder, tok, chat_template=CHATML, eos_token="<|im_end|>")
    return folder


class RunningServer:
    """uvicorn in a thread, on a socket bound to a free loopback port."""

    def __init__(self, server: Server):
        import uvicorn

        self.server = server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def request(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        try:
            return resp.status, dict(resp.getheaders()), json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, dict(resp.getheaders()), raw

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.engine.close()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture(scope="module")
def served(tiny_folder):
    running = RunningServer(build(str(tiny_folder), max_batch=16, context=256, batch_invariant=True))
    yield running
    running.close()


def reference_text(served, prompt_ids, max_tokens, **params):
    """The same request through lmlab.inference.generate (one prompt alone, no server)."""
    pre = served.server.pretrained
    p = SamplingParams(max_new_tokens=max_tokens, temperature=params.get("temperature", 0.0),
                       stop=tuple(params.get("stop", ())))
    return generate(pre.model, pre.tokenizer, [prompt_ids], p, eos_ids=pre.eos_ids)[0]


def chat_ids(served, messages):
    pre = served.server.pretrained
    return pre.tokenizer.encode(pre.chat_prompt(messages), add_special_tokens=False).ids


def stream_text(stream, chat=False):
    """Concatenated text, the finish reason and the usage of a streamed response."""
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += (choice.delta.content or "") if chat else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


# ----------------------------------------------------------------------------------------------------------------
# The API


def test_models_health_and_page(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert served.request("GET", "/health")[:3:2] == (200, {"status": "ok", "model": "tiny-chat"})
    status, headers, page = served.request("GET", "/")
    assert status == 200 and "<html" in page.lower() and headers["content-type"].startswith("text/html")
    assert served.request("GET", "/static/app.js")[0] == 200


def test_completion_matches_generate(served):
    client = served.client()
    prompt = "alice sees bob"
    ids = served.server.tokenizer.encode(prompt).ids
    out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0,
                                    user="someone", extra_body={"an_unknown_field": [1, 2]})  # ignored, as OpenAI does
    ref = reference_text(served, ids, 12)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    # Several prompts (as text and as token ids) in one request, n choices each, indexed prompt-major.
    out = client.completions.create(model="tiny-chat", prompt=[prompt, ids], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) == 1  # greedy: the same text four times


def test_chat_uses_template_and_streams(served):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who sees bob?"},
                {"role": "assistant", "content": "alice"}, {"role": "user", "content": "Where?"}]
    ids = chat_ids(served, messages)
    assert served.server.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.")
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    ref = reference_text(served, ids, 10)
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = stream_text(stream, chat=True)
    assert (text, finish) == (ref.text, out.choices[0].finish_reason)
    assert usage.completion_tokens == out.usage.completion_tokens


def test_streamed_completion_equals_plain_and_ends_with_done(served):
    body = {"model": "tiny-chat", "prompt": "carol meets", "max_tokens": 8, "temperature": 0, "stream": True}
    status, headers, raw = served.request("POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    plain = served.client().completions.create(model="tiny-chat", prompt="carol meets", max_tokens=8, temperature=0)
    assert text == plain.choices[0].text


def test_stop_strings(served):
    client = served.client()
    full = client.completions.create(model="tiny-chat", prompt="bob helps", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3
    cut = full[:full.find(stop)]
    out = client.completions.create(model="tiny-chat", prompt="bob helps", max_tokens=24, temperature=0,
                                    stop=[stop, "never appears"], extra_body={"ignore_eos": True})
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    stream = client.completions.create(model="tiny-chat", prompt="bob helps", max_tokens=24, temperature=0,
                                       stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert stream_text(stream)[:2] == (cut, "stop")


def test_seed_reproducibility(served):
    client = served.client()

    def sample(seed, n=1):
        out = client.completions.create(model="tiny-chat", prompt="dave", max_tokens=16, temperature=1.0,
                                        seed=seed, n=n, extra_body={"ignore_eos": True})
        return [c.text for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, n=2) == first + sample(8)  # choice i uses seed + i
    # Sampled choices of one unseeded request differ.
    out = client.completions.create(model="tiny-chat", prompt="dave", max_tokens=16, temperature=1.0, n=3,
                                    extra_body={"ignore_eos": True})
    assert len({c.text for c in out.choices}) == 3


def test_echo_logprobs_match_transformers(served, tiny_folder):
    """lm-evaluation-harness' scoring request: echo + logprobs with max_tokens 0 or 1. The prompt's
    log-probabilities must equal transformers' on the same weights."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, torch_dtype=torch.float32).eval()
    client = served.client()
    ids = served.server.tokenizer.encode("alice sees bob in the park.").ids
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    expected = [reference[i, ids[i + 1]].item() for i in range(len(ids) - 1)]

    out = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=0, echo=True, logprobs=3,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == served.server.tokenizer.decode(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    top = sorted(reference[0].tolist(), reverse=True)[:3]
    assert sorted(lp.top_logprobs[1].values(), reverse=True) == pytest.approx(top, abs=1e-4)
    assert lp.text_offset[0] == 0 and len(lp.tokens) == len(ids)

    out = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1  # the harness slices [ctxlen:-1]
    greedy = int(reference[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(reference[-1, greedy].item(), abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-6)

    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens - (chat.choices[0].finish_reason == "stop")
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny-chat", "prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "tiny-chat", "prompt": "x", "top_p": "high"}, 400, "top_p", "invalid_type"),
    ({"model": "tiny-chat", "prompt": "x", "n": 99}, 400, "n", "invalid_value"),
    ({"model": "gpt-4o", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": "tiny-chat", "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", "unsupported"),
    ({"model": "tiny-chat", "prompt": "x " * 300}, 400, "prompt", "context_length_exceeded"),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": 300}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "tiny-chat", "prompt": [1, 2, 10 ** 6]}, 400, "prompt", "invalid_value"),
])
def test_bad_completion_requests(served, body, status, param, code):
    got, _, error = served.request("POST", "/v1/completions", body)
    assert got == status
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert (error["error"]["param"], error["error"]["code"]) == (param, code)


def test_errors_through_the_openai_client(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "bob " * 300}])
    assert "256" in e.value.message  # names the context limit
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=-3)
    status, _, error = served.request("POST", "/v1/completions", b"x" * (served.server.max_body + 1))
    assert status == 413 and error["error"]["code"] == "request_too_large"


def test_api_key(tiny_folder):
    running = RunningServer(build(str(tiny_folder), max_batch=2, context=64, api_key="sesame"))
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").completions.create(model="tiny-chat", prompt="x", max_tokens=1)
        status, headers, _ = running.request("POST", "/v1/completions", {"model": "tiny-chat", "prompt": "x"})
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        out = running.client(api_key="sesame").completions.create(model="tiny-chat", prompt="x", max_tokens=2)
        assert out.usage.completion_tokens >= 1
        assert running.request("GET", "/health")[0] == 200  # health and the page stay open
    finally:
        running.close()


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching


def _lone_and_together(running, jobs):
    """The texts of the jobs sent one at a time, then all at once; and the engine's (decode steps, generated
    tokens) counters between the two."""
    def run(job):
        stream = running.client().completions.create(model="tiny-chat", stream=True,
                                                     extra_body={"ignore_eos": True}, **job)
        return stream_text(stream)[0]

    lone = [run(job) for job in jobs]
    stats = running.server.engine.stats
    counters = stats.decode_steps, stats.generation_tokens

    async def together():
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)

        async def one(job):
            stream = await client.completions.create(model="tiny-chat", stream=True,
                                                     extra_body={"ignore_eos": True}, **job)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        return await asyncio.gather(*(one(job) for job in jobs))
    return lone, asyncio.run(together()), counters


def test_int4_rows_are_batch_invariant_and_match_generate(tiny_folder):
    """The engine with int4 weights (bf16 compute): with --batch-invariant, each request's tokens are those it
    gets alone, and a greedy one's are lmlab.inference.generate's on the same int4 model."""
    from lmlab.models.quantize import InferenceSettings, Int4Linear

    running = RunningServer(build(str(tiny_folder), inference=InferenceSettings(dtype="bfloat16", quantize="int4"),
                                  max_batch=8, context=256, batch_invariant=True))
    try:
        assert isinstance(running.server.pretrained.model.blocks[0].attn.qkv, Int4Linear)
        prompts = ["alice", "bob sees carol at", "erin", "frank thanks dave in the park. carol"]
        jobs = [dict(prompt=prompts[i % 4], max_tokens=12 + i, temperature=0.0 if i % 2 else 0.9, seed=i)
                for i in range(8)]
        lone, batched, _ = _lone_and_together(running, jobs)
        assert batched == lone
        pre = running.server.pretrained
        ids = pre.tokenizer.encode(prompts[1]).ids
        expected = generate(pre.model, pre.tokenizer, [ids], SamplingParams(max_new_tokens=13, temperature=0,
                                                                            stop_at_eos=False))[0]
        assert lone[1] == expected.text
    finally:
        running.close()


def test_sixteen_concurrent_streams_equal_lone_requests(served):
    """Every client gets the text it gets alone (greedy and seeded sampling), while they share decode steps."""
    prompts = ["alice", "bob sees carol at", "erin", "frank thanks dave in the park. carol"]
    jobs = [dict(prompt=prompts[i % 4], max_tokens=20 + i, temperature=0.0 if i % 2 else 0.9, seed=i)
            for i in range(16)]

    stats = served.server.engine.stats
    lone, batched, (steps, tokens) = _lone_and_together(served, jobs)
    assert batched == lone
    decoded = stats.generation_tokens - tokens - len(jobs)  # first tokens come from the prefills
    assert decoded == sum(job["max_tokens"] - 1 for job in jobs)
    assert decoded / (stats.decode_steps - steps) > 3, "the clients did not share decode steps"


def _open_stream(running, body):
    """Start a streaming request on a raw connection and read its first event."""
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    return conn


def _wait(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killed_client_frees_its_row_and_others_finish(tiny_folder):
    running = RunningServer(build(str(tiny_folder), max_batch=2, context=4096))
    engine = running.server.engine
    try:
        long = {"model": "tiny-chat", "prompt": "alice", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
        killed = _open_stream(running, long)
        expected = running.client().completions.create(model="tiny-chat", prompt="bob", max_tokens=30,
                                                       temperature=0, extra_body={"ignore_eos": True})
        other = running.client().completions.create(model="tiny-chat", prompt="bob", max_tokens=30, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
        killed.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
        killed.close()
        assert stream_text(other)[0] == expected.choices[0].text
        _wait(lambda: engine.running() == 0)
        assert engine.stats.generation_tokens < 4000  # the killed request stopped long before its 4000 tokens
        # Both rows are free again: two new requests run at once.
        for conn in [_open_stream(running, long), _open_stream(running, long)]:
            conn.close()
        _wait(lambda: engine.running() == 0 and engine.queue_depth() == 0)
    finally:
        running.close()


def test_full_queue_answers_429_with_retry_after(tiny_folder):
    running = RunningServer(build(str(tiny_folder), max_batch=1, max_queue=1, context=4096))
    try:
        long = {"model": "tiny-chat", "prompt": "alice", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
        busy = _open_stream(running, long)  # holds the only row
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)  # waits in the queue
        conn.request("POST", "/v1/completions", body=json.dumps({**long, "max_tokens": 1}),
                     headers={"Content-Type": "application/json"})
        _wait(lambda: running.server.engine.queue_depth() == 1)
        status, headers, error = running.request("POST", "/v1/completions", {**long, "max_tokens": 1})
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert error["error"]["code"] == "rate_limit_exceeded"
        busy.close()  # the queued request then gets the row and completes
        assert json.loads(conn.getresponse().read())["choices"][0]["finish_reason"] == "length"
        conn.close()
    finally:
        running.close()


def test_metrics(served):
    served.client().completions.create(model="tiny-chat", prompt="alice", max_tokens=3, temperature=0)
    status, headers, text = served.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['lmlab_http_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    for name in ("lmlab_queue_depth", "lmlab_batch_size", "lmlab_running_sequences", "lmlab_prompt_tokens_total",
                 "lmlab_generation_tokens_total"):
        assert name in values
    for hist in ("lmlab_time_to_first_token_seconds", "lmlab_inter_token_latency_seconds"):
        assert values[f'{hist}_bucket{{le="+Inf"}}'] == values[f"{hist}_count"] > 0
    ttft = [v for k, v in values.items() if k.startswith("lmlab_time_to_first_token_seconds_bucket")]
    assert ttft == sorted(ttft)  # cumulative buckets


def test_smollm_chat_matches_lmlab_chat(smollm):
    """The real model and its own chat template: the server's greedy answer is lmlab chat's."""
    from lmlab.inference.chat import answer
    from lmlab.inference.engine import Engine

    engine = Engine(smollm.model, smollm.tokenizer, smollm.eos_ids, max_batch=4, context=256)
    running = RunningServer(Server(smollm, engine, "smollm2-135m-instruct"))
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = running.client().chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                       max_tokens=8, temperature=0)
        expected = "".join(answer(smollm, messages, SamplingParams(max_new_tokens=8, temperature=0)))
        assert out.choices[0].message.content == expected
        assert "Paris" in expected
    finally:
        running.close()


def test_engine_prefills_waiting_prompts_together(served):
    """Prompts that arrive together are prefilled in one left-padded pass, and decode as lmlab.inference.generate does."""
    from lmlab.inference.engine import Engine, Handle, Request, TokenEvent

    pre = served.server.pretrained
    prompts = [pre.tokenizer.encode(p).ids for p in ["alice", "bob sees carol at", "erin meets frank"] * 2]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    engine = Engine(pre.model, pre.tokenizer, max_batch=8, context=64)
    passes = []
    prefill_together = engine._prefill_together
    engine._prefill_together = lambda: passes.append(prefill_together()) or passes[-1]

    async def run():
        loop = asyncio.get_running_loop()
        with engine._wake:  # all of them wait before the engine thread looks
            handles = [Handle(Request(ids, params), loop) for ids in prompts]
            engine.waiting.extend(handles)
            engine._wake.notify()
        return ["".join([e.text async for e in h if isinstance(e, TokenEvent)]) for h in handles]

    try:
        texts = asyncio.run(run())
    finally:
        engine.close()
    assert max(passes) == len(prompts) * engine._padded(max(map(len, prompts)))  # one padded pass for all six
    assert texts == [c.text for c in generate(pre.model, pre.tokenizer, prompts, params)]


def test_prompts_of_forty_lengths_give_few_matmul_shapes(served):
    """bf16 matmuls on the CPU compile and keep a kernel per matrix shape (about 0.66 MiB each here), so a server
    that saw every prompt length would keep growing: the engine pads prompts to a multiple of PREFILL_STEP. Forty
    prompt lengths, one request at a time, reach the model's linear layers as a few shapes (plus one per row count
    while decoding), and the answers are still lmlab.inference.generate's."""
    from lmlab.inference.engine import Engine, Handle, Request, TokenEvent

    pre = served.server.pretrained
    text = " ".join(["alice sees bob and carol at the market with erin and frank"] * 20)
    prompts = [pre.tokenizer.encode(text).ids[:n] for n in range(1, 41)]
    lengths = {len(p) for p in prompts}
    assert len(lengths) == 40
    params = SamplingParams(max_new_tokens=3, temperature=0, stop_at_eos=False)
    # Without prefix caching: these prompts are prefixes of one text, whose cached blocks would shorten the passes.
    engine = Engine(pre.model, pre.tokenizer, max_batch=4, context=128, prefix_caching=False)
    rows_seen = set()
    hooks = [m.register_forward_pre_hook(lambda _, args: rows_seen.add(args[0].shape[:-1].numel()))
             for m in pre.model.blocks[0].modules() if isinstance(m, torch.nn.Linear)]

    async def one(ids):
        loop = asyncio.get_running_loop()
        handle = engine.submit(Request(ids, params), loop)
        return "".join([e.text async for e in handle if isinstance(e, TokenEvent)])

    try:
        texts = [asyncio.run(one(ids)) for ids in prompts]
    finally:
        engine.close()
        for h in hooks:
            h.remove()
    prefill = {m for m in rows_seen if m > engine.max_batch}  # the rest are decode steps' row counts
    assert prefill == {engine._padded(n) for n in lengths} == {32, 64}  # unpadded: 36 shapes
    assert texts == [c.text for c in generate(pre.model, pre.tokenizer, prompts, params)]


def test_cli_refuses_bad_sizes_in_one_line(capsys):
    from lmlab.cli import main

    assert main(["serve", "--model", "smollm2-135m-instruct", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab serve: error: need --max-batch >= 1") and err.count("\n") == 1
