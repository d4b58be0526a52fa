"""Server-sent events for streamed chat completions, written in one place.

The ingress peeks at the first chunk before it answers, so an error that
happens before any token (unknown model, prompt too long) still gets a normal
JSON error with its HTTP status. Once the 200 stream has started, an error is
sent as one `data:` event carrying the error envelope, then `data: [DONE]`.
"""

from __future__ import annotations

from typing import AsyncIterator

from pydantic import BaseModel

from serve_app.http_errors import as_api_error, error_body
from serve_app.jobs import ChatStreamChunk
from serve_app.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    DeltaMessage,
    Usage,
    new_id,
    now,
)
from serve_app.request_guards import note
from serve_app.translate import choice_logprobs

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class ChatChunkEncoder:
    """Turns model chunks into OpenAI `chat.completion.chunk` events for one request."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), request.model
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.started: set[int] = set()
        self.usage: Usage | None = None

    def encode(self, chunk: ChatStreamChunk) -> str:
        choices = []
        for delta in chunk.deltas:
            role = None if delta.index in self.started else "assistant"  # the first delta names the role
            self.started.add(delta.index)
            choices.append(ChunkChoice(index=delta.index, finish_reason=delta.finish_reason,
                                       delta=DeltaMessage(role=role, content=delta.text),
                                       logprobs=choice_logprobs(delta.logprobs)))
        self.usage = Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                           total_tokens=chunk.prompt_tokens + chunk.completion_tokens)
        # The running totals, for the access log and metrics: right even if the client leaves.
        note(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)
        return event(self._chunk(choices))

    def closing(self) -> str:
        """The usage-only chunk (when asked for with stream_options.include_usage) and [DONE]."""
        if self.include_usage and self.usage is not None:
            return event(self._chunk([], usage=self.usage)) + DONE
        return DONE

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)


async def chat_events(encoder: ChatChunkEncoder, first: ChatStreamChunk | None,
                      rest: AsyncIterator[ChatStreamChunk]) -> AsyncIterator[str]:
    """The SSE body: the peeked first chunk, the rest as they come, then the closing events."""
    try:
        if first is not None:
            yield encoder.encode(first)
        async for chunk in rest:
            yield encoder.encode(chunk)
    except Exception as exc:  # noqa: BLE001 - the status is already sent; report in-band
        yield event(error_body(as_api_error(exc)))
        yield DONE
        return
    finally:
        cancel = getattr(rest, "cancel", None)
        if cancel is not None:
            cancel()  # the client left (or we are done): the model stops generating for it
    yield encoder.closing()
