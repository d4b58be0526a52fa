"""A model's answer read into its parts: thinking into `reasoning` (`reasoning_parser`), tool
calls into OpenAI's `tool_calls` (`tool_call_parser`).

The readers are checked on text first. End to end, a copy of the tiny chat model is
fitted for a few seconds to a handful of answers (a Hermes-style call, two calls, plain text,
a Qwen3-style `<think>` block before text, a call and JSON, a Mistral call, a Qwen3-Coder
call, and gpt-oss's harmony messages) to prompts that list tools, so that the real decode loop writes real calls and
thinking; its tokenizer
counts `<tool_call>` and `</tool_call>` as special tokens, as Hermes 2 Pro's does, which
the reader only sees because the decoder keeps special tokens for this format, and
`<think>` and `</think>` as single ordinary tokens, as Qwen3's does.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from serve_app.harmony import HarmonyReader
from serve_app.reasoning import ReasoningReader, prompt_opening
from serve_app.tool_calls import ForcedCallReader, read_tool_calls, READERS, tool_call_reader
from serve_app.translate import AnswerFormat, joined_calls

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>' % city


ONE_CALL, TWO_CALLS, NO_CALL = "What is the weather in Paris?", "Weather in Paris and Rome?", "Say hello."
THINK, THINK_CALL, THINK_JSON = "Think, then greet.", "Think, then check Rome.", "Think, then name a city in JSON."
MISTRAL_CALL = "Weather in Lyon, Mistral style?"
CODER_CALL = "Forecast for Oslo, coder style?"
GPTOSS_CALL, GPTOSS_TEXT = "Weather in Bergen, gpt-oss style?", "Greet me, gpt-oss style."
TAUGHT = {ONE_CALL: _call("Paris"), TWO_CALLS: _call("Paris") + "\n" + _call("Rome"), NO_CALL: "Hello! How can I help?",
          THINK: "<think>\nA greeting is wanted.\n</think>\n\nHello there!",
          THINK_CALL: "<think>\nI need the weather.\n</think>\n\n" + _call("Rome"),
          THINK_JSON: '<think>\nRome will do.\n</think>{"city":"Rome"}',
          MISTRAL_CALL: 'Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lyon"}}]',
          CODER_CALL: "<tool_call>\n<function=forecast>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n3\n"
                      "</parameter>\n</function>\n</tool_call>",
          # gpt-oss's harmony messages (its end-of-sequence <|call|> / <|return|> is the test model's own)
          GPTOSS_CALL: "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
                       'to=functions.get_weather <|constrain|>json<|message|>{"city":"Bergen"}',
          GPTOSS_TEXT: "<|channel|>analysis<|message|>A greeting.<|end|><|start|>assistant<|channel|>final<|message|>"
                       "Hi from harmony!"}
HARMONY_MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>"]
FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hot": {"type": "boolean"}, "at": {"type": "number"},
    "where": {"type": "object"}, "tags": {"type": ["array", "null"]}, "hours": {"anyOf": [{"type": "integer"},
                                                                                          {"type": "null"}]},
    "place": {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "null"}]}}}}}
CODER_PARAMETERS = {"forecast": FORECAST["function"]["parameters"]["properties"]}
TAUGHT_TOOLS = {CODER_CALL: [*TOOLS, FORECAST]}  # the tools each question is asked with, else TOOLS
CITY = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}


# ------------------------------------------------------------------ the readers, on text


def _streamed(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[str, dict]], list[str]]:
    """Content, calls and the content of each piece, fed piece by piece to a whole answer's reader."""
    reader, contents, calls = READERS[fmt](), [], []
    for read in [*(reader.feed(piece) for piece in pieces), reader.finish()]:
        contents.append(read.content)
        calls += [(call.name, json.loads(call.arguments)) for call in read.calls]
    return "".join(contents), calls, contents


def _read_streaming(reader, pieces: list[str]) -> tuple[str, list]:
    """Content and call pieces (in the order they went out) of a stream's reader fed `pieces`."""
    content, sent = "", []
    for read in [*(reader.feed(piece) for piece in pieces), reader.finish()]:
        content += read.content
        sent += read.calls
    return content, sent


def _joined(sent) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in joined_calls(sent)]


@pytest.mark.parametrize("fmt, text, content, calls", [
    ("hermes", _call("Paris"), "", [("get_weather", {"city": "Paris"})]),
    ("hermes", "Let me check.\n" + _call("Paris") + "\n" + _call("Rome") + "\n", "Let me check.",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": [1, 2]}}', "", [("f", {"a": [1, 2]})]),  # no end tag
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", {"a": 1})]),
    # What does not parse as a call stays as the model wrote it.
    ("hermes", "a <tool_call>{not json}</tool_call> b", "a <tool_call>{not json}</tool_call> b", []),
    ("hermes", '<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", "x <tool_ y\n", "x <tool_ y\n", []),
    # Arguments a client can always json.loads: a quoted non-JSON string as a JSON string (as vLLM
    # sends it); half a character escaped in JSON stays escaped (a UTF-8 body cannot carry it).
    ("hermes", '<tool_call>{"name": "f", "arguments": "Paris"}</tool_call>', "", [("f", "Paris")]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"s": "\\ud83d x"}}</tool_call>', "", [("f", {"s": "\ud83d x"})]),
    ("hermes", '<tool_call>{"name": "f\\ud83d"}</tool_call>', '<tool_call>{"name": "f\\ud83d"}</tool_call>', []),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}}', "", [("f", {"x": 1})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"y": "ü"}}', "",
     [("f", {}), ("g", {"y": "ü"})]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '<|python_tag|> {"name": "f", "parameters": {}};', "", [("f", {})]),
    ("llama3_json", '{"name": "f", "parameters": {}} and more', '{"name": "f", "parameters": {}} and more', []),
    ("llama3_json", " Hello {there}\n", " Hello {there}\n", []),
])
def test_reader_reads_calls_and_keeps_everything_else(fmt, text, content, calls):
    read = read_tool_calls(fmt, text)
    assert (read.content, [(c.name, json.loads(c.arguments)) for c in read.calls]) == (content, calls)
    assert all(c.id.startswith("call_") for c in read.calls) and len({c.id for c in read.calls}) == len(read.calls)
    assert all(c.arguments.encode("utf-8") and c.name.encode("utf-8") for c in read.calls)
    # A character at a time, the same in the end; and so for a stream's reader, whose calls go
    # out in pieces (but for an answer that goes on after its calls with text that is no call:
    # the calls it already sent stay sent).
    streamed_content, streamed_calls, _ = _streamed(fmt, list(text))
    assert (streamed_content, streamed_calls) == (content, calls)
    if not text.endswith(" and more"):
        streamed_content, sent = _read_streaming(READERS[fmt](stream=True), list(text))
        assert (streamed_content, _joined(sent)) == (content, [(c.name, c.arguments) for c in read.calls])


