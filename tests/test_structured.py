"""lmlab serve's structured outputs and tool calls, through the official `openai` client against a real server on
the tiny random model of tests/test_serve.py. A random model writes whatever its masks allow, so every output that
validates here does so because of the grammar; validity is checked with jsonschema, an independent validator."""

from __future__ import annotations

import asyncio
import json

import pytest

openai = pytest.importorskip("openai", reason="the serve tests use the openai client: pip install -e '.[test]'")
jsonschema = pytest.importorskip("jsonschema", reason="an independent JSON Schema validator: pip install -e '.[test]'")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("llguidance", reason="structured outputs need llguidance: pip install -e .")
from lmlab.inference.server import build  # noqa: E402
from lmlab.inference.tools import CallReader, Tool, prompt_messages  # noqa: E402
from tests.test_serve import RunningServer, chat_ids, make_tiny_model_folder, reference_text  # noqa: E402

MODEL = "tiny-chat"
CITY = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 0, "maximum": 10**6},
    "capital": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["old", "big", "port"]},
                                              "maxItems": 3}},
    "required": ["name", "population", "capital", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 12}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "alice sees bob"}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0, le=10**6)
    capital: bool


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / MODEL)
    running = RunningServer(build(str(folder), max_batch=16, context=2048, batch_invariant=True))
    yield running
    running.close()


def valid(schema, text):
    jsonschema.validate(json.loads(text), schema)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Structured outputs


def test_parse_with_a_pydantic_model(served):
    """The openai client's parse(): it sends a strict json_schema response_format and parses the answer."""
    result = served.client().chat.completions.parse(model=MODEL, messages=ASK, response_format=City, max_tokens=300,
                                                     temperature=0)
    message = result.choices[0].message
    assert isinstance(message.parsed, City)
    assert valid(City.model_json_schema(), message.content)


def test_a_hundred_sampled_outputs_all_validate(served):
    """100 of 100 sampled outputs of a json_schema request parse and validate (seeded, temperature 1)."""
    client = served.client()
    outputs = []
    for seed in range(10):
        response = client.chat.completions.create(
            model=MODEL, messages=ASK, n=10, seed=seed, temperature=1.0, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
        outputs += [(c.message.content, c.finish_reason) for c in response.choices]
    assert len(outputs) == 100
    assert all(finish == "stop" for _, finish in outputs)
    assert all(valid(CITY, text) for text, _ in outputs)
    assert len({text for text, _ in outputs}) > 10  # sampled, not one answer repeated


def test_json_object_and_vllm_guided_fields(served):
    client = served.client()
    text = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=0,
                                          response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(text), dict)
    regex = r"[a-z]{3,8}-[0-9]{2}"
    for extra in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
        out = client.completions.create(model=MODEL, prompt="alice", max_tokens=20, temperature=1.0, seed=3,
                                        extra_body=extra).choices[0].text
        assert jsonschema.Draft202012Validator({"type": "string", "pattern": f"^{regex}$"}).is_valid(out)
    lark = 'start: name " " verb "s " name\nname: "alice" | "bob"\nverb: "see" | "help"'
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=1.0, seed=4,
                                    extra_body={"guided_grammar": lark}).choices[0].text
    assert out.split(" ")[0] in ("alice", "bob") and out.split(" ")[1] in ("sees", "helps")
    gbnf = 'root ::= ("yes" | "no") "!"'
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_grammar": gbnf})
    assert out.choices[0].text in ("yes!", "no!")
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=1.0, seed=1,
                                         extra_body={"guided_choice": ["red", "green", "blue"]})
    assert out.choices[0].message.content in ("red", "green", "blue")
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=0,
                                         extra_body={"guided_json": json.dumps(CITY)})
    assert valid(CITY, out.choices[0].message.content)


def test_a_streamed_structured_output_is_the_plain_one(served):
    client = served.client()
    body = dict(model=MODEL, messages=ASK, max_tokens=100, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    plain = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == plain and valid(CITY, plain)


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(served):
    """A constraint is one row's business: an unconstrained request decoded in the same batch as constrained ones
    gives the text it gives alone (the fixture's batch_invariant server makes that exact)."""
    client = served.client()
    alone = reference_text(served, chat_ids(served, ASK), 24).text

    async def together():
        aclient = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
        constrained = [aclient.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=60, temperature=1.0, seed=s,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
            for s in range(6)]
        plain = aclient.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
        return await asyncio.gather(plain, *constrained)

    plain, *constrained = asyncio.run(together())
    assert plain.choices[0].message.content == alone
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24,
                                          temperature=0).choices[0].message.content == alone
    assert all(c.choices[0].message.content != alone for c in constrained)


# ----------------------------------------------------------------------------------------------------------------
# Tool calls


def _arguments_valid(call, tools):
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    return valid(schema, call.function.arguments)


