"""The SSE a streamed chat completion is sent as, read by the official client's stream
helper (no server: the encoder's events served by an httpx mock transport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai

from serve_app.jobs import ChatStreamChunk, ChoiceDelta
from serve_app.protocol import ChatCompletionRequest
from serve_app.streaming import ChatChunkEncoder, chat_events


async def _sse(request: ChatCompletionRequest, chunks: list[ChatStreamChunk]) -> bytes:
    async def rest():
        for chunk in chunks[1:]:
            yield chunk

    return "".join([event async for event in chat_events(ChatChunkEncoder(request), chunks[0], rest())]).encode()


def test_a_choice_whose_text_is_held_back_is_opened_by_the_first_event():
    """Choice 0's first token is held back (half a character, or the start of a stop string)
    while choice 1 has text: the first event still opens both, in order, and the client's
    `chat.completions.stream` helper assembles each choice's own text."""
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "n": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    chunks = [
        ChatStreamChunk([ChoiceDelta(1, "Hi")], prompt_tokens=3, completion_tokens=2),
        ChatStreamChunk([ChoiceDelta(0, "é", "stop"), ChoiceDelta(1, "!", "stop")], prompt_tokens=3,
                        completion_tokens=4),
    ]
    body = asyncio.run(_sse(request, chunks))
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert all(len(event["choices"]) == 1 for event in events)  # one choice an event, as OpenAI sends them
    assert [(event["choices"][0]["index"], event["choices"][0]["delta"].get("role")) for event in events[:2]] == \
        [(0, "assistant"), (1, "assistant")]

    transport = httpx.MockTransport(lambda _: httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream"}))
    client = openai.OpenAI(api_key="k", base_url="http://test/v1", http_client=httpx.Client(transport=transport))
    with client.chat.completions.stream(model="m", n=2, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_completion()
    assert [(c.index, c.message.content, c.finish_reason) for c in final.choices] == \
           [(0, "é", "stop"), (1, "Hi!", "stop")]
