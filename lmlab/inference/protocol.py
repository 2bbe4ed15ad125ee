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
import re
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from tokenizers import decoders

from lmlab.errors import LmlabError
from lmlab.inference.engine import Request
from lmlab.inference.generate import SamplingParams
from lmlab.inference.structured import (ConstraintError, Constraint, Grammars, choice_grammar, json_schema_grammar,
                                        lark_grammar, regex_grammar)
from lmlab.inference.tools import NO_PARAMETERS, CallReader, Tool, calls_grammar, prompt_messages, template_takes_tools

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
    for name in ("logit_bias", "suffix", "functions"):
        if body.get(name) not in (None, {}, [], ""):
            raise ApiError(400, f"'{name}' is not supported by lmlab serve; remove it", name, "unsupported")


def check_model(body: dict, names: tuple[str, ...], aliases: tuple[str, ...] = ()) -> None:
    """The body names one of the served models (`names`, as /v1/models lists them; `aliases`: other names that
    are taken for them)."""
    model = body.get("model")
    served = ", ".join(map(repr, names))
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"you must provide a model parameter (this server serves {served})",
                       "model", "missing_required_parameter")
    if model not in names and model not in aliases:
        raise ApiError(404, f"the model {model!r} does not exist on this server; it serves {served} "
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
# Structured outputs (lmlab.inference.structured): OpenAI's response_format and vLLM's guided_* fields

def _schema(value, param: str) -> dict:
    if isinstance(value, str):  # vLLM takes guided_json as JSON text too
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"'{param}' is not valid JSON ({e}); send a JSON schema", param,
                           "invalid_value") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"'{param}' must be a JSON schema (an object)", param, "invalid_type")
    return value