@pytest.mark.parametrize("reader, text, name", [
    (READERS["hermes"], 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\\"is", "days": [1, 2]}}\n'
                        '</tool_call>', "get_weather"),
    (READERS["llama3_json"], '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "n": {"a": "}"}}}',
     "get_weather"),
    (lambda stream: ForcedCallReader("get_weather", stream), ' {"city": "Paris", "when": {"day": "}{"}}', "get_weather"),
    (lambda stream: ForcedCallReader(None, stream), '[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
     "get_weather"),
])
def test_a_streamed_call_goes_out_as_it_is_written(reader, text, name):
    """As OpenAI and vLLM stream a call: a first delta with its id and name once the arguments
    object has begun, then the arguments' text piece by piece, which join into the whole answer's."""
    content, sent = _read_streaming(reader(True), list(text))
    whole_content, whole = _read_streaming(reader(False), [text])
    assert (content, _joined(sent)) == (whole_content, _joined(whole)) and len(whole) == 1
    first, *rest = sent
    assert first.id.startswith("call_") and first.name == name and first.arguments == "{" and len(rest) > 5
    assert all(piece.index == 0 and piece.id is None and piece.name is None for piece in rest)
    arguments = _joined(sent)[0][1]
    assert json.loads(arguments) == json.loads(whole[0].arguments) and arguments in text  # as the model wrote it


@pytest.mark.parametrize("reader, text, last", [
    (READERS["hermes"], '<tool_call>{"name": "f", "arguments": {"city": "Pa', ("f", '{"city": "Pa')),
    (READERS["llama3_json"], '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b"', ("g", '{"b"')),
    (lambda stream: ForcedCallReader("f", stream), '{"city": "Pa', ("f", '{"city": "Pa')),
])
def test_a_streamed_call_cut_off_keeps_what_went_out(reader, text, last):
    """Once a call's first delta has gone it stays a call, its arguments those written (as from
    vLLM; `finish_reason` says `length`); a whole answer's cut-off call is its text."""
    content, sent = _read_streaming(reader(True), list(text))
    assert content == "" and _joined(sent)[-1] == last
    whole_content, whole = _read_streaming(reader(False), [text])
    assert (whole_content, whole) == (text, [])


@pytest.mark.parametrize("fmt, text, content, calls", [
    # An end tag inside a JSON string is the string's text (code that writes one), streamed or not.
    ("hermes", '<tool_call>{"name": "w", "arguments": {"code": "x = \'</tool_call>\'"}}</tool_call>', "",
     [("w", '{"code": "x = \'</tool_call>\'"}')]),
    # What follows a streamed call and is no call is content, from where it stops being one.
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}; {"b": 2} and more', '{"b": 2} and more',
     [("f", '{"a": 1}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1} oops}</tool_call>', "oops}", [("f", '{"a": 1}')]),
    # Two argument keys: the first, as a stream sends it, whole too.
    ("hermes", '<tool_call>{"name": "f", "parameters": {"a": 1}, "arguments": {"b": 2}}</tool_call>', "",
     [("f", '{"a": 1}')]),
])
def test_a_stream_reader_keeps_every_character(fmt, text, content, calls):
    for pieces in (list(text), [text]):
        assert _read_streaming(READERS[fmt](stream=True), pieces)[0] == content
        assert _joined(_read_streaming(READERS[fmt](stream=True), pieces)[1]) == calls
    if text.count("</tool_call>") == 2 or "parameters" in text and "arguments" in text:  # valid: the same whole
        assert _joined(read_tool_calls(fmt, text).calls) == calls


@pytest.mark.parametrize("text, content, calls", [
    # Tokenizers before v11: one JSON list after the marker.
    ('Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "g", "arguments": {"a": [1]}}]', "Let me check.",
     [("get_weather", '{"city": "Paris"}'), ("g", '{"a": [1]}')]),
    # v11 on: a marker, a name and its arguments per call ([ARGS] where the tokenizer keeps it).
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]g{"a": {"b": "}"}}', "",
     [("get_weather", '{"city": "Paris"}'), ("g", '{"a": {"b": "}"}}')]),
    ('[TOOL_CALLS]get_weather{"city": "Paris"}', "", [("get_weather", '{"city": "Paris"}')]),
    ('[TOOL_CALLS]f[CALL_ID]abcdefghi[ARGS]{"a": 1}', "", [("f", '{"a": 1}')]),  # tokenizer v11's own ids
    # A name given twice: the first, which a stream sends before it sees the second.
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}, "name": "g"}]', "", [("f", '{"a": 1}')]),
    ("Hello, no calls [TOOL", "Hello, no calls [TOOL", []),
    ("[TOOL_CALLS]not a call", "[TOOL_CALLS]not a call", []),
    ('[TOOL_CALLS] [{"name": "f", "arguments": "{\\"a\\": 1}"}]', "", [("f", '{"a": 1}')]),
])
def test_mistral_calls_are_read_in_both_forms(text, content, calls):
    for pieces in ([text], list(text), _random_pieces(random.Random(text), text)):
        for stream in (False, True):
            got_content, sent = _read_streaming(READERS["mistral"](stream=stream), pieces)
            assert (got_content, _joined(sent)) == (content, calls), (stream, pieces)
            ids = [piece.id for piece in sent if piece.id]
            assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == len(calls)


def test_a_later_mistral_call_that_breaks_off_is_content_marker_and_all():
    reader = AnswerFormat(tool_calls="mistral").reader(stream=True)
    content, sent = _read_streaming(reader, list('[TOOL_CALLS]f{"a": 1}[TOOL_CALLS]gg'))
    assert (content, _joined(sent), reader.finish_reason("stop")) == ("[TOOL_CALLS]gg", [("f", '{"a": 1}')],
                                                                       "tool_calls")


def test_a_mistral_models_forced_call_has_a_nine_character_id_too():
    from serve_app.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    for parser, length in (("mistral", 9), ("hermes", 29)):
        fmt = AnswerFormat(forced=request.forced_tool_call, call_ids=parser)
        for stream in (False, True):
            sent = _read_streaming(fmt.reader(stream=stream).tools, ['{"city": "Paris"}'])[1]
            assert len(sent[0].id) == length




def _coder(*functions: str) -> str:
    """A Qwen3-Coder block of `functions`, each `name(key=value, ...)` written as the model writes it."""
    written = ""
    for function in functions:
        name, _, rest = function.partition("(")
        written += f"<function={name}>\n"
        for pair in filter(None, rest.removesuffix(")").split("|")):
            key, _, value = pair.partition("=")
            written += f"<parameter={key}>\n{value}\n</parameter>\n"
        written += "</function>\n"
    return "<tool_call>\n" + written + "</tool_call>"


@pytest.mark.parametrize("text, content, calls", [
    # Values typed by the request's schema: text, integer, boolean, number, JSON, a Python literal.
    ("Let me check.\n" + _coder("forecast(city=Paris|days=3|hot=True|at=21.5|where={'lat': 48.8}|tags=[\"a\"])"),
     "Let me check.", [("forecast", {"city": "Paris", "days": 3, "hot": True, "at": 21.5, "where": {"lat": 48.8},
                                     "tags": ["a"]})]),
    # null is None whatever the type; text that is not of its type stays text; an optional
    # parameter's type is its non-null branch; a parameter the schema lacks is text.
    (_coder("forecast(city=null|days=three|hours=5|extra=7)"), "",
     [("forecast", {"city": None, "days": "three", "hours": 5, "extra": "7"})]),
    # An optional object by $ref, as pydantic writes Optional[Model], is JSON.
    (_coder('forecast(place={"lat": 1})'), "", [("forecast", {"place": {"lat": 1}})]),
    # A value's lines are kept (one newline each side is the format's), tags inside it too.
    (_coder("forecast(city=a\n\n<tool_call></tool_call>\nb\n)"), "", [("forecast", {"city": "a\n\n<tool_call></tool_call>\nb\n"})]),
    # Two functions in one block, two blocks, a function with no parameters, a tool not given.
    (_coder("forecast(days=1)", "other(x=1)") + "\n" + _coder("forecast()"), "",
     [("forecast", {"days": 1}), ("other", {"x": "1"}), ("forecast", {})]),
    # vLLM lets a left-out </function> go, and a value ended by the next tag.
    ("<tool_call>\n<function=forecast>\n<parameter=days>\n2\n<parameter=city>\nRome\n</parameter>\n</tool_call>", "",
     [("forecast", {"days": 2, "city": "Rome"})]),
    ("<tool_call>\n<function=forecast>\n<parameter=days>\n2\n</parameter>\n", "", [("forecast", {"days": 2})]),
    # What is not all calls stays as the model wrote it.
    ("<tool_call>\n<function=forecast>\nsunny\n</function>\n</tool_call>",
     "<tool_call>\n<function=forecast>\nsunny\n</function>\n</tool_call>", []),
    ("<tool_call>\n<function=forecast>\n<parameter=city>\nPa", "<tool_call>\n<function=forecast>\n<parameter=city>\nPa", []),
    ("a < b, <tool_call></tool_call> <tool_", "a < b, <tool_call></tool_call> <tool_", []),
])
def test_qwen3_coder_calls_are_read_and_typed_by_the_schema(text, content, calls):
    whole = read_tool_calls("qwen3_coder", text, CODER_PARAMETERS)
    assert (whole.content, [(c.name, json.loads(c.arguments)) for c in whole.calls]) == (content, calls)
    assert all(c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False) for c in whole.calls)
    rng = random.Random(text)
    for pieces in ([text], list(text), _random_pieces(rng, text), _random_pieces(rng, text)):
        for stream in (False, True):
            if stream and not calls and "<function=forecast>" in text:
                continue  # a stream sent the call once its name was written: see the next test
            got_content, sent = _read_streaming(tool_call_reader("qwen3_coder", stream, CODER_PARAMETERS), pieces)
            assert (got_content, _joined(sent)) == (content, [(c.name, c.arguments) for c in whole.calls]), pieces


def test_a_qwen3_coder_call_streams_its_text_values_as_they_are_written():
    """Its first delta once the name is written, a string value's text as it comes (a file's
    contents, say), other values once they have ended; a call cut off stays a call, cut."""
    text = _coder("forecast(days=3|city=" + "long text " * 5 + ")")
    reader = AnswerFormat(tool_calls="qwen3_coder", tool_parameters=CODER_PARAMETERS).reader(stream=True)
    sent = []
    for at, char in enumerate(text):
        sent += [(at, piece) for piece in reader.feed(char).calls]
    sent += [(len(text), piece) for piece in reader.finish().calls]
    first = sent[0][1]
    assert (first.name, first.arguments) == ("forecast", "{") and sent[0][0] == text.index(">", 12)
    assert [piece.arguments for _, piece in sent[1:3]] == ['"days": 3', ', "city": "l']
    value_end = text.index("\n</parameter>\n</function>")
    assert len([at for at, _ in sent if text.index("long") < at < value_end]) > 30  # a piece a character
    assert json.loads("".join(piece.arguments for _, piece in sent)) == {"days": 3, "city": "long text " * 5}
    assert reader.finish_reason("stop") == "tool_calls"
    cut = AnswerFormat(tool_calls="qwen3_coder").reader(stream=True)
    content, pieces = _read_streaming(cut.tools, list("<tool_call>\n<function=f>\n<parameter=a>\nnull"))
    assert (content, _joined(pieces), cut.finish_reason("length")) == ("", [("f", "{")], "length")
    assert _joined(_read_streaming(tool_call_reader("qwen3_coder", True), list(text[:text.index("long t") + 6]))[1])[0][1] == \
        '{"days": "3", "city": "long t'  # typed only with the request's schema


def test_qwen3_coder_readers_agree_on_any_text():
    """Mangled calls (tags cut, dropped or added anywhere): the same reading whatever the
    pieces; a whole answer that is no call keeps every character; a stream's calls are the
    whole answer's where all its blocks were calls."""
    atoms = ["<tool_call>", "</tool_call>", "<function=forecast>", "</function>", "<parameter=days>", "</parameter>",
             "\n", "null", "12", "<", "</", "<tool_", "é", '"', "\\", "<parameter="]
    for seed in range(300):
        rng = random.Random(seed)
        text = "Sure. " + _coder(*("forecast(days=%s|city=%s)" % (rng.choice(["1", "x", "null"]), rng.choice(["Paris", "", "a\nb"]))
                                   for _ in range(rng.randint(1, 2))))
        for _ in range(rng.randint(0, 3)):
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice(atoms) + text[at + rng.choice([0, 0, 1, 5]):]
        whole = _read_streaming(tool_call_reader("qwen3_coder", False, CODER_PARAMETERS), [text])
        stream = _read_streaming(tool_call_reader("qwen3_coder", True, CODER_PARAMETERS), [text])
        for pieces in (list(text), _random_pieces(rng, text)):
            content, sent = _read_streaming(tool_call_reader("qwen3_coder", False, CODER_PARAMETERS), pieces)
            assert (content, _joined(sent)) == (whole[0], _joined(whole[1]))
            assert _joined(_read_streaming(tool_call_reader("qwen3_coder", True, CODER_PARAMETERS), pieces)[1]) == \
                _joined(stream[1])
        if not whole[1]:
            assert whole[0] == text
        elif "<tool_call>" not in whole[0] and "<tool_call>" in text.rpartition("</tool_call>")[0]:
            assert (stream[0], _joined(stream[1])) == (whole[0], _joined(whole[1]))


HARMONY_CALL = ('<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant<|channel|>'
                'commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}')


@pytest.mark.parametrize("text, read_calls, reasoning, content, calls", [
    (HARMONY_CALL, True, "The user wants the weather.", "", [("get_weather", '{"city":"Oslo"}')]),
    # The recipient where the role is, a content type without <|constrain|>.
    (' to=functions.f<|channel|>commentary json<|message|>{"a": 1}', True, "", "", [("f", '{"a": 1}')]),
    ("<|channel|>analysis<|message|>Greet.<|end|><|start|>assistant<|channel|>final<|message|>Hello!", True,
     "Greet.", "Hello!", []),
    # A preamble before a call is content; so is a call's text where the request gave no tools.
    ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f<|channel|>commentary"
     '<|message|>{}', True, "", "Checking.", [("f", "{}")]),
    (HARMONY_CALL, False, "The user wants the weather.", '{"city":"Oslo"}', []),
    # A message whose end was left out; an answer cut off inside the thinking, or in a header.
    ("<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b", True, "a", "b", []),
    ("<|channel|>analysis<|message|>still thinking", True, "still thinking", "", []),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|chan", True, "x", "", []),
    # Not harmony at all: content, as written.
    ("Plain <|text|> answer", True, "", "Plain <|text|> answer", []),
    ("to=do: buy milk", True, "", "to=do: buy milk", []),
])
def test_harmony_answers_are_read_into_reasoning_content_and_calls(text, read_calls, reasoning, content, calls):
    rng = random.Random(text)
    for pieces in ([text], list(text), _random_pieces(rng, text)):
        for stream in (False, True):
            reader = HarmonyReader(stream, read_calls=read_calls)
            reads = [reader.feed(piece) for piece in pieces] + [reader.finish()]
            got = ("".join(r.reasoning for r in reads), "".join(r.content for r in reads),
                   _joined([call for r in reads for call in r.calls]))
            assert got == (reasoning, content, calls), (stream, pieces)


def test_a_harmony_call_cut_off_is_content_whole_and_cut_streamed():
    text = HARMONY_CALL[:-4]
    whole = AnswerFormat(reasoning="openai_gptoss", tool_calls="openai").reader().read(text)
    assert (whole.content, whole.calls) == ('{"city":"Os', [])
    streamed = AnswerFormat(reasoning="openai_gptoss", tool_calls="openai").reader(stream=True)
    parts = [streamed.feed(char) for char in text] + [streamed.finish()]
    assert "".join(call.arguments for part in parts for call in part.calls) == '{"city":"Os'
    assert streamed.finish_reason("stop") == "stop" and streamed.finish_reason("length") == "length"


