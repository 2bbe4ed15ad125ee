"""Chat templates: turn a conversation into the exact text a chat model was fine-tuned on.

A chat model does not see "messages"; it sees one string with its own markers, e.g. SmolLM2's

    <|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n

The recipe is a Jinja template shipped with the model (GGUF `tokenizer.chat_template`, or `chat_template` in a
Hugging Face tokenizer_config.json). Render it exactly as `transformers`' `apply_chat_template` does, or the model
sees text slightly unlike its training data and answers worse: the same sandboxed environment (templates are code
from the internet), `trim_blocks` and `lstrip_blocks`, the same helpers (`raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML) and the same variables (`messages`, `add_generation_prompt`, the special
tokens, `tools`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmlab.errors import LmlabError


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks in transformers;
    for rendering it is a no-op, but templates that use it must still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LmlabError(f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                         "pass a corrected template") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, tools: list | None = None,
                **extra) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]).

    add_generation_prompt appends the opening of the assistant's turn, so that the model's next tokens are its
    answer. `extra` reaches the template as further variables (e.g. unk_token, pad_token, or a template's own
    switches such as enable_thinking)."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise LmlabError(f"chat messages must be dicts with a 'role' and 'content', got {m!r}")
    # A special token the model lacks is left undefined, as transformers does, not set to None.
    tokens = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token).items() if v is not None}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **tokens, **extra)
    except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a sandbox violation
        raise LmlabError(f"the chat template refused this conversation: {e}") from None


# Gemma's turn format (Gemma 2 and 3, as ai.google.dev/gemma/docs/core/prompt-structure describes it): the
# assistant is "model", a system message opens the first user turn, contents are trimmed, and each turn ends
# in <end_of_turn> and a newline.
_GEMMA_TEMPLATE = """{{ bos_token }}
{%- set system = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' -%}
{%- for message in (messages[1:] if system else messages) -%}
{%- if (message['role'] == 'user') != loop.index0 is even -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}
{{- (system if loop.first else '') + message['content'] | trim }}<end_of_turn>
{{ '' }}
{%- endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{{ '' }}
{%- endif -%}"""

# Chat formats by GGUF architecture, for files that carry no `tokenizer.chat_template` of their own.
FAMILY_TEMPLATES = {"gemma3": _GEMMA_TEMPLATE}
