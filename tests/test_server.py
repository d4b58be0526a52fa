"""End to end through Ray Serve: the four routes of the standard, in both dialects.

Every response is checked against the standard's shape (code/message envelope)
and against the official `openai` client's own types.
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
import re
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImagesResponse
from openai.types.chat import ChatCompletion
from PIL import Image

from tests.conftest import METRICS_REPORT_INTERVAL_MS, ROOT, wait_for

CHAT = "Llama3-8B"
IMAGE = "SuperImage"
SEED_CHAT = {
    "model": CHAT,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
    ],
}
NO_EOS = {"2": -100, "5": -100}
"""A `logit_bias` banning the tiny chat model's end-of-sequence tokens: an answer runs to its limit."""


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_success(response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == 0 and body["message"] == "success"
    assert isinstance(body["created"], int)
    return body


def png_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


# ------------------------------------------------------------------------------ models


def test_models_lists_live_models_in_both_shapes(http, client):
    body = http.get("/v1/models").json()
    assert body["code"] == 0 and body["project"] == "serve_app" and body["object"] == "list"
    by_name = {entry["model"]: entry for entry in body["data"]}
    assert set(by_name) == {CHAT, IMAGE}
    assert by_name[CHAT]["url"].endswith("/v1/chat/completions")
    assert by_name[IMAGE]["url"].endswith("/v1/images/generations")
    for entry in body["data"]:
        assert entry["id"] == entry["model"] and entry["object"] == "model"
        assert isinstance(entry["created"], int) and entry["owned_by"]
    assert {model.id for model in client.models.list()} == {CHAT, IMAGE}


def test_one_model_is_retrieved_by_name(http, client):
    assert http.get("/v1/models/").json()["object"] == "list"
    assert http.get(f"/v1/models/{IMAGE}/").json()["id"] == IMAGE
    body = assert_success(http.get(f"/v1/models/{CHAT}"))
    assert body["id"] == body["model"] == CHAT and body["object"] == "model" and body["kind"] == "chat"
    assert client.models.retrieve(IMAGE).id == IMAGE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert http.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"


# -------------------------------------------------------------------------------- chat


def test_chat_seed_example_matches_standard_and_openai(http):
    body = assert_success(http.post("/v1/chat/completions", json=SEED_CHAT))
    assert body["model"] == CHAT and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert (choice["message"]["refusal"], choice["message"]["annotations"]) == (None, [])  # as OpenAI's
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    ChatCompletion.model_validate(body)


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_gives_length_and_exact_usage(client, name):
    # The tiny model's end-of-sequence tokens (2 and 5) banned: each choice runs to its limit.
    result = client.chat.completions.create(model=CHAT, messages=SEED_CHAT["messages"], **{name: 5},
                                            n=2, temperature=1.0, seed=1, logprobs=True, logit_bias=NO_EOS)
    assert len(result.choices) == 2 and [c.index for c in result.choices] == [0, 1]
    assert [(c.finish_reason, len(c.logprobs.content)) for c in result.choices] == [("length", 5)] * 2
    assert result.usage.completion_tokens == 10
    # Left free to end, a choice that does counts its end-of-sequence token, which has no entry.
    free = client.chat.completions.create(model=CHAT, messages=SEED_CHAT["messages"], **{name: 5},
                                          n=2, temperature=1.0, seed=1, logprobs=True)
    used = [len(c.logprobs.content) + (c.finish_reason == "stop") for c in free.choices]
    assert all(c.finish_reason == "length" and n == 5 or c.finish_reason == "stop" and 0 < n <= 5
               for c, n in zip(free.choices, used))
    assert free.usage.completion_tokens == sum(used)


def test_presence_and_frequency_penalties_reach_the_model(http):
    """Each penalty, sent over HTTP, changes a greedy answer (a random model's repeats one
    token, which either penalty pushes down), and the same request answers the same again."""
    def answer(**penalty) -> str:
        body = {**SEED_CHAT, "max_tokens": 16, "temperature": 0, "logit_bias": NO_EOS, **penalty}
        return assert_success(http.post("/v1/chat/completions", json=body))["choices"][0]["message"]["content"]

    plain = answer()
    for name in ("presence_penalty", "frequency_penalty"):
        penalised = answer(**{name: 2})
        assert penalised != plain, name
        assert answer(**{name: 2}) == penalised, name
    assert answer(presence_penalty=0, frequency_penalty=0) == plain


def test_chat_seed_reproduces_and_differs(client):
    def ask(seed: int) -> str:
        return client.chat.completions.create(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=16,
                                              temperature=1.0, seed=seed).choices[0].message.content

    assert ask(7) == ask(7)
    assert len({ask(7), ask(8), ask(9)}) > 1


def test_omitted_temperature_samples_as_openai_does(client):
    """OpenAI's default temperature is 1: n=3 without one gives three answers (the tiny
    model's checkpoint sets no sampling defaults), and its seed reproduces them."""
    def ask() -> list[str]:
        result = client.chat.completions.create(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=16, n=3, seed=4)
        return [c.message.content for c in result.choices]

    answers = ask()
    assert len(set(answers)) > 1 and ask() == answers


def test_chat_stop_string_cuts_output(client):
    greedy = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=24, temperature=0)
    full = client.chat.completions.create(**greedy).choices[0].message.content
    assert len(full) > 6
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.chat.completions.create(**greedy, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    # Under vLLM's min_tokens stop strings do not count yet.
    late = client.chat.completions.create(**greedy, stop=[stop], extra_body={"min_tokens": 24}).choices[0]
    assert (late.message.content, late.finish_reason) == (full, "length")


def test_vllms_top_k_and_min_p_narrow_sampling(client):
    """top_k 1, or min_p 1 (only tokens as likely as the most likely one), is the greedy answer
    at any temperature; a wide one still samples."""
    ask = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=12)
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    for narrow in ({"top_k": 1}, {"min_p": 1.0}):
        answers = client.chat.completions.create(**ask, temperature=1.5, n=3, seed=5, extra_body=narrow)
        assert [c.message.content for c in answers.choices] == [greedy] * 3, narrow
    wide = client.chat.completions.create(**ask, temperature=1.5, n=3, seed=5, extra_body={"top_k": 40, "min_p": 0.01})
    assert len({c.message.content for c in wide.choices}) > 1


