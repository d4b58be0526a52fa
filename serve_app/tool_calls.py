"""Tool calls in a chat model's text, read out into OpenAI's `tool_calls`.

A model trained for tools writes a call as text in the format its chat template
taught it, and OpenAI clients expect it back as structured `tool_calls`. A chat
model's config names the format (`tool_call_parser`, with vLLM's names):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
  block per call, maybe after some text: Qwen 2.5 and 3, QwQ, Hermes 2 Pro and
  3, and other templates in the Hermes style;
- `llama3_json`: the whole answer is a JSON object `{"name": ..., "parameters":
  {...}}` (several joined by `;`), maybe after `<|python_tag|>`: Llama 3.1-3.3;
- `mistral`: `[TOOL_CALLS]` and the calls, maybe after some text: a JSON list
  `[{"name": ..., "arguments": {...}}, ...]` from Mistral's tokenizers before v11
  (Mistral 7B Instruct v0.3, Mixtral 8x22B Instruct), `[TOOL_CALLS]name{...}` (or
  `name[ARGS]{...}`, or v11's `name[CALL_ID]id[ARGS]{...}`) per call from v11 on (Mistral
  Small 3.1/3.2, Devstral, Magistral).
  Their calls' ids are nine letters and digits, which Mistral's chat templates require
  of the calls sent back.
- `qwen3_coder`: `<tool_call><function=name><parameter=key>value</parameter>...</function>
  </tool_call>`, maybe after some text: Qwen3-Coder. Its values are text, typed by the
  parameter's schema in the request's tools, as vLLM types them (`typed_value`).
- `openai`: gpt-oss's harmony messages to `functions.*`, read by `harmony.HarmonyReader`
  (which reads the thinking too).

The same readers serve a whole answer and a stream. Content passes through as it
comes (in a stream, at once, but where it may be a call: Llama 3's answer that begins with
`{`, and text after Llama 3's and Mistral's calls, wait for the answer's end). A whole answer's calls are read once each is whole:
text that looks like a call but does not parse as one stays content, so nothing the
model wrote is lost. In a stream (`stream=True`) a call goes out as OpenAI and vLLM
stream one: its first delta carries the call's id and name once the model has written
the name and begun the arguments object, and each later delta the arguments' next
piece of text as the model writes it (the openai client's stream helper joins them),
so a long call shows as it is written instead of all at its end. Such a call is
committed once its first delta has gone: if its text then breaks off (`max_tokens`)
the client has the arguments written so far and `finish_reason` "length", as from
vLLM. A call whose arguments are not an object (a quoted string), or whose name comes
after them, goes out whole once its text is.

Either way a call's `arguments` is the model's own text of the arguments object (for
`qwen3_coder`, the typed values as `json.dumps` writes them), so a call read whole has the
same arguments streamed or not. The ingress reads calls only
for a request that gives tools (with `tool_choice` not `none`), as vLLM does with
`--enable-auto-tool-choice`, and not where a grammar says what the answer is (a forced
call, which `ForcedCallReader` reads, a JSON `response_format`, `structured_outputs`).
"""

from __future__ import annotations

import ast
import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

ToolCallFormat = Literal["hermes", "llama3_json", "mistral", "qwen3_coder", "openai"]
"""`openai` is gpt-oss's harmony format, read by `harmony.HarmonyReader` (calls and thinking both)."""

ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Nine letters and digits, as Mistral's chat templates and mistral-common require."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


CALL_IDS: dict[str | None, Callable[[], str]] = {"mistral": mistral_call_id}
"""How a model's calls are named, by its `tool_call_parser` (else `new_call_id`)."""


@dataclass(frozen=True)
class ParsedToolCall:
    """One call as OpenAI sends it: a fresh id, the function's name, its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class CallPiece:
    """A call as it goes out, whole or in pieces: a call's first piece carries its `id` and
    `name`; in a stream, later pieces carry only more of its arguments' text. `index` counts
    the choice's calls."""

    index: int
    arguments: str
    name: str | None = None
    id: str | None = None


@dataclass
class ReadText:
    """What a piece of a choice's text turned out to hold."""

    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)
    reasoning: str = ""  # thinking, where the format carries it too (`harmony`)

    def __iadd__(self, other: "ReadText") -> "ReadText":
        self.content += other.content
        self.calls += other.calls
        self.reasoning += other.reasoning
        return self


def parsed_call(value: Any, arguments_text: str | None = None) -> ParsedToolCall | None:
    """A call from a decoded JSON object `{"name": ..., "arguments" (or "parameters"): ...}`,
    else None. Object arguments go out as the model wrote them (`arguments_text`, their JSON
    text), else as JSON; a string holding JSON (some models quote their arguments) as it is;
    any other string as a JSON string, as vLLM sends it, so that a client's
    `json.loads(arguments)` never fails. A `\\ud83d` escape the model wrote decodes to half a
    character, which no UTF-8 body can carry: such arguments stay escaped, and such a name is
    no call."""
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or not name or not _encodable(name):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, dict) and arguments_text is not None and _same_json(arguments_text, arguments):
        return ParsedToolCall(name=name, arguments=arguments_text.strip())
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


