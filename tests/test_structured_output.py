"""`response_format` json_object and json_schema: the tiny random model, constrained, answers
JSON that parses and validates, through the real decode loop (alone, batched, streamed)."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

CHAT = "Llama3-8B"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "score", "tags"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
                         "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3}}}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


def _ask(**extra) -> dict:
    return {"model": CHAT, "messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 64, **extra}


def _post(http, body: dict):
    """As JSON with escapes: httpx's own encoder cannot write a lone surrogate ("\\ud800")."""
    return http.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_a_json_schema_answer_validates(http):
    answer = http.post("/v1/chat/completions", json=_ask(response_format=AS_SCHEMA, n=3, seed=7)).json()
    assert answer["code"] == 0
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"  # ended by the grammar, well within max_tokens
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    # Unconstrained, the same request writes no JSON at all.
    free = http.post("/v1/chat/completions", json=_ask(seed=7)).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)


def test_the_openai_clients_parse_helper_gets_its_pydantic_model(client):
    class Verdict(pydantic.BaseModel):
        answer: Literal["yes", "no"]
        confident: bool

    parsed = client.chat.completions.parse(model=CHAT, messages=[{"role": "user", "content": "Well?"}],
                                           response_format=Verdict, max_tokens=64, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


def test_streamed_json_is_the_same_json(http, client):
    whole = http.post("/v1/chat/completions", json=_ask(response_format=AS_SCHEMA, n=2, seed=3, temperature=1.2)).json()
    chunks = client.chat.completions.create(**_ask(response_format=AS_SCHEMA, n=2, seed=3, temperature=1.2, stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [choice["message"]["content"] for choice in whole["choices"]]
    assert all(jsonschema.validate(json.loads(text), SCHEMA) is None for text in texts)


def test_json_object_gives_an_object_or_runs_out_of_tokens(http):
    """Any object: what a random model writes in it is gibberish, but JSON; cut off, it says `length`."""
    parsed = 0
    for seed in range(4):
        choice = http.post("/v1/chat/completions", json=_ask(response_format={"type": "json_object"}, seed=seed,
                                                              max_tokens=48)).json()["choices"][0]
        assert choice["message"]["content"].startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
            parsed += 1
        else:
            assert choice["finish_reason"] == "length"
    assert parsed, "no seed's object ended within max_tokens: the `stop` branch went unchecked"
    short = http.post("/v1/chat/completions", json=_ask(response_format=AS_SCHEMA, max_tokens=3)).json()["choices"][0]
    assert short["finish_reason"] == "length" and short["message"]["content"].startswith('{"')


def test_json_completed_by_the_last_token_allowed_ends_as_stop(http):
    """The answer is whole: `length` would tell the client it was cut off."""
    whole = http.post("/v1/chat/completions", json=_ask(response_format=AS_SCHEMA, temperature=0)).json()
    used = whole["usage"]["completion_tokens"]
    assert whole["choices"][0]["finish_reason"] == "stop" and used < 64
    exact = http.post("/v1/chat/completions", json=_ask(response_format=AS_SCHEMA, temperature=0,
                                                        max_tokens=used)).json()["choices"][0]
    assert exact["finish_reason"] == "stop" and exact["message"]["content"] == whole["choices"][0]["message"]["content"]
    cut = http.post("/v1/chat/completions", json=_ask(response_format=AS_SCHEMA, temperature=0,
                                                      max_tokens=used - 1)).json()["choices"][0]
    assert cut["finish_reason"] == "length"


def test_a_constrained_request_shares_its_batch_with_free_ones(http):
    """Rows with and without a grammar decode in one batch: each keeps its own rules."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [_ask(response_format=AS_SCHEMA, seed=i) if i % 2 else _ask(seed=i, max_tokens=16) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: http.post("/v1/chat/completions", json=body).json(), bodies))
    for i, answer in enumerate(answers):
        content = answer["choices"][0]["message"]["content"]
        if i % 2:
            jsonschema.validate(json.loads(content), SCHEMA)
        else:
            assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    # Seeded, the constrained answers are the same alone as batched.
    alone = http.post("/v1/chat/completions", json=bodies[1]).json()["choices"][0]["message"]["content"]
    assert alone == answers[1]["choices"][0]["message"]["content"]


@pytest.mark.parametrize("response_format, says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "objectx"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "grammar", "grammar": "root ::= 'a'"}, "'grammar' is not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\ud800"]}}}, "schema cannot be used"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "maximum": 2 ** 64}}},
     "schema cannot be used"),
    # Compiles, then goes past the parser's limits at the first token: that request fails, as a 400.
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "additionalProperties": False,
        "properties": {f"field_{i}": {"type": "string"} for i in range(520)}}}}, "schema"),
])
def test_a_schema_that_cannot_be_used_is_a_400(http, response_format, says):
    answer = _post(http, _ask(response_format=response_format))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "response_format" and says in answer.json()["message"]
    for stream in (False, True):  # the same 400 for a stream: refused before any token
        assert _post(http, _ask(response_format=response_format, stream=stream)).status_code == 400


# ------------------------------------------------------------------ tool_choice that forces a call

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"enum": ["Paris", "Rome"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _arguments_valid(call) -> bool:
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    return True


def test_a_named_tool_choice_calls_that_function(client):
    """Any model, with or without a tool_call_parser: the answer is the function's arguments."""
    answer = client.chat.completions.create(**_ask(tools=[WEATHER, CLOCK], tool_choice=NAMED, n=2, seed=1))
    for choice in answer.choices:
        assert choice.finish_reason == "stop" and choice.message.content is None  # "stop", as OpenAI and vLLM say
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_") and _arguments_valid(call)
    # The older function_call naming it forces the same.
    older = client.chat.completions.create(**_ask(tools=[WEATHER], function_call={"name": "get_weather"}))
    assert older.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_required_calls_one_or_more_tools(client):
    for seed in range(3):
        choice = client.chat.completions.create(**_ask(tools=[WEATHER, CLOCK], tool_choice="required", seed=seed,
                                                       parallel_tool_calls=False)).choices[0]
        (call,) = choice.message.tool_calls
        assert call.function.name in ("get_weather", "get_time") and _arguments_valid(call)
        assert choice.finish_reason == "tool_calls"  # as OpenAI and vLLM end `required` (a named call: "stop")
    free = client.chat.completions.create(**_ask(tools=[WEATHER, CLOCK], tool_choice="required", seed=5,
                                                 max_tokens=200)).choices[0]
    if free.finish_reason == "tool_calls":
        assert free.message.tool_calls and all(_arguments_valid(call) for call in free.message.tool_calls)
    else:  # cut off inside its list of calls: the text it wrote, no call
        assert free.message.tool_calls is None and free.message.content.startswith("[{")
    # allowed_tools narrows the choice.
    narrowed = client.chat.completions.create(**_ask(tools=[WEATHER, CLOCK], parallel_tool_calls=False, tool_choice={
        "type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "name": "get_time"}]}}))
    assert narrowed.choices[0].message.tool_calls[0].function.name == "get_time"
    # A tool whose parameters refer to their own $defs (as pydantic_function_tool writes an Enum field).
    unit = {"type": "function", "function": {"name": "get_temperature", "parameters": {
        "$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object", "additionalProperties": False,
        "required": ["unit"], "properties": {"unit": {"$ref": "#/$defs/Unit"}}}}}
    call = client.chat.completions.create(**_ask(tools=[WEATHER, unit], tool_choice="required", parallel_tool_calls=False,
                                                 seed=4)).choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_temperature")


TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["u", "child", "same"],
    "properties": {"u": {"type": "integer", "minimum": 0, "maximum": 9}, "same": {"$ref": "#/properties/u"},
                   "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}}}


def test_required_keeps_each_tools_own_refs(client):
    """`#` and `#/properties/...` mean the tool's own schema under `required` too, and two tools
    may use one $defs name for different things."""
    unit = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object", "additionalProperties": False,
        "required": ["unit"], "properties": {"unit": {"$ref": "#/$defs/Unit"}}}}}
    size = {"type": "function", "function": {"name": "get_time", "parameters": {
        "$defs": {"Unit": {"enum": ["s", "ms"]}}, "type": "object", "additionalProperties": False,
        "required": ["unit"], "properties": {"unit": {"$ref": "#/$defs/Unit"}}}}}
    tools = {"tree": TREE, "get_weather": unit, "get_time": size}
    called = set()
    for seed in range(6):
        choice = client.chat.completions.create(**_ask(tools=list(tools.values()), tool_choice="required", seed=seed,
                                                       max_tokens=120, temperature=0.8)).choices[0]
        for call in choice.message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"])
            called.add(call.function.name)
    assert called


def test_a_forced_call_is_an_object_and_a_tools_own_id_keeps_its_refs(client):
    """A schema whose types allow null, or none given, makes an object all the same; under
    `required`, a tool whose schema has an `$id` of its own resolves refs by that URI."""
    nullable = {"type": "function", "function": {"name": "n", "parameters": {
        "type": ["object", "null"], "properties": {"a": {"type": "integer"}}, "required": ["a"],
        "additionalProperties": False}}}
    by_uri = {"type": "function", "function": {"name": "u", "parameters": {
        "$id": "https://example.com/s.json", "type": "object", "required": ["u", "v"], "additionalProperties": False,
        "properties": {"u": {"$ref": "https://example.com/s.json#/$defs/U"}, "v": {"$ref": "#/$defs/U"}},
        "$defs": {"U": {"type": "integer", "minimum": 0, "maximum": 3}}}}}
    for tool, choice in ((nullable, {"type": "function", "function": {"name": "n"}}), (by_uri, "required")):
        for seed in range(3):
            choice_ = client.chat.completions.create(**_ask(tools=[tool], tool_choice=choice, seed=seed,
                                                            max_tokens=60, temperature=1.0)).choices[0]
            if choice_.finish_reason == "length":
                continue
            arguments = json.loads(choice_.message.tool_calls[0].function.arguments)
            jsonschema.validate(arguments, {**tool["function"]["parameters"], "type": "object"})


def test_a_stop_string_inside_a_streamed_call_is_no_finished_call(client):
    """The call went out in pieces and a stop string ended the answer inside it: `stop`, not
    `tool_calls`, which would say the call is whole."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 5}, "b": {"type": "boolean"}},
        "required": ["a", "b"], "additionalProperties": False}}}
    ask = _ask(tools=[tool], tool_choice="required", seed=3, max_tokens=200, stop=[',"b'])
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "stop" and whole.message.tool_calls is None  # its text
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["stop"]


def test_a_required_tools_own_id_is_kept_unless_it_has_a_fragment():
    from serve_app.protocol import ChatCompletionRequest
    from serve_app.translate import _forced_call_schema

    def schema_of(tool_id: str) -> dict:
        parameters = {"$id": tool_id, "type": "object", "properties": {"a": {"$ref": "#/$defs/U"}},
                      "$defs": {"U": {"type": "integer"}}}
        request = ChatCompletionRequest.model_validate({**_ask(), "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": parameters}}]})
        return _forced_call_schema(request.forced_tool_call, single=False)["$defs"]["tool_0"]

    kept = schema_of("https://example.com/s.json")
    assert kept["$id"] == "https://example.com/s.json" and kept["properties"]["a"]["$ref"] == "#/$defs/U"
    rebased = schema_of("#foo")  # no ref can resolve against a base with a fragment
    assert "$id" not in rebased and rebased["properties"]["a"]["$ref"] == "#/$defs/tool_0/$defs/U"


@pytest.mark.parametrize("extra, matches", [
    ({"guided_choice": ["yes", "no", "maybe \"so\""]}, lambda text: text in ("yes", "no", 'maybe "so"')),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda text: text in ("red", "green")),
    ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch("[0-9]{3}-[a-z]{2}", text)),
    ({"structured_outputs": {"regex": "(ab)+c"}}, lambda text: re.fullmatch("(ab)+c", text)),
    ({"structured_outputs": {"grammar": 'start: "x" ("," "y")*'}}, lambda text: re.fullmatch("x(,y)*", text)),
    ({"guided_json": SCHEMA}, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ({"structured_outputs": {"json_object": True}}, lambda text: isinstance(json.loads(text), dict)),
])
def test_vllms_structured_outputs_constrain_the_answer(client, extra, matches):
    """vLLM's `structured_outputs` and its older `guided_*` fields, as its clients send them
    (`extra_body`), streamed or not: every answer that ended on its own matches."""
    ended = 0
    for seed in range(3):
        ask = _ask(seed=seed, max_tokens=60, temperature=1.0)
        choice = client.chat.completions.create(**ask, extra_body=extra).choices[0]
        chunks = list(client.chat.completions.create(**ask, extra_body=extra, stream=True))
        streamed = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        assert streamed == choice.message.content and choice.message.tool_calls is None
        if choice.finish_reason == "stop":
            ended += 1
            assert matches(choice.message.content), choice.message.content
    assert ended  # the grammar ends most answers well within max_tokens


@pytest.mark.parametrize("extra, param", [
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {}}, "structured_outputs"),  # nothing to follow, as vLLM refuses it
    ({"structured_outputs": {"structural_tag": {"type": "structural_tag"}}}, "structured_outputs.structural_tag"),
    ({"guided_json": "not json"}, "guided_json"),
    ({"guided_json": [1]}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_regex": "(?<=a)b"}, "guided_regex"),  # no lookarounds in Rust's regex
    ({"structured_outputs": {"grammar": "start: ??"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "integer", "minimum": 5, "maximum": 1}}}, "structured_outputs.json"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
    ({"guided_choice": ["a"], "tools": [WEATHER], "tool_choice": "required"}, "guided_choice"),
])
def test_structured_outputs_a_model_cannot_follow_are_a_400(http, extra, param):
    for stream in (False, True):
        answer = _post(http, _ask(stream=stream, **extra))
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    if param.endswith("json"):  # in words that fit what was sent
        assert "grammar" not in answer.json()["error"]["message"]


def test_rebasing_moves_only_a_tools_own_pointers():
    from serve_app.translate import _rebased

    schema = {"$id": "urn:tool", "type": "object", "$defs": {"U": {"$anchor": "U", "enum": ["C"]}},
              "properties": {"a": {"$ref": "#"}, "b": {"$ref": "#/$defs/U"}, "c": {"$ref": "#U"},
                             "default": {"$ref": "#/properties/a"},  # a property named like a keyword
                             "d": {"const": {"$ref": "#/x"}, "default": {"$ref": "#"}},  # data
                             "e": {"$id": "urn:other", "$ref": "#/$defs/V", "$defs": {"V": {}}},  # a resource of its own
                             "f": {"items": [{"$ref": "#"}], "anyOf": [{"$ref": "#/$defs/U"}]}}}
    got = _rebased(schema, "#/$defs/tool_0")
    assert "$id" not in got
    p = got["properties"]
    assert (p["a"], p["b"], p["c"], p["default"]) == ({"$ref": "#/$defs/tool_0"}, {"$ref": "#/$defs/tool_0/$defs/U"},
                                                      {"$ref": "#U"}, {"$ref": "#/$defs/tool_0/properties/a"})
    assert p["d"] == schema["properties"]["d"] and p["e"] == schema["properties"]["e"]
    assert p["f"] == {"items": [{"$ref": "#/$defs/tool_0"}], "anyOf": [{"$ref": "#/$defs/tool_0/$defs/U"}]}


def test_a_streamed_forced_call_is_the_same_call(client):
    ask = _ask(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, seed=2, temperature=1.5)
    whole = client.chat.completions.create(**ask).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    # Its arguments as they are written, the first piece with the call's name.
    assert streamed[0].function.name == whole[0].function.name
    assert {c.index for c in streamed} == {0} and all(c.function.name is None for c in streamed[1:])
    assert "".join(c.function.arguments for c in streamed) == whole[0].function.arguments
    # Its content is null, streamed too (no "" the stream helper would make the message's content).
    assert all(choice.delta.content is None for chunk in chunks for choice in chunk.choices)
    # No empty deltas while the `[{"name": ` wrapper is written (about 5 before each call), as
    # OpenAI and vLLM send none: every chunk after the first carries a piece or the end.
    assert all(choice.delta.tool_calls or choice.finish_reason for chunk in chunks[1:] for choice in chunk.choices)


def test_tool_choice_wins_over_the_older_function_call(client):
    answer = client.chat.completions.create(**_ask(tools=[WEATHER], tool_choice="none", max_tokens=8,
                                                   function_call={"name": "get_weather"})).choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")


@pytest.mark.parametrize("schema, stream", [
    ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, False),  # allows no value at all
    ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, True),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(500)}}, False),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(500)}}, True),
])
def test_a_schema_past_the_decoders_reach_is_a_short_400(http, schema, stream):
    """In words a client can read (not llguidance's parser state), whenever it shows."""
    body = _ask(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                stream=stream, max_tokens=8)
    answer = _post(http, body)
    if answer.status_code == 200:  # found only while decoding: an error event, or a JSON answer after all
        events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
        errors = [event["error"] for event in events if "error" in event]
        if not errors:
            return
        error = errors[0]
    else:
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
    assert error["param"] == "response_format" and len(error["message"]) < 500
    assert "compute_time_us" not in error["message"] and "<state>" not in error["message"]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "custom", "custom": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": "required"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": 5}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"enum": [2 ** 64 + 0.5, "\ud800"]}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "x\ud83d"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}],
      "tool_choice": {"type": "function", "function": {"name": "s"}}}, "tools"),  # arguments are an object
    ({"tools": [WEATHER, {**WEATHER, "function": {**WEATHER["function"], "description": "again"}}],
      "tool_choice": "required"}, "tool_choice"),  # which of the two?
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    # Schemas without a `type` that allow no object: arguments are an object.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"enum": [1, 2]}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "$defs": {"S": {"type": "string"}}, "$ref": "#/$defs/S"}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    # Tools a model could not call, forced or not.
    ({"tools": [{"type": "function", "function": {"name": ""}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "  "}}]}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"description": "no name"}}]}, "tools"),
])
def test_a_forced_call_that_cannot_be_made_is_a_400(http, extra, param):
    answer = _post(http, _ask(**extra))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


