"""lmlab serve under bad input (issue 13): every answer is a 2xx or OpenAI's error body, counted in /metrics;
prompts are bounded before they are tokenised and tokenised off the event loop; the key guards /metrics; a bad
--port or --host fails in one line before the model loads; the echo + logprobs scoring request returns the
generated token's entry even when it is EOS, read as lm-evaluation-harness' local-completions reads it; and a
property-based fuzz of the request schema (hypothesis) never gets a 5xx.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="lmlab serve needs fastapi and uvicorn: pip install -e .")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from lmlab.inference.engine import Engine  # noqa: E402
from lmlab.inference.server import Server, build  # noqa: E402
from tests.test_serve import RunningServer, make_tiny_model_folder  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture(scope="module")
def served(tiny_folder):
    running = RunningServer(build(str(tiny_folder), max_batch=4, max_queue=8, context=256))
    yield running
    running.close()


def metric(running, endpoint, status) -> float:
    text = running.request("GET", "/metrics")[2]
    key = f'lmlab_http_requests_total{{endpoint="{endpoint}",status="{status}"}}'
    return next((float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(key + " ")), 0.0)


def assert_openai_error(status, headers, body, expected_status):
    assert status == expected_status, body
    assert headers["content-type"].startswith("application/json")
    assert set(body["error"]) == ERROR_KEYS


# ----------------------------------------------------------------------------------------------------------------
# Every exception an OpenAI error, counted

@pytest.mark.parametrize("path, raw", [
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "a \\ud800 b", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\udfff"}]}'),
])
def test_lone_surrogate_is_a_counted_400(served, path, raw):
    before = metric(served, path, 400)
    status, headers, body = served.request("POST", path, raw)
    assert_openai_error(status, headers, body, 400)
    assert "surrogate" in body["error"]["message"]
    assert metric(served, path, 400) == before + 1


def test_a_bug_in_a_handler_is_an_openai_500_and_counted(served, monkeypatch):
    async def broken(body, http):
        raise RuntimeError("a bug")
    monkeypatch.setattr(served.server, "models", broken)
    before = metric(served, "/v1/models", 500)
    status, headers, body = served.request("GET", "/v1/models")
    assert_openai_error(status, headers, body, 500)
    assert body["error"]["type"] == "server_error" and "a bug" not in body["error"]["message"]
    assert metric(served, "/v1/models", 500) == before + 1


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/completions", 405), ("GET", "/v1/chat/completions",
                                                  405), ("POST", "/health", 405), ("GET", "/v2/nothing", 404)])
def test_unknown_paths_and_methods_answer_in_openai_shape(served, method, path, status):
    got, headers, body = served.request(method, path, {} if method == "POST" else None)
    assert_openai_error(got, headers, body, status)
    assert "detail" not in body


# ----------------------------------------------------------------------------------------------------------------
# Long prompts: bounded before tokenising, tokenised off the event loop

class CountingTokenizer:
    """The server's tokenizer, counting (and optionally slowing down) its encode calls."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer, self.delay, self.calls = tokenizer, delay, 0

    def encode(self, *args, **kw):
        self.calls += 1
        time.sleep(self.delay)
        return self.tokenizer.encode(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _health_seconds(running) -> float:
    start = time.perf_counter()
    assert running.request("GET", "/health")[0] == 200
    return time.perf_counter() - start


def test_huge_prompts_are_refused_before_tokenising(served, monkeypatch):
    counting = CountingTokenizer(served.server.tokenizer)
    monkeypatch.setattr(served.server, "tokenizer", counting)
    prompt = "alice sees bob. " * 240_000  # 3.8 MB, just under the body limit
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(served.request(
        "POST", "/v1/completions", {"model": "tiny-chat", "prompt": prompt}))) for _ in range(3)]
    for t in threads:
        t.start()
    health = [_health_seconds(served) for _ in range(3)]
    for t in threads:
        t.join()
    for status, headers, body in answers:
        assert_openai_error(status, headers, body, 400)
        assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "prompt"
    assert counting.calls == 0
    assert max(health) < 2.0, health
    status, _, body = served.request("POST", "/v1/chat/completions", {
        "model": "tiny-chat", "messages": [{"role": "user", "content": prompt[:400_000]}]})
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "context_length_exceeded", "messages")


def test_tokenising_runs_off_the_event_loop(served, monkeypatch):
    monkeypatch.setattr(served.server, "tokenizer", CountingTokenizer(served.server.tokenizer, delay=3.0))
    slow = threading.Thread(target=served.request, args=("POST", "/v1/completions",
                                                         {"model": "tiny-chat", "prompt": "bob", "max_tokens": 1}))
    slow.start()
    time.sleep(0.3)
    assert _health_seconds(served) < 1.0  # while the 3 s tokenisation runs
    slow.join()


def test_a_request_that_can_never_fit_is_400_not_429(served):
    status, headers, body = served.request("POST", "/v1/completions", {"model": "tiny-chat", "prompt": ["hi"] * 1000,
                                                                       "max_tokens": 1})
    assert_openai_error(status, headers, body, 400)
    assert body["error"]["param"] == "prompt" and "--max-queue" in body["error"]["message"]


# ----------------------------------------------------------------------------------------------------------------
# The key

