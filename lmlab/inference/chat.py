"""`lmlab chat`: an interactive conversation with a chat model, streamed token by token.

The whole conversation is rendered with the model's own chat template at every turn (as the model saw it in
fine-tuning) and the answer streams as it is decoded. `/reset` forgets the conversation, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, stream


def answer(pretrained, messages: list[dict], params: SamplingParams):
    """Stream the assistant's reply to `messages` as text deltas."""
    prompt = pretrained.chat_prompt(messages, add_generation_prompt=True)
    ids = pretrained.tokenizer.encode(prompt, add_special_tokens=False).ids
    return stream(pretrained.model, pretrained.tokenizer, ids, params, eos_ids=pretrained.eos_ids)


def chat_loop(pretrained, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict]:
    """Run the conversation until /exit or end of input; return the messages."""
    if pretrained.chat_template is None:
        raise LmlabError(f"{pretrained.name} has no chat template; use `lmlab generate` to continue plain text")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"Chatting with {pretrained.name}. /reset starts over, /exit quits.\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            out.write("\n")
            break
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for delta in answer(pretrained, messages, params):
            reply.append(delta)
            out.write(delta)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages
