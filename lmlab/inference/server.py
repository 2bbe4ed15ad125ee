"""`lmlab serve`: any lmlab model behind the OpenAI HTTP API, with continuous batching and a chat page.

    lmlab serve --model smollm2-135m-instruct --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (plain JSON, or `stream: true` as
Server-Sent Events ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text), and GET / (the chat
page, lmlab/static). The official `openai` client, lm-evaluation-harness' `local-completions` (echo + logprobs
scoring) and other OpenAI-speaking tools work unchanged.

Structured outputs (`response_format` json_object / json_schema, vLLM's `guided_json`, `guided_regex`,
`guided_grammar`, `guided_choice` and `structured_outputs`) are enforced token by token by a grammar
(lmlab.inference.structured); `tools` / `tool_choice` answer in OpenAI's `tool_calls` (lmlab.inference.tools). A
sentence encoder given as the model (`lmlab serve --model minilm-l6`) is served alone at POST /v1/embeddings.
LoRA runs of `lmlab sft` given as `--adapter NAME=RUN` are served unmerged beside the base model, each request
choosing one by its `model` field (lmlab.models.multi_lora); /v1/models lists them with the base as `parent`.

As vLLM splits it: lmlab.inference.protocol checks the requests and shapes the answers' pieces (OpenAI's fields
and error bodies), this file serves them (the FastAPI app, the key, the body, streaming, metrics), and
lmlab.inference.engine generates (one thread owns the model).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmlab.errors import LmlabError
from lmlab.inference.embed import Embedder
from lmlab.inference.embeddings_api import EmbeddingService, on_model_thread
from lmlab.inference.rag_api import RagService
from lmlab.inference.engine import (DoneEvent, Engine, ErrorEvent, PromptEvent, QueueFull, Request, TokenEvent,
                                    check_kv_cache_tokens, check_speculate)
from lmlab.inference.structured import Grammars
from lmlab.inference.tools import stream_deltas
from lmlab.inference.metrics import prometheus_text
from lmlab.inference.protocol import (ApiError, Limits, TokenNames, check_model, include_usage, parse_chat,
                                      parse_completion, usage)
from lmlab.models.hub import REGISTRY, load_pretrained, resolve
from lmlab.models.multi_lora import AdapterRows, attach_adapters, parse_adapter_flags
from lmlab.models.quantize import FLOAT32, InferenceSettings, check_device
from lmlab.util import bound_kernel_caches, listen, notice, option, pick_device

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 1024 * 1024  # a context of 100k tokens is about 400 kB of text: 4 MiB leaves room


class Server:
    """The API's logic: a loaded model, its engine, and counters for /metrics. Without a language model
    (`pretrained` and `engine` None) it serves its embedding model alone."""

    def __init__(self, pretrained, engine: Engine | None, model_id: str, api_key: str | None = None,
                 max_body: int = MAX_BODY_BYTES, embeddings: EmbeddingService | None = None,
                 rag: RagService | None = None, adapters: AdapterRows | None = None):
        self.pretrained = pretrained
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key
        self.max_body = max_body
        self.created = int(time.time())
        self.http_requests: dict[tuple[str, int], int] = {}
        if engine is not None:
            self.tokenizer = pretrained.tokenizer
            self.names = TokenNames(self.tokenizer)
            self.limits = Limits(engine.context, engine.context * self.names.longest, max(engine.max_queue, 1),
                                 engine.max_batch)
            eos = pretrained.eos_token_id if pretrained.eos_token_id is not None else min(engine.eos_ids, default=0)
            # structured outputs and forced tool calls (llguidance reads the tokenizer on the first such request)
            self.grammars = Grammars(self.tokenizer, pretrained.model.config.vocab_size, eos)
        self.embeddings = embeddings  # the embedding model of /v1/embeddings, if the server has one
        self.rag = rag  # the index of /v1/rag (the chat page's retrieval switch), if the server has one
        self.adapters = adapters  # LoRA runs served beside the base model, by name (--adapter NAME=RUN)

    # ------------------------------------------------------------------------------------------------------------
    # Shared request handling: key, body; running requests on the engine

    async def handle(self, http: HttpRequest, endpoint: str, work, needs_body: bool = True):
        """Check the key, read and parse the body, run `work(body, http)`; count the status; errors as OpenAI's
        (a bug too: a 500 in OpenAI's shape, counted, with the traceback on the server's stderr)."""
        try:
            self._check_key(http)
            body = await self._read_json(http) if needs_body else None
            response = await work(body, http)
        except ApiError as e:
            response = e.response()
        except Exception as e:  # noqa: BLE001 - whatever escapes must still be an API answer
            response = internal_error(e).response()
        self.count(endpoint, response.status_code)
        return response

    def count(self, endpoint: str, status: int) -> None:
        self.http_requests[endpoint, status] = self.http_requests.get((endpoint, status), 0) + 1

    def _check_key(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, given = http.headers.get("authorization", "").strip().partition(" ")
        # RFC 7235: the scheme is case-insensitive ("bearer KEY" is as good as "Bearer KEY").
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
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
        try:  # JSON allows "\ud800" (half of a UTF-16 pair), which is no text: refuse it here, not in the tokenizer
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"the request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!a}), "
                                "which is not text; send valid Unicode", None, "invalid_json") from None
        return body

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the server's limit of {self.max_body} bytes",
                        None, "request_too_large")

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
        if len(handles) == 1 and http is None:
            # One streamed request (the usual case): its events as they are, without the merging queue, its pump
            # task and a timeout per event (a new Task per token); Starlette cancels the stream on disconnect.
            try:
                async for event in handles[0]:
                    if isinstance(event, ErrorEvent):
                        raise ApiError(500, event.message, None, "internal_error", type_="server_error")
                    yield 0, event
            finally:
                handles[0].cancel()
            return
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
            except Exception as e:  # noqa: BLE001 - a bug mid-stream: an error event too, not a cut connection
                yield f"data: {json.dumps(internal_error(e).body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------------------------
    # /v1/completions

    def _generating(self, body: dict) -> tuple[str, int]:
        """The body names this server's language model or one of its adapters (a server of an embedding model
        alone has none): (the name answers carry, the adapter's slot: 0 for the base model)."""
        if self.engine is None:
            raise ApiError(400, f"{self.model_id} is an embedding model: this server serves POST /v1/embeddings "
                                "only; serve a language model (lmlab serve --model smollm2-135m-instruct) for "
                                "completions and chat", "model", "model_not_supported")
        adapters = self.adapters.names if self.adapters else []
        check_model(body, (self.model_id, *adapters), (self.pretrained.name,))
        if body["model"] in adapters:
            return body["model"], self.adapters.index_of(body["model"])
        return self.model_id, 0

    async def completions(self, body: dict, http: HttpRequest):
        model, adapter = self._generating(body)
        # Tokenising a long prompt takes a while: off the event loop, so that other clients and /health go on.
        parsed = await asyncio.to_thread(parse_completion, body, self.tokenizer, self.limits, self.grammars)
        prompts, n, logprobs = parsed.prompts, parsed.n, parsed.logprobs
        handles = self._submit([replace(r, adapter=adapter) for r in parsed.requests])
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model}
        echoes = [self.tokenizer.decode(ids, skip_special_tokens=False) if parsed.echo else "" for ids in prompts]
        if parsed.stream:
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
                    "logprobs": None if logprobs is None else self.names.completion_logprobs(infos[i][j], 0),
                    "finish_reason": finish[i][j]}
                   for i in range(len(prompts)) for j in range(n)]
        return JSONResponse({**meta, "choices": choices, "usage": usage(sum(map(len, prompts)), completion_tokens)})

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
                    lp = self.names.completion_logprobs(event.tokens, 0)
                    offsets[i, j] = len(echoes[i])
                    yield {**meta, "choices": [{"index": i * n + j, "text": echoes[i], "logprobs": lp,
                                                "finish_reason": None}]}
            elif isinstance(event, TokenEvent):
                index = i * n + event.choice
                lp = None
                if logprobs is not None:
                    start = offsets.get((i, event.choice), len(echoes[i]))
                    lp = self.names.completion_logprobs(event.tokens, start)
                    offsets[i, event.choice] = start + len(event.text)
                yield {**meta, "choices": [{"index": index, "text": event.text, "logprobs": lp,
                                            "finish_reason": None}]}
            elif isinstance(event, DoneEvent):
                completion_tokens += event.completion_tokens
                yield {**meta, "choices": [{"index": i * n + event.choice, "text": "", "logprobs": None,
                                            "finish_reason": event.finish_reason}]}
        if include_usage(body):
            prompt_tokens = sum(len(h.request.prompt) for h in handles)
            yield {**meta, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    # ------------------------------------------------------------------------------------------------------------
    # /v1/chat/completions

    async def chat(self, body: dict, http: HttpRequest):
        model, adapter = self._generating(body)
        parsed = await asyncio.to_thread(parse_chat, body, self.pretrained, self.model_id, self.limits,
                                         self.grammars)
        n, want_logprobs = parsed.n, parsed.logprobs
        handles = self._submit([replace(parsed.request, adapter=adapter)])
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}
        if parsed.stream:
            return self._stream(self._chat_chunks(handles, meta, parsed, body))
        texts, infos, finish = [""] * n, [[] for _ in range(n)], [None] * n
        completion_tokens = 0
        async for _, event in self._events(handles, http):
            if isinstance(event, TokenEvent):
                texts[event.choice] += event.text
                infos[event.choice] += event.tokens
            elif isinstance(event, DoneEvent):
                finish[event.choice] = event.finish_reason
                completion_tokens += event.completion_tokens
        choices = []
        for j in range(n):
            message, reader = {"role": "assistant", "content": texts[j]}, parsed.call_reader()
            if reader is not None:  # the text's tool calls, read out of it
                content, calls = reader.feed(texts[j], final=True)
                if calls:
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": [c.openai() for c in calls]}
                    finish[j] = "tool_calls" if finish[j] == "stop" else finish[j]
            choices.append({"index": j, "message": message, "finish_reason": finish[j],
                            "logprobs": {"content": self.names.chat_logprobs(infos[j])} if want_logprobs else None})
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": usage(len(parsed.request.prompt), completion_tokens)})

    async def _chat_chunks(self, handles, meta, parsed, body):
        """OpenAI's chunks; with tools, each choice's text goes through its CallReader: content as it is decided,
        each call when its closing tag arrives (a chunk with its id and name, then one with its arguments)."""
        meta, n, want_logprobs = {**meta, "object": "chat.completion.chunk"}, parsed.n, parsed.logprobs
        readers = [parsed.call_reader() for _ in range(n)]
        for j in range(n):
            yield {**meta, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}

        def chunk(j, delta, lp=None, finish=None):
            return {**meta, "choices": [{"index": j, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        def split(j, text, final=False):  # content and call chunks of a piece of choice j's text
            return [chunk(j, delta) for delta in stream_deltas(readers[j], text, final)]

        completion_tokens = 0
        async for _, event in self._events(handles, None):
            if isinstance(event, TokenEvent):
                j = event.choice
                pieces = split(j, event.text)
                if want_logprobs and any(not t.eos for t in event.tokens):
                    lp = {"content": self.names.chat_logprobs(event.tokens)}
                    pieces = pieces or [chunk(j, {"content": ""})]
                    pieces[0]["choices"][0]["logprobs"] = lp
                for piece in pieces:
                    yield piece
            elif isinstance(event, DoneEvent):
                j = event.choice
                completion_tokens += event.completion_tokens
                for piece in split(j, "", final=True):
                    yield piece
                finish = event.finish_reason
                if readers[j] is not None and readers[j].calls and finish == "stop":
                    finish = "tool_calls"
                yield chunk(j, {}, finish=finish)
        if include_usage(body):
            yield {**meta, "choices": [], "usage": usage(len(handles[0].request.prompt), completion_tokens)}

    # ------------------------------------------------------------------------------------------------------------
    # /v1/embeddings (lmlab.inference.embeddings_api)

    async def embed(self, body: dict, http: HttpRequest):
        if self.engine is not None and body.get("model") in (self.model_id, self.pretrained.name):
            served = self.embeddings.model_id if self.embeddings else "start the server with --embedding-model"
            raise ApiError(400, f"{self.model_id} is a decoder-only language model: /v1/embeddings needs an "
                                f"embedding model ({served})", "model", "invalid_value")
        if self.embeddings is None:
            raise ApiError(404, "this server has no embedding model; start it with --embedding-model minilm-l6",
                           "model", "model_not_found")
        check_model(body, (self.embeddings.model_id,), (self.embeddings.embedder.name,))
        return JSONResponse(await self.embeddings.respond(body))

    async def rag_info(self, body, http):
        if self.rag is None:
            raise ApiError(404, "this server has no index; start it with --rag INDEX (lmlab rag index)", None,
                           "not_found")
        return JSONResponse(self.rag.info())

    async def rag_context(self, body: dict, http: HttpRequest):
        await self.rag_info(body, http)
        return JSONResponse(await on_model_thread(self.rag.context, body))  # the embedding model's one thread

    # ------------------------------------------------------------------------------------------------------------
    # /v1/models, /metrics

    async def models(self, body, http):
        data = [] if self.engine is None else [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lmlab",
             "max_model_len": self.engine.context, "chat": self.pretrained.chat_template is not None}]
        for name, run in (self.adapters.runs.items() if self.adapters else ()):  # vLLM's LoRA cards: root, parent
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "lmlab", "root": run,
                         "parent": self.model_id, "max_model_len": self.engine.context,
                         "chat": self.pretrained.chat_template is not None})
        if self.embeddings is not None:
            data.append({"id": self.embeddings.model_id, "object": "model", "created": self.created,
                         "owned_by": "lmlab", "max_model_len": self.embeddings.embedder.max_length,
                         "embedding": True})
        return JSONResponse({"object": "list", "data": data})

    def metrics_text(self) -> str:
        return prometheus_text(self.http_requests, self.engine)


