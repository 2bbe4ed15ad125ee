"""`lmlab serve`: any lmlab model behind the OpenAI HTTP API, with continuous batching and a chat page.

    lmlab serve --model smollm2-135m-instruct --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (plain JSON, or `stream: true` as
Server-Sent Events ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text), and GET / (the chat
page, lmlab/static). The official `openai` client, lm-evaluation-harness' `local-completions` (echo + logprobs
scoring) and other OpenAI-speaking tools work unchanged.

Requests are validated here, by hand rather than through FastAPI's models, so that every bad request gets
OpenAI's error body {"error": {"message", "type", "param", "code"}} with OpenAI's status (400, 401, 404, 413, 429)
instead of FastAPI's 422 format. Generation itself happens in lmlab.inference.engine (one thread owns the model).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lmlab.inference.engine import DoneEvent, Engine, ErrorEvent, PromptEvent, QueueFull, Request, TokenEvent
from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 1024 * 1024  # a context of 100k tokens is about 400 kB of text: 4 MiB leaves room
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI: 5 for completions, 20 for chat)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this maps them back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # the others become chr(256), chr(257), ...
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _byte_level_alphabet()


class ApiError(Exception):
    """A request the API refuses, as OpenAI reports it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------------------------
# Request fields, checked as OpenAI defines them


def _field(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return value


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    what = "an integer" if integer else "a number"
    value = _field(body, name, (int,) if integer else (int, float), default, what)
    if value is not None and not (lo <= value <= hi):
        bounds = f">= {lo}" if math.isinf(hi) else f"between {lo} and {hi}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", name, "invalid_value")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop",
                       "invalid_value")
    return tuple(stops)


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the output but that lmlab does not implement: refused rather than ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported by lmlab serve; leave it at 0", name, "unsupported")
    for name in ("logit_bias", "suffix", "tools", "functions", "response_format"):
        if body.get(name) not in (None, {}, [], "") and not (name == "response_format"
                                                                and body[name] == {"type": "text"}):
            raise ApiError(400, f"'{name}' is not supported by lmlab serve; remove it", name, "unsupported")