def _same_json(text: str, value: Any) -> bool:
    try:
        return json.loads(text) == value
    except (ValueError, RecursionError):
        return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class JsonExtent:
    """Where one JSON value ends, in text fed piece by piece (not what it means: `json.loads`
    checks that once it is whole). A number, `true`, `false` or `null` ends at the first
    character that cannot go on with it."""

    _SCALAR_ENDS = frozenset(",:;}] \t\r\n")

    def __init__(self) -> None:
        self._parts: list[str] = []  # joined once, at the end: a long value comes in many pieces
        self.ended = False
        self._depth = 0
        self.in_string = self._escaped = self._scalar = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, text: str) -> int:
        """Takes `text` up to the value's end; how many characters it took."""
        for at, char in enumerate(text):
            if self.in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self.in_string = False
                    if self._depth == 0:
                        return self._end(text, at + 1)
            elif self._scalar:
                if char in self._SCALAR_ENDS:
                    return self._end(text, at)
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    return self._end(text, at + 1)
            elif self._depth == 0:
                self._scalar = True
        self._parts.append(text)
        return len(text)

    def _end(self, text: str, at: int) -> int:
        self._parts.append(text[:at])
        self.ended = True
        return at


class CallText:
    """One call's JSON object `{"name": ..., "arguments": {...}}` read as the model writes it
    (with `name`: the arguments object alone, a forced call's answer). With `stream`, once the
    name is known and an arguments object has begun, its text goes out piece by piece as it
    comes (`feed` returns each piece); otherwise the call waits for its object's end
    (`whole` then reads it). `arguments` keeps the arguments' own text either way."""

    def __init__(self, index: int, stream: bool, name: str | None = None, call_id: str | None = None) -> None:
        self.index, self.stream, self.name = index, stream, name
        self.id = call_id or new_call_id()
        self.bare = name is not None
        self._parts: list[str] = []  # the object's text so far (bare: the arguments')
        self.arguments: str | None = None
        self.sent = False  # whether the call's first piece has gone out
        self._state = "value" if self.bare else "open"
        self._key: str | None = "arguments" if self.bare else None
        self._value: JsonExtent | None = None
        self._streaming = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def in_string(self) -> bool:
        """Whether the text so far ends inside a JSON string (where a marker is the string's text)."""
        return self._value is not None and self._value.in_string

    @property
    def ended(self) -> bool:
        return self._state == "done"

    @property
    def cut(self) -> bool:
        """Whether the call went out and its arguments were never whole."""
        return self.sent and self.arguments is None

    @property
    def failed(self) -> bool:
        return self._state == "failed"

    def feed(self, text: str) -> tuple[CallPiece | None, int]:
        """Takes `text` up to the object's end: the piece to send now (if any), characters taken."""
        at, sending = 0, ""
        while at < len(text) and self._state not in ("done", "failed"):
            char = text[at]
            if self._state in ("value", "key_text"):
                if self._value is None:
                    if char.isspace():
                        at += 1
                        continue
                    self._value = JsonExtent()
                    self._streaming = (self._state == "value" and self.stream and char == "{"
                                       and self._key in ARGUMENT_KEYS and self.arguments is None
                                       and self.name is not None)
                took = self._value.feed(text[at:])
                if self._streaming:
                    sending += text[at:at + took]
                at += took
                if self._value.ended:
                    self._value_ended()
                continue
            at += 1
            if char.isspace():
                continue
            if self._state == "open":
                self._state = "key" if char == "{" else "failed"
            elif self._state == "key":
                if char == '"':
                    self._state, at = "key_text", at - 1
                else:
                    self._state = "done" if char == "}" else "failed"
            elif self._state == "colon":
                self._state = "value" if char == ":" else "failed"
            else:  # after a value
                self._state = "key" if char == "," else "done" if char == "}" else "failed"
            if self._state == "failed":
                at -= 1  # not the call's: the text from there on is the reader's to place
        self._parts.append(text[:at])
        return self._piece(sending), at

    def _value_ended(self) -> None:
        text, self._value, self._streaming = self._value.text, None, False
        if self._state == "key_text":
            self._key, self._state = _loads(text), "colon"
            return
        if self._key == "name" and not self.bare and self.name is None:  # the first that names it
            name = _loads(text)
            self.name = name if isinstance(name, str) and name and _encodable(name) else None
        elif self._key in ARGUMENT_KEYS and self.arguments is None:
            self.arguments = text
        self._state = "done" if self.bare else "next"

    def _piece(self, sending: str) -> CallPiece | None:
        if not sending:
            return None
        if self.sent:
            return CallPiece(self.index, sending)
        self.sent = True
        return CallPiece(self.index, sending, self.name, self.id)

    def whole(self) -> CallPiece | None:
        """Once the call's text has ended and nothing of it went out: the call it holds, else None."""
        text = self.text
        value = _loads(text)
        if self.bare:
            call = parsed_call({"name": self.name, "arguments": value}, text) if isinstance(value, dict) else None
        else:
            first = _loads(self.arguments) if self.arguments is not None else None
            if isinstance(value, dict) and isinstance(first, dict):  # the name and arguments a stream would send
                value = {"name": self.name if self.name is not None else value.get("name"), "arguments": first}
            call = parsed_call(value, self.arguments)
        return None if call is None else CallPiece(self.index, call.arguments, call.name, self.id)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class ToolCallReader(ABC):
    """One choice's text, fed as it is produced; `finish` once it has ended. With `stream`,
    calls go out in pieces as they are written (see the module's docstring); `call_ids`
    names them."""

    call_ids: Callable[[], str] = staticmethod(new_call_id)

    def __init__(self, stream: bool = False, call_ids: Callable[[], str] | None = None) -> None:
        self.stream = stream
        if call_ids is not None:
            self.call_ids = call_ids
        self.cut: int | None = None  # the index of a call that went out in a stream, not whole when its text ended
        self.calls_made = 0
        self._space = ""  # trailing whitespace of the content, held until text follows it

    @abstractmethod
    def feed(self, text: str) -> ReadText:
        """The content that may go out now, and the calls (or pieces of calls) `text` made."""

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

    def new_call(self, name: str | None = None) -> CallText:
        return CallText(self.calls_made, self.stream, name, self.call_ids())

    def send(self, piece: CallPiece | None) -> list[CallPiece]:
        """A call's piece on its way out; its first piece counts the call made."""
        if piece is None:
            return []
        if piece.id is not None:
            self.calls_made += 1
            self._space = ""
        return [piece]