def internal_error(e: Exception) -> ApiError:
    """A bug as OpenAI reports a server error; the traceback goes to the server's stderr, not to the client."""
    traceback.print_exception(e, file=sys.stderr)
    return ApiError(500, f"internal error in lmlab serve ({type(e).__name__}); the server's log has the details",
                    None, "internal_error", type_="server_error")


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="lmlab", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def not_routed(http: HttpRequest, e: HTTPException):
        """An unknown path (404) or a method a route does not take (405), in OpenAI's error shape."""
        path = http.url.path
        message = (f"{http.method} {path} is not a route of this server (GET /v1/models, POST /v1/completions, "
                   "POST /v1/chat/completions, GET /health, GET /metrics)" if e.status_code == 404
                   else f"{http.method} is not allowed on {path}" if e.status_code == 405 else str(e.detail))
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(e.status_code)
        server.count(path if path in ROUTES else "other", e.status_code)
        return ApiError(e.status_code, message, None, code, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def crashed(http: HttpRequest, e: Exception):
        server.count(http.url.path if http.url.path in ROUTES else "other", 500)
        return internal_error(e).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id}

    @app.get("/metrics")
    async def metrics(http: HttpRequest):
        async def text(body, http):
            return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")
        return await server.handle(http, "/metrics", text, needs_body=False)  # behind the key: it shows the traffic

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        return await server.handle(http, "/v1/models", server.models, needs_body=False)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await server.handle(http, "/v1/completions", server.completions)

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        return await server.handle(http, "/v1/chat/completions", server.chat)

    @app.post("/v1/embeddings")
    async def embeddings(http: HttpRequest):
        return await server.handle(http, "/v1/embeddings", server.embed)

    @app.get("/v1/rag")
    async def rag_info(http: HttpRequest):
        return await server.handle(http, "/v1/rag", server.rag_info, needs_body=False)

    @app.post("/v1/rag/context")
    async def rag_context(http: HttpRequest):
        return await server.handle(http, "/v1/rag/context", server.rag_context)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def model_id_for(spec: str) -> str:
    """The name clients use: a registry name as it is, a path by its file or folder name."""
    return spec if spec in REGISTRY else Path(spec).name.removesuffix(".gguf") or spec


