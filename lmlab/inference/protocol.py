"""The OpenAI API as lmlab serve speaks it: request bodies checked field by field into engine Requests with
SamplingParams, OpenAI's error body (ApiError), and the response pieces (token names, logprobs, usage).

Requests are validated here, by hand rather than through FastAPI's models, so that every bad request gets
OpenAI's error body {"error": {"message", "type", "param", "code"}} with OpenAI's status (400, 401, 404, 413, 429)
instead of FastAPI's 422 format. Fields are checked in the order OpenAI's server reports them, so that a request
with several mistakes names the same one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from tokenizers import decoders

from lmlab.errors import LmlabError
from lmlab.inference.engine import Request
from lmlab.inference.generate import SamplingParams

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI: 5 for completions, 20 for chat)


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

def field(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return value


def flag(body: dict, name: str) -> bool:
    return field(body, name, (bool,), False, "true or false")


def number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    what = "an integer" if integer else "a number"
    value = field(body, name, (int,) if integer else (int, float), default, what)
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


def refuse_unsupported(body: dict) -> None:
    """Fields that would change the output but that lmlab does not implement: refused rather than ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported by lmlab serve; leave it at 0", name, "unsupported")
    for name in ("logit_bias", "suffix", "tools", "functions", "response_format"):
        if body.get(name) not in (None, {}, [], "") and not (name == "response_format"
                                                                and body[name] == {"type": "text"}):
            raise ApiError(400, f"'{name}' is not supported by lmlab serve; remove it", name, "unsupported")