def test_min_tokens_and_ignore_eos_hold_the_end_back(client, models_dir):
    """With the end-of-sequence token pushed to the top by logit_bias the answer ends on its
    first token; min_tokens holds the end back that many tokens, ignore_eos until max_tokens."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(models_dir / "tiny-llama").eos_token_id
    ask = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=10, temperature=0, logit_bias={str(eos): 100})

    def answer(**extra):
        choice = client.chat.completions.create(**ask, extra_body=extra)
        return choice.usage.completion_tokens, choice.choices[0].finish_reason

    assert answer() == (1, "stop")  # the end-of-sequence token counts, as in vLLM
    assert answer(min_tokens=4) == (5, "stop")
    assert answer(ignore_eos=True) == (10, "length")
    with client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True},
                                        extra_body={"min_tokens": 4}) as stream:
        chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "stop"


def test_chat_accepts_content_parts_and_unknown_fields(http):
    body = {
        "model": CHAT, "max_tokens": 4, "wallet": "0xabc", "signature": "sig", "user": "u1",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
    }
    as_parts = assert_success(http.post("/v1/chat/completions", json=body))["usage"]["prompt_tokens"]
    # The parts are the message's text, joined by a newline (as vLLM joins them).
    for text, same in (("Hi \nthere", True), ("", False)):
        other = {**body, "messages": [{"role": "user", "content": text}]}
        assert (assert_success(http.post("/v1/chat/completions", json=other))["usage"]["prompt_tokens"]
                == as_parts) is same, text
    # An assistant's refusal part, as OpenAI's clients replay one, is that turn's text.
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I can't help with that."},
             {"role": "user", "content": "Why?"}]
    as_part = copy.deepcopy(turns)
    as_part[1]["content"] = [{"type": "refusal", "refusal": "I can't help with that."}]
    prompt_tokens = [assert_success(http.post("/v1/chat/completions", json={**body, "messages": m}))["usage"]["prompt_tokens"]
                     for m in (turns, as_part)]
    assert prompt_tokens[0] == prompt_tokens[1]


def test_streaming_equals_non_streaming(client):
    greedy = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**greedy)
    chunks = list(client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The details OpenAI always sends, so that code reading them works here too.
    for usage in (whole.usage, chunks[-1].usage):
        assert (usage.prompt_tokens_details.cached_tokens, usage.completion_tokens_details.reasoning_tokens) == (0, 0)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client):
    """vLLM's extension: with include_usage, each chunk's usage counts the tokens sent so far."""
    greedy = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=12, temperature=0, stream=True)
    chunks = list(client.chat.completions.create(**greedy, stream_options={"include_usage": True},
                                                 extra_body={"stream_options": {"include_usage": True,
                                                                                "continuous_usage_stats": True}}))
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert all(chunk.usage is not None for chunk in chunks) and counts == sorted(counts)
    assert counts[-1] == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens > counts[0]
    # Without it, only the last chunk has usage, as OpenAI sends it.
    plain = list(client.chat.completions.create(**greedy, stream_options={"include_usage": True}))
    assert [chunk.usage is not None for chunk in plain] == [False] * (len(plain) - 1) + [True]


def test_logprobs_follow_the_tokens_in_both_modes(client):
    greedy = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=10, temperature=0,
                  logprobs=True, top_logprobs=3, logit_bias=NO_EOS)
    whole = client.chat.completions.create(**greedy)
    choice = whole.choices[0]
    entries = choice.logprobs.content
    # One entry per generated token, all 10 of them (no end of sequence).
    assert choice.finish_reason == "length" and len(entries) == whole.usage.completion_tokens == 10
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        ranked = [alt.logprob for alt in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # greedy, no penalties: the token chosen is the most likely one
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)
    # A token may be part of a character (its `token` then holds U+FFFD); the bytes join into the text.
    joined = bytes(byte for entry in entries for byte in entry.bytes)
    assert joined.decode("utf-8", errors="replace") == choice.message.content
    chunks = list(client.chat.completions.create(**greedy, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    plain = client.chat.completions.create(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=4)
    assert plain.choices[0].logprobs is None


@pytest.fixture(scope="module")
def chat_tokenizer(models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models_dir / "tiny-llama")


def test_logit_bias_forces_a_token_and_its_bytes_are_the_real_ones(client, chat_tokenizer):
    """+100 on the first token of "€" (part of the character): every token is that one, and its
    `bytes` are the character's first byte, not the replacement character's."""
    euro = chat_tokenizer.encode("€", add_special_tokens=False)
    assert len(euro) > 1, "the tiny tokenizer splits € over several tokens"
    greedy = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=3, temperature=0, logprobs=True)
    plain = client.chat.completions.create(**greedy)
    forced = client.chat.completions.create(**greedy, logit_bias={str(euro[0]): 100})
    entries = forced.choices[0].logprobs.content
    # Byte-level BPE: one vocabulary character per byte, so the token holds the first n bytes of €.
    first = "€".encode()[:len(chat_tokenizer.convert_ids_to_tokens(euro[0]))]
    assert len(first) < 3 and [bytes(e.bytes) for e in entries] == [first] * 3
    assert entries[0].token == "\ufffd"
    assert forced.choices[0].message.content != plain.choices[0].message.content


def test_top_p_zero_keeps_only_the_most_likely_token(client):
    ask = dict(model=CHAT, messages=SEED_CHAT["messages"], max_tokens=12)
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    assert {client.chat.completions.create(**ask, temperature=1.0, top_p=0, seed=seed).choices[0].message.content
            for seed in (1, 2)} == {greedy}


@pytest.mark.parametrize("tool_choice", ["auto", {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}])
def test_tools_in_auto_mode_function_role_and_text_format_are_plain_chat(http, tool_choice):
    body = {**SEED_CHAT, "max_tokens": 3, "response_format": {"type": "text"}, "tool_choice": tool_choice,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "messages": [*SEED_CHAT["messages"], {"role": "function", "name": "get_weather", "content": "sunny"}]}
    answer = assert_success(http.post("/v1/chat/completions", json=body))
    assert answer["choices"][0]["message"]["content"] and "tool_calls" not in answer["choices"][0]["message"]


def test_tools_and_chat_template_kwargs_reach_the_chat_template(http):
    """As vLLM passes them: a model trained for tools sees their definitions (the tiny model's
    template lists them, as Qwen's does), but not with tool_choice "none"; `chat_template_kwargs`
    are the template's variables (its Qwen3-style `enable_thinking` switch), though never one of
    the server's own."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

    def prompt_tokens(**fields) -> int:
        return assert_success(http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 1, **fields}))[
            "usage"]["prompt_tokens"]

    plain = prompt_tokens()
    assert prompt_tokens(tools=tools) == prompt_tokens(tools=tools, tool_choice="auto") > plain + 20
    assert prompt_tokens(tools=tools, tool_choice="none") == prompt_tokens(tools=tools, function_call="none") == plain
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) > plain
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": True, "unused": [1, {"a": None}]}) == plain
    for taken in ("tokenize", "messages", "conversations", "tools", "add_generation_prompt"):
        refused = http.post("/v1/chat/completions", json={**SEED_CHAT, "chat_template_kwargs": {taken: False}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs", refused.text
        assert taken in refused.json()["message"]
    # Both are prompt text (a template may print a variable: `bos_token` overrides the tokenizer's),
    # and both are copied recursively by transformers: a client's 400 either way, never a 500.
    deep: object = "x"
    for _ in range(600):
        deep = [deep]
    for fields, param in [({"chat_template_kwargs": {"bos_token": "x" * 250_000}}, "messages"),
                          ({"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 250_000}}]},
                           "messages"),
                          ({"chat_template_kwargs": {"deep": deep}}, "chat_template_kwargs"),
                          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"d": deep}}}]},
                           "tools")]:
        refused = http.post("/v1/chat/completions", json={**SEED_CHAT, **fields})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text[:300]


def test_stream_options_may_say_null(http):
    """Null is absent for every optional field, `stream_options.include_usage` too: no usage chunk."""
    with http.stream("POST", "/v1/chat/completions", json={
            **SEED_CHAT, "stream": True, "max_tokens": 2, "stream_options": {"include_usage": None}}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["choices"] and c.get("usage") is None for c in chunks)