@dataclass
class ServerSettings:
    """How `lmlab serve` runs its engine (the flags of `lmlab serve` besides the model, host and port)."""
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 requests and /metrics")
    max_batch: int = option(16, "sequences decoded together in one forward pass")
    max_queue: int = option(64, "requests that may wait for a row; beyond: 429")
    context: int | None = option(None, "tokens per sequence, prompt + completion (default: the model's, at most "
                                       "2048)")
    batch_invariant: bool = option(False, "decode at the full --max-batch shape every step, so that a request's "
                                          "tokens do not depend on what else runs (slower for a lone request)")
    device: str = option("auto", "auto | cpu | cuda | mps")
    embedding_model: str | None = option(None, "also serve this sentence encoder at /v1/embeddings (minilm-l6)")
    rag: str | None = option(None, "an index folder (lmlab rag index) the chat page can answer from")
    kv_cache_tokens: int | None = option(None, "tokens the paged KV cache holds, all sequences together (default: "
                                               "max-batch x context); a request waits until its blocks fit")
    prefix_cache: bool = option(True, "share the KV blocks of prompt prefixes computed before (automatic prefix "
                                      "caching)")
    adapter: list[str] = option(lambda: [], "also serve a LoRA run of lmlab sft on this base model, unmerged, as "
                                            "NAME=RUN (repeatable); a request chooses it with \"model\": NAME",
                                action="append", metavar="NAME=RUN")
    speculate: int = option(0, "prompt-lookup speculative decoding in the engine: each row drafts up to N tokens "
                               "that followed its latest words earlier in its prompt or text, checked in one "
                               "forward pass of the batch (greedy: the same tokens; 0 is off)")