class HermesReader(ToolCallReader):
    """`<tool_call>{json}</tool_call>` blocks anywhere in the answer."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, stream: bool = False) -> None:
        super().__init__(stream)
        self._held = ""
        self._call: CallText | None = None  # after a START whose END has not come yet
        self._taken = 0  # how much of the held call text `_call` has read
        self._searched = 0  # where in it the search for an END goes on from

    def feed(self, text: str) -> ReadText:
        self._held += text
        read = ReadText()
        while True:
            if self._call is None:
                at = self._held.find(self.START)
                if at < 0:  # all of it, but the start of a START
                    keep = marker_prefix_at_end(self._held, self.START)
                    read.content += self._content(self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    return read
                read.content += self._content(self._held[:at])
                self._held, self._call, self._taken = self._held[at + len(self.START):], self.new_call(), 0
                self._searched = 0
            else:
                at = self._held.find(self.END, self._searched)
                if at < 0:
                    self._searched = max(self._searched, len(self._held) - len(self.END) + 1)
                    if self.stream:  # all of it, but what could be the start of an END
                        read += self._take(len(self._held) - marker_prefix_at_end(self._held, self.END))
                    return read
                read += self._take(at)
                if self._call.in_string:  # an END inside a JSON string is that string's text
                    self._searched = at + 1
                    continue
                read += self._end_call(at)
                self._held = self._held[at + len(self.END):]

    def finish(self) -> ReadText:
        if self._call is None:
            held, self._held = self._held, ""
            return ReadText(self._content(held, final=True))
        read = self._end_call(len(self._held), ended=False)  # the answer ended inside a call
        self._held = ""
        return read

    def _take(self, upto: int) -> ReadText:
        """The held call text up to `upto` read by the call, and what of it may go out."""
        piece, took = self._call.feed(self._held[self._taken:upto])
        self._taken += took
        return ReadText(calls=self.send(piece))

    def _end_call(self, at: int, ended: bool = True) -> ReadText:
        """The call whose text is the held text up to `at` (`ended`: by an END, else by the
        answer's end): what is left of it to send; a call text that is no call (and has not
        begun to go out) is content, as the model wrote it."""
        read, call, body = self._take(at), self._call, self._held[:at]
        self._call = None
        rest = body[self._taken:]  # after the call's object closed
        if call.sent:
            left = rest if rest.strip() else ""
            self.cut = call.index if call.cut else self.cut
        else:
            piece = call.whole() if call.ended and not rest.strip() else None
            read.calls += self.send(piece)
            left = self.START + body + (self.END if ended else "") if piece is None else ""
        read.content += self._content(left, final=not ended)
        return read


class CallSequence:
    """Calls one after another: Llama 3's `{call}; {call}` or a forced `required` answer's
    `[{call}, {call}]`, read as it comes. Each call goes out as `CallText` lets it (in a stream,
    in pieces; else once its object has closed); `broken` once the text leaves that shape."""

    def __init__(self, reader: ToolCallReader, separator: str, bracketed: bool) -> None:
        self.reader, self.separator, self.bracketed = reader, separator, bracketed
        self.calls: list[CallPiece] = []  # the calls read whole, not yet sent (not in a stream)
        self.call: CallText | None = None
        self._state = "open" if bracketed else "call"
        self.taken = 0  # characters read, up to where it broke

    @property
    def broken(self) -> bool:
        return self._state == "broken"

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole sequence of one or more calls."""
        return (self._state == "closed" if self.bracketed else self._state in ("next", "call")) and \
            self.call is None and bool(self.calls or self.reader.calls_made)

    def feed(self, text: str) -> list[CallPiece]:
        sent, at = [], 0
        while at < len(text) and not self.broken:
            if self.call is not None:
                piece, took = self.call.feed(text[at:])
                sent += self.reader.send(piece)
                at += took
                if self.call.ended:
                    sent += self._closed_call()
                elif self.call.failed:
                    self._state = "broken"
                continue
            char = text[at]
            if char.isspace():
                at += 1
                continue
            if self._state == "call" and char == "{":
                self.call = self.reader.new_call()
                self.call.index += len(self.calls)  # after the calls read whole but not yet sent
                continue
            if self._state == "open" and char == "[":
                self._state = "call"
            elif self._state == "next" and char == self.separator:
                self._state = "call"
            elif self._state == "next" and self.bracketed and char == "]":
                self._state = "closed"
            else:
                self._state = "broken"
                break
            at += 1
        self.taken += at
        return sent

    def _closed_call(self) -> list[CallPiece]:
        call, self.call, self._state = self.call, None, "next"
        if call.sent:
            return []
        piece = call.whole()
        if piece is None:  # kept, for its text
            self.call, self._state = call, "broken"
            return []
        if self.reader.stream:
            return self.reader.send(piece)
        self.calls.append(piece)
        return []

    def sent_whole(self) -> list[CallPiece]:
        """The calls read whole, sent together once the sequence has turned out complete."""
        calls, self.calls = self.calls, []
        return [sent for piece in calls for sent in self.reader.send(piece)]