def test_streaming_raw_sse_format(http):
    with http.stream("POST", "/v1/chat/completions", json={**SEED_CHAT, "stream": True, "max_tokens": 4, "n": 2}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    choices = [c for line in events[:-1] for c in json.loads(line[6:])["choices"]]
    assert {c["index"] for c in choices} == {0, 1}
    # One choice an event, as OpenAI and vLLM send them (a gateway reading choices[0] sees every choice);
    # the first events open every choice in index order, text or not (a choice's text may be held
    # back as part of a character or a stop string), as OpenAI's and vLLM's streams do.
    assert all(len(json.loads(line[6:])["choices"]) == 1 for line in events[:-1])
    assert [json.loads(line[6:])["choices"][0]["index"] for line in events[:2]] == [0, 1]
    # As OpenAI sends them: the role in each choice's first delta only, no null fields.
    for index in (0, 1):
        deltas = [c["delta"] for c in choices if c["index"] == index]
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
        assert all(None not in d.values() for d in deltas)


@pytest.mark.parametrize("extra,status,param,code", [
    ({"model": "nope"}, 404, "model", "model_not_found"),  # found by the ingress
    # Found by the model's replica, from its tokenizer and vocabulary: the first item of the stream.
    ({"logit_bias": {"5000": 5}}, 400, "logit_bias", "invalid_value"),
    ({"max_tokens": 1024, "messages": [{"role": "user", "content": " conversations" * 1100}]}, 400, "max_tokens",
     "context_length_exceeded"),
], ids=["unknown-model", "token-beyond-vocabulary", "past-the-context"])
def test_streaming_error_before_start_is_plain_json(http, extra, status, param, code):
    """An error found before the first token is a plain JSON error with its status, not a 200 stream."""
    response = http.post("/v1/chat/completions", json={**SEED_CHAT, "stream": True, **extra})
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


# ------------------------------------------------------------------------------ images


def test_image_seed_example_returns_fetchable_png(http):
    body = assert_success(http.post("/v1/images/generations", json={
        "model": IMAGE, "prompt": "A cute baby sea otter", "n": 2, "size": "128x96"}))
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert list(item) == ["url"] and item["url"].startswith("http://")  # as the standard shows it, no nulls
        fetched = http.get(item["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert png_of(fetched.content).size == (128, 96)
    assert (body["output_format"], body["size"]) == ("png", "128x96")  # what was made, as gpt-image says
    ImagesResponse.model_validate(body)


def test_image_files_serve_ranges_and_answer_their_failures_as_the_api_does(http):
    """A byte range is served; one that cannot be parsed is ignored, as RFC 9110 allows (the
    whole image, where Starlette answered a plain-text 400), and one past the end is a 416
    with the API's JSON error and the file's length."""
    body = assert_success(http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "otter",
                                                                    "size": "64x64"}))
    url = body["data"][0]["url"]
    whole = http.get(url).content
    part = http.get(url, headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == whole[:8] == b"\x89PNG\r\n\x1a\n"
    assert part.headers["content-range"] == f"bytes 0-7/{len(whole)}"
    for unparsable in ("pages=1-2", "bytes=abc", "bytes=5-2", "bytes"):
        response = http.get(url, headers={"Range": unparsable})
        assert response.status_code == 200 and response.content == whole, unparsable
    past = http.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(whole)}"
    assert past.headers["content-type"] == "application/json"
    assert past.json()["code"] == 416 and past.json()["error"]["code"] == "range_not_satisfiable"
    stale = http.get(url, headers={"Range": f"bytes={len(whole)}-", "If-Range": '"another-version"'})
    assert stale.status_code == 200 and stale.content == whole  # If-Range: a changed file is sent whole
    # A cache holding the image (its ETag in If-None-Match) is told it is unchanged, not sent it again.
    etag = http.get(url).headers["etag"]
    for held in (etag, f'"other", W/{etag}', "*"):
        unchanged = http.get(url, headers={"If-None-Match": held})
        assert (unchanged.status_code, unchanged.content, unchanged.headers["etag"]) == (304, b"", etag), held
    assert http.get(url, headers={"If-None-Match": '"another-version"'}).content == whole
    # HEAD (a client checking an image before fetching it, an uptime probe) answers the headers alone.
    head = http.head(url)
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(whole)))
    for probe in ("/health", "/ready", "/v1/models"):
        assert (http.head(probe).status_code, http.head(probe).content) == (200, b"")
    assert http.head("/v1/chat/completions").status_code == 405


def test_a_request_without_model_goes_to_the_one_model_of_its_kind(client, http):
    """OpenAI's client may leave `model` out of an image request; the server serves one image
    model and one chat model here, so each route knows which is meant, and says so."""
    image = client.images.generate(prompt="otter", size="64x64", response_format="b64_json")
    assert png_of(base64.b64decode(image.data[0].b64_json)).size == (64, 64)
    assert image.model_extra["model"] == IMAGE
    chat = assert_success(http.post("/v1/chat/completions", json={"model": "", "max_tokens": 2,
                                                                  "messages": SEED_CHAT["messages"]}))
    assert chat["model"] == CHAT


def readme_seed_examples() -> list[tuple[str, str | None]]:
    """The curl commands of the README's first example block (the standard's, verbatim), as
    (path, body): what a new user pastes first."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Examples", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [c for c in re.split(r"\n\s*\n", block) if c.startswith("curl ")]
    return [(re.match(r"curl http://127\.0\.0\.1:1088(\S+)", c)[1],  # type: ignore[index]
             (body := re.search(r"-d '(.*?)'", c, re.S)) and body[1]) for c in commands]


def test_readme_seed_examples_work_as_written(http):
    examples = dict(readme_seed_examples())
    assert list(examples) == ["/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models"]

    def post(path: str) -> httpx.Response:
        return http.post(path, content=examples[path], headers={"Content-Type": "application/json"})

    assert assert_success(post("/v1/chat/completions"))["choices"][0]["message"]["role"] == "assistant"
    images = assert_success(post("/v1/images/generations"))["data"]  # 1024x1024, the largest size allowed
    assert len(images) == 1 and png_of(http.get(images[0]["url"]).content).size == (1024, 1024)
    placeholder = post("/v1/images/edits")  # "https://..." names no image, as the README says
    assert placeholder.status_code == 400 and placeholder.json()["error"]["param"] == "image"
    assert [m["model"] for m in http.get("/v1/models").json()["data"]] == [CHAT, IMAGE]


def test_openai_images_generate_url_and_b64(client, http):
    by_url = client.images.generate(model=IMAGE, prompt="otter", size="256x256")
    assert png_of(http.get(by_url.data[0].url).content).size == (256, 256)
    inline = client.images.generate(model=IMAGE, prompt="otter", n=2, size="64x64", response_format="b64_json")
    assert len(inline.data) == 2
    assert png_of(base64.b64decode(inline.data[0].b64_json)).size == (64, 64)


@pytest.mark.parametrize("fmt,media", [("jpeg", "image/jpeg"), ("webp", "image/webp"), ("png", "image/png")])
def test_output_format_is_the_file_format_by_url_and_in_base64(http, client, fmt, media):
    ask = {"model": IMAGE, "prompt": "an otter", "size": "64x64", "seed": 3, "output_format": fmt}
    body = assert_success(http.post("/v1/images/generations", json=ask))
    url = body["data"][0]["url"]
    assert url.endswith("." + fmt)
    fetched = http.get(url)
    assert fetched.headers["content-type"] == media
    assert Image.open(io.BytesIO(fetched.content)).format == fmt.upper()
    encoded = client.images.generate(model=IMAGE, prompt="an otter", size="64x64", response_format="b64_json",
                                     output_format=fmt, output_compression=20)
    image = Image.open(io.BytesIO(base64.b64decode(encoded.data[0].b64_json)))
    assert (image.format, image.size) == (fmt.upper(), (64, 64))
    assert encoded.output_format == body["output_format"] == fmt


def test_node_style_zero_values_mean_defaults(http):
    body = assert_success(http.post("/v1/images/generations", json={
        "model": IMAGE, "prompt": "otter", "n": 0, "size": "", "width": 0, "height": 0,
        "response_format": "", "step": 0, "wallet": "w", "signature": "s", "hash": "h"}))
    assert len(body["data"]) == 1 and body["data"][0]["url"]
    assert png_of(http.get(body["data"][0]["url"]).content).size == (512, 512)  # the config's default
    assert body["size"] == "512x512"


def test_width_height_fields_set_the_size(http):
    body = assert_success(http.post("/v1/images/generations", json={
        "model": IMAGE, "prompt": "otter", "width": 96, "height": 64, "size": "96x64", "response_format": "b64_json"}))
    assert png_of(base64.b64decode(body["data"][0]["b64_json"])).size == (96, 64)
    # A size said two ways that disagree, or in other digits than ASCII's, is the client's to fix.
    for fields in ({"width": 96, "height": 64, "size": "64x64"}, {"size": "\u0661\u0662\u0668x128"}):
        refused = http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "otter", **fields})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "size", refused.text


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _png_bytes(size=(80, 60), color="red") -> bytes:
    return _png(Image.new("RGB", size, color))


def test_openai_images_edit_with_file_upload(client, http):
    result = client.images.edit(model=IMAGE, image=("in.png", _png_bytes(), "image/png"),
                                prompt="with a beret", size="128x128")
    assert png_of(http.get(result.data[0].url).content).size == (128, 128)

    def edit(color: str) -> np.ndarray:  # the upload drives the output: same prompt and seed, another image
        made = client.images.edit(model=IMAGE, image=("in.png", _png_bytes((72, 64), color), "image/png"),
                                  prompt="with a beret", response_format="b64_json", extra_body={"seed": 7})
        image = png_of(base64.b64decode(made.data[0].b64_json))
        assert image.size == (72, 64)  # no size asked: the upload's
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    assert np.abs(edit("red") - edit("blue")).mean() > 1


def test_edit_with_upload_under_another_field_name_and_octet_stream(http):
    response = http.post("/v1/images/edits", data={"model": IMAGE, "prompt": "beret", "n": "2", "size": "64x64"},
                         files={"face_image": ("f.bin", _png_bytes(), "application/octet-stream")})
    assert len(assert_success(response)["data"]) == 2


def test_edit_json_with_data_url_keeps_input_size(http):
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes((120, 80))).decode()
    body = assert_success(http.post("/v1/images/edits", json={
        "model": IMAGE, "prompt": "beret", "image": data_url, "response_format": "b64_json"}))
    assert png_of(base64.b64decode(body["data"][0]["b64_json"])).size == (120, 80)


def test_edit_json_with_http_url(http):
    """The standard's edit example with a real URL, `n: 2` as in its request body."""
    made = assert_success(http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}))
    body = assert_success(http.post("/v1/images/edits", json={
        "model": IMAGE, "prompt": "beret", "image": made["data"][0]["url"], "n": 2, "size": "64x64"}))
    assert len(body["data"]) == 2 and len({item["url"] for item in body["data"]}) == 2
    assert all(png_of(http.get(item["url"]).content).size == (64, 64) for item in body["data"])