# ------------------------------------------------------------------ after a reasoning model's thinking


@pytest.fixture(scope="module")
def thinking_tokenizer(models_dir):
    """The tiny model's tokenizer with `<think>` and `</think>` as single ordinary tokens, as
    Qwen3's and DeepSeek-R1's have them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-llama")
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def _allowed(grammar, vocabulary: int) -> set[int]:
    import torch

    words = torch.zeros((1, (vocabulary + 31) // 32), dtype=torch.int32)
    grammar.fill_mask(words, 0)
    return {i for i in range(vocabulary) if (int(words[0, i // 32]) >> (i % 32)) & 1}


def _compiler(tokenizer, fmt=None):
    from serve_app.structured_output import GrammarCompiler

    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, fmt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("fmt, opening", [("qwen3", None), ("deepseek_r1", None), ("qwen3", "thinking")])
def test_the_grammar_starts_after_the_thinking(thinking_tokenizer, fmt, opening):
    from serve_app.structured_output import json_grammar

    tokenizer, vocabulary = thinking_tokenizer, len(thinking_tokenizer)
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    brace, word = tokenizer.convert_tokens_to_ids("{"), _ids(tokenizer, "hello")[0]
    grammar, = _compiler(tokenizer, fmt).grammars(json_grammar(SCHEMA, any_whitespace=False), 1, opening=opening)
    json_start = _allowed(_compiler(tokenizer).grammars(json_grammar(SCHEMA, any_whitespace=False), 1)[0], vocabulary)
    assert brace in json_start and start not in json_start and word not in json_start
    if fmt == "qwen3" and opening is None:  # thinks only if it starts with <think>: that, or the JSON's first token
        assert _allowed(grammar, vocabulary) == json_start | {start}
        assert grammar.follow(start, ended=False) is False
    thinking = _allowed(grammar, vocabulary)  # inside the thinking, anything goes but the end: the JSON must come
    assert thinking == set(range(vocabulary)) - {tokenizer.eos_token_id}
    for token in (word, brace, start, word):
        assert grammar.follow(token, ended=False) is False
        assert _allowed(grammar, vocabulary) == thinking
    grammar.follow(end, ended=False)
    assert _allowed(grammar, vocabulary) == json_start  # then the JSON, from its start
    for token in _ids(tokenizer, '{"answer":"yes","score":3,"tags":[]}'):
        done = grammar.follow(token, ended=False)
    assert done


@pytest.mark.parametrize("fmt, opening", [("qwen3", None), ("deepseek_r1", "answer"), ("qwen3", "answer")])
def test_an_answer_that_does_not_think_is_json_at_once(thinking_tokenizer, fmt, opening):
    """A qwen3 answer that does not open with <think>; any answer whose prompt closed the
    thinking (Qwen3 with enable_thinking false: no <think> allowed then)."""
    from serve_app.structured_output import json_grammar

    tokenizer = thinking_tokenizer
    grammar, = _compiler(tokenizer, fmt).grammars(json_grammar(SCHEMA, any_whitespace=False), 1, opening=opening)
    assert (tokenizer.convert_tokens_to_ids("<think>") in _allowed(grammar, len(tokenizer))) == (opening is None)
    grammar.follow(tokenizer.convert_tokens_to_ids("{"), ended=False)
    assert tokenizer.convert_tokens_to_ids("<think>") not in _allowed(grammar, len(tokenizer))


def test_a_batchs_masks_computed_together_are_each_rows_own(thinking_tokenizer):
    """`fill_masks` computes the rows' masks on llguidance's thread pool: each row as alone,
    rows at different places in their JSON, thinking, or failed, side by side."""
    import torch

    from serve_app.structured_output import fill_masks, json_grammar

    tokenizer, vocabulary = thinking_tokenizer, len(thinking_tokenizer)
    grammars = _compiler(tokenizer, "qwen3").grammars(json_grammar(SCHEMA, any_whitespace=False), 5)
    grammars[1].follow(tokenizer.convert_tokens_to_ids("<think>"), ended=False)  # thinking
    for token in _ids(tokenizer, '{"answer":"y'):
        grammars[2].follow(token, ended=False)  # inside a string
    grammars[3].matcher.consume_token(_ids(tokenizer, "hello")[0])  # a failed matcher
    together = torch.zeros((5, (vocabulary + 31) // 32), dtype=torch.int32)
    fill_masks(list(enumerate(grammars)), together)
    alone = [_allowed(grammar, vocabulary) for grammar in grammars]
    assert [{i for i in range(vocabulary) if (int(together[row, i // 32]) >> (i % 32)) & 1} for row in range(5)] == alone
    assert len({frozenset(mask) for mask in alone}) == 4  # the untouched rows 0 and 4 alike, the rest differ


def test_a_reasoning_model_without_single_marker_tokens_cannot_take_a_grammar(models_dir, thinking_tokenizer):
    """Its thinking's end cannot be told token by token: a clear 400, not JSON read as thinking."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from serve_app.errors import InvalidRequest
    from serve_app.structured_output import ThinkingMarkers, json_grammar

    plain = AutoTokenizer.from_pretrained(models_dir / "tiny-llama")  # `<think>` is several tokens here
    with pytest.raises(InvalidRequest, match="no single ordinary token for <think> and </think>") as refused:
        _compiler(plain, "deepseek_r1").grammars(json_grammar(None, any_whitespace=False), 1, param="tool_choice")
    assert refused.value.param == "tool_choice"
    assert _compiler(plain).grammars(json_grammar(None, False), 1)
    eos = {plain.eos_token_id}
    for flagged in ("additional", "added"):  # either way decoded away, so the reader would never see them
        special = AutoTokenizer.from_pretrained(models_dir / "tiny-llama")
        if flagged == "additional":
            special.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
        else:
            special.add_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
        assert ThinkingMarkers.of(special, "qwen3", eos) is None, flagged
    assert ThinkingMarkers.of(thinking_tokenizer, None, eos) is None
    assert ThinkingMarkers.of(thinking_tokenizer, "qwen3", eos).end == (thinking_tokenizer.convert_tokens_to_ids("</think>"),)
    assert ThinkingMarkers.of(plain, "openai_gptoss", eos) is None  # harmony's markers: several ordinary tokens here
    with pytest.raises(InvalidRequest, match="no special tokens for <\\|channel\\|> and <\\|message\\|>"):
        _compiler(plain, "openai_gptoss").grammars(json_grammar(None, any_whitespace=False), 1)