class Llama3JsonReader(ToolCallReader):
    """An answer that is one or more JSON calls (`;` between them), or plain content.

    Its first character decides: `{` (or `<|python_tag|>`, where the tokenizer keeps
    special tokens) makes it calls, read as they come; anything else streams as content.
    A whole answer is calls only if all of it is; in a stream, text after the calls
    already sent that is not another call is content."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, stream: bool = False) -> None:
        super().__init__(stream)
        self._held = ""
        self._mode: Literal["undecided", "content", "calls"] = "undecided"
        self._calls: CallSequence | None = None

    def feed(self, text: str) -> ReadText:
        if self._mode == "content":
            return ReadText(self._content(text))
        self._held += text
        start = self._held.lstrip() if self._mode == "undecided" else ""
        if start:
            if start.startswith(("{", self.PYTHON_TAG)):
                self._mode, self._calls = "calls", CallSequence(self, ";", bracketed=False)
                self._calls.taken = len(self._held) - len(start.removeprefix(self.PYTHON_TAG))
            elif not self.PYTHON_TAG.startswith(start[:len(self.PYTHON_TAG)]):
                self._mode, held, self._held = "content", self._held, ""
                return ReadText(self._content(held))
        if self._calls is None or not self.stream:
            return ReadText()
        return ReadText(calls=self._calls.feed(self._held[self._calls.taken:]))

    def finish(self) -> ReadText:
        held, self._held, calls = self._held, "", self._calls
        if calls is None:
            return ReadText(self._content(held, final=True))
        read = ReadText(calls=calls.feed(held[calls.taken:]))
        if calls.complete:
            read.calls += calls.sent_whole()
            left = ""
        elif self.calls_made:  # in a stream, after calls already sent: the rest, but a call cut off
            call = calls.call
            left = ("" if call is None or call.sent else call.text) + held[calls.taken:]
            self.cut = call.index if call is not None and call.cut else None
        else:
            left = held
        read.content += self._content(left, final=True)
        return read


def marker_prefix_at_end(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with (0 if none)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class ForcedCallReader(ToolCallReader):
    """An answer that is a call by construction (a `tool_choice` that forces one, decoded under
    a grammar): the named function's arguments object (`name`), or with `required` (`name`
    None) a JSON list of `{"name": ..., "parameters": ...}`, read as it comes. A whole answer
    cut off before its JSON closed stays text; in a stream, what went out stays sent."""

    def __init__(self, name: str | None, stream: bool = False, call_ids: Callable[[], str] | None = None) -> None:
        super().__init__(stream, call_ids)
        self._held = ""
        self._call = self.new_call(name) if name is not None else None
        self._calls = CallSequence(self, ",", bracketed=True) if name is None else None
        self._taken = 0

    def feed(self, text: str) -> ReadText:
        self._held += text
        return ReadText(calls=self._read() if self.stream else [])

    def _read(self) -> list[CallPiece]:
        if self._call is not None:
            piece, took = self._call.feed(self._held[self._taken:])
            self._taken += took
            return self.send(piece)
        return self._calls.feed(self._held[self._calls.taken:])

    def finish(self) -> ReadText:
        read = ReadText(calls=self._read())
        held, self._held = self._held, ""
        if self._call is not None:
            if not self._call.sent:
                piece = self._call.whole()
                if piece is None:
                    return ReadText(held)
                read.calls += self.send(piece)
        elif self._calls.complete:
            read.calls += self._calls.sent_whole()
        elif not self.calls_made:
            return ReadText(held)
        call = self._call or self._calls.call
        self.cut = call.index if call is not None and call.cut else None
        return read


def _mistral_name(text: str) -> str:
    """A v11+ call's name from the text before its arguments: `name`, `name[ARGS]`, or with
    tokenizer v11's own id, `name[CALL_ID]abcdefghi[ARGS]` (the id the model wrote is dropped:
    this server names the call)."""
    return text.split(MistralReader.CALL_ID)[0].replace(MistralReader.ARGS, "").strip()


class MistralReader(ToolCallReader):
    """Content up to `[TOOL_CALLS]`, then the calls: a JSON list of calls (tokenizers before
    v11), or each call as its name and its arguments object, `[TOOL_CALLS]` before each (v11
    on; `[ARGS]` between name and arguments where the tokenizer keeps that marker, and with v11
    `[CALL_ID]` and an id the model made up before it), as vLLM's
    `mistral` parser reads them. A whole answer's calls are calls only if all of them are."""

    MARKER, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    MAX_NAME = 256  # characters before a name's arguments: past that, no call
    call_ids = staticmethod(mistral_call_id)

    def __init__(self, stream: bool = False, call_ids: Callable[[], str] | None = None) -> None:
        super().__init__(stream, call_ids)
        self._held = ""  # content not yet sent; after the first marker, the call text
        self._calling = False
        self._taken = 0  # how much of the call text the named calls have read
        self._list: CallSequence | None = None  # the list form's calls
        self._call: CallText | None = None  # the named form's call being read (or the one that failed)
        self._after_call = False  # a named call has ended: the next marker, or the end
        self._slot = 0  # where the named call being read began, its marker included
        self._whole: list[CallPiece] = []  # a whole answer's named calls, sent once all of them are
        self._broken = False

    def feed(self, text: str) -> ReadText:
        self._held += text
        read = ReadText()
        if not self._calling:
            at = self._held.find(self.MARKER)
            end = at if at >= 0 else len(self._held) - marker_prefix_at_end(self._held, self.MARKER)
            read.content += self._content(self._held[:end])
            self._held = self._held[end:]
            if at < 0:
                return read
            self._calling, self._held = True, self._held[len(self.MARKER):]
        if self.stream:
            read.calls += self._read(ended=False)
        return read

    def finish(self) -> ReadText:
        if not self._calling:
            held, self._held = self._held, ""
            return ReadText(self._content(held, final=True))
        read = ReadText(calls=self._read(ended=True))
        taken = self._list.taken if self._list is not None else self._taken
        if self._list is not None and self._list.complete:
            read.calls += self._list.sent_whole()
            left = ""
        elif self._list is None and not self._broken and self._call is None and (self._whole or self.calls_made):
            read.calls += [sent for piece in self._whole for sent in self.send(piece)]
            left = ""
        elif self._list is not None and self.calls_made:  # in a stream, after calls already sent
            call = self._list.call
            left = ("" if call is None or call.sent else call.text) + self._held[taken:]
            self.cut = call.index if call is not None and call.cut else None
        elif self.calls_made:  # the named form: the rest from the call that broke off, its marker too
            call = self._call
            left = self._held[taken:] if call is not None and call.sent else self._held[self._slot:]
            self.cut = call.index if call is not None and call.cut else None
        else:
            left = self.MARKER + self._held
        self._held = ""
        read.content += self._content(left, final=True)
        return read

    def _read(self, ended: bool) -> list[CallPiece]:
        """The calls in the call text so far (`ended`: all of it has come)."""
        if self._list is not None:
            return self._list.feed(self._held[self._list.taken:])
        sent: list[CallPiece] = []
        while not self._broken:
            if self._call is not None:  # a named call's arguments
                piece, took = self._call.feed(self._held[self._taken:])
                self._taken += took
                sent += self.send(piece)
                if not self._call.ended:
                    self._broken = self._call.failed
                    return sent
                if not self._call.sent:
                    piece = self._call.whole()
                    if piece is None:  # kept, for its text
                        self._broken = True
                        return sent
                    if self.stream:
                        sent += self.send(piece)
                    else:
                        self._whole.append(piece)
                self._call, self._after_call, self._slot = None, True, self._taken
                continue
            rest = self._held[self._taken:]
            start = rest.lstrip()
            if not start or (not ended and self.MARKER.startswith(start[:len(self.MARKER)]) and
                             len(start) < len(self.MARKER)):
                return sent  # nothing yet, or maybe the next marker
            if start.startswith(self.MARKER) and (self._after_call or not self._whole and not self.calls_made):
                self._slot = self._taken + len(rest) - len(start)
                self._taken = self._slot + len(self.MARKER)
                self._after_call = False
                continue
            if self._after_call:
                self._broken = True  # after a call, only another one
            elif start.startswith("[") and not start.startswith(self.ARGS) and not self._whole and not self.calls_made:
                self._list = CallSequence(self, ",", bracketed=True)
                self._list.taken = self._taken
                return sent + self._list.feed(self._held[self._taken:])
            else:
                brace = start.find("{")
                name = _mistral_name(start[:max(brace, 0)])
                if brace < 0:
                    self._broken = ended or len(start) > self.MAX_NAME
                    return sent
                if not name or any(char.isspace() or char in '{}[]"' for char in name):
                    self._broken = True
                    return sent
                self._taken += len(rest) - len(start) + brace
                self._call = CallText(self.calls_made + len(self._whole), self.stream, name, self.call_ids())
        return sent