def test_an_image_this_server_made_is_edited_from_its_store_whatever_address_names_it(http):
    """Its `url` passed on to an edit is read from the image store, not fetched: the shipped
    config refuses loopback and private addresses (this suite's server allows 127.0.0.1 only,
    so the addresses below would be refused if fetched), and a LAN address reaches it too."""
    made = assert_success(http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}))
    path = httpx.URL(made["data"][0]["url"]).path
    mask = assert_success(http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "m", "size": "64x64"}))
    for source in (f"http://127.0.0.2:1{path}", f"https://10.1.2.3/some/prefix{path}", path):
        body = assert_success(http.post("/v1/images/edits", json={
            "model": IMAGE, "prompt": "beret", "image": source, "mask": "http://[::1]" + httpx.URL(mask["data"][0]["url"]).path,
            "response_format": "b64_json"}))
        assert png_of(base64.b64decode(body["data"][0]["b64_json"])).size == (64, 64)
    # Not one of its images (never made, or removed by retention): fetched, the address is refused,
    # and the answer says the image is gone rather than blaming the address.
    gone = f"{path.rsplit('/', 1)[0]}/{'A' * 24}.png"
    for unknown in (f"http://127.0.0.2:1{gone}", gone):
        response = http.post("/v1/images/edits", json={"model": IMAGE, "prompt": "beret", "image": unknown})
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("image_not_found", "image")
        assert "does not hold" in response.json()["message"]
    # At an address it may fetch from (this suite allows 127.0.0.1), such a URL is another
    # server's: its failure is told as it is.
    elsewhere = http.post("/v1/images/edits", json={"model": IMAGE, "prompt": "beret", "image": f"http://127.0.0.1:1{gone}"})
    assert elsewhere.status_code == 400 and elsewhere.json()["error"]["code"] == "invalid_image_url", elsewhere.text
    assert elsewhere.json()["message"] == "image URL could not be connected to."


def test_edit_json_in_openai_image_url_form(http):
    """OpenAI's JSON edits: `images: [{"image_url": ...}]` and `mask: {"image_url": ...}`,
    read as `image` and `mask`; a `file_id` (OpenAI's file store) is a clear 400."""
    image = "data:image/png;base64," + base64.b64encode(_png_bytes((64, 64))).decode()
    mask = "data:image/png;base64," + base64.b64encode(_png(Image.new("L", (64, 64), 255))).decode()
    ask = {"model": IMAGE, "prompt": "beret", "seed": 3, "response_format": "b64_json"}
    plain = assert_success(http.post("/v1/images/edits", json={**ask, "image": image, "mask": mask}))
    wrapped = assert_success(http.post("/v1/images/edits", json={
        **ask, "images": [{"image_url": image}], "mask": {"image_url": mask}}))
    assert wrapped["data"] == plain["data"]
    for refs, param, code in (([{"file_id": "file-1"}], "images[0]", "invalid_value"),
                              ([{"image_url": image}] * 2, "images", "too_many_files")):  # as two `image[]` parts
        refused = http.post("/v1/images/edits", json={**ask, "images": refs})
        assert refused.status_code == 400, refused.text
        assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (param, code), refused.text


def test_an_edit_sent_to_the_generations_url_runs_as_an_edit(http):
    """The network's node finds an image model by name alone and may forward an edit (a
    multipart form, as it sends edits) to the generations URL: it is run as the same edit,
    not answered with a picture that ignores its image. JSON with an `image` too."""
    form = {"data": {"model": IMAGE, "prompt": "beret", "seed": "5", "size": "64x64", "response_format": "b64_json"},
            "files": {"image": ("in.png", _png_bytes((64, 64), "red"), "image/png")}}
    edited = assert_success(http.post("/v1/images/edits", **form))["data"]
    assert assert_success(http.post("/v1/images/generations", **form))["data"] == edited
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes((120, 80))).decode()
    body = assert_success(http.post("/v1/images/generations", json={
        "model": IMAGE, "prompt": "beret", "image": data_url, "response_format": "b64_json"}))
    assert png_of(base64.b64decode(body["data"][0]["b64_json"])).size == (120, 80)  # the input's, as edits keep it
    refused = http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "beret", "image": "data:,nope"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image", refused.text


def test_openai_images_edit_with_several_images_is_refused_not_cut(client):
    """OpenAI's client sends a list of images as `image[]` parts; this server edits one, so
    two are a 400 rather than an edit of the first alone. A list of one is that image."""
    one = client.images.edit(model=IMAGE, image=[("in.png", _png_bytes(), "image/png")], prompt="beret",
                             size="64x64", response_format="b64_json")
    assert png_of(base64.b64decode(one.data[0].b64_json)).size == (64, 64)
    with pytest.raises(openai.BadRequestError) as two:
        client.images.edit(model=IMAGE, image=[("a.png", _png_bytes(), "image/png")] * 2, prompt="beret")
    assert two.value.body["param"] == "image" and two.value.body["code"] == "too_many_files"