def test_a_gpt_oss_answer_comes_under_the_grammar_after_its_final_channels_header(models_dir):
    """Harmony's thinking (its analysis channel, and any header) is free but for the end of the
    answer; the grammar starts once `<|channel|>final<|message|>` has been written, token by token."""
    from transformers import AutoTokenizer

    from serve_app.structured_output import json_grammar

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>"]})
    vocabulary, eos = len(tokenizer), tokenizer.eos_token_id
    grammar, = _compiler(tokenizer, "openai_gptoss").grammars(json_grammar(SCHEMA, any_whitespace=False), 1)
    json_start = _allowed(_compiler(tokenizer).grammars(json_grammar(SCHEMA, any_whitespace=False), 1)[0], vocabulary)
    thinking = _ids(tokenizer, "<|channel|>analysis<|message|>Think of the final answer.<|end|><|start|>assistant")
    for token in thinking + _ids(tokenizer, "<|channel|>final"):
        assert eos not in _allowed(grammar, vocabulary) and len(_allowed(grammar, vocabulary)) == vocabulary - 1
        assert grammar.follow(token, ended=False) is False
    grammar.follow(tokenizer.convert_tokens_to_ids("<|message|>"), ended=False)
    assert _allowed(grammar, vocabulary) == json_start


@pytest.mark.parametrize("schema, says", [
    ({"type": "string", "pattern": "(("}, "unclosed group"),  # llguidance's detail is past its first line
    ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "no JSON value can follow it"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "The schema cannot be used")])