def _text(value, param: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{param}' must be {what} (a non-empty string)", param, "invalid_type")
    return value


def _response_format(value) -> tuple[str | None, str]:
    """(the grammar, the field it comes from) of OpenAI's response_format: text (no grammar), json_object, or
    json_schema {name, schema, strict}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, "response_format"
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}), "response_format"
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ApiError(400, "'response_format.json_schema' must be an object with a 'name' and a 'schema'",
                           "response_format.json_schema", "invalid_value")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise ApiError(400, "'response_format.json_schema.strict' must be true or false",
                           "response_format.json_schema.strict", "invalid_type")
        param = "response_format.json_schema.schema"
        return json_schema_grammar(_schema(spec.get("schema", {}), param)), param
    raise ApiError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                        "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                   "response_format", "invalid_value")


# vLLM's names: the guided_* fields, and their newer home, the structured_outputs object
_GUIDED = {"json": lambda v, p: json_schema_grammar(_schema(v, p)),
           "regex": lambda v, p: regex_grammar(_text(v, p, "a regular expression")),
           "grammar": lambda v, p: lark_grammar(_text(v, p, "a Lark or GBNF grammar"), p),
           "choice": lambda v, p: choice_grammar(_choices(v, p)),
           "json_object": lambda v, p: json_schema_grammar({"type": "object"}) if v is True else None}


def _choices(value, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ApiError(400, f"'{param}' must be a non-empty list of non-empty strings", param, "invalid_type")
    return value


def constraint(body: dict, grammars: Grammars | None, grammar: tuple[str, str] | None = None) -> Constraint | None:
    """The request's output grammar, compiled (400 naming the field if it cannot be), or None. `grammar` is one
    given by the caller (tool calls), as (grammar, the field it comes from)."""
    found = [grammar] if grammar else []
    if body.get("response_format") is not None:
        found.append(_response_format(body["response_format"]))
    for name, make in _GUIDED.items():
        if body.get(f"guided_{name}") is not None:
            found.append((make(body[f"guided_{name}"], f"guided_{name}"), f"guided_{name}"))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict) or set(outputs) - set(_GUIDED):
            raise ApiError(400, "'structured_outputs' must be an object with one of: " + ", ".join(_GUIDED),
                           "structured_outputs", "invalid_value")
        found += [(make(outputs[name], f"structured_outputs.{name}"), f"structured_outputs.{name}")
                  for name, make in _GUIDED.items() if outputs.get(name) is not None]
    found = [(g, param) for g, param in found if g is not None]
    if len(found) > 1:
        raise ApiError(400, f"'{found[1][1]}' and '{found[0][1]}' both constrain the output; send one of them",
                       found[1][1], "invalid_value")
    if not found:
        return None
    if grammars is None:
        raise ApiError(400, "this server cannot constrain outputs", found[0][1], "unsupported")
    try:
        return grammars.constraint(*found[0])
    except ConstraintError as e:
        raise ApiError(400, str(e), e.param, "invalid_value") from None


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


def parse_completion(body: dict, tokenizer, limits: Limits, grammars: Grammars | None = None) -> CompletionRequest:
    """The completion request; the fields are checked before the prompts are tokenised (the slow part)."""
    refuse_unsupported(body)
    _prompt_list(body, limits)
    grammar = constraint(body, grammars)
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
                        prompt_logprobs=echo and logprobs is not None, constraint=grammar) for ids in prompts]
    return CompletionRequest(prompts, requests, n, logprobs, echo, stream)


@dataclass
class ChatRequest:
    request: Request
    n: int
    logprobs: bool
    stream: bool
    tools: list[Tool] | None = None  # the functions the answer may call (None: its text is all content)
    forced: bool = False  # tool_choice required or named: the answer is calls only

    def call_reader(self) -> CallReader | None:
        return CallReader(self.tools, self.forced) if self.tools else None


def _content(m: dict, param: str, optional: bool) -> str:
    content = m.get("content")
    if content is None and optional:
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"{param}.content parts must be text parts (lmlab models read text only)",
                           param, "invalid_value")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string", param, "invalid_type")
    return content


def _calls(m: dict, param: str) -> list[dict]:
    """An assistant message's tool_calls, their arguments parsed."""
    calls = m.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ApiError(400, f"{param}.tool_calls must be a list", f"{param}.tool_calls", "invalid_type")
    out = []
    for j, c in enumerate(calls):
        where = f"{param}.tool_calls[{j}]"
        function = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(function, dict) and isinstance(c.get("id"), str) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise ApiError(400, f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                "\"arguments\": JSON text}}}}", where, "invalid_value")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"{where}.function.arguments must be a JSON object as text", 
                           f"{where}.function.arguments", "invalid_value")
        out.append({"id": c["id"], "name": function["name"], "arguments": arguments})
    return out


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                       "invalid_type")
    out, call_ids = [], set()
    for k, m in enumerate(messages):
        param = f"messages[{k}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"{param} must be an object whose 'role' is system, user, assistant or tool", param,
                           "invalid_value")
        role = m["role"]
        calls = _calls(m, param) if role == "assistant" else []
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        entry = {"role": "system" if role == "developer" else role, "content": _content(m, param, bool(calls))}
        if calls:
            entry["tool_calls"] = calls
            call_ids.update(c["id"] for c in calls)
        if role == "tool":
            if m.get("tool_call_id") not in call_ids:
                raise ApiError(400, f"{param} answers no tool call: its 'tool_call_id' "
                                    f"{json.dumps(m.get('tool_call_id'))} is not the id of a call in an earlier "
                                    "assistant message's tool_calls", f"{param}.tool_call_id", "invalid_value")
            entry["tool_call_id"] = m["tool_call_id"]
        out.append(entry)
    return out


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _tools(body: dict, grammars: Grammars | None) -> list[Tool]:
    """The request's functions; each parameters schema is compiled, so that a bad one is a 400 naming it."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools",
                       "invalid_type")
    out = []
    for i, t in enumerate(tools):
        function = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(function, dict):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                "\"description\", \"parameters\"}}}}", f"tools[{i}]", "invalid_value")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ApiError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -",
                           f"tools[{i}].function.name", "invalid_value")
        if name in {t.name for t in out}:
            raise ApiError(400, f"tools[{i}].function.name {name!r} is used by two tools",
                           f"tools[{i}].function.name", "invalid_value")
        param = f"tools[{i}].function.parameters"
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise ApiError(400, f"'{param}' must be a JSON schema (an object)", param, "invalid_type")
        description = function.get("description")
        if grammars is not None:
            try:
                grammars.constraint(json_schema_grammar(parameters), param)
            except ConstraintError as e:
                raise ApiError(400, str(e), e.param, "invalid_value") from None
        out.append(Tool(name, description if isinstance(description, str) else None, parameters))
    return out


def _tool_choice(body: dict, tools: list[Tool]) -> tuple[list[Tool], bool]:
    """(the tools the answer may call, whether it must call one) as tool_choice says."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise ApiError(400, "'tool_choice' is 'required' but the request has no tools", "tool_choice",
                           "invalid_value")
        return (tools if choice != "none" else []), choice == "required"
    name = ((choice.get("function") or {}).get("name") if isinstance(choice, dict)
            and choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None)
    if name is None:
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice", "invalid_value")
    named = [t for t in tools if t.name == name]
    if not named:
        raise ApiError(400, f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice",
                       "invalid_value")
    return named, True


def parse_chat(body: dict, pretrained, model_id: str, limits: Limits, grammars: Grammars | None = None) -> ChatRequest:
    """The chat request; the messages become a prompt through the model's own chat template."""
    refuse_unsupported(body)
    messages = _messages(body)
    chars = sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""))) for m in messages)
    if chars > limits.max_chars:  # the template only adds to the contents
        raise _too_long(chars, limits, "messages")
    context, max_batch = limits.context, limits.max_batch
    if pretrained.chat_template is None:
        raise ApiError(400, f"{model_id} has no chat template (a base model); use /v1/completions", "model",
                       "no_chat_template")
    tools = _tools(body, grammars)
    callable_, forced = _tool_choice(body, tools)
    parallel = flag(body, "parallel_tool_calls") if body.get("parallel_tool_calls") is not None else True
    native = template_takes_tools(pretrained.chat_template)
    try:
        text = pretrained.chat_prompt(prompt_messages(messages, callable_, native), add_generation_prompt=True,
                                      tools=[t.openai() for t in callable_] if native and callable_ else None)
    except LmlabError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    grammar = constraint(body, grammars, (calls_grammar(callable_, parallel), "tool_choice") if forced else None)
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
                      top if want_logprobs else None, constraint=grammar)
    return ChatRequest(request, n, want_logprobs, stream, callable_ or None, forced)


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