def post_form(http, fields: dict[str, str], extra_parts: str = "",
              media_type: str = "multipart/form-data", route: str = "/v1/images/edits") -> httpx.Response:
    """A browser form: text fields written out by hand (httpx sends no form without a file),
    then any parts given as they are."""
    form = "".join(f'--b0undary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                   for name, value in fields.items()) + extra_parts + "--b0undary--\r\n"
    return http.post(route, content=form.encode(), headers={"content-type": f"{media_type}; boundary=b0undary"})


@pytest.mark.parametrize("route", ["/v1/images/edits", "/v1/images/generations"])
def test_an_image_part_sent_without_a_filename_is_that_image(http, route):
    """A form part with the image's bytes but no filename (RFC 7578: a client SHOULD send one),
    which Starlette reads as a text field, is the upload it is, not "not a valid URL"."""
    parts = b"".join(b'--b0undary\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value)
                     for name, value in (("model", IMAGE.encode()), ("prompt", b"beret"), ("response_format", b"b64_json"),
                                         ("image", _png_bytes((72, 64)))))
    response = http.post(route, content=parts + b"--b0undary--\r\n",
                         headers={"content-type": "multipart/form-data; boundary=b0undary"})
    body = assert_success(response)
    assert png_of(base64.b64decode(body["data"][0]["b64_json"])).size == (72, 64)  # the edit keeps its input's size


def test_a_generation_sent_as_a_form_without_an_image_is_that_generation(http):
    """`curl -F model=... -F prompt=...` to the generations route: a form with no image is
    the generation its fields ask for (not an edit missing its image), and the same as JSON."""
    ask = {"model": IMAGE, "prompt": "a hat", "seed": 9, "size": "64x72", "n": 2, "response_format": "b64_json"}
    as_json = assert_success(http.post("/v1/images/generations", json=ask))["data"]
    as_form = assert_success(post_form(http, {k: str(v) for k, v in ask.items()}, route="/v1/images/generations"))
    assert as_form["data"] == as_json and len(as_json) == 2
    assert png_of(base64.b64decode(as_json[0]["b64_json"])).size == (64, 72)
    # The prompt as a file part (`curl -F prompt=@prompt.txt`, for a long one): the same text.
    fields = {k: str(v) for k, v in ask.items() if k != "prompt"}
    from_file = http.post("/v1/images/generations", data=fields, files={"prompt": ("prompt.txt", b"a hat\n")})
    assert assert_success(from_file)["data"] == as_json
    edit = {**fields, "n": "1"}
    image = {"image": ("in.png", _png_bytes((64, 72)), "image/png")}
    as_text = assert_success(http.post("/v1/images/edits", data={**edit, "prompt": "a hat"}, files=image))["data"]
    as_file = http.post("/v1/images/edits", data=edit, files={**image, "prompt": ("prompt.txt", b"a hat\r\n")})
    assert assert_success(as_file)["data"] == as_text
    not_text = http.post("/v1/images/edits", data=edit, files={**image, "prompt": ("p.bin", b"\xff\xfe")})
    assert not_text.status_code == 400 and not_text.json()["error"]["param"] == "prompt", not_text.text


MOST = {"n": "n must be at most", "steps": "steps must be at most", "step": "step must be at most",
        "size": "size: width and height must be between", "prompt": "prompt is longer than 4000 characters"}


@pytest.mark.parametrize("limit,param", [({"n": 99}, "n"), ({"steps": 10_000}, "steps"), ({"step": 10_000}, "step"),
                                         ({"size": "8000x8000"}, "size"), ({"prompt": "x" * 5000}, "prompt")])
def test_an_edit_beyond_the_models_limits_is_refused_before_its_image_is_fetched(http, limit, param):
    """The image may be a 20 MiB download of up to 15 s: asking for more than the model allows
    is answered first, for nothing (the URL here is a private address, which a fetch refuses)."""
    body = {"model": IMAGE, "prompt": "beret", "image": "http://10.255.255.1/x.png", **limit}
    for response in (http.post("/v1/images/edits", json=body),
                     post_form(http, {key: str(value) for key, value in body.items()})):
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert MOST[param] in response.json()["message"], response.text


def test_multipart_edit_may_name_its_image_by_url(http):
    made = assert_success(http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}))
    # As a browser form sends it: the URL in a text field, and a file field left empty (filename="").
    fields = {"model": IMAGE, "prompt": "beret", "image": made["data"][0]["url"], "size": "64x64"}
    empty_file = ('--b0undary\r\nContent-Disposition: form-data; name="mask"; filename=""\r\n'
                  'Content-Type: application/octet-stream\r\n\r\n\r\n')
    body = assert_success(post_form(http, fields, empty_file, media_type="Multipart/Form-Data"))  # any case
    assert png_of(http.get(body["data"][0]["url"]).content).size == (64, 64)


def test_multipart_edit_may_carry_its_image_as_a_data_url_over_a_mebibyte(http):
    noise = np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(image) > 2**20  # past Starlette's default cap on a form's text field
    fields = {"model": IMAGE, "prompt": "beret", "image": image, "size": "64x64"}
    body = assert_success(post_form(http, fields))
    assert png_of(http.get(body["data"][0]["url"]).content).size == (64, 64)


def test_an_edit_starts_from_its_input_image(http):
    """The same prompt and seed on a red and on a blue input: two images; the red one again: the same."""
    def edit(color: str) -> np.ndarray:
        body = assert_success(http.post("/v1/images/edits", data={
            "model": IMAGE, "prompt": "beret", "seed": "7", "size": "64x64", "response_format": "b64_json"},
            files={"image": ("in.png", _png_bytes((64, 64), color), "image/png")}))
        return np.asarray(png_of(base64.b64decode(body["data"][0]["b64_json"])).convert("RGB"), dtype=np.int16)

    red, blue, red_again = edit("red"), edit("blue"), edit("red")
    assert np.abs(red - blue).mean() > 1
    assert np.abs(red - red_again).max() <= 1


def test_an_edit_with_a_mask_inpaints(http):
    """A mask selects the inpainting pipeline: the same input, prompt and seed make another
    image with a mask than without; as a multipart upload or a data: URL in JSON alike."""
    image = _png_bytes((64, 64), "red")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    ask = {"model": IMAGE, "prompt": "beret", "seed": "5", "size": "64x64", "response_format": "b64_json"}

    def made(response: httpx.Response) -> np.ndarray:
        data = base64.b64decode(assert_success(response)["data"][0]["b64_json"])
        assert png_of(data).size == (64, 64)
        return np.asarray(png_of(data).convert("RGB"), dtype=np.int16)

    masked = made(http.post("/v1/images/edits", data=ask, files={
        "image": ("in.png", image, "image/png"), "mask": ("mask.png", buffer.getvalue(), "image/png")}))
    unmasked = made(http.post("/v1/images/edits", data=ask, files={"image": ("in.png", image, "image/png")}))
    as_json = made(http.post("/v1/images/edits", json={
        **ask, "seed": 5, "image": "data:image/png;base64," + base64.b64encode(image).decode(),
        "mask": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}))
    assert np.abs(masked - unmasked).mean() > 1
    assert np.abs(masked - as_json).max() <= 1


def test_an_edit_reads_transparency_as_openai_does(http):
    """OpenAI's mask edits where it is transparent; without a mask, the image's own
    transparent pixels are edited. A mask without transparency (an RGBA one that is opaque
    everywhere included) paints where it is white, as diffusers reads masks; one that marks nothing is a 400."""
    ask = {"model": IMAGE, "prompt": "beret", "seed": "5", "size": "64x64", "response_format": "b64_json"}
    red = Image.new("RGB", (64, 64), "red")
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    clear_left = Image.new("RGBA", (64, 64), (0, 0, 0, 255))  # OpenAI's: opaque, with a hole to edit
    clear_left.paste((0, 0, 0, 0), (0, 0, 32, 64))
    red_clear_left = red.convert("RGBA")
    red_clear_left.putalpha(white_left.point(lambda v: 255 - v))

    def made(image: Image.Image, mask: Image.Image | None = None) -> np.ndarray:
        files = {"image": ("in.png", _png(image), "image/png")}
        if mask is not None:
            files["mask"] = ("mask.png", _png(mask), "image/png")
        data = base64.b64decode(assert_success(http.post("/v1/images/edits", data=ask, files=files))["data"][0]["b64_json"])
        return np.asarray(png_of(data).convert("RGB"), dtype=np.int16)

    left = made(red, white_left)
    assert np.abs(left - made(red)).mean() > 1  # an inpainting, not a plain edit
    assert np.abs(left - made(red, clear_left)).max() <= 1
    assert np.abs(left - made(red_clear_left)).max() <= 1
    assert np.abs(left - made(red, white_left.convert("RGBA"))).max() <= 1  # alpha 255 everywhere
    # All black, read as diffusers reads masks: it marks nothing to edit, and the picture would come back as it was.
    nothing = http.post("/v1/images/edits", data=ask, files={"image": ("in.png", _png(red), "image/png"),
                                                          "mask": ("mask.png", _png(clear_left.convert("RGB")), "image/png")})
    assert nothing.status_code == 400 and nothing.json()["error"]["param"] == "mask", nothing.text