def test_a_schema_error_is_llguidances_words_without_its_parser_state(thinking_tokenizer, schema, says):
    from serve_app.errors import InvalidRequest
    from serve_app.structured_output import json_grammar

    with pytest.raises(InvalidRequest, match=says) as refused:
        _compiler(thinking_tokenizer).grammars(json_grammar(schema, any_whitespace=False), 1, param="tools")
    assert refused.value.param == "tools" and "<state>" not in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("fmt, start, end, opening, tokens, state, counted", [
    ("qwen3", 10, (11,), None, [10, 5, 6, 7, 11, 8, 9], "answer", 3),  # <think> 5 6 7 </think> 8 9
    ("qwen3", 10, (11,), None, [5, 10, 6, 11], "answer", 0),  # not its first token: no thinking
    ("qwen3", 10, (11,), "thinking", [5, 6, 11, 8], "answer", 2),  # the prompt opened it
    ("qwen3", 10, (11,), "answer", [10, 5, 11], "answer", 0),  # the prompt closed it
    ("deepseek_r1", 10, (11,), None, [5, 6, 7], "thinking", 3),  # thinks from the start; cut off
    ("deepseek_r1", 10, (11,), None, [10, 5, 6, 11, 8], "answer", 2),  # a leading <think> the reader drops
    ("qwen3", 10, (11,), "thinking", [10, 5, 11], "answer", 1),
    # gpt-oss: <|channel|>=20 final=21 analysis=23 <|message|>=22 <|end|>=24; only the analysis
    # message's tokens are reasoning, not headers, nor a commentary channel's call.
    ("openai_gptoss", None, (20, 21, 22), None, [20, 23, 22, 5, 6, 24, 30, 20, 21, 22, 4], "answer", 2),
    ("openai_gptoss", None, (20, 21, 22), None, [20, 23, 22, 5, 6, 7, 24, 30, 20, 31, 22, 8, 9], "thinking", 3),
    ("openai_gptoss", None, (20, 21, 22), None, [20, 23, 22, 5, 20, 21, 22, 4], "answer", 1),  # no <|end|>
])
def test_thinking_is_followed_and_counted_token_by_token(fmt, start, end, opening, tokens, state, counted):
    """usage's reasoning_tokens: the tokens read out as `reasoning`, markers left out (as vLLM
    counts them)."""
    from serve_app.structured_output import Thinking, ThinkingMarkers

    harmony = {"analysis": (20, 23, 22), "message_end": frozenset({24})} if fmt == "openai_gptoss" else {}
    thinking = Thinking(ThinkingMarkers(start=start, end=end, fmt=fmt, eos_ids=frozenset({2}), **harmony), opening)
    for token in tokens:
        thinking.follow(token)
    assert (thinking.state, thinking.tokens) == (state, counted)