STRING_TYPES = frozenset(("string", "str", "text", "varchar", "char", "enum"))
"""Parameter types whose value is the model's text as it is (vLLM's list for `qwen3_coder`)."""


def parameter_type(schema: Any) -> str:
    """The type a parameter's schema gives its value, lower-cased: its `type`, the first that is
    not "null" of a list of types or of `anyOf`/`oneOf`'s branches (an optional parameter's
    schema, as pydantic writes one); an object's or array's where `properties` or `items` say
    so, "any" for a `$ref` (read as JSON) or an `enum` of other values than strings; else
    "string"."""
    if not isinstance(schema, dict):
        return "string"
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), None)
    if isinstance(kind, str):
        return kind.strip().lower()
    if "properties" in schema or "$ref" in schema or "items" in schema:  # an object or array, or a definition's
        return "object" if "properties" in schema else "array" if "items" in schema else "any"
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        for branch in branches if isinstance(branches, list) else ():
            kind = parameter_type(branch)
            if kind != "null" and (kind != "string" or isinstance(branch, dict) and "type" in branch):
                return kind
    enum = schema.get("enum")
    if isinstance(enum, list) and not all(isinstance(item, str) for item in enum):
        return "any"
    return "string"


def typed_value(text: str, kind: str) -> Any:
    """A parameter's value from the text the model wrote for it, typed as its schema says, as
    vLLM's `qwen3_coder` parser types it: `null` is None whatever the type; a string type keeps the
    text; an integer, number or boolean type reads it as one; any other type (object, array,
    "any") reads it as JSON, else as a Python literal (`{'a': True}`). Text that is not
    of its type stays text (vLLM reads an odd boolean as false), and so does a value JSON cannot
    carry (`inf`)."""
    if text.lower() == "null":
        return None
    if kind in STRING_TYPES:
        return text
    value: Any = text
    try:
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            value = int(text)
        elif kind.startswith(("num", "float", "double", "decimal")):
            number = float(text)
            value = int(number) if number.is_integer() else number
        elif kind in ("boolean", "bool", "binary"):
            value = {"true": True, "false": False}.get(text.strip().lower(), text)
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = ast.literal_eval(text.strip())
        json.dumps(value, allow_nan=False)
    except Exception:  # noqa: BLE001 - any text at all: what does not read as its type stays text
        return text
    return value