# ------------------------------------------------------------------------------ errors

TOO_LARGE = {"code": "body_too_large"}
TOO_DEEP = {"code": "invalid_json", "message": "The request body's JSON is nested too deeply (more than about 1,000 "
                                               "levels of arrays and objects)."}
TOO_MANY_DIGITS = {"code": "invalid_json",
                   "message": "A number in the request body has more than 4,300 digits, more than this server reads."}
TOO_MANY_VALUES = {"code": "invalid_value", "message": "the request holds more than 100000 JSON values"}
BAD_REQUESTS = [
    # (method, path, kwargs, status, the error's param, or the error fields expected)
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "model": "nope"}}, 404, "model"),
    ("post", "/v1/images/generations", {"json": {"model": "nope", "prompt": "x"}}, 404, "model"),
    ("post", "/v1/images/edits", {"json": {"model": "nope", "prompt": "x", "image": "data:image/png;base64,"
                                           + base64.b64encode(_png_bytes()).decode()}}, 404, "model"),
    ("post", "/v1/chat/completions", {"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400, {"code": "invalid_json"}),
    # Valid JSON nested past what Python's parser takes is told as that, on FastAPI's route and ours.
    ("post", "/v1/chat/completions", {"content": b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                      "headers": {"content-type": "application/json"}}, 400, TOO_DEEP),
    ("post", "/v1/images/generations", {"content": b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                        "headers": {"content-type": "application/json"}}, 400, TOO_DEEP),
    # So is an integer past the digits Python's parser reads (valid JSON too).
    ("post", "/v1/chat/completions", {"content": b'{"seed": ' + b"7" * 5000 + b"}",
                                      "headers": {"content-type": "application/json"}}, 400, TOO_MANY_DIGITS),
    ("post", "/v1/images/generations", {"content": b'{"seed": ' + b"7" * 5000 + b"}",
                                        "headers": {"content-type": "application/json"}}, 400, TOO_MANY_DIGITS),
    ("post", "/v1/chat/completions", {"json": {"model": CHAT}}, 400, "messages"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [{"role": "robot", "content": "x"}]}}, 400, "messages[0].role"),
    # A user's (system's, tool's) message needs content, as OpenAI requires; an assistant's tool-call turn need not.
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [{"role": "user"}]}}, 400, "messages[0].content"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [
        {"role": "system", "content": None}, {"role": "user", "content": "x"}]}}, 400, "messages[0].content"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "temperature": "hot"}}, 400, "temperature"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "max_tokens": 10**6}}, 400, "max_tokens"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "max_completion_tokens": 10**6}}, 400, "max_completion_tokens"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "presence_penalty": 2.5}}, 400, "presence_penalty"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "n": 1000}}, 400, "n"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "top_logprobs": 2}}, 400, "top_logprobs"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "logprobs": True, "top_logprobs": 21}}, 400, "top_logprobs"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "model": IMAGE}}, 400, "model"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "seed": 2**64}}, 400, "seed"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "seed": -(2**63) - 1}}, 400, "seed"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "size": "big"}}, 400, "size"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "size": "100x100"}}, 400, "size"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "size": "8192x8192"}}, 400, "size"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE}}, 400, "prompt"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "steps": 10**4}}, 400, "steps"),
    ("post", "/v1/images/generations", {"json": {"model": CHAT, "prompt": "x"}}, 400, "model"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "https://..."}}, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "/etc/passwd"}}, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x",
                                           "image": "data:text/plain;base64," + base64.b64encode(b"hello").decode()}}, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x"}}, 400, "image"),
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"}, "files": {"image": ("a.png", b"not an image")}}, 400, "image"),
    # A mask must have the image's dimensions (as OpenAI requires): stretched, it would repaint elsewhere.
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"}, "files": {
        "image": ("a.png", _png_bytes((80, 60))), "mask": ("m.png", _png_bytes((60, 60), "white"))}}, 400, "mask"),
    # One mask per edit, and of files under names it does not know, one (a node's `face_image`), not a choice.
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"}, "files": [
        ("image", ("a.png", _png_bytes())), ("mask", ("m.png", _png_bytes())), ("mask", ("n.png", _png_bytes()))]},
     400, {"param": "mask", "code": "too_many_files"}),
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"}, "files": [
        ("face", ("a.png", _png_bytes())), ("photo", ("b.png", _png_bytes()))]}, 400, "image"),
    ("get", "/v1/files/images/..%2F..%2Fetc%2Fpasswd", {}, 404, {"code": "route_not_found"}),
    ("get", "/v1/files/images/nothere1234567890123.png", {}, 404, {"param": "name", "code": "file_not_found"}),
    ("get", "/v1/nothing", {}, 404, {"code": "route_not_found"}),
    ("delete", "/v1/models", {}, 405, {"code": "method_not_allowed"}),
    ("get", "/v1/chat/completions", {}, 405, {"code": "method_not_allowed"}),
    ("post", "/v1/chat/completions", {"content": b"x" * (26 * 1024 * 1024),
                                      "headers": {"content-type": "application/json"}}, 413, TOO_LARGE),
    # Chunked (no Content-Length): the limit holds as the body arrives, on routes FastAPI parses too.
    ("post", "/v1/chat/completions", {"content": [b" " * 2**20] * 27, "headers": {"content-type": "application/json"}}, 413, TOO_LARGE),
    ("post", "/v1/images/generations", {"content": [b" " * 2**20] * 27, "headers": {"content-type": "application/json"}}, 413, TOO_LARGE),
    # An edit over `max_body_bytes` (25 MiB): as JSON (its image a data: URL) and as a form, chunked or not.
    ("post", "/v1/images/edits", {"content": [b'{"model": "SuperImage", "prompt": "x", "image": "data:image/png;base64,',
                                              *[b"A" * 2**20] * 26, b'"}'],
                                  "headers": {"content-type": "application/json"}}, 413, TOO_LARGE),
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"},
                                  "files": {"image": ("a.png", b"\0" * (26 * 2**20), "image/png")}}, 413, TOO_LARGE),
    ("post", "/v1/images/edits", {"content": [b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.png"'
                                              b'\r\nContent-Type: image/png\r\n\r\n', *[b"\0" * 2**20] * 26,
                                              b"\r\n--b0undary--\r\n"],
                                  "headers": {"content-type": "multipart/form-data; boundary=b0undary"}}, 413, TOO_LARGE),
    # A chat's body may be 4 MiB (`max_text_body_bytes`); an image route's, which may carry images, 25.
    ("post", "/v1/chat/completions", {"content": b" " * (5 * 2**20), "headers": {"content-type": "application/json"}}, 413, TOO_LARGE),
    # The image routes take an edit's size, JSON (a data: URL) or a form, also where an edit goes to generations.
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "image": "data:image/png;base64,"
                                                 + base64.b64encode(b"x" * (4 * 2**20)).decode()}}, 400, "image"),
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x", "note": "n" * (5 * 2**20)},
                                  "files": {"image": ("a.png", b"not an image")}}, 400, "image"),
    ("post", "/v1/images/generations", {"data": {"model": IMAGE, "prompt": "x", "note": "n" * (5 * 2**20)},
                                        "files": {"image": ("a.png", b"not an image")}}, 400, "image"),
    # JSON values are counted before pydantic builds or checks them: a million tiny tool calls,
    # stops or biases cost the ingress seconds and gigabytes.
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [
        {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}] * 40_000}]}}, 400, TOO_MANY_VALUES),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "stop": [0] * 100_001}}, 400, TOO_MANY_VALUES),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "images": [{}] * 100_001}}, 400, TOO_MANY_VALUES),
    # Counted before the image routes parse a body (up to 25 MiB, a second of the event loop): this
    # one is not even read to its (missing) end.
    ("post", "/v1/images/generations", {"content": b'{"model": "SuperImage", "prompt": "x", "junk": [' + b"0," * 100_001,
                                        "headers": {"content-type": "application/json"}}, 400, TOO_MANY_VALUES),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}},
     400, "messages[0].content[0]"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}},
     400, "messages[0].content[0]"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "negative_prompt": "n" * 5000}}, 400, "negative_prompt"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "size": "9" * 5000 + "x512"}}, 400, "size"),
    ("post", "/v1/images/generations", {"content": b'{"model": "SuperImage", "prompt": "x", "width": ' + b"9" * 5000 + b', "height": 64}',
                                        "headers": {"content-type": "application/json"}}, 400, {"code": "invalid_json"}),
    # An edit runs int(steps * strength) steps: a tiny strength would need 10^8 of them.
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "strength": 1e-8, "image": "data:image/png;base64,"
                                           + base64.b64encode(_png_bytes()).decode()}}, 400, "strength"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "http://93.184.215.14:70000/a.png"}}, 400, "image"),
    # Near zero, the steps an edit needs outgrow what a float counts (this hung the ingress once).
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "strength": 1e-300, "image": "data:image/png;base64,"
                                           + base64.b64encode(_png_bytes()).decode()}}, 400, "strength"),
    # A lone UTF-16 surrogate (a string cut inside an emoji) is valid JSON, and no tokenizer takes it.
    ("post", "/v1/chat/completions", {"content": b'{"model": "Llama3-8B", "messages": [{"role": "user", "content": "\\ud800"}]}',
                                      "headers": {"content-type": "application/json"}}, 400, "messages[0].content"),
    ("post", "/v1/chat/completions", {"content": b'{"model": "Llama3-8B", "messages": [{"role": "user", "content": "x"}], '
                                                 b'"stop": ["a\\udfff"]}', "headers": {"content-type": "application/json"}}, 400, "stop[0]"),
    ("post", "/v1/images/edits", {"content": b'{"model": "SuperImage", "prompt": "otter \\ud83d", "image": "x"}',
                                  "headers": {"content-type": "application/json"}}, 400, "prompt"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "logit_bias": {"01": 5}}}, 400, "logit_bias"),
    ("post", "/v1/images/generations", {"content": b'{"model": "SuperImage", "prompt": "otter \\ud83d"}',
                                        "headers": {"content-type": "application/json"}}, 400, "prompt"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "stop": ["x" * 1001]}}, 400, "stop"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "output_format": "gif"}}, 400, "output_format"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "background": "transparent"}}, 400, "background"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "stream": True}}, 400, "stream"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "output_compression": 101}}, 400, "output_compression"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "response_format": {"type": "regex", "regex": "a+"}}}, 400, "response_format"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "tool_choice": "required"}}, 400, "tool_choice"),  # no tools
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}}}}, 400, "tool_choice"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}},
     400, "tool_choice"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "tool_choice": {"type": "allowed_tools", "allowed_tools": [1]}}},
     400, "tool_choice"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "logit_bias": {"99999999": 5}}}, 400, "logit_bias"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "logit_bias": {"5": 101}}}, 400, "logit_bias"),
    ("post", "/v1/chat/completions", {"content": b'{"model": "Llama3-8B", "messages": []}'}, 400, {"code": "invalid_body"}),  # no Content-Type
]