def test_api_key_guards_metrics_and_takes_the_scheme_in_any_case(tiny_folder):
    running = RunningServer(build(str(tiny_folder), max_batch=2, context=64, api_key="sesame"))
    try:
        status, headers, body = running.request("GET", "/metrics")
        assert_openai_error(status, headers, body, 401)
        for scheme in ("Bearer", "bearer", "BEARER"):
            status, _, text = running.request("GET", "/metrics", headers={"Authorization": f"{scheme} sesame"})
            assert status == 200 and "lmlab_http_requests_total" in text
            status, _, out = running.request("POST", "/v1/completions", {"model": "tiny-chat", "prompt": "x",
                                                                         "max_tokens": 1},
                                             headers={"Authorization": f"{scheme} sesame"})
            assert status == 200 and out["usage"]["completion_tokens"] == 1
        assert running.request("GET", "/metrics", headers={"Authorization": "Basic sesame"})[0] == 401
        assert running.request("GET", "/health")[0] == 200
    finally:
        running.close()


# ----------------------------------------------------------------------------------------------------------------
# `lmlab serve` checks its address before loading the model

@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must be between 1 and 65535 (got 99999)"),
    (["--port", "-1"], "--port must be between 1 and 65535 (got -1)"),
    (["--host", "256.1.1.1"], "--host '256.1.1.1' is not an address"),
])
def test_serve_checks_the_address_before_loading(capsys, flags, message):
    from lmlab.cli import main

    # The model does not exist: a check made after loading would report that instead.
    assert main(["serve", "--model", "no-such-model-anywhere", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmlab serve: error: {message}") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness' scoring request when the generated token is EOS

def test_echo_logprobs_keep_the_generated_eos_entry(tiny_folder):
    """local-completions sends context + continuation with echo, logprobs 1 and max_tokens 1, and takes
    sum(token_logprobs[ctxlen:-1]) as the continuation's log-likelihood (lm_eval/models/openai_completions.py,
    parse_logprobs): the last entry must be the generated token's, whatever that token is."""
    transformers = pytest.importorskip("transformers")
    from lmlab.models.hub import load_pretrained

    pre = load_pretrained(str(tiny_folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, torch_dtype=torch.float32).eval()
    context, continuation = pre.tokenizer.encode("alice sees").ids, pre.tokenizer.encode(" bob in the park").ids
    ids = context + continuation
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    expected = sum(reference[i - 1, ids[i]].item() for i in range(len(context), len(ids)))
    greedy = int(reference[-1].argmax())
    # The model's greedy next token is made an end token, so that the generated token is EOS.
    engine = Engine(pre.model, pre.tokenizer, {*pre.eos_ids, greedy}, max_batch=2, context=64)
    running = RunningServer(Server(pre, engine, "tiny-chat"))
    try:
        status, _, out = running.request("POST", "/v1/completions", {
            "model": "tiny-chat", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    finally:
        running.close()
    assert status == 200
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop"
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["tokens"][-1] == running.server.names.text(greedy)
    assert lp["token_logprobs"][-1] == pytest.approx(reference[-1, greedy].item(), abs=1e-4)
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Fuzz: any JSON body, never a 5xx

# Text includes lone surrogates ("Cs"), which JSON can carry ("\ud800") but no tokenizer can encode.
_TEXT = st.text(max_size=20) | st.text(alphabet=st.sampled_from(("a", " ", "\n", "\u00e9", "\u4e00", "\U0001f600",
                                                                 "\x00", "\ud800", "\udfff")), max_size=20)
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | _TEXT, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_FIELDS = {"prompt": _TEXT | st.lists(st.integers(-5, 400), max_size=6) | _JSON,
           "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]),
                                                       "content": _TEXT | _JSON}), max_size=3) | _JSON,
           "max_tokens": st.integers(-3, 300) | _JSON, "temperature": st.floats(-1, 3) | _JSON,
           "top_p": st.floats(-1, 2) | _JSON, "n": st.integers(-1, 6) | _JSON, "stream": st.booleans() | _JSON,
           "logprobs": st.integers(-1, 30) | st.booleans() | _JSON, "top_logprobs": st.integers(-1, 30) | _JSON,
           "echo": st.booleans() | _JSON, "stop": st.text(max_size=5) | st.lists(st.text(max_size=5)) | _JSON,
           "seed": st.integers(-2**65, 2**65) | _JSON, "stream_options": _JSON}
# Mostly the served model, so that the other fields are checked too (a wrong model is refused first).
_REQUEST = st.fixed_dictionaries({"model": st.just("tiny-chat")}, optional=_FIELDS)
_BODIES = _REQUEST | _REQUEST | _REQUEST | st.fixed_dictionaries({"model": _JSON}, optional=_FIELDS) | _JSON


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_BODIES)
def test_fuzzed_bodies_get_a_2xx_or_an_openai_4xx(served, path, body):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep the generations short: the schema is under test, not the decoding
    status, headers, answer = served.request("POST", path, json.dumps(body).encode())
    assert status < 500, (body, answer)
    if status >= 400:
        assert set(answer["error"]) == ERROR_KEYS, answer


def test_serve_bounds_the_cpu_kernel_caches_unless_the_user_chose(monkeypatch):
    """oneDNN keeps a compiled kernel per matmul shape in two caches of 1,024 entries (~0.66 MiB each): lmlab
    serve caps both, and leaves a capacity the user set alone."""
    from lmlab.util import KERNEL_CACHE_ENTRIES, bound_kernel_caches

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "4096")
    bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ["LRU_CACHE_CAPACITY"] == "4096"