class Server:
    """The API's logic: a loaded model, its engine, and counters for /metrics."""

    def __init__(self, pretrained, engine: Engine, model_id: str, api_key: str | None = None,
                 max_body: int = MAX_BODY_BYTES):
        self.pretrained = pretrained
        self.tokenizer = pretrained.tokenizer
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key
        self.max_body = max_body
        self.created = int(time.time())
        self.http_requests: dict[tuple[str, int], int] = {}
        self.added_tokens = set(self.tokenizer.get_added_tokens_decoder())  # special tokens are not byte-level

    # ------------------------------------------------------------------------------------------------------------
    # Shared request handling: key, body, model, sampling fields

    async def handle(self, http: HttpRequest, endpoint: str, work, needs_body: bool = True):
        """Check the key, read and parse the body, run `work(body, http)`; count the status; errors as OpenAI's."""
        try:
            self._check_key(http)
            body = await self._read_json(http) if needs_body else None
            response = await work(body, http)
        except ApiError as e:
            response = e.response()
        self.http_requests[endpoint, response.status_code] = self.http_requests.get((endpoint, response.status_code),
                                                                                    0) + 1
        return response

    def _check_key(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = http.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY' with "
                                "the key the server was started with (--api-key)", None, "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _read_json(self, http: HttpRequest) -> dict:
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        data = bytearray()
        async for chunk in http.stream():  # a chunked upload has no Content-Length: count as it arrives
            data += chunk
            if len(data) > self.max_body:
                raise self._too_large()
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", None,
                           "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the server's limit of {self.max_body} bytes",
                        None, "request_too_large")

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, f"you must provide a model parameter (this server serves {self.model_id!r})",
                           "model", "missing_required_parameter")
        if model not in (self.model_id, self.pretrained.name):
            raise ApiError(404, f"the model {model!r} does not exist on this server; it serves {self.model_id!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    def _sampling(self, body: dict, max_tokens: int, n_prompt: int, prompt_param: str) -> SamplingParams:
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        context = self.engine.context
        if n_prompt + max(max_tokens, 1) > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the request needs "
                                f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} for max_tokens): "
                                "shorten the prompt or lower max_tokens",
                           "max_tokens" if n_prompt < context else prompt_param, "context_length_exceeded")
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=float(temperature),
            top_p=float(top_p) if top_p > 0 else 1e-12,  # top_p 0 keeps the single most likely token
            stop=_stop(body), seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
            stop_at_eos=not _field(body, "ignore_eos", (bool,), False, "true or false"))

    def _n(self, body: dict) -> int:
        n = _number(body, "n", 1, 1, self.engine.max_batch, integer=True)
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise ApiError(400, "'best_of' other than n is not supported by lmlab serve", "best_of", "unsupported")
        return n

    def _token_text(self, token_id: int) -> str:
        """A token as text; a token that is not whole UTF-8 (a piece of a multi-byte character) is written as
        OpenAI does, 'bytes:\\xe2\\x80', so that different tokens never share a name."""
        raw = self._token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _token_bytes(self, token_id: int) -> bytes:
        from tokenizers import decoders

        piece = self.tokenizer.id_to_token(token_id)
        byte_level = isinstance(self.tokenizer.decoder, decoders.ByteLevel)
        if byte_level and token_id not in self.added_tokens and piece is not None:
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    # ------------------------------------------------------------------------------------------------------------
    # Running requests on the engine

    def _submit(self, requests: list[Request]) -> list:
        loop = asyncio.get_running_loop()
        handles = []
        try:
            for r in requests:
                handles.append(self.engine.submit(r, loop))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise ApiError(429, f"the server's queue is full ({self.engine.max_queue} requests waiting); retry in "
                                f"{e.retry_after} s", None, "rate_limit_exceeded", type_="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except LmlabError as e:
            for h in handles:
                h.cancel()
            raise ApiError(400, str(e), None, "invalid_value") from None
        return handles

    async def _events(self, handles: list, http: HttpRequest | None = None):
        """(request index, event) from all handles as they come; a disconnected client cancels them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, handle):
            async for event in handle:
                await queue.put((i, event))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        checked = time.monotonic()
        try:
            open_handles = len(handles)
            while open_handles:
                try:
                    i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = False
                if http is not None and time.monotonic() - checked > 0.5:  # a plain (not streamed) request
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if event is False:
                    continue
                if event is None:
                    open_handles -= 1
                    continue
                if isinstance(event, ErrorEvent):
                    raise ApiError(500, event.message, None, "internal_error", type_="server_error")
                yield i, event
        finally:
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

    def _stream(self, chunks):
        """An SSE response from an async iterator of JSON-able chunks; the engine work is cancelled if the client
        goes away (Starlette cancels the iterator on disconnect; the iterator's finally cancels the handles)."""
        async def sse():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except ApiError as e:  # the status line has gone out already: the error travels as an event
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ------------------------------------------------------------------------------------------------------------
    # /v1/completions

    def _prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        vocab = self.tokenizer.get_vocab_size()
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "lists of token ids", "prompt", "invalid_type")
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p).ids
            elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                ids = list(p)
            else:
                raise ApiError(400, f"token ids in 'prompt' must be integers in [0, {vocab})", "prompt",
                               "invalid_value")
            if not ids:
                raise ApiError(400, "'prompt' has no tokens; send at least one character or token", "prompt",
                               "invalid_value")
            out.append(ids)
        return out

    def _completion_logprobs(self, infos, offset: int) -> dict:
        """The legacy completions format: parallel lists of tokens, their log-probabilities, top alternatives and
        character offsets."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for info in infos:
            text = self._token_text(info.id)
            tokens.append(text)
            logprobs.append(info.logprob)
            tops.append(None if info.top is None or info.logprob is None
                        else {self._token_text(t): lp for t, lp in info.top})
            offsets.append(offset)
            offset += len(self._token_bytes(info.id).decode("utf-8", errors="ignore"))
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    async def completions(self, body: dict, http: HttpRequest):
        self._check_model(body)
        _refuse_unsupported(body)
        prompts = self._prompts(body)
        max_tokens = _number(body, "max_tokens", 16, 0, math.inf, integer=True)
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        echo = _field(body, "echo", (bool,), False, "true or false")
        stream = _field(body, "stream", (bool,), False, "true or false")
        n = self._n(body)
        if max_tokens == 0 and not echo:
            raise ApiError(400, "'max_tokens' of 0 only makes sense with echo (to score the prompt)", "max_tokens",
                           "invalid_value")
        requests = [Request(ids, self._sampling(body, max_tokens, len(ids), "prompt"), n, logprobs,
                            prompt_logprobs=echo and logprobs is not None) for ids in prompts]
        handles = self._submit(requests)
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id}
        echoes = [self.tokenizer.decode(ids, skip_special_tokens=False) if echo else "" for ids in prompts]
        if stream:
            return self._stream(self._completion_chunks(handles, meta, n, echoes, logprobs, body, http))
        texts = [[echoes[i]] * n for i in range(len(prompts))]
        infos: list[list[list]] = [[[] for _ in range(n)] for _ in prompts]
        finish = [[None] * n for _ in prompts]
        completion_tokens = 0
        async for i, event in self._events(handles, http):
            if isinstance(event, PromptEvent):
                for j in range(n):
                    infos[i][j] = list(event.tokens) + infos[i][j]
            elif isinstance(event, TokenEvent):
                texts[i][event.choice] += event.text
                infos[i][event.choice] += event.tokens
            elif isinstance(event, DoneEvent):
                finish[i][event.choice] = event.finish_reason
                completion_tokens += event.completion_tokens
        choices = [{"index": i * n + j, "text": texts[i][j],
                    "logprobs": None if logprobs is None else self._completion_logprobs(infos[i][j], 0),
                    "finish_reason": finish[i][j]}
                   for i in range(len(prompts)) for j in range(n)]
        return JSONResponse({**meta, "choices": choices,
                             "usage": self._usage(sum(map(len, prompts)), completion_tokens)})

    async def _completion_chunks(self, handles, meta, n, echoes, logprobs, body, http):
        offsets = {}
        completion_tokens = 0
        for i, echo in enumerate(echoes):
            if echo and logprobs is None:
                for j in range(n):
                    yield {**meta, "choices": [{"index": i * n + j, "text": echo, "logprobs": None,
                                                "finish_reason": None}]}
        async for i, event in self._events(handles, None):
            if isinstance(event, PromptEvent):
                for j in range(n):
                    lp = self._completion_logprobs(event.tokens, 0)
                    offsets[i, j] = len(echoes[i])
                    yield {**meta, "choices": [{"index": i * n + j, "text": echoes[i], "logprobs": lp,
                                                "finish_reason": None}]}
            elif isinstance(event, TokenEvent):
                index = i * n + event.choice
                lp = None
                if logprobs is not None:
                    start = offsets.get((i, event.choice), len(echoes[i]))
                    lp = self._completion_logprobs(event.tokens, start)
                    offsets[i, event.choice] = start + len(event.text)
                yield {**meta, "choices": [{"index": index, "text": event.text, "logprobs": lp,
                                            "finish_reason": None}]}
            elif isinstance(event, DoneEvent):
                completion_tokens += event.completion_tokens
                yield {**meta, "choices": [{"index": i * n + event.choice, "text": "", "logprobs": None,
                                            "finish_reason": event.finish_reason}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = sum(len(h.request.prompt) for h in handles)
            yield {**meta, "choices": [], "usage": self._usage(prompt_tokens, completion_tokens)}

    # ------------------------------------------------------------------------------------------------------------
    # /v1/chat/completions

    def _messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                           "invalid_type")
        out = []
        for k, m in enumerate(messages):
            param = f"messages[{k}]"
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
                raise ApiError(400, f"{param} must be an object whose 'role' is system, user or assistant", param,
                               "invalid_value")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"{param}.content parts must be text parts (lmlab models read text only)",
                                   param, "invalid_value")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"{param}.content must be a string", param, "invalid_type")
            # "developer" is OpenAI's newer name for the system role; chat templates know "system".
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return out

    def _chat_logprobs(self, infos) -> list[dict]:
        def entry(token_id, logprob):
            return {"token": self._token_text(token_id), "logprob": logprob,
                    "bytes": list(self._token_bytes(token_id))}
        return [{**entry(i.id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in (i.top or [])]}
                for i in infos]

    async def chat(self, body: dict, http: HttpRequest):
        self._check_model(body)
        _refuse_unsupported(body)
        messages = self._messages(body)
        if self.pretrained.chat_template is None:
            raise ApiError(400, f"{self.model_id} has no chat template (a base model); use /v1/completions", "model",
                           "no_chat_template")
        try:
            text = self.pretrained.chat_prompt(messages, add_generation_prompt=True)
        except LmlabError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        default_max = max(self.engine.context - len(ids), 1)
        max_tokens = _number(body, "max_completion_tokens", None, 1, math.inf, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens or default_max, 1, math.inf, integer=True)
        want_logprobs = _field(body, "logprobs", (bool,), False, "true or false")
        top = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        if body.get("top_logprobs") is not None and not want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        stream = _field(body, "stream", (bool,), False, "true or false")
        n = self._n(body)
        request = Request(ids, self._sampling(body, max_tokens, len(ids), "messages"), n,
                          top if want_logprobs else None)
        handles = self._submit([request])
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": self.model_id}
        if stream:
            return self._stream(self._chat_chunks(handles, meta, n, want_logprobs, body))
        texts, infos, finish = [""] * n, [[] for _ in range(n)], [None] * n
        completion_tokens = 0
        async for _, event in self._events(handles, http):
            if isinstance(event, TokenEvent):
                texts[event.choice] += event.text
                infos[event.choice] += event.tokens
            elif isinstance(event, DoneEvent):
                finish[event.choice] = event.finish_reason
                completion_tokens += event.completion_tokens
        choices = [{"index": j, "message": {"role": "assistant", "content": texts[j]},
                    "logprobs": {"content": self._chat_logprobs(infos[j])} if want_logprobs else None,
                    "finish_reason": finish[j]} for j in range(n)]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": self._usage(len(ids), completion_tokens)})

    async def _chat_chunks(self, handles, meta, n, want_logprobs, body):
        meta = {**meta, "object": "chat.completion.chunk"}
        for j in range(n):
            yield {**meta, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        completion_tokens = 0
        async for _, event in self._events(handles, None):
            if isinstance(event, TokenEvent):
                if event.text or want_logprobs:
                    lp = {"content": self._chat_logprobs(event.tokens)} if want_logprobs else None
                    yield {**meta, "choices": [{"index": event.choice, "delta": {"content": event.text},
                                                "logprobs": lp, "finish_reason": None}]}
            elif isinstance(event, DoneEvent):
                completion_tokens += event.completion_tokens
                yield {**meta, "choices": [{"index": event.choice, "delta": {}, "logprobs": None,
                                            "finish_reason": event.finish_reason}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {**meta, "choices": [], "usage": self._usage(len(handles[0].request.prompt), completion_tokens)}

    # ------------------------------------------------------------------------------------------------------------
    # /v1/models, /metrics

    async def models(self, body, http):
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "lmlab",
            "max_model_len": self.engine.context, "chat": self.pretrained.chat_template is not None}]})

    def metrics_text(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        stats = self.engine.stats
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("lmlab_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{{endpoint="{e}",status="{s}"}}', c) for (e, s), c in sorted(self.http_requests.items())])
        metric("lmlab_requests_finished_total", "counter", "Generation requests completed by the engine.",
               [("", stats.requests_finished)])
        metric("lmlab_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats.prompt_tokens)])
        metric("lmlab_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generation_tokens)])
        metric("lmlab_decode_steps_total", "counter", "Batched decode steps run.", [("", stats.decode_steps)])
        metric("lmlab_queue_depth", "gauge", "Requests waiting for a batch row or being prefilled.",
               [("", self.engine.queue_depth())])
        metric("lmlab_running_sequences", "gauge", "Sequences decoding in the running batch.",
               [("", self.engine.running())])
        metric("lmlab_batch_size", "gauge", "Rows in the last decode step.", [("", stats.batch_size)])
        metric("lmlab_max_batch", "gauge", "Rows the engine can batch (--max-batch).", [("", self.engine.max_batch)])
        for name, hist, help_ in (("lmlab_time_to_first_token_seconds", stats.ttft,
                                   "Time from a request's arrival to its first token."),
                                  ("lmlab_inter_token_latency_seconds", stats.itl,
                                   "Time between consecutive tokens of a sequence.")):
            samples = [(f'_bucket{{le="{b}"}}', c) for b, c in zip(hist.buckets, hist.counts)]
            samples += [('_bucket{le="+Inf"}', hist.count), ("_sum", hist.sum), ("_count", hist.count)]
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
            lines.extend(f"{name}{suffix} {value}" for suffix, value in samples)
        return "\n".join(lines) + "\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="lmlab", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        return await server.handle(http, "/v1/models", server.models, needs_body=False)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await server.handle(http, "/v1/completions", server.completions)

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        return await server.handle(http, "/v1/chat/completions", server.chat)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def model_id_for(spec: str) -> str:
    """The name clients use: a registry name as it is, a path by its file or folder name."""
    from lmlab.models.hub import REGISTRY

    return spec if spec in REGISTRY else Path(spec).name.removesuffix(".gguf") or spec


def build(model: str, *, max_batch: int = 16, max_queue: int = 64, context: int | None = None,
          batch_invariant: bool = False, api_key: str | None = None, device: str = "auto") -> Server:
    """Load a model (anything lmlab.models.hub.load_pretrained accepts) and start its engine."""
    from lmlab.models.hub import load_pretrained
    from lmlab.util import pick_device

    if max_batch < 1 or max_queue < 0 or (context is not None and context < 2):  # before the slow model load
        raise LmlabError(f"need --max-batch >= 1, --max-queue >= 0 and --context >= 2 (got {max_batch}, "
                         f"{max_queue}, {context})")
    pretrained = load_pretrained(model)
    if not pretrained.model.config.causal:
        raise LmlabError(f"{model} is an encoder (bidirectional attention): it cannot generate text; serve a "
                         "decoder such as smollm2-135m-instruct")
    pretrained.model.to(pick_device(device))
    if context is None:
        context = min(pretrained.context_length, 2048)  # the KV cache holds max_batch x context positions
    engine = Engine(pretrained.model, pretrained.tokenizer, pretrained.eos_ids, max_batch=max_batch,
                    max_queue=max_queue, context=context, batch_invariant=batch_invariant)
    return Server(pretrained, engine, model_id_for(model), api_key=api_key)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    import uvicorn

    server = build(model, **options)
    print(f"lmlab serve: {server.model_id} at http://{host}:{port} (OpenAI API under /v1, chat page at /; "
          f"{server.engine.max_batch} rows, context {server.engine.context})", flush=True)
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        server.engine.close()
