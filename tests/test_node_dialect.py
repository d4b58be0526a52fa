"""Responses as the network node's strict Go client reads them.

The node parses a body only when Content-Type is exactly `application/json`,
decodes `code` as an integer (absent = 0), `created` as an int64,
`choices[].message.content` as a string and `usage.*_tokens` as integers, and
passes streams through raw. Every response of every route must survive that.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

INT64 = (-(2**63), 2**63 - 1)


def node_decode(response) -> dict:
    """Decode as the node does; raise AssertionError where its decoder would fail."""
    assert response.headers.get("content-type") == "application/json", response.headers.get("content-type")
    body = json.loads(response.content)
    assert isinstance(body, dict)
    code = body.get("code", 0)
    assert isinstance(code, int) and not isinstance(code, bool)
    assert isinstance(body.get("message", ""), str)
    if "created" in body:
        assert isinstance(body["created"], int) and INT64[0] <= body["created"] <= INT64[1]
    for choice in body.get("choices", []):
        assert isinstance(choice["message"]["content"], str)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if "usage" in body:
            assert isinstance(body["usage"][key], int)
    for item in body.get("data", []):
        assert isinstance(item, dict)
    if code != 0:
        assert body["message"] and response.status_code >= 400
    else:
        assert response.status_code == 200
    return body


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, "PNG")
    return buffer.getvalue()


NODE_IMAGE_FIELDS = {"n": 0, "size": "", "width": 0, "height": 0, "response_format": "", "step": 0,
                     "wallet": "0xwallet", "signature": "0xsig", "hash": "0xhash"}

SUCCESSES = [
    ("post", "/v1/chat/completions", {"json": {"model": "Llama3-8B", "max_tokens": 8, "wallet": "w", "signature": "s",
                                               "hash": "h", "messages": [{"role": "user", "content": "Hello!"}]}}),
    ("post", "/v1/images/generations", {"json": {"model": "SuperImage", "prompt": "otter", **NODE_IMAGE_FIELDS,
                                                 "size": "64x64"}}),
    ("post", "/v1/images/generations", {"json": {"model": "SuperImage", "prompt": "otter", **NODE_IMAGE_FIELDS}}),
    ("post", "/v1/images/edits", {"data": {"model": "SuperImage", "prompt": "beret",
                                           **{k: str(v) for k, v in NODE_IMAGE_FIELDS.items()}, "size": "64x64"},
                                  "files": {"face_image": ("face.jpg", png(), "application/octet-stream")}}),
    ("post", "/v1/images/edits", {"json": {"model": "SuperImage", "prompt": "beret", **NODE_IMAGE_FIELDS,
                                           "image": "data:image/png;base64," + base64.b64encode(png()).decode()}}),
    ("get", "/v1/models", {}),
    ("get", "/v1/registration", {}),
]

FAILURES = [
    ("post", "/v1/chat/completions", {"json": {"model": "missing", "messages": [{"role": "user", "content": "x"}]}}),
    ("post", "/v1/chat/completions", {"content": b"{", "headers": {"content-type": "application/json"}}),
    ("post", "/v1/images/generations", {"json": {"model": "SuperImage", "prompt": "x", "size": "huge"}}),
    ("post", "/v1/images/edits", {"json": {"model": "SuperImage", "prompt": "x", "image": "https://..."}}),
    ("post", "/v1/images/edits", {"data": {"model": "SuperImage", "prompt": "x"}}),
    ("get", "/v1/images/generations", {}),
    ("get", "/v1/unknown", {}),
]


@pytest.mark.parametrize("method,path,kwargs", SUCCESSES, ids=[f"{m}-{p}-{i}" for i, (m, p, _) in enumerate(SUCCESSES)])
def test_node_decodes_every_success(http, method, path, kwargs):
    body = node_decode(http.request(method.upper(), path, **kwargs))
    assert body.get("code", 0) == 0
    if path == "/v1/chat/completions":  # what the node forwards: one answer and its token counts
        assert len(body["choices"]) == 1 and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1
    elif path.startswith("/v1/images/"):  # the node's `n: 0` is one picture
        assert len(body["data"]) == 1 and (body["data"][0].get("url") or body["data"][0].get("b64_json"))
    elif path == "/v1/models":
        assert {"Llama3-8B", "SuperImage"} <= {card["id"] for card in body["data"]}
    else:
        assert body == {"enabled": False, "project": "serve_app", "nodes": []}


@pytest.mark.parametrize("method,path,kwargs", FAILURES, ids=[f"{m}-{p}-{i}" for i, (m, p, _) in enumerate(FAILURES)])
def test_node_decodes_every_failure(http, method, path, kwargs):
    body = node_decode(http.request(method.upper(), path, **kwargs))
    assert body["code"] != 0 and body["error"]["message"]


def test_node_passes_streams_through_as_openai_sse(http):
    request = {"model": "Llama3-8B", "stream": True, "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]}
    with http.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text, finishes = "", []
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk" and isinstance(chunk["created"], int)
        for choice in chunk["choices"]:
            assert isinstance(choice["delta"].get("content", ""), (str, type(None)))
            text += choice["delta"].get("content") or ""
            finishes += [choice["finish_reason"]] if choice.get("finish_reason") else []
    assert text and len(finishes) == 1
