"""Server-sent events for streamed chat completions, written in one place.

The ingress peeks at the first chunk before it answers, so an error that
happens before any token (unknown model, prompt too long) still gets a normal
JSON error with its HTTP status. Once the 200 stream has started, an error is
sent as one `data:` event carrying the error envelope, then `data: [DONE]`.
"""

from __future__ import annotations

from typing import AsyncIterator, Literal

from pydantic import BaseModel

from serve_app.deadline import DeadlinePassed, within
from serve_app.errors import APIError, GatewayTimeout
from serve_app.http_errors import as_api_error
from serve_app.jobs import ChatStreamChunk, ChoiceDelta
from serve_app.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkFunctionCall,
    ChunkToolCall,
    DeltaMessage,
    Usage,
    error_body,
    new_id,
    now,
    usage_of,
)
from serve_app.access_log import note
from serve_app.tool_calls import CallPiece
from serve_app.translate import AnswerFormat, AnswerReader, choice_logprobs, wire_tool_calls

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class ChatChunkEncoder:
    """Turns model chunks into OpenAI `chat.completion.chunk` events for one request."""

    def __init__(self, request: ChatCompletionRequest, answer_format: AnswerFormat = AnswerFormat()) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), request.model
        self.request = request
        self.answer_format = answer_format
        # Where the answer is read into parts (thinking, tool calls), each choice has a reader of its
        # own, made with the first chunk (which says where the prompt leaves the answer).
        self.readers: list[AnswerReader] | None = None
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        # vLLM's continuous_usage_stats: the usage so far in every chunk, not only in the last one.
        self.usage_in_every_chunk = self.include_usage and bool(request.stream_options.continuous_usage_stats)
        self.n = request.n
        self.opened = False
        self.usage: Usage | None = None

    def encode(self, chunk: ChatStreamChunk) -> str:
        """The chunk's events, one per choice that says something, as OpenAI and vLLM send them
        (a client or gateway reading `chunk.choices[0]` and its `index` sees every choice); ""
        where, once every choice is open, none does (the answer's text held back: a forced
        call's `[{"name": ` wrapper, part of a character, a possible stop string), as OpenAI
        and vLLM send no empty deltas."""
        if self.opened:
            choices = [choice for choice in map(self._choice, chunk.deltas) if not _says_nothing(choice)]
        else:
            if self.answer_format.read:
                self.readers = [self.answer_format.reader(chunk.opening, stream=True) for _ in range(self.n)]
            # The first events open every choice, in index order, with its role, whether its text
            # has begun or not (it may be held back: part of a character, a possible stop string),
            # as OpenAI's and vLLM's streams do: the openai client's stream helper adds a choice
            # by position when its index first comes.
            given = {delta.index: delta for delta in chunk.deltas}
            choices = [self._choice(given.get(index, ChoiceDelta(index, "")), role="assistant")
                       for index in range(self.n)]
            self.opened = True
        self.usage = usage_of(chunk.prompt_tokens, chunk.completion_tokens, chunk.reasoning_tokens)
        # The running totals, for the access log and metrics: right even if the client leaves.
        note(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)
        usage = self.usage if self.usage_in_every_chunk else None
        return "".join(event(self._chunk([choice], usage=usage)) for choice in choices)

    def closing(self) -> str:
        """The usage-only chunk (when asked for with stream_options.include_usage) and [DONE]."""
        if self.include_usage and self.usage is not None:
            return event(self._chunk([], usage=self.usage)) + DONE
        return DONE

    def _choice(self, delta: ChoiceDelta, role: Literal["assistant"] | None = None) -> ChunkChoice:
        if self.readers is None:
            message, finish_reason = DeltaMessage(role=role, content=delta.text), delta.finish_reason
        else:
            message, finish_reason = self._read(delta, role)
        return ChunkChoice(index=delta.index, finish_reason=finish_reason, delta=message,
                           logprobs=choice_logprobs(delta.logprobs))

    def _read(self, delta: ChoiceDelta, role: Literal["assistant"] | None) -> tuple[DeltaMessage, str | None]:
        """The delta read into its parts: thinking, content and calls (in pieces) as they may go
        now; the end flushes what was held back."""
        reader = self.readers[delta.index]
        parts = reader.feed(delta.text)
        if delta.finish_reason is not None:
            parts += reader.finish()
        calls = [_chunk_call(piece) for piece in wire_tool_calls(parts.calls, self.request)]
        # Content only where there is some, as OpenAI streams it (an empty one would end the openai
        # client's content events early); the first delta opens it with "", as without a reader,
        # but for a forced call's answer, whose content is null.
        content = parts.content or ("" if role and not (calls or parts.reasoning or reader.forced) else None)
        return (DeltaMessage(role=role, content=content, tool_calls=calls or None,
                             reasoning=parts.reasoning or None, reasoning_content=parts.reasoning or None),
                reader.finish_reason(delta.finish_reason))

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)


def _says_nothing(choice: ChunkChoice) -> bool:
    """No text, call, thinking, end or logprobs in it (a token's logprobs go even while its text
    is held back)."""
    delta = choice.delta
    return (choice.finish_reason is None and choice.logprobs is None and delta.role is None
            and not delta.content and not delta.tool_calls and not delta.reasoning)


def _chunk_call(piece: CallPiece) -> ChunkToolCall:
    return ChunkToolCall(index=piece.index, id=piece.id, type="function" if piece.id else None,
                         function=ChunkFunctionCall(name=piece.name, arguments=piece.arguments))


async def chat_events(encoder: ChatChunkEncoder, first: ChatStreamChunk | None,
                      rest: AsyncIterator[ChatStreamChunk], silence_s: float | None = None) -> AsyncIterator[str]:
    """The SSE body: the peeked first chunk, the rest as they come, then the closing events.

    A model that stops sending without failing (a hung GPU, a stuck engine) would hold the
    connection open for ever: after `silence_s` without a chunk the stream ends with a 504
    error event, as a request that waits that long for its answer gets a 504."""
    try:
        if first is not None:
            yield encoder.encode(first)  # never "": the first event opens every choice
        while True:
            try:
                chunk = await within(silence_s, anext(rest))
            except StopAsyncIteration:
                break
            except DeadlinePassed:
                raise GatewayTimeout(f"The model sent nothing for {silence_s:g} s; the stream was ended.") from None
            if isinstance(chunk, APIError):  # a client's mistake found while decoding (a schema past limits)
                raise chunk
            if text := encoder.encode(chunk):
                yield text
    except Exception as exc:  # noqa: BLE001 - the status is already sent; report in-band
        error = as_api_error(exc)
        note(error=error.code, error_status=error.status_code)  # a 200 in the log, counted as the error it was
        yield event(error_body(error))
        yield DONE
        return
    finally:
        cancel = getattr(rest, "cancel", None)
        if cancel is not None:
            cancel()  # the client left (or we are done): the model stops generating for it
    yield encoder.closing()