def build(model: str, settings: ServerSettings | None = None, inference: InferenceSettings = FLOAT32,
          **overrides) -> Server:
    """Load a model (anything lmlab.models.hub.load_pretrained accepts, its weights as `inference` says) and start
    its engine; `overrides` replace fields of `settings` (build(model, max_batch=4))."""
    s = replace(settings or ServerSettings(), **overrides)
    if s.max_batch < 1 or s.max_queue < 0 or (s.context is not None and s.context < 2):  # before the slow load
        raise LmlabError(f"need --max-batch >= 1, --max-queue >= 0 and --context >= 2 (got {s.max_batch}, "
                         f"{s.max_queue}, {s.context})")
    check_kv_cache_tokens(s.kv_cache_tokens, Engine.BLOCK_SIZE)
    check_speculate(s.speculate, s.batch_invariant)
    rag = RagService(s.rag) if s.rag else None  # a missing or damaged index is refused before the slow load
    runs = parse_adapter_flags(s.adapter, (model_id_for(model), model))  # the runs' own files after the load
    pretrained = load_pretrained(model, inference=inference)
    if not pretrained.model.config.causal:  # a sentence encoder: /v1/embeddings alone
        if s.embedding_model or runs:
            raise LmlabError(f"{model} is an encoder, served at /v1/embeddings by itself: drop "
                             f"{'--embedding-model' if s.embedding_model else '--adapter'} (or serve a decoder "
                             "such as smollm2-135m-instruct)")
        embedder = Embedder(pretrained, folder=resolve(model))
        embedder.model.to(pick_device(s.device))
        return Server(None, None, model_id_for(model), api_key=s.api_key,
                      embeddings=EmbeddingService(embedder, model_id_for(model)))
    check_device(pretrained.model, pick_device(s.device))
    pretrained.model.to(pick_device(s.device))
    context = s.context or min(pretrained.context_length, 2048)  # tokens per sequence
    adapters = attach_adapters(pretrained.model, runs) if runs else None
    if adapters is not None and pretrained.model.__dict__.pop("decoding", None) is not None:
        # The adapters' rows are Python state the wrapped layers branch on, and change every step: a compiled step
        # would be traced for one batch's choice and guarded on it (recompiling as the choice changes)
        notice(f"--compile {inference.compile}: with --adapter the decoding steps run eager")
    engine = Engine(pretrained.model, pretrained.tokenizer, pretrained.eos_ids, max_batch=s.max_batch,
                    max_queue=s.max_queue, context=context, batch_invariant=s.batch_invariant,
                    kv_cache_tokens=s.kv_cache_tokens, prefix_caching=s.prefix_cache, adapters=adapters,
                    speculate=s.speculate)
    embeddings = None
    if s.embedding_model:
        embedder = Embedder.load(s.embedding_model, flag="--embedding-model")
        embedder.model.to(pick_device(s.device))
        embeddings = EmbeddingService(embedder, model_id_for(s.embedding_model))
    return Server(pretrained, engine, model_id_for(model), api_key=s.api_key, embeddings=embeddings, rag=rag,
                  adapters=adapters)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000,
          settings: ServerSettings = ServerSettings(), inference: InferenceSettings = InferenceSettings()) -> None:
    """Serve a model over the OpenAI HTTP API (continuous batching) with a chat page.

    Args:
        model: registry name, .gguf file, Hugging Face folder or lmlab run
        host: address to listen on (0.0.0.0: every interface)
        port: TCP port to listen on
    """
    sock = listen(host, port)
    bound_kernel_caches()  # a server runs for days: its memory must not grow with the prompt lengths it has seen
    try:
        server = build(model, settings, inference)
    except BaseException:
        sock.close()
        raise
    if server.engine is None:
        print(f"lmlab serve: {server.model_id} at http://{host}:{port} (an embedding model: POST /v1/embeddings)",
              flush=True)
    else:
        print(f"lmlab serve: {server.model_id} at http://{host}:{port} (OpenAI API under /v1, chat page at /; "
              f"{server.engine.max_batch} rows, context {server.engine.context}, KV cache "
              f"{server.engine.pool.num_blocks * server.engine.pool.block_size} tokens"
              + (f"; adapters {', '.join(server.adapters.names)}" if server.adapters else "") + ")", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning")).run(sockets=[sock])
    finally:
        if server.engine is not None:
            server.engine.close()
        sock.close()
