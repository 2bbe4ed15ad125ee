"""A request to the engine and what comes back: the prompt with its sampling settings, the events streamed to the
client (prompt log-probabilities, tokens, the end of a choice, an error), the full-queue refusal, and the
client's handle on it. The server builds them; the engine thread feeds the handles."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from lmlab.inference.generate import SamplingParams
from lmlab.inference.structured import Constraint


@dataclass
class Request:
    """One prompt to complete. `n` choices are sampled from it (n rows, one shared prefill)."""

    prompt: list[int]
    params: SamplingParams  # max_new_tokens, temperature, top_p, stop, seed, stop_at_eos
    n: int = 1
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    prompt_logprobs: bool = False  # also the log-probability of every prompt token (OpenAI's echo + logprobs)
    constraint: Constraint | None = None  # a grammar every choice's tokens must follow (structured outputs)
    adapter: int = 0  # the LoRA adapter it runs with: a slot of the engine's AdapterRows (0: the base model)


@dataclass
class TokenInfo:
    """A token with its log-probability under the model (raw logits, before temperature/top-p) and, when asked,
    the most likely alternatives as (token id, log-probability). `eos`: a generated end-of-sequence token (it
    has no text; chat logprobs leave it out, as OpenAI's do)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None
    eos: bool = False


@dataclass
class PromptEvent:
    tokens: list[TokenInfo]  # the prompt's tokens; the first has no log-probability (nothing precedes it)


@dataclass
class TokenEvent:
    choice: int
    text: str  # new text (may be empty while a stop string could still be arriving)
    tokens: list[TokenInfo]


@dataclass
class DoneEvent:
    choice: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    completion_tokens: int


@dataclass
class ErrorEvent:
    message: str


class QueueFull(Exception):
    """The bounded queue is full; `retry_after` estimates the seconds until a slot frees."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class Handle:
    """The client's side of one request: an async iterator of events, fed by the engine thread through
    loop.call_soon_threadsafe, and cancel() (e.g. when the client disconnects)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._open = request.n  # choices not finished yet, as the client has seen them
        self.engine_open = request.n  # choices not finished yet, as the engine thread counts them

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread between steps; a bool store is atomic

    def _emit(self, event) -> None:  # engine thread
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._open == 0:
            raise StopAsyncIteration
        event = await self.events.get()
        if isinstance(event, DoneEvent):
            self._open -= 1
        elif isinstance(event, ErrorEvent):
            self._open = 0
        return event