@pytest.mark.parametrize("method,path,kwargs,status,expected", BAD_REQUESTS,
                         ids=[f"{i}-{case[1]}-{case[3]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_the_error_envelope(http, method, path, kwargs, status, expected):
    response = http.request(method.upper(), path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["code"], int) and body["code"] != 0
    assert isinstance(body["message"], str) and body["message"]
    assert body["error"]["message"] and body["error"]["type"]
    assert "Traceback" not in response.text
    expected = expected if isinstance(expected, dict) else {"param": expected}
    for field, value in expected.items():
        assert body["error"][field] == value, body


def test_a_body_declared_too_large_is_413_before_it_is_sent(server):
    """Refused by its Content-Length alone: the 413 comes with none of the body sent (a client
    that waits for `100 Continue`, or a proxy, learns before uploading)."""
    import socket

    url = httpx.URL(server)
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (25 * 2**20 + 1))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:500]
    assert json.loads(body)["error"]["code"] == "body_too_large", body


@pytest.mark.parametrize("body", [b'{"model": "x",', b'{"model": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000],
                         ids=["cut", "not-utf8", "nested-100000"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"])
def test_a_body_that_is_not_json_is_400_invalid_json_on_every_route(http, path, body):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    # Nested past Python's parser, it is valid JSON, and told as too deep.
    message = TOO_DEEP["message"] if body.startswith(b"[[") else "The request body is not valid JSON."
    assert (error["code"], error["message"]) == ("invalid_json", message)


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_a_url_encoded_form_on_an_image_route_is_told_what_to_send(http, path):
    response = http.post(path, data={"model": IMAGE, "prompt": "an otter"})  # curl -d
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body", response.text
    assert "multipart form (curl -F)" in response.json()["message"]


def test_a_broken_multipart_form_is_told_what_is_wrong_with_it(http):
    response = http.post("/v1/images/edits", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "Missing boundary in multipart."
    assert response.json()["error"]["code"] == "invalid_body"


def test_a_model_called_on_the_other_kinds_route_is_told_where_to_go(http):
    image_as_chat = http.post("/v1/chat/completions", json={**SEED_CHAT, "model": IMAGE}).json()["error"]
    chat_as_image = http.post("/v1/images/generations", json={"model": CHAT, "prompt": "x"}).json()["error"]
    assert image_as_chat["code"] == chat_as_image["code"] == "wrong_model_kind"
    assert image_as_chat["message"] == f"The model '{IMAGE}' is an image model; call /v1/images/generations for it."
    assert chat_as_image["message"] == f"The model '{CHAT}' is a chat model; call /v1/chat/completions for it."


def test_a_wrong_method_is_told_which_ones_the_route_takes(http):
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "POST" in response.json()["message"]
    # A path served by a GET route and a HEAD route of its own names both.
    for path in ("/health", "/ready", "/v1/files/images/any.png"):
        response = http.delete(path)
        assert (response.status_code, response.headers["allow"]) == (405, "GET, HEAD"), response.headers
        assert "GET, HEAD" in response.json()["message"]


def test_a_trailing_slash_is_the_route_without_it(http):
    """Not FastAPI's empty 307, which curl shows as no answer and some clients follow as a GET."""
    chat = http.post("/v1/chat/completions/", json={**SEED_CHAT, "max_tokens": 2})
    assert_success(chat)
    assert chat.json()["object"] == "chat.completion"
    models = http.get("/v1/models/")
    assert models.status_code == 200 and models.json()["object"] == "list"
    assert http.get(f"/v1/models/{CHAT}/").json()["id"] == CHAT


def test_a_compressed_body_is_refused_by_name_not_as_bad_json(http):
    body = gzip.compress(json.dumps({**SEED_CHAT, "max_tokens": 2}).encode())
    response = http.post("/v1/chat/completions", content=body,
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_content_encoding"
    assert "'gzip' is not supported" in response.json()["message"]
    plain = http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 2},
                      headers={"Content-Encoding": "identity"})
    assert_success(plain)


def test_a_body_without_content_type_is_told_what_to_send(http):
    response = http.post("/v1/chat/completions", content=b'{"model": "Llama3-8B", "messages": []}')
    assert response.status_code == 400 and "Content-Type: application/json" in response.json()["message"]


def test_server_still_serves_after_bad_input(http):
    """The worst of the bad requests above, sent here too so that this holds run alone."""
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"model": "\xff\xfe"}', b"x" * (26 * 1024 * 1024), b'{"model": "x",'):
        for path in ("/v1/chat/completions", "/v1/images/generations"):
            status = http.post(path, content=body, headers={"content-type": "application/json"}).status_code
            assert status in (400, 413), (path, body[:20], status)
    assert_success(http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 3}))
    assert_success(http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}))


