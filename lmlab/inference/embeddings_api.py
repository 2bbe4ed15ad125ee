"""POST /v1/embeddings in OpenAI's shape, for `lmlab serve --embedding-model minilm-l6`.

    curl localhost:8000/v1/embeddings -H 'Content-Type: application/json' \\
         -d '{"model": "minilm-l6", "input": ["first text", "second text"]}'

`input` is a string, an array of strings, an array of token ids or an array of such arrays (token ids are the
embedding model's own, without its special tokens: lmlab adds [CLS] and [SEP] as for a text). `encoding_format`
is "float" (lists of numbers) or "base64" (the float32 little-endian bytes, as the openai client asks by
default). `dimensions` is refused unless it is the model's own size (MiniLM's vectors are not Matryoshka-trained:
a cut vector would be worse, not shorter). An input longer than the model reads is refused, as OpenAI does,
rather than cut.

Requests are batched: whatever arrives while the model is busy waits, and then all of it runs in one pass of
Embedder.embed_ids (length-sorted), on the embedding model's one thread (MODEL_THREAD), so that the server's event
loop stays free.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmlab.inference.embed import Embedder
from lmlab.inference.protocol import ApiError, usage

MAX_INPUTS = 2048  # OpenAI's limit on the items of one request

# A server runs every use of its embedding model (the /v1/embeddings passes, the questions of /v1/rag/context) on
# this one thread. Spread over asyncio's default pool, the same work ran on up to 6 threads, each growing its own
# malloc arena and scratch buffers: the resident set grew by hundreds of MB under 16 clients (issue 27, finding
# 36; docs/results/soak). One thread also runs one forward pass at a time, which the few cores a server has could
# not run faster side by side anyway.
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmlab-embed")


async def on_model_thread(fn: Callable, *args):
    """fn(*args) on the embedding model's thread, awaited without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, fn, *args)


@dataclass
class EmbeddingRequest:
    inputs: list[list[int]]  # token ids with the special tokens, one list per input
    base64: bool
    tokens: int


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _inputs(body: dict) -> list:
    value = body.get("input")
    what = "a string, an array of strings, an array of token ids, or an array of token id arrays"
    if isinstance(value, str) or _is_ids(value):
        items = [value]
    elif isinstance(value, list) and value and (all(isinstance(v, str) for v in value) or all(map(_is_ids, value))):
        items = value
    else:
        raise ApiError(400, f"'input' must be {what} (none of them empty)", "input", "invalid_type")
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"'input' holds {len(items)} items; at most {MAX_INPUTS} per request", "input",
                       "invalid_value")
    if any(item == "" for item in items):
        raise ApiError(400, "'input' must not contain empty strings", "input", "invalid_value")
    return items


def parse_embeddings(body: dict, embedder: Embedder) -> EmbeddingRequest:
    """An /v1/embeddings body checked into token ids, in OpenAI's order: input, encoding_format, dimensions."""
    items = _inputs(body)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format",
                       "invalid_value")
    dims = body.get("dimensions")
    if dims is not None and dims != embedder.dim:
        raise ApiError(400, f"{embedder.name} does not support 'dimensions' other than its own {embedder.dim}",
                       "dimensions", "invalid_value")
    tokenizer = embedder.pretrained.tokenizer
    vocab = tokenizer.get_vocab_size()
    inputs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            # The length rule below, checked on the characters first: a 3 MB text is refused before tokenizing it,
            # which would also hide its length (a word past the tokenizer's limit is one [UNK]).
            chars = len(item) if len(item) <= embedder.max_chars else len("".join(item.split()))
            if chars > embedder.max_chars:
                raise ApiError(400, f"'input' item {i} is {chars} characters (not counting spaces), more than the "
                                    f"{embedder.max_length} tokens {embedder.name} reads can hold (at most "
                                    f"{embedder.max_chars}): shorten it or split it", "input",
                               "context_length_exceeded")
            ids = tokenizer.encode(item).ids
        else:
            if min(item) < 0 or max(item) >= vocab:
                raise ApiError(400, f"'input' item {i} holds token ids outside the vocabulary (0..{vocab - 1})",
                               "input", "invalid_value")
            ids = tokenizer.post_process(tokenizer.encode("", add_special_tokens=False)).ids
            ids = ids[:1] + list(item) + ids[1:]  # [CLS] ids [SEP], as the text's encoding would be
        if len(ids) > embedder.max_length:
            raise ApiError(400, f"'input' item {i} is {len(ids)} tokens; {embedder.name} reads at most "
                                f"{embedder.max_length}: shorten it or split it", "input", "context_length_exceeded")
        inputs.append(ids)
    return EmbeddingRequest(inputs, fmt == "base64", sum(map(len, inputs)))


class EmbeddingService:
    """The embedding model of a server: requests queue, and each pass embeds all that waits, in one batch."""

    def __init__(self, embedder: Embedder, model_id: str):
        self.embedder, self.model_id = embedder, model_id
        self._waiting: list[tuple[list[list[int]], asyncio.Future]] = []
        self._running = False
        self.passes = 0  # for the batching test: how many model passes served the requests

    async def embed(self, inputs: list[list[int]]):
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((inputs, future))
        if not self._running:
            self._running = True
            asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                flat = [ids for inputs, _ in batch for ids in inputs]
                try:
                    vectors = await on_model_thread(self.embedder.embed_ids, flat)
                except Exception as e:  # noqa: BLE001 - every waiting request learns of it, none hangs
                    for _, future in batch:
                        future.set_exception(e)
                    continue
                self.passes += 1
                start = 0
                for inputs, future in batch:
                    if not future.done():
                        future.set_result(vectors[start:start + len(inputs)])
                    start += len(inputs)
        finally:
            self._running = False

    async def respond(self, body: dict) -> dict:
        request = parse_embeddings(body, self.embedder)
        vectors = (await self.embed(request.inputs)).numpy().astype("<f4")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode() if request.base64
                 else v.tolist()} for i, v in enumerate(vectors)]
        tokens = usage(request.tokens, 0)
        return {"object": "list", "data": data, "model": self.model_id,
                "usage": {"prompt_tokens": tokens["prompt_tokens"], "total_tokens": tokens["prompt_tokens"]}}