def check_model(body: dict, names: tuple[str, ...]) -> None:
    """The body names one of the served model's names (the first is the one clients see)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"you must provide a model parameter (this server serves {names[0]!r})",
                       "model", "missing_required_parameter")
    if model not in names:
        raise ApiError(404, f"the model {model!r} does not exist on this server; it serves {names[0]!r} "
                            "(GET /v1/models)", "model", "model_not_found")


def sampling(body: dict, max_tokens: int, n_prompt: int, prompt_param: str, context: int) -> SamplingParams:
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    if n_prompt + max(max_tokens, 1) > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; the request needs "
                            f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} for max_tokens): "
                            "shorten the prompt or lower max_tokens",
                       "max_tokens" if n_prompt < context else prompt_param, "context_length_exceeded")
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=float(temperature),
        top_p=float(top_p) if top_p > 0 else 1e-12,  # top_p 0 keeps the single most likely token
        stop=_stop(body), seed=number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
        stop_at_eos=not flag(body, "ignore_eos"))


def choices_n(body: dict, max_batch: int) -> int:
    n = number(body, "n", 1, 1, max_batch, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError(400, "'best_of' other than n is not supported by lmlab serve", "best_of", "unsupported")
    return n


def include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


# ----------------------------------------------------------------------------------------------------------------
# /v1/completions and /v1/chat/completions requests

@dataclass
class CompletionRequest:
    prompts: list[list[int]]
    requests: list[Request]  # one per prompt, each with n choices
    n: int
    logprobs: int | None
    echo: bool
    stream: bool


@dataclass
class Limits:
    """What a request may hold, checked before any tokenising: `context` tokens per sequence, `max_chars`
    characters of text (context x the longest token's characters: a longer text can never fit), `max_prompts`
    prompts (they must all fit in the queue at once) and `max_batch` choices."""
    context: int
    max_chars: int
    max_prompts: int
    max_batch: int


def _too_long(chars: int, limits: Limits, param: str) -> ApiError:
    return ApiError(400, f"this model's maximum context length is {limits.context} tokens; the {param} has {chars} "
                         f"characters, more than {limits.context} tokens can hold ({limits.max_chars}): shorten it",
                    param, "context_length_exceeded")


def _prompt_list(body: dict, limits: Limits) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "lists of token ids", "prompt", "invalid_type")
    if len(prompts) > limits.max_prompts:  # they could never all wait in the queue: not a 429 "retry later"
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; this server takes at most {limits.max_prompts} "
                            "in one request (its --max-queue): send them in several requests", "prompt",
                       "invalid_value")
    for p in prompts:
        if len(p) > limits.max_chars:
            raise _too_long(len(p), limits, "prompt")
    return prompts


def _prompt_ids(body: dict, tokenizer, limits: Limits) -> list[list[int]]:
    prompts = _prompt_list(body, limits)
    vocab = tokenizer.get_vocab_size()
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer.encode(p).ids
        elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
            ids = list(p)
        else:
            raise ApiError(400, f"token ids in 'prompt' must be integers in [0, {vocab})", "prompt", "invalid_value")
        if not ids:
            raise ApiError(400, "'prompt' has no tokens; send at least one character or token", "prompt",
                           "invalid_value")
        out.append(ids)
    return out


def parse_completion(body: dict, tokenizer, limits: Limits) -> CompletionRequest:
    """The completion request; the fields are checked before the prompts are tokenised (the slow part)."""
    refuse_unsupported(body)
    _prompt_list(body, limits)
    max_tokens = number(body, "max_tokens", 16, 0, math.inf, integer=True)
    logprobs = number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    echo = flag(body, "echo")
    stream = flag(body, "stream")
    n = choices_n(body, limits.max_batch)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' of 0 only makes sense with echo (to score the prompt)", "max_tokens",
                       "invalid_value")
    prompts = _prompt_ids(body, tokenizer, limits)
    requests = [Request(ids, sampling(body, max_tokens, len(ids), "prompt", limits.context), n, logprobs,
                        prompt_logprobs=echo and logprobs is not None) for ids in prompts]
    return CompletionRequest(prompts, requests, n, logprobs, echo, stream)


@dataclass
class ChatRequest:
    request: Request
    n: int
    logprobs: bool
    stream: bool


def _messages(body: dict) -> list[dict]:
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


def parse_chat(body: dict, pretrained, model_id: str, limits: Limits) -> ChatRequest:
    """The chat request; the messages become a prompt through the model's own chat template."""
    refuse_unsupported(body)
    messages = _messages(body)
    chars = sum(len(m["content"]) for m in messages)
    if chars > limits.max_chars:  # the template only adds to the contents
        raise _too_long(chars, limits, "messages")
    context, max_batch = limits.context, limits.max_batch
    if pretrained.chat_template is None:
        raise ApiError(400, f"{model_id} has no chat template (a base model); use /v1/completions", "model",
                       "no_chat_template")
    try:
        text = pretrained.chat_prompt(messages, add_generation_prompt=True)
    except LmlabError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    ids = pretrained.tokenizer.encode(text, add_special_tokens=False).ids
    max_tokens = number(body, "max_completion_tokens", None, 1, math.inf, integer=True)
    max_tokens = number(body, "max_tokens", max_tokens or max(context - len(ids), 1), 1, math.inf, integer=True)
    want_logprobs = flag(body, "logprobs")
    top = number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    if body.get("top_logprobs") is not None and not want_logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    stream = flag(body, "stream")
    n = choices_n(body, max_batch)
    request = Request(ids, sampling(body, max_tokens, len(ids), "messages", context), n,
                      top if want_logprobs else None)
    return ChatRequest(request, n, want_logprobs, stream)


# ----------------------------------------------------------------------------------------------------------------
# Response pieces

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this maps them back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # the others become chr(256), chr(257), ...
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _byte_level_alphabet()


class TokenNames:
    """Tokens as the API names them in logprobs: their bytes, and text (or OpenAI's 'bytes:...' for a piece of a
    character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added_tokens = set(tokenizer.get_added_tokens_decoder())  # special tokens are not byte-level
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        # The most characters one token stands for: a vocabulary piece is at least as long as its text (a
        # byte-level piece has one character per byte), so a text longer than context x this cannot fit.
        self.longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def text(self, token_id: int) -> str:
        """A token as text; a token that is not whole UTF-8 (a piece of a multi-byte character) is written as
        OpenAI does, 'bytes:\\xe2\\x80', so that different tokens never share a name."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if self.byte_level and token_id not in self.added_tokens and piece is not None:
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def completion_logprobs(self, infos, offset: int) -> dict:
        """The legacy completions format: parallel lists of tokens, their log-probabilities, top alternatives and
        character offsets."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for info in infos:
            tokens.append(self.text(info.id))
            logprobs.append(info.logprob)
            tops.append(None if info.top is None or info.logprob is None
                        else {self.text(t): lp for t, lp in info.top})
            offsets.append(offset)
            offset += len(self.bytes(info.id).decode("utf-8", errors="ignore"))
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, infos) -> list[dict]:
        def entry(token_id, logprob):
            return {"token": self.text(token_id), "logprob": logprob, "bytes": list(self.bytes(token_id))}
        return [{**entry(i.id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in (i.top or [])]}
                for i in infos if not i.eos]
