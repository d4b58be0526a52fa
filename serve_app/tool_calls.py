"""Tool calls in a chat model's text, read out into OpenAI's `tool_calls`.

A model trained for tools writes a call as text in the format its chat template
taught it, and OpenAI clients expect it back as structured `tool_calls`. A chat
model's config names the format (`tool_call_parser`, with vLLM's names):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
  block per call, maybe after some text: Qwen 2.5 and 3, QwQ, Hermes 2 Pro and
  3, and other templates in the Hermes style;
- `llama3_json`: the whole answer is a JSON object `{"name": ..., "parameters":
  {...}}` (several joined by `;`), maybe after `<|python_tag|>`: Llama 3.1-3.3.

The same reader serves a whole answer and a stream: content passes through as
it comes (in a stream, at once), while a call is held back until it is whole
and then goes out as one `tool_calls` delta with its complete arguments (the
openai client's stream helper joins argument pieces, so one piece is as good
as many). Text that looks like a call but does not parse as one stays content:
nothing the model wrote is lost. The ingress reads calls only for a request
that gives tools (with `tool_choice` not `none`), as vLLM does with
`--enable-auto-tool-choice`.
"""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

ToolCallFormat = Literal["hermes", "llama3_json"]


@dataclass(frozen=True)
class ParsedToolCall:
    """One call as OpenAI sends it: a fresh id, the function's name, its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


@dataclass
class ReadText:
    """What a piece of a choice's text turned out to hold."""

    content: str = ""
    calls: list[ParsedToolCall] = field(default_factory=list)

    def __iadd__(self, other: "ReadText") -> "ReadText":
        self.content += other.content
        self.calls += other.calls
        return self


def parsed_call(value: Any) -> ParsedToolCall | None:
    """A call from a decoded JSON object `{"name": ..., "arguments" (or "parameters"): ...}`,
    else None. The arguments go out as JSON text: an object as JSON; a string holding JSON (some
    models quote their arguments) as it is; any other string as a JSON string, as vLLM sends it,
    so that a client's `json.loads(arguments)` never fails. A `\\ud83d` escape the model wrote
    decodes to half a character, which no UTF-8 body can carry: such arguments stay escaped,
    and such a name is no call."""
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or not name or not _encodable(name):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except (ValueError, RecursionError):
            arguments = json.dumps(arguments, ensure_ascii=False)
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not _encodable(arguments):
        arguments = json.dumps(json.loads(arguments))  # ASCII, every character escaped: the same value
    return ParsedToolCall(name=name, arguments=arguments)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_call(text: str) -> ParsedToolCall | None:
    try:
        return parsed_call(json.loads(text))
    except (ValueError, RecursionError):
        return None


class ToolCallReader(ABC):
    """One choice's text, fed as it is produced; `finish` once it has ended."""

    def __init__(self) -> None:
        self.calls_made = 0
        self._space = ""  # trailing whitespace of the content, held until text follows it

    @abstractmethod
    def feed(self, text: str) -> ReadText:
        """The content that may go out now, and the calls completed by `text`."""

    @abstractmethod
    def finish(self) -> ReadText:
        """Whatever was held back: a call the answer ended inside (if it parses) or its text."""

    def _content(self, text: str, final: bool = False) -> str:
        """Content to send. Whitespace waits until more text follows: whitespace-only content
        between and around calls (the newline before a `<tool_call>`) is not content a client
        wants, and is dropped once a call has been made."""
        text = self._space + text
        kept = text if final else text.rstrip()
        self._space = text[len(kept):]
        if final and self.calls_made and not kept.strip():
            return ""
        return kept

    def _call(self, call: ParsedToolCall) -> list[ParsedToolCall]:
        self.calls_made += 1
        self._space = ""
        return [call]