@pytest.mark.parametrize("text, whole", [
    ('<tool_call>{"name": "f", "arguments": {"a": "x', False),  # a stop string ended it inside the call
    ('<tool_call>{"name": "f", "arguments": {"a": "x"}}</tool_call>', True),
])
def test_a_streamed_call_cut_inside_its_arguments_is_no_finished_call(text, whole):
    reader = AnswerFormat(tool_calls="hermes").reader(stream=True)
    for char in text:
        reader.feed(char)
    reader.finish()
    assert reader.calls_made == 1 and reader.finish_reason("stop") == ("tool_calls" if whole else "stop")
    # With parallel_tool_calls false the client gets the first call only: a later one cut off is not its.
    for first_only, reason in ((False, "stop"), (True, "tool_calls")):
        reader = AnswerFormat(tool_calls="hermes", first_call_only=first_only).reader(stream=True)
        _read_streaming(reader, list(_call("Paris") + '<tool_call>{"name": "f", "arguments": {"a": "x'))
        assert reader.finish_reason("stop") == reason


def test_a_streamed_call_waits_whole_when_its_name_comes_last_or_its_arguments_are_text():
    for text in ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'):
        sent = _read_streaming(READERS["hermes"](stream=True), list(text))[1]
        assert len(sent) == 1 and sent[0].name == "f" and json.loads(sent[0].arguments) == {"a": 1}


@pytest.mark.parametrize("fmt, text, reasoning, content", [
    ("qwen3", "<think>\nhmm\n</think>\n\nHello", "\nhmm\n", "Hello"),
    ("qwen3", "Hello <think>x</think>", "", "Hello <think>x</think>"),  # thinking only where the answer starts
    ("qwen3", "  <think>cut off", "cut off", ""),
    ("qwen3", "<thin", "", "<thin"),
    ("qwen3", "<think></think>", "", ""),
    ("deepseek_r1", "hmm\n</think>\n\nHello", "hmm\n", "Hello"),  # the template opened the thinking
    ("deepseek_r1", "<think>a</think>b", "a", "b"),
    ("deepseek_r1", "no end", "no end", ""),
    ("deepseek_r1", "", "", ""),
])
def test_reasoning_reader_splits_thinking_from_content(fmt, text, reasoning, content):
    rng = random.Random(text)
    for pieces in ([text], list(text), _random_pieces(rng, text), _random_pieces(rng, text)):
        reader, read = AnswerFormat(reasoning=fmt).reader(), []
        read += [reader.feed(piece) for piece in pieces] + [reader.finish()]
        assert ("".join(r.reasoning for r in read), "".join(r.content for r in read)) == (reasoning, content), pieces


def _random_pieces(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("prompt, opening", [
    ("<|im_start|>assistant\n", None), ("<|im_start|>assistant\n<think>\n", "thinking"),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "answer"), ("say </think> twice", None)])
def test_the_prompt_says_where_the_answer_starts(prompt, opening):
    assert prompt_opening(prompt) == opening


@pytest.mark.parametrize("fmt, opening, text, reasoning, content", [
    ("qwen3", "thinking", "hmm\n</think>\n\nHello", "hmm\n", "Hello"),  # Qwen3's thinking-only 2507 template
    ("deepseek_r1", "answer", "Hello", "", "Hello"),  # a template that closed the thinking
    ("qwen3", "answer", "<think>x</think>Hello", "", "<think>x</think>Hello"),
    ("deepseek_r1", "thinking", "<think>a</think>b", "a", "b"),
])
def test_the_prompts_opening_decides_over_the_format(fmt, opening, text, reasoning, content):
    reader = ReasoningReader(fmt, opening)
    first, last = reader.feed(text), reader.finish()
    assert (first.reasoning + last.reasoning, first.content + last.content) == (reasoning, content)


def test_thinking_then_a_call_streams_as_both():
    text = "<think>\nweather\n</think>\n\n" + _call("Rome")
    reader = AnswerFormat(reasoning="qwen3", tool_calls="hermes").reader()
    pieces = [reader.feed(text[:12]), reader.feed(text[12:]), reader.finish()]
    assert pieces[0].reasoning == "\nweat" and pieces[0].content == ""  # thinking goes out as it comes
    assert "".join(p.reasoning for p in pieces) == "\nweather\n" and "".join(p.content for p in pieces) == ""
    assert [(c.name, json.loads(c.arguments)) for p in pieces for c in p.calls] == [("get_weather", {"city": "Rome"})]


def test_streamed_reader_sends_content_at_once_and_holds_only_a_call():
    content, calls, pieces = _streamed("hermes", ["Hi", " there", ".", "\n", "<tool", "_call>",
                                                  '{"name": "f", "arguments": {}}', "</tool_call>", "\n"])
    assert pieces[:3] == ["Hi", " there", "."] and calls == [("f", {})] and content == "Hi there."
    # A Llama 3 answer that starts as text streams as text.
    assert _streamed("llama3_json", ["Sun", "ny", " today"])[2][:3] == ["Sun", "ny", " today"]


# ------------------------------------------------------------------ end to end


TAUGHT_MARGIN = 4.0
"""How far (in logits) each taught token must lead every other before fitting stops: greedy
decoding then writes the taught answers token for token, with room for the float differences
between the padded training batch and the replica's cached decoding (about 1e-5). Reached after about 110 steps,
where a loss under 1e-3 (what used to end fitting) was not reached in 400."""