def test_tool_round_trip(served):
    """tool_choice required: the answer is calls whose arguments validate; the next turn sends the calls back with
    their results in `tool` messages and gets an answer."""
    client = served.client()
    tools = [WEATHER, TIME]
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert all(_arguments_valid(c, tools) for c in calls)
    messages = ASK + [choice.message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "18 degrees"} for c in calls]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="none",
                                            max_tokens=8, temperature=0)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content


def test_named_function_and_no_parallel_calls(served):
    client = served.client()
    for seed in range(5):
        response = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=100, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
        calls = response.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_time" and _arguments_valid(calls[0], [TIME])


def test_streamed_tool_calls_as_openai_streams_them(served):
    """The openai client's stream helper accumulates the deltas (index, id, name, then arguments) into the same
    calls as the plain request."""
    client = served.client()
    for seed in range(20):  # a random model: the first seed whose answer is two or more calls, then its end
        body = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=300,
                    temperature=1.0, seed=seed)
        plain = client.chat.completions.create(**body).choices[0]
        if plain.finish_reason == "tool_calls" and len(plain.message.tool_calls) > 1:
            break
    assert len(plain.message.tool_calls) > 1
    with client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    got = [(c.function.name, c.function.arguments) for c in final.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]


def test_auto_tool_choice_reads_calls_out_of_free_text():
    tools = [Tool("f", None, {"type": "object"})]
    reader = CallReader(tools, forced=False)
    pieces = ["Sure", ". <tool", '_call>\n{"name": "f", "arguments": {"x": 1}}', "\n</tool_call>", "\n"]
    out = [reader.feed(p) for p in pieces] + [reader.feed("", final=True)]
    assert "".join(c for c, _ in out) == "Sure. "
    assert [(c.name, json.loads(c.arguments)) for _, calls in out for c in calls] == [("f", {"x": 1})]
    # text that only looks like a call, or calls a function that is not offered, stays text
    reader = CallReader(tools, forced=False)
    text = '<tool_call>{"name": "g", "arguments": {}}</tool_call> and <tool'
    assert reader.feed(text, final=True) == (text, [])


def test_generic_tool_prompt_for_a_template_without_tools():
    """A template that knows no tools: the functions go into the system turn, earlier calls into the assistant's
    turn, and results into one user turn."""
    tools = [Tool("get_weather", "The weather", WEATHER["function"]["parameters"])]
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "a", "name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}},
                    {"id": "b", "name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "3"}, {"role": "tool", "tool_call_id": "b",
                                                                       "content": "20"}]
    out = prompt_messages(messages, tools, native=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"].count("<tool_call>") == 2 and '"city": "Oslo"' in out[2]["content"]
    assert out[3]["content"] == "<tool_response>\n3\n</tool_response>\n<tool_response>\n20\n</tool_response>"


def test_a_template_that_takes_tools_gets_them(served, monkeypatch):
    pre = served.server.pretrained
    template = ("{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}{% for m in messages %}"
                "{{ m['role'] }}:{{ m['content'] }}{% for c in m.get('tool_calls', []) %}"
                "({{ c['function']['name'] }}){% endfor %}|{% endfor %}")
    monkeypatch.setattr(pre, "chat_template", template)
    from lmlab.inference.protocol import parse_chat
    body = {"model": MODEL, "tools": [WEATHER], "messages": ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    parsed = parse_chat(body, pre, MODEL, served.server.limits, served.server.grammars)
    text = pre.tokenizer.decode(parsed.request.prompt, skip_special_tokens=False)
    assert text == "[get_weather]user:alice sees bob|assistant:(get_weather)|tool:sunny|"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: OpenAI 400s naming the field, never a 5xx


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_grammar": "start: foo"}, "guided_grammar"),
    ({"structured_outputs": {"regex": "[a"}}, "structured_outputs.regex"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_structured_requests_are_400s_naming_the_field(served, extra, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5, **extra}
    status, _, answer = served.request("POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------------------------------------------
# An embedding model served on its own


def test_an_encoder_is_served_alone_at_v1_embeddings(minilm_path):
    running = RunningServer(build(str(minilm_path)))
    try:
        client = running.client()
        model = minilm_path.name
        assert [m.id for m in client.models.list().data] == [model]
        vectors = client.embeddings.create(model=model, input=["a cat", "a dog"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) == 384
        for path, body in (("/v1/chat/completions", {"model": model, "messages": ASK}),
                           ("/v1/completions", {"model": model, "prompt": "hi"})):
            status, _, answer = running.request("POST", path, body)
            assert status == 400 and answer["error"]["param"] == "model"
            assert "embedding model" in answer["error"]["message"]
        status, _, text = running.request("GET", "/metrics")
        assert status == 200 and 'endpoint="/v1/chat/completions",status="400"' in text
    finally:
        running.uvicorn.should_exit = True
        running.thread.join(timeout=10)