class HermesReader(ToolCallReader):
    """`<tool_call>{json}</tool_call>` blocks anywhere in the answer."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._held = ""
        self._inside = False  # after a START whose END has not come yet

    def feed(self, text: str) -> ReadText:
        self._held += text
        read = ReadText()
        while True:
            if not self._inside:
                at = self._held.find(self.START)
                if at < 0:  # all of it, but the start of a START
                    keep = marker_prefix_at_end(self._held, self.START)
                    read.content += self._content(self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    return read
                read.content += self._content(self._held[:at])
                self._held, self._inside = self._held[at + len(self.START):], True
            else:
                at = self._held.find(self.END)
                if at < 0:
                    return read
                body, self._held, self._inside = self._held[:at], self._held[at + len(self.END):], False
                call = _json_call(body)
                if call is not None:
                    read.calls += self._call(call)
                else:
                    read.content += self._content(self.START + body + self.END)

    def finish(self) -> ReadText:
        held, self._held = self._held, ""
        if self._inside:  # the answer ended inside a call (no END: some models stop there)
            self._inside = False
            call = _json_call(held)
            if call is not None:
                calls = self._call(call)
                return ReadText(self._content("", final=True), calls)
            held = self.START + held
        return ReadText(self._content(held, final=True))


class Llama3JsonReader(ToolCallReader):
    """An answer that is one or more JSON calls (`;` between them), or plain content.

    Its first character decides: `{` (or `<|python_tag|>`, where the tokenizer keeps
    special tokens) holds the whole answer back until it ends, then reads it as calls,
    else as content; anything else streams as content."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._held = ""
        self._mode: Literal["undecided", "content", "calls"] = "undecided"

    def feed(self, text: str) -> ReadText:
        if self._mode == "content":
            return ReadText(self._content(text))
        self._held += text
        start = self._held.lstrip()
        if self._mode == "undecided" and start:
            if start.startswith(("{", self.PYTHON_TAG)):
                self._mode = "calls"
            elif not self.PYTHON_TAG.startswith(start[:len(self.PYTHON_TAG)]):
                self._mode, held, self._held = "content", self._held, ""
                return ReadText(self._content(held))
        return ReadText()

    def finish(self) -> ReadText:
        held, self._held = self._held, ""
        if self._mode == "calls":
            calls = _json_calls(held.strip().removeprefix(self.PYTHON_TAG).strip().removesuffix(";"))
            if calls:
                made = [made for call in calls for made in self._call(call)]
                return ReadText(self._content("", final=True), made)
        return ReadText(self._content(held, final=True))


def _json_calls(text: str) -> list[ParsedToolCall] | None:
    """`{call}; {call}`: every one a call and nothing else around them, else None."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        call = parsed_call(value)
        if call is None:
            return None
        calls.append(call)
        rest = text[at:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        at = len(text) - len(rest[1:].lstrip())


def marker_prefix_at_end(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with (0 if none)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class ForcedCallReader(ToolCallReader):
    """An answer that is a call by construction (a `tool_choice` that forces one, decoded under
    a grammar): held back whole, then read as the named function's arguments (`name`), or with
    `required` (`name` None) as a JSON list of `{"name": ..., "parameters": ...}`. An answer cut
    off before its JSON closed stays text."""

    def __init__(self, name: str | None) -> None:
        super().__init__()
        self._name, self._held = name, ""

    def feed(self, text: str) -> ReadText:
        self._held += text
        return ReadText()

    def finish(self) -> ReadText:
        held, self._held = self._held, ""
        try:
            value = json.loads(held)
        except (ValueError, RecursionError):
            value = None
        if self._name is not None:
            calls = [parsed_call({"name": self._name, "arguments": value})] if isinstance(value, dict) else []
        else:
            calls = [parsed_call(item) for item in value] if isinstance(value, list) else []
        if not calls or None in calls:
            return ReadText(held)
        return ReadText("", [made for call in calls for made in self._call(call)])


READERS: dict[str, type[ToolCallReader]] = {"hermes": HermesReader, "llama3_json": Llama3JsonReader}

KEEPS_SPECIAL_TOKENS = {"hermes"}
"""Formats whose markers some tokenizers count as special tokens (Hermes 2 Pro's `<tool_call>`):
their text is decoded with special tokens kept, as vLLM's hermes parser asks, so the markers
survive. Llama 3's `<|python_tag|>` is not needed to read its calls."""


def read_tool_calls(fmt: ToolCallFormat, text: str) -> ReadText:
    """A whole answer's content (calls taken out) and calls."""
    reader = READERS[fmt]()
    read = reader.feed(text)
    read += reader.finish()
    return read