def _least_margin(logits, wanted) -> float:
    """The smallest lead of the wanted token's logit over the best other one, across positions."""
    import torch

    right = logits.gather(-1, wanted[:, None])[:, 0]
    others = logits.scatter(-1, wanted[:, None], float("-inf")).amax(-1)
    return float(torch.min(right - others))


def _fit_tool_model(source: Path, target: Path) -> Path:
    """The tiny chat model, fitted to answer TAUGHT's prompts (with TOOLS listed) as taught."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>", "[TOOL_CALLS]",
                                                                *HARMONY_MARKERS]})
    tokenizer.add_tokens(["<think>", "</think>"])
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = []
    for question, answer in TAUGHT.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               tools=TAUGHT_TOOLS.get(question, TOOLS),
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, answer_ids))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt_ids, answer_ids) in enumerate(rows):
        ids[i, :len(prompt_ids) + len(answer_ids)] = torch.tensor(prompt_ids + answer_ids)
        labels[i, len(prompt_ids):len(prompt_ids) + len(answer_ids)] = torch.tensor(answer_ids)
        mask[i, :len(prompt_ids) + len(answer_ids)] = 1
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    taught = labels[:, 1:] != -100  # the positions whose next token is the answer's
    for _ in range(400):
        result = model(input_ids=ids, attention_mask=mask, labels=labels)
        if _least_margin(result.logits[:, :-1][taught], labels[:, 1:][taught]) >= TAUGHT_MARGIN:
            break
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    model.eval().save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def tool_model(models_dir, tmp_path_factory) -> Path:
    return _fit_tool_model(models_dir / "tiny-llama", tmp_path_factory.mktemp("tool-model") / "tool-llama")


def _token_count(model: Path, text: str) -> int:
    """How many tokens `text` is to the tool model (its taught answers' pieces between special
    tokens are tokenized on their own)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tools_app(cluster, server, tool_model, tmp_path_factory):
    path = tool_model
    args = cluster.args(route_prefix="/tools")
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    args["models"] = [{**chat, "name": "tool-llama", "path": str(path), "tool_call_parser": "hermes",
                       "reasoning_parser": "qwen3", "stream_interval_s": 0},  # a message per token
                      # The same model read as Mistral's: it was taught one answer in that format.
                      {**chat, "name": "mistral-llama", "path": str(path), "tool_call_parser": "mistral",
                       "stream_interval_s": 0},
                      # And as Qwen3-Coder's, taught one answer in that format too.
                      {**chat, "name": "coder-llama", "path": str(path), "tool_call_parser": "qwen3_coder",
                       "stream_interval_s": 0},
                      # And as gpt-oss's harmony (the reasoning parser comes with it).
                      {**chat, "name": "gptoss-llama", "path": str(path), "tool_call_parser": "openai",
                       "stream_interval_s": 0},
                      # And with no tool_call_parser at all: what it writes is text.
                      {**chat, "name": "plain-llama", "path": str(path), "stream_interval_s": 0,
                       "deployment": {**chat["deployment"], "num_cpus": 0.1}}]
    try:
        yield cluster.deploy(args, name="tools_app", route_prefix="/tools")
    finally:
        serve.delete("tools_app")


@pytest.fixture(scope="module")
def client(tools_app):
    return openai.OpenAI(base_url=tools_app + "/v1", api_key="unused", max_retries=0)


def _ask(question: str, **extra) -> dict:
    return {"model": "tool-llama", "messages": [{"role": "user", "content": question}], "tools": TOOLS,
            "temperature": 0, "max_tokens": 120, **extra}


def _calls(tool_calls) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in tool_calls]


