"""`lmlab chat` with SmolLM2-135M-Instruct: streamed answers, history kept across turns, /reset and /exit."""

import io

import pytest

from lmlab.inference.chat import answer, chat_loop
from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, generate

GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


def test_chat_keeps_history_and_resets(smollm, monkeypatch):
    prompts = []
    real_render = type(smollm).chat_prompt

    def spy(self, messages, add_generation_prompt=True):
        prompts.append([m["content"] for m in messages])
        return real_render(self, messages, add_generation_prompt)

    monkeypatch.setattr(type(smollm), "chat_prompt", spy)
    lines = iter(["What is the capital of France?", "And of Italy?", "/reset", "Hello", "/exit", "never read"])
    out = io.StringIO()
    messages = chat_loop(smollm, GREEDY, read=lambda _prompt: next(lines), out=out)
    # The second turn sees the first question and answer; after /reset only the new turn is sent.
    assert prompts[0] == ["What is the capital of France?"]
    assert prompts[1][0] == "What is the capital of France?" and prompts[1][2] == "And of Italy?"
    assert "Paris" in prompts[1][1]
    assert prompts[2] == ["Hello"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert "(conversation cleared)" in out.getvalue() and "Paris" in out.getvalue()


def test_streamed_answer_equals_batch_generation(smollm):
    messages = [{"role": "user", "content": "Name three colours."}]
    streamed = "".join(answer(smollm, messages, GREEDY))
    ids = smollm.tokenizer.encode(smollm.chat_prompt(messages), add_special_tokens=False).ids
    batch = generate(smollm.model, smollm.tokenizer, [ids], GREEDY, eos_ids=smollm.eos_ids)[0]
    assert streamed == batch.text and streamed.strip()


def test_end_of_input_ends_the_chat(smollm):
    def no_more(_prompt):
        raise EOFError

    assert chat_loop(smollm, GREEDY, read=no_more, out=io.StringIO()) == []


def test_base_model_without_template_is_refused(smollm, monkeypatch):
    monkeypatch.setattr(smollm, "chat_template", None)
    with pytest.raises(LmlabError, match="has no chat template"):
        chat_loop(smollm, GREEDY, read=lambda _p: "/exit", out=io.StringIO())