def test_null_stream_and_extreme_seeds_are_plain_requests(http):
    """OpenAI documents `stream` as boolean or null; a seed may be any 64-bit integer, and
    every bit of it counts."""
    texts = {}
    seeds = (2**63 - 1, -(2**63), 2**40 + 7, 7)
    for extra in ({"stream": None}, *({"seed": seed} for seed in seeds for _ in range(2))):  # each seed twice
        response = http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 8, "n": 2, "temperature": 1.0,
                                                           **extra})
        body = assert_success(response)
        assert response.headers["content-type"] == "application/json"
        answers = tuple(choice["message"]["content"] for choice in body["choices"])
        assert answers[0] != answers[1]  # each choice its own generator
        if "seed" in extra:
            assert texts.setdefault(extra["seed"], answers) == answers  # the same seed, the same answers
    assert len(texts) == len(seeds) and len(set(texts.values())) == len(texts)  # seeds 2**40 apart, or at the ends of the range, differ


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=SEED_CHAT["messages"])
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model=IMAGE, prompt="x", size="13x13")


# Two equal snapshots this far apart: longer than a count's way out (the ingress's 1 s flush,
# then Ray's report interval), twice over.
METRICS_EXPORT_GAP_S = 2 * (1 + METRICS_REPORT_INTERVAL_MS / 1000)
REQUESTS_TAKE_AT_MOST_S = 10.0  # one of the time-to-first-token buckets


def test_metrics_are_exported_to_prometheus(http):
    """serve_app's counters (summed on the ingress, handed to Ray every second) reach Ray's
    Prometheus endpoint with the model, route and status of each request; the chat
    replica's latency histograms count each request once, its time to first token (measured
    inside the replica) in a bucket no longer than the client's whole requests took; the
    image replica counts its pipeline call, of one request."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    chat = f'model="{CHAT}"'
    wanted = {  # what: (series, labels)
        "requests": ("requests_total", f'{chat},route="/v1/chat/completions",status="200"'),
        # An unknown name is not a label value: clients could mint endless label sets.
        "errors": ("errors_total", 'model="-",route="/v1/chat/completions",status="404"'),
        "tokens": ("tokens_total", f'kind="completion_tokens",{chat}'),
        # Nor is a path that no route matched: it counts as "other".
        "unrouted": ("errors_total", 'model="-",route="other",status="404"'),
        # A request refused before routing (by its Content-Length) counts under its route.
        "too_large": ("errors_total", 'model="-",route="/v1/chat/completions",status="413"'),
        "queued": ("queue_time_seconds_count", chat),
        "first_tokens": ("time_to_first_token_seconds_count", chat),
        # The buckets count exactly (Ray's `_sum` of a histogram adds bucket midpoints).
        "first_tokens_within": ("time_to_first_token_seconds_bucket", f'le="{REQUESTS_TAKE_AT_MOST_S}",{chat}'),
        "per_token": ("time_per_output_token_seconds_count", chat),
        "images": ("images_total", f'model="{IMAGE}"'),
        "image_queued": ("image_queue_time_seconds_count", f'model="{IMAGE}"'),
        "image_calls": ("image_batch_requests_count", f'model="{IMAGE}"'),
        "image_calls_of_one": ("image_batch_requests_bucket", f'le="1.0",model="{IMAGE}"'),
        # The ingress's histograms of served requests, by model (failures are not timed).
        "served_chats": ("request_seconds_count", f'{chat},route="/v1/chat/completions"'),
        "served_within": ("request_seconds_bucket", f'le="{REQUESTS_TAKE_AT_MOST_S}",{chat}'),
        "served_images": ("request_seconds_count", f'model="{IMAGE}",route="/v1/images/generations"'),
        "prompt_lengths": ("request_prompt_tokens_count", chat),
        "short_completions": ("request_completion_tokens_bucket", f'le="5.0",{chat}'),
    }

    def exported() -> dict[str, float]:
        """This app's totals over every series: each replica that ever ran exports its own,
        tagged with its replica id (other tests deploy apps serving the same model)."""
        found = dict.fromkeys(wanted, 0.0)  # earlier tests' requests may or may not be exported yet
        for line in httpx.get(url, timeout=10).text.splitlines():
            assert "junk-" not in line, line
            for name, (series, labels) in wanted.items():
                if line.startswith(f"ray_serve_app_{series}{{") and all(
                        part in line for part in labels.split(",") + ['application="serve_app"']):
                    found[name] += float(line.rsplit(" ", 1)[1])
        return found

    def settled() -> dict[str, float]:
        """Totals that stopped moving: earlier tests' requests all exported (Ray exports every
        few seconds, so two equal snapshots must be further apart than that)."""
        last = exported()
        for _ in range(6):
            time.sleep(METRICS_EXPORT_GAP_S)
            now = exported()
            if now == last:
                return now
            last = now
        raise AssertionError(f"the exported totals did not settle: {last}")

    before = settled()
    started = time.monotonic()
    answer = assert_success(http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 3}))
    with http.stream("POST", "/v1/chat/completions", json={
            **SEED_CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    assert time.monotonic() - started < REQUESTS_TAKE_AT_MOST_S
    drawn = assert_success(http.post("/v1/images/generations", json={
        "model": IMAGE, "prompt": "an otter", "n": 2, "size": "64x64", "response_format": "b64_json"}))
    streamed_tokens = json.loads(events[-1].removeprefix("data: "))["usage"]["completion_tokens"]
    assert http.post("/v1/chat/completions", json={**SEED_CHAT, "model": "no-such-model"}).status_code == 404
    junk = f"/v1/junk-{uuid.uuid4().hex}"
    assert http.get(junk).status_code == 404
    assert http.post("/v1/chat/completions", content=b" " * (5 * 2**20),
                     headers={"content-type": "application/json"}).status_code == 413
    tokens = [answer["usage"]["completion_tokens"], streamed_tokens]
    grown = {"requests": 2, "errors": 1, "tokens": sum(tokens), "unrouted": 1, "too_large": 1, "queued": 2, "first_tokens": 2,
             "first_tokens_within": 2, "images": len(drawn["data"]), "image_queued": 1, "image_calls": 1,
             "image_calls_of_one": 1, "served_chats": 2, "served_within": 2, "served_images": 1,
             "prompt_lengths": 2, "short_completions": 2}
    # A request with one token (EOS right after it) has no time between tokens.
    timed_per_token = sum(t > 1 for t in tokens)

    def caught_up(now: dict[str, float]) -> bool:
        return (all(now[name] == before[name] + grown[name] for name in grown)
                and now["per_token"] - before["per_token"] >= timed_per_token)

    # Ray exports with a delay: wait until the snapshot has this test's own requests, and only them.
    assert wait_for(lambda: caught_up(exported()), timeout=60, interval=2), (before, exported(), grown)
    assert exported()["per_token"] - before["per_token"] <= 2, (before, exported(), tokens)
