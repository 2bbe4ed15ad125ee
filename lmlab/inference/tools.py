"""Tool calling: functions described to the model in its prompt, its calls read back out of its text.

A call is written as Hermes-style models (Qwen2.5, SmolLM3, Hermes) write them, one JSON object per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The prompt: a chat template that takes `tools` itself (its source uses the variable) gets them, and the
conversation's calls and results, as Hugging Face's apply_chat_template passes them. Any other template gets the
generic tool prompt below: the functions' JSON schemas and the call format in the system message, earlier calls
written into the assistant's turns in the same format, and results as user turns inside <tool_response> tags.

tool_choice "required" or a named function constrains the output with a grammar (lmlab.inference.structured)
whose JSON part is each function's parameters schema, so the arguments always validate. With "auto" the model
writes freely; calls that parse and name a known function are returned as calls, anything else as text.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from lmlab.inference.structured import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"

GENERIC_PROMPT = """You can call functions. Their signatures, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with one JSON object per call inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>"""

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class Tool:
    name: str
    description: str | None
    parameters: dict

    def openai(self) -> dict:
        function = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}

    def call_schema(self) -> dict:
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": self.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}


def template_takes_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None


def prompt_messages(messages: list[dict], tools: list[Tool], native: bool) -> list[dict]:
    """The conversation as the chat template is given it: as it is for a template that takes tools (arguments as
    objects, as transformers passes them), else in the generic format (see the module's docstring)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            entry = {"role": m["role"], "content": m["content"]}
            if calls:
                entry["tool_calls"] = [{"id": c["id"], "type": "function",
                                        "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
            if m["role"] == "tool":
                entry["tool_call_id"] = m["tool_call_id"]
            out.append(entry)
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # several results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            text = "\n".join([m["content"]] * bool(m["content"]) + [format_call(c["name"], c["arguments"])
                                                                    for c in calls])
            out.append({"role": m["role"], "content": text})
    for m in out:
        m.pop("tool_results", None)
    if tools and not native:
        described = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def format_call(name: str, arguments: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def calls_grammar(tools: list[Tool], parallel: bool) -> str:
    """A Lark grammar (llguidance's, with %json) for one call, or one or more calls, of the given tools."""
    schema = {"anyOf": [t.call_schema() for t in tools]} if len(tools) > 1 else tools[0].call_schema()
    schema["x-guidance"] = JSON_OPTIONS
    more = ' ("\\n" call)*' if parallel else ""
    return f'start: call{more}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}\n'


@dataclass
class Call:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class CallReader:
    """Splits a choice's text, as it streams, into content and completed calls. Text that could still become a
    call (a prefix of <tool_call>, or an open call) is held back until it is decided."""

    def __init__(self, tools: list[Tool], forced: bool):
        self.names = {t.name for t in tools}
        self.forced = forced  # the grammar writes nothing but calls: no content at all
        self.pending = ""
        self.calls: list[Call] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[Call]]:
        """(content to send now, calls completed now)."""
        self.pending += text
        content, calls = "", []
        while self.pending:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.pending, OPEN)
                content += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content += self.pending[:start]
            end = self.pending.find(CLOSE, start)
            if end < 0:
                if final:  # an unfinished call (max_tokens): the text as it is
                    content += self.pending[start:]
                    self.pending = ""
                else:
                    self.pending = self.pending[start:]
                break
            call = self._call(self.pending[start + len(OPEN):end])
            if call is None:
                content += self.pending[start:end + len(CLOSE)]
            else:
                calls.append(call)
            self.pending = self.pending[end + len(CLOSE):]
        self.calls += calls
        if self.forced or (self.calls and not content.strip()):
            content = ""  # the newlines between calls
        return content, calls

    def _call(self, body: str) -> Call | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not (isinstance(value, dict) and value.get("name") in self.names
                and isinstance(value.get("arguments", {}), dict)):
            return None
        return Call(f"call_{secrets.token_hex(12)}", value["name"],
                    json.dumps(value.get("arguments", {}), ensure_ascii=False))


def stream_deltas(reader: CallReader | None, text: str, final: bool = False) -> list[dict]:
    """OpenAI's chat-stream deltas for the next piece of a choice's text: the content decided so far, then each
    completed call as OpenAI streams one (its index, id and name with empty arguments, then the arguments)."""
    content, calls = (text, []) if reader is None else reader.feed(text, final)
    deltas = [{"content": content}] if content else []
    first = len(reader.calls) - len(calls) if reader is not None else 0  # the calls' place in the choice
    for index, call in enumerate(calls, start=first):
        deltas += [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]},
                   {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]
    return deltas


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