def test_a_call_comes_back_as_tool_calls(client, tools_app):
    answer = client.chat.completions.create(**_ask(ONE_CALL))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _calls(choice.message.tool_calls) == [("get_weather", {"city": "Paris"})]
    assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"
    raw = httpx.post(tools_app + "/v1/chat/completions", json=_ask(ONE_CALL), timeout=60).json()
    assert raw["code"] == 0 and raw["message"] == "success"  # the standard's envelope, as for any answer
    # The answer goes back into the conversation, and the model reads it as the call it was.
    result = client.chat.completions.create(**_ask(ONE_CALL, max_tokens=3, messages=[
        {"role": "user", "content": ONE_CALL}, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"}]))
    assert result.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_two_calls_and_parallel_tool_calls_false(client):
    message = client.chat.completions.create(**_ask(TWO_CALLS)).choices[0].message
    assert _calls(message.tool_calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert len({call.id for call in message.tool_calls}) == 2
    single = client.chat.completions.create(**_ask(TWO_CALLS, parallel_tool_calls=False)).choices[0]
    assert _calls(single.message.tool_calls) == [("get_weather", {"city": "Paris"})]
    assert single.finish_reason == "tool_calls"


def test_a_text_answer_stays_text(client):
    choice = client.chat.completions.create(**_ask(NO_CALL)).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (TAUGHT[NO_CALL], None, "stop")


def test_a_call_cut_off_by_max_tokens_is_text(client):
    """Half a call is no call: the client gets the text (its `<tool_call>` a special token, kept)."""
    choice = client.chat.completions.create(**_ask(ONE_CALL, max_tokens=8)).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("<tool_call>\n{")


def test_tool_choice_none_reads_no_calls(client):
    """Without tools the model is not told of any and no calls are read (special tokens skipped)."""
    message = client.chat.completions.create(**_ask(ONE_CALL, tool_choice="none")).choices[0].message
    assert message.tool_calls is None and isinstance(message.content, str) and "<tool_call>" not in message.content


@pytest.mark.parametrize("question", [ONE_CALL, TWO_CALLS, NO_CALL])
def test_streamed_calls_match_the_answer(client, question):
    """Each call's arguments go out in pieces as they are written (its first delta with the
    call's id, type and name), and join into the unstreamed answer's calls, exactly."""
    whole = client.chat.completions.create(**_ask(question, n=2)).choices
    chunks = list(client.chat.completions.create(**_ask(question, n=2, stream=True,
                                                        stream_options={"include_usage": True})))
    for index in (0, 1):
        deltas = [choice for chunk in chunks for choice in chunk.choices if choice.index == index]
        content = "".join(d.delta.content or "" for d in deltas)
        pieces = [call for d in deltas for call in d.delta.tool_calls or []]
        joined = {}
        for piece in pieces:
            if piece.id is not None:
                assert piece.index == len(joined) and piece.type == "function" and piece.function.name
                joined[piece.index] = [piece.id, piece.function.name, piece.function.arguments]
            else:
                assert piece.index == len(joined) - 1 and piece.function.name is None
                joined[piece.index][2] += piece.function.arguments
        calls = whole[index].message.tool_calls or []
        assert list(joined.values()) == [[joined[i][0], c.function.name, c.function.arguments] for i, c in enumerate(calls)]
        assert len(pieces) >= 3 * len(calls)  # not whole calls: the arguments in pieces
        assert content == (whole[index].message.content or "") and "<tool_call>" not in content
        assert [d.finish_reason for d in deltas if d.finish_reason] == [whole[index].finish_reason]
    assert chunks[-1].usage.completion_tokens > 0


def test_the_openai_stream_helper_joins_a_streamed_call(client):
    with client.chat.completions.stream(**_ask(ONE_CALL)) as stream:
        done = [event for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion().choices[0]
    assert [(event.name, json.loads(event.arguments)) for event in done] == [("get_weather", {"city": "Paris"})]
    assert _calls(final.message.tool_calls) == [("get_weather", {"city": "Paris"})]


def test_a_mistral_models_calls_come_back_as_tool_calls(client):
    """Written after `[TOOL_CALLS]` (a special token, kept for this format), read out with the
    content before it, under nine-character ids; streamed, the same."""
    ask = _ask(MISTRAL_CALL, model="mistral-llama")
    choice = client.chat.completions.create(**ask).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Sure.", "tool_calls")
    assert _calls(choice.message.tool_calls) == [("get_weather", {"city": "Lyon"})]
    assert len(choice.message.tool_calls[0].id) == 9 and choice.message.tool_calls[0].id.isalnum()
    chunks = list(client.chat.completions.create(**ask, stream=True))
    pieces = [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls or []]
    assert len(pieces[0].id) == 9 and len(pieces) > 3
    assert "".join(p.function.arguments for p in pieces) == choice.message.tool_calls[0].function.arguments
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == "Sure."
    # Read as Hermes-style (the other model), the same answer is text: the marker decides.
    other = client.chat.completions.create(**_ask(MISTRAL_CALL)).choices[0]
    assert other.message.tool_calls is None and other.message.content.startswith("Sure.")


def test_a_qwen3_coder_models_calls_come_back_typed_by_the_tools_schema(client):
    """Its XML call read out, the integer parameter an integer as the request's schema types it
    (where the schema did not say, it would be the text "3"); streamed, the same arguments, the
    first delta with the name once it is written."""
    ask = _ask(CODER_CALL, model="coder-llama", tools=TAUGHT_TOOLS[CODER_CALL])
    choice = client.chat.completions.create(**ask).choices[0]
    assert (choice.message.content, choice.finish_reason) == (None, "tool_calls")
    assert _calls(choice.message.tool_calls) == [("forecast", {"city": "Oslo", "days": 3})]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    pieces = [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls or []]
    assert (pieces[0].function.name, pieces[0].function.arguments) == ("forecast", "{") and len(pieces) >= 5
    assert "".join(p.function.arguments for p in pieces) == choice.message.tool_calls[0].function.arguments
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["tool_calls"]


def test_a_gpt_oss_models_channels_come_back_as_reasoning_content_and_calls(client, tools_app, tool_model):
    """Harmony's markers are special tokens, kept for this format: the analysis channel is the
    reasoning, the final channel the content, a message to functions.* a call; streamed, the same."""
    ask = _ask(GPTOSS_CALL, model="gptoss-llama")
    choice = client.chat.completions.create(**ask).choices[0]
    assert (choice.message.content, choice.finish_reason) == (None, "tool_calls")
    assert choice.message.model_extra["reasoning"] == "Need the weather."
    assert _calls(choice.message.tool_calls) == [("get_weather", {"city": "Bergen"})]
    assert choice.message.tool_calls[0].function.arguments == '{"city":"Bergen"}'  # as the model wrote it
    chunks = list(client.chat.completions.create(**ask, stream=True))
    deltas = [c.delta for chunk in chunks for c in chunk.choices]
    pieces = [call for d in deltas for call in d.tool_calls or []]
    assert "".join(p.function.arguments for p in pieces) == '{"city":"Bergen"}' and pieces[0].function.name == "get_weather"
    assert "".join(d.model_extra.get("reasoning") or "" for d in deltas) == "Need the weather."
    answered = client.chat.completions.create(**_ask(GPTOSS_TEXT, model="gptoss-llama"))
    text = answered.choices[0]
    assert (text.message.content, text.message.model_extra["reasoning"], text.finish_reason) == (
        "Hi from harmony!", "A greeting.", "stop")
    # Its reasoning tokens are its analysis message's (not the headers, nor a call).
    assert answered.usage.completion_tokens_details.reasoning_tokens == _token_count(tool_model, "A greeting.")
    called = client.chat.completions.create(**ask).usage
    assert called.completion_tokens_details.reasoning_tokens == _token_count(tool_model, "Need the weather.")
    # Under a JSON schema the thinking is free, and the final channel's text is the JSON.
    schema = client.chat.completions.create(**_ask(GPTOSS_TEXT, model="gptoss-llama", response_format=CITY)).choices[0]
    assert schema.message.model_extra["reasoning"] == "A greeting." and schema.finish_reason == "stop"
    assert list(json.loads(schema.message.content)) == ["city"]
    # It calls tools in its commentary channel, which no grammar waits for: a forced call is refused.
    refused = httpx.post(tools_app + "/v1/chat/completions", timeout=60, json=_ask(
        GPTOSS_CALL, model="gptoss-llama", tool_choice="required"))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
    assert "harmony" in refused.json()["message"]


def test_thinking_comes_back_as_reasoning(client, tools_app, tool_model):
    answer = client.chat.completions.create(**_ask(THINK))
    choice = answer.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("Hello there!", None, "stop")
    # usage counts the thinking's tokens (its markers left out), as vLLM does; streamed, the same.
    thought = _token_count(tool_model, "\nA greeting is wanted.\n")
    assert answer.usage.completion_tokens_details.reasoning_tokens == thought
    assert answer.usage.completion_tokens > thought
    chunks = list(client.chat.completions.create(**_ask(THINK), stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thought
    assert client.chat.completions.create(**_ask(THINK), n=2).usage.completion_tokens_details.reasoning_tokens == \
        2 * thought  # every choice's
    raw = httpx.post(tools_app + "/v1/chat/completions", json=_ask(THINK), timeout=60).json()["choices"][0]["message"]
    assert raw["reasoning"] == raw["reasoning_content"] == "\nA greeting is wanted.\n"  # vLLM's name and DeepSeek's
    called = client.chat.completions.create(**_ask(THINK_CALL)).choices[0]
    assert called.message.reasoning == "\nI need the weather.\n" and called.message.content is None
    assert _calls(called.message.tool_calls) == [("get_weather", {"city": "Rome"})]
    # A plain answer has no thinking, and no reasoning fields.
    plain = httpx.post(tools_app + "/v1/chat/completions", json=_ask(NO_CALL), timeout=60).json()
    assert "reasoning" not in plain["choices"][0]["message"]
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    # The thinking goes back into the conversation under either name.
    for name in ("reasoning", "reasoning_content"):
        follow_up = _ask(THINK, max_tokens=3, messages=[
            {"role": "user", "content": THINK}, {"role": "assistant", "content": "Hello there!", name: "hmm"},
            {"role": "user", "content": "Again."}])
        assert httpx.post(tools_app + "/v1/chat/completions", json=follow_up, timeout=60).status_code == 200


def test_a_json_answer_comes_after_the_thinking(client, tools_app):
    """As vLLM: the thinking is free text, the content after it follows the schema."""
    answer = client.chat.completions.create(**_ask(THINK_JSON, response_format=CITY)).choices[0]
    assert answer.message.reasoning == "\nRome will do.\n" and answer.finish_reason == "stop"
    assert json.loads(answer.message.content) == {"city": "Rome"}
    # The grammar still holds after thinking the model was not taught for this prompt.
    other = httpx.post(tools_app + "/v1/chat/completions", json=_ask(THINK, response_format=CITY, max_tokens=60),
                       timeout=60).json()["choices"][0]
    assert other["message"]["reasoning"] == "\nA greeting is wanted.\n"
    if other["finish_reason"] == "stop":
        assert list(json.loads(other["message"]["content"])) == ["city"]
    else:  # the city's name ran on to max_tokens: a cut JSON
        assert other["message"]["content"].startswith('{"city":"')


def test_a_forced_call_comes_after_the_thinking(tools_app):
    """Greedy, with room to spare: the thinking, then the one forced call, whole."""
    forced = {"type": "function", "function": {"name": "get_weather"}}
    answer = httpx.post(tools_app + "/v1/chat/completions", json=_ask(THINK_CALL, tool_choice=forced),
                        timeout=60).json()["choices"][0]
    assert answer["message"]["reasoning"] == "\nI need the weather.\n"
    assert answer["finish_reason"] == "stop", answer  # OpenAI's for a forced call; not cut off: the arguments are whole
    call, = answer["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and list(json.loads(call["function"]["arguments"])) == ["city"]


@pytest.mark.parametrize("question, extra", [(question, {}) for question in TAUGHT] + [
    (THINK_JSON, {"response_format": CITY, "n": 2})])
def test_streamed_thinking_matches_the_answer(tools_app, question, extra):
    whole = httpx.post(tools_app + "/v1/chat/completions", json=_ask(question, **extra), timeout=60).json()["choices"][0]
    with httpx.stream("POST", tools_app + "/v1/chat/completions", json=_ask(question, stream=True, **extra),
                      timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [choice["delta"] for event in events for choice in event["choices"] if choice["index"] == 0]
    assert {choice["index"] for event in events for choice in event["choices"]} == set(range(extra.get("n", 1)))
    assert "".join(d.get("reasoning", "") for d in deltas) == whole["message"].get("reasoning", "")
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert "" not in [d.get("content") for d in deltas if "role" not in d]  # no empty content after the first
    assert "".join(d.get("content") or "" for d in deltas) == (whole["message"]["content"] or "")
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c] == \
        [c["function"]["name"] for c in whole["message"].get("tool_calls", [])]
    assert "<think>" not in json.dumps(deltas)


PLAIN_CALL = TAUGHT[ONE_CALL].removeprefix("<tool_call>").removesuffix("</tool_call>")


def test_models_without_a_parser_answer_tool_calls_as_text(client):
    """The tool model served without a tool_call_parser writes its taught call, and it stays
    content (the call's special tokens skipped, as for any model without a format that keeps them)."""
    choice = client.chat.completions.create(**_ask(ONE_CALL, model="plain-llama")).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (PLAIN_CALL, None, "stop")
