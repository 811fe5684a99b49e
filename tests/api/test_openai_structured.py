"""Structured output with the official `openai` client against a real server on the tiny base:
``response_format`` json_schema / json_object by constrained decoding, ``tools`` / ``tool_choice`` with OpenAI
``tool_calls``, tool turns in the input, and every bad input a 400 naming it. The engine-level batch test (rows
with and without a grammar in one decode step) is in tests/serving/test_constrained.py."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from lorafleet.api.openai_routes import prompt_ids

MODEL = "acme/alice/style"
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]
# Bounded values: the tiny random model would otherwise write one endless number or string.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet", "likes"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", None]},
                         "likes": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
# Small definitions: the tiny base's context is 512 tokens of bytes, and the tools are rendered into the prompt.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,5}$"}},
                                          "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a"]}}}


@pytest.fixture(scope="module")
def c(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0, timeout=120)


def _schema_format(schema, name="person"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_output_parses_and_validates(c):
    out = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=200, temperature=0,
                                    response_format=_schema_format(PERSON))
    plain = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=20, temperature=0)
    assert not plain.choices[0].message.content.startswith("{")  # the model alone does not write JSON
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # ended by the grammar being complete, not by max_tokens
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    # sampled rows are constrained too: several seeds, each valid
    many = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=200, temperature=1.0, seed=3, n=3,
                                     response_format=_schema_format(PERSON))
    docs = [json.loads(ch.message.content) for ch in many.choices]
    for doc in docs:
        jsonschema.validate(doc, PERSON)
    assert len({json.dumps(d) for d in docs}) > 1


def test_json_object_is_held_to_json(c):
    out = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, temperature=0,
                                    response_format={"type": "json_object"})
    plain = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, temperature=0)
    assert out.choices[0].finish_reason == "stop"  # the object closed (greedy, this adapter: '{}')
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.choices[0].message.content)  # alone, the same row writes no JSON


def test_json_schema_streams_the_same_text(c):
    kwargs = {"model": MODEL, "messages": MSGS, "max_tokens": 200, "temperature": 0,
              "response_format": _schema_format(PERSON)}
    whole = c.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("response_format", "param", "words"), [
    (_schema_format({"type": "nonsense"}), "response_format.json_schema.schema", "nonsense"),
    (_schema_format({"type": "object", "required": "name"}), "response_format.json_schema.schema", "required"),
    (_schema_format({"type": "string", "pattern": "(("}), "response_format.json_schema.schema", "pattern"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name",
     "name"),
    ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
    ({"type": "yaml"}, "response_format.type", "yaml"),
    ({"type": "json_object", "schema": {}}, "response_format.schema", "not supported"),
])
def test_bad_response_format_is_400_naming_it(c, response_format, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, response_format=response_format)
    assert err.value.body["param"] == param
    assert words in err.value.body["message"]


def test_required_tool_choice_forces_a_valid_call(c):
    out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                    tools=[ADD], tool_choice="required", max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])


def test_named_tool_choice_calls_that_function(c):
    out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Oslo?"}],
                                    tools=[PING, WEATHER], max_tokens=70, temperature=0,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and out.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_auto_and_none_leave_plain_text_as_content(server, c):
    msgs = [{"role": "user", "content": "Hi there"}]
    auto = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=8, temperature=0)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    assert auto.choices[0].finish_reason in ("stop", "length")
    none = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=8,
                                     temperature=0)
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    # "none": the tools are not rendered, so the prompt (and the greedy answer) is the one without tools
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_tool_turns_are_accepted_and_rendered(server, c):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4}'}]
    out = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant"
    ids = prompt_ids(server.service, [{k: v for k, v in m.items() if v is not None} for m in msgs], "messages",
                     [WEATHER])
    text = server.base.tokenizer.decode(ids)
    assert out.usage.prompt_tokens == len(ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>{"temp_c": 4}</tool_response>' in text
    assert '"name":"get_weather"' in text  # the definitions, in the system turn


@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope'"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "always"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters", "objekt"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [WEATHER], "stream": True}, "stream", "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "aliases"),
])
def test_bad_tool_input_is_400_naming_it(c, kwargs, param, words):
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        out = c.chat.completions.create(model=MODEL, messages=MSGS, **kwargs)
        if kwargs.get("stream"):
            list(out)
    assert err.value.body["param"] == param
    assert words in err.value.body["message"]


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "4"},  # no tool_call_id
    {"role": "user", "content": None},
    {"role": "assistant", "content": None},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "f", "arguments": "not json"}}]},
    {"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function",
                                                    "function": {"name": "f", "arguments": "{}"}}]},
])
def test_bad_messages_are_400(c, message):
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}, message], max_tokens=4)
    assert err.value.body["param"].startswith("messages.1")


def test_max_completion_tokens_alias(c):
    both = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, max_completion_tokens=5, temperature=0)
    alone = c.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=5, temperature=0)
    assert both.usage.completion_tokens == alone.usage.completion_tokens == 5
    assert both.choices[0].message.content == alone.choices[0].message.content


WX_PLAN_TOOLS = [WEATHER, {"type": "function", "function": {
    "name": "strict_add", "strict": True, "parameters": ADD["function"]["parameters"]}}]


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('{"tool": "get_weather", "city": "London"}', None, [("get_weather", {"city": "London"})]),  # wxbot persona
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
    ('Let me check. <tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}', "Let me check.",
     [("get_weather", {"city": "Rome"})]),  # arguments as a string; an unclosed last tag
    ('```json\n[{"name": "get_weather", "parameters": {"city": "A"}}, {"name": "strict_add", "arguments": {"a": 1}}]'
     '\n```', None, [("get_weather", {"city": "A"}), ("strict_add", {"a": 1})]),
    ('{"name": "unknown", "arguments": {}}', None, None),  # not a declared function: plain content
    ('{"name": "strict_add", "arguments": {"a": 1000}}', None, None),  # breaks a strict tool's schema
    ('{"city": "London"}', None, None),
    ("It is sunny in London.", None, None),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call><tool_call>oops</tool_call>', None,
     None),
])
def test_tool_call_formats_parsed(text, content, calls):
    from lorafleet.api.structured import parse_tool_calls, tool_plan

    parsed = parse_tool_calls(text, tool_plan(WX_PLAN_TOOLS, "auto", None))
    if calls is None:
        assert parsed is None
        return
    got_content, got = parsed
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)
    single = parse_tool_calls(text, tool_plan(WX_PLAN_TOOLS, "auto", False))  # parallel_tool_calls=false
    assert len(single[1]) == 1