def _json_text(value: Any) -> str:
    """A value as JSON text, characters as they are where UTF-8 can carry them."""
    text = json.dumps(value, ensure_ascii=False)
    return text if _encodable(text) else json.dumps(value)


class _XmlFunction:
    """One `<function=name>` of a Qwen3-Coder call: its parameters as JSON text, in order."""

    def __init__(self, index: int, call_id: str, name: str) -> None:
        self.index, self.id, self.name = index, call_id, name
        self.pairs: list[str] = []  # each parameter's `"key": value`
        self.sent = self.ended = False

    @property
    def arguments(self) -> str:
        """The arguments object, as `json.dumps` writes it (a key given twice, twice)."""
        return "{" + ", ".join(self.pairs) + "}"


class Qwen3CoderReader(ToolCallReader):
    """Qwen3-Coder's calls, as vLLM's `qwen3_coder` parser reads them: content, then
    `<tool_call>` blocks each holding one or more `<function=name>` with a `<parameter=key>`
    per argument and its value as plain text on the lines between (a `</parameter>`, or the
    next `<parameter=`/`</function>`, ends it; one newline each side is the format's, not
    the value's), typed by the parameter's schema in the request's tools (`typed_value`).
    A `</function>` left out before `</tool_call>`, or both at the answer's end, are let go,
    as vLLM lets them go.

    A whole answer's block is calls only if all of it is (tags, and whitespace between them);
    else it stays content, tags and all. In a stream a call's first delta goes once its name
    is written (arguments `{`), each parameter once its value has ended, and a string
    parameter's value piece by piece as it is written (a file's contents, say), then `}`."""

    START, END = "<tool_call>", "</tool_call>"
    FUNCTION, FUNCTION_END = "<function=", "</function>"
    PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
    VALUE_ENDS = (PARAMETER_END, PARAMETER, FUNCTION_END)
    NEXT_TAGS = {"between": (FUNCTION, END), "params": (PARAMETER, FUNCTION_END, END)}
    MAX_NAME = 256  # characters of a function's or parameter's name: past that, no call

    def __init__(self, stream: bool = False, call_ids: Callable[[], str] | None = None,
                 parameters: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(stream, call_ids)
        self.parameters = parameters or {}  # each function's parameters' schemas, by the function's name
        self._held = ""  # content not yet sent; in a block, the block's text
        self._in_block = False
        self._at = 0  # how much of the block's text has been read
        # "between" functions, in a function's "params", its "name" or a parameter's "key" (after
        # their tags, at `_tag_at`), in a parameter's "value"; "broken" where the text stopped
        # being calls, "cut" where the answer ended inside a value
        self._state = "between"
        self._tag_at = 0
        self._functions: list[_XmlFunction] = []  # the block's
        self._key = ""
        self._value_at = 0  # where the parameter's value began
        self._searched = 0  # where the search for its end goes on from
        self._value_sent: int | None = None  # a string value streaming: up to where in the held text it has gone

    def feed(self, text: str) -> ReadText:
        self._held += text
        read = ReadText()
        while True:
            if not self._in_block:
                at = self._held.find(self.START)
                end = at if at >= 0 else len(self._held) - marker_prefix_at_end(self._held, self.START)
                read.content += self._content(self._held[:end])
                self._held = self._held[end:]
                if at < 0:
                    return read
                self._held = self._held[len(self.START):]
                self._in_block, self._at, self._state, self._functions = True, 0, "between", []
            read += self._read_block(ended=False)
            if self._in_block:
                return read

    def finish(self) -> ReadText:
        read = self._read_block(ended=True) if self._in_block else ReadText()
        if self._in_block and self._state == "params" and not self._held[self._at:].strip():
            read.calls += self._function_ended()  # its end tags left out, as vLLM lets them be
            self._state = "between"
        if self._in_block:  # the answer ended inside a block
            read += self._close_block(len(self._held), ended=False)
        held, self._held = self._held, ""
        read.content += self._content(held, final=True)
        return read

    def _read_block(self, ended: bool) -> ReadText:
        """The block's text read as far as it has come: its calls (in a stream, their pieces),
        and once its end tag has come, the block closed."""
        read = ReadText()
        while self._state not in ("broken", "cut"):
            if self._state == "value":
                read.calls += self._read_value(ended)
                if self._state == "value":
                    return read
                continue
            rest = self._held[self._at:]  # a name, or whitespace and a tag: short (else no call)
            if self._state in ("name", "key"):
                close = rest.find(">")
                name = rest[:close] if close >= 0 else rest
                if "<" in name or "\n" in name or len(name) > self.MAX_NAME or close >= 0 and not name.strip():
                    self._state, self._at = "broken", self._tag_at
                elif close < 0:
                    if ended:
                        self._state, self._at = "broken", self._tag_at
                    return read
                else:
                    self._at += close + 1
                    read.calls += self._named(name.strip())
            else:
                start = rest.lstrip()
                tags = self.NEXT_TAGS[self._state]
                tag = next((tag for tag in tags if start.startswith(tag)), None)
                if tag is None:
                    if not start or not ended and any(tag.startswith(start) for tag in tags):
                        return read  # nothing yet, or maybe a tag once more has come
                    self._state = "broken"
                    break
                self._tag_at = self._at + len(rest) - len(start)
                self._at = self._tag_at + len(tag)
                if tag in (self.FUNCTION_END, self.END) and self._state == "params":
                    read.calls += self._function_ended()
                self._state = {self.FUNCTION: "name", self.PARAMETER: "key"}.get(tag, "between")
                if tag == self.END:
                    read += self._close_block(self._tag_at, ended=True)
                    return read
        # broken: the block's text from there on is no call; the block ends at its end tag
        at = self._held.find(self.END, self._at) if self._state == "broken" else -1
        if at >= 0:
            read += self._close_block(at, ended=True)
        return read

    def _named(self, name: str) -> list[CallPiece]:
        if self._state == "key":
            self._key, self._state = name, "value"
            self._value_at = self._searched = self._at
            self._value_sent = None
            return []
        index = self.calls_made + sum(not function.sent for function in self._functions)
        function = _XmlFunction(index, self.call_ids(), name)
        self._functions.append(function)
        self._state = "params"
        if not self.stream:
            return []
        function.sent = True
        return self.send(CallPiece(index, "{", name, function.id))

    def _function_ended(self) -> list[CallPiece]:
        function = self._functions[-1]
        function.ended = True
        return self._more("}")

    def _more(self, text: str) -> list[CallPiece]:
        """More of the streamed function's arguments."""
        function = self._functions[-1]
        return [CallPiece(function.index, text)] if function.sent and text else []

    def _read_value(self, ended: bool) -> list[CallPiece]:
        """A parameter's value, as far as it has come: once it has ended, the parameter; in a
        stream, a string's text so far (but for a newline at its end and what may begin a tag)."""
        held, function = self._held, self._functions[-1]
        ends = [(at, tag) for tag in self.VALUE_ENDS if (at := held.find(tag, self._searched)) >= 0]
        if not ends and not ended:
            self._searched = max(self._searched, len(held) - max(map(len, self.VALUE_ENDS)) + 1)
            return self._stream_string(len(held) - max(marker_prefix_at_end(held, tag) for tag in self.VALUE_ENDS))
        at, tag = min(ends) if ends else (len(held), "")
        if not tag:  # the answer ended inside the value: what has come of a streamed string
            self._state = "cut" if function.sent else "broken"
            return self._stream_string(at) if self._value_sent is not None else []
        self._at, self._state = at + len(tag) if tag == self.PARAMETER_END else at, "params"
        value = self._value(at)
        if self._value_sent is not None:  # a streamed string's rest
            sent = self._stream_string(at) + self._more('"')
            function.pairs.append(_json_text(self._key) + ": " + json.dumps(value, ensure_ascii=False))
            return sent
        pair = _json_text(self._key) + ": " + _json_text(typed_value(value, self._kind()))
        function.pairs.append(pair)
        return self._more((", " if len(function.pairs) > 1 else "") + pair)

    def _value_extent(self, upto: int) -> tuple[int, int]:
        """Where the value's text up to `upto` begins and ends in the held text, but for the
        format's newline each side."""
        held, start = self._held, self._value_at
        if upto > start and held[start] == "\n":
            start += 1
        return start, upto - 1 if upto > start and held[upto - 1] == "\n" else upto

    def _value(self, upto: int) -> str:
        start, end = self._value_extent(upto)
        return self._held[start:end]

    def _stream_string(self, upto: int) -> list[CallPiece]:
        """In a stream, a string parameter's value up to `upto`: its key and opening quote once
        it cannot be `null` (which is no string), then each new piece of its JSON text (escaped
        piece by piece, as JSON escapes each character alone)."""
        function = self._functions[-1]
        if not function.sent or self._kind() not in STRING_TYPES:
            return []
        start, end = self._value_extent(upto)
        opening = ""
        if self._value_sent is None:
            if end - start <= len("null") and "null".startswith(self._held[start:end].lower()):
                return []
            opening, self._value_sent = (", " if function.pairs else "") + _json_text(self._key) + ': "', start
        if end <= self._value_sent:
            return self._more(opening)
        piece, self._value_sent = json.dumps(self._held[self._value_sent:end], ensure_ascii=False)[1:-1], end
        return self._more(opening + piece)

    def _kind(self) -> str:
        schemas = self.parameters.get(self._functions[-1].name)
        return parameter_type(schemas.get(self._key)) if isinstance(schemas, dict) else "string"

    def _close_block(self, at: int, ended: bool) -> ReadText:
        """The block whose text is the held text up to `at` (`ended`: by its end tag, else by the
        answer's end): a whole answer's calls if all of it was calls, else its text as content;
        in a stream, what followed its calls and was no call, as content."""
        body, functions = self._held[:at], self._functions
        read = ReadText()
        if any(function.sent for function in functions):
            if not functions[-1].ended:
                self.cut = functions[-1].index
            left = body[self._at:] if self._state == "broken" else ""
        elif self._state == "between" and functions:
            for function in functions:
                read.calls += self.send(CallPiece(function.index, function.arguments, function.name, function.id))
            left = ""
        else:
            left = self.START + body + (self.END if ended else "")
        self._held = self._held[at + (len(self.END) if ended else 0):]
        self._in_block, self._functions = False, []
        read.content += self._content(left if left.strip() else "", final=not ended)
        return read


READERS: dict[str, type[ToolCallReader]] = {"hermes": HermesReader, "llama3_json": Llama3JsonReader,
                                            "mistral": MistralReader, "qwen3_coder": Qwen3CoderReader}

KEEPS_SPECIAL_TOKENS = {"hermes", "mistral", "qwen3_coder"}
"""Formats whose markers some tokenizers count as special tokens (Hermes 2 Pro's `<tool_call>`,
Mistral's `[TOOL_CALLS]`; Qwen's own tokenizers do not): their text is decoded with special
tokens kept (as vLLM's Hermes and Mistral parsers ask), so the markers survive. Llama 3's `<|python_tag|>` is not
needed to read its calls."""


TYPED_BY_SCHEMA = {"qwen3_coder"}
"""Formats whose argument values are text, typed by the request's tool schemas."""


def tool_call_reader(fmt: ToolCallFormat, stream: bool = False,
                     parameters: dict[str, dict[str, Any]] | None = None) -> ToolCallReader:
    """A reader of `fmt`; `parameters`: each function's parameters' schemas, by its name (for
    `TYPED_BY_SCHEMA` formats)."""
    if fmt in TYPED_BY_SCHEMA:
        return READERS[fmt](stream, parameters=parameters)
    return READERS[fmt](stream)


def read_tool_calls(fmt: ToolCallFormat, text: str, parameters: dict[str, dict[str, Any]] | None = None) -> ReadText:
    """A whole answer's content (calls taken out) and calls."""
    reader = tool_call_reader(fmt, parameters=parameters)
    read = reader.feed(text)
    read += reader.finish()
    return read
