"""gpt-oss's answers, in OpenAI's harmony format, read into thinking, content and tool calls.

gpt-oss writes its answer as a run of messages, each a header naming its channel (and for
a tool call, its recipient), `<|message|>`, the text, and an end marker:

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>

or, for an answer in text, `...<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>`.
The `analysis` channel is the model's thinking (the message's `reasoning`, as vLLM returns
it), the `final` channel the answer's content, and a message to `functions.NAME` a call to
that function, its text the arguments (JSON). A `commentary` message with no recipient (a
preamble before a call) is content too, as from vLLM. The markers are special tokens, so
such a model's text is decoded with special tokens kept; its ends (`<|return|>`, `<|call|>`)
are the model's end-of-sequence tokens and never reach the text.

The chat config names the format as vLLM does (`reasoning_parser: openai_gptoss`, and for
tool calls `tool_call_parser: openai`). Text that is not harmony (a message whose header
does not close within `MAX_HEADER` characters, or an answer that does not begin with one)
is content from there on, as it was written; a header cut off by the answer's end is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from serve_app.tool_calls import CallPiece, ReadText, ToolCallReader, marker_prefix_at_end

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
MESSAGE_ENDS = (END, CALL, RETURN, START)  # a new message's start ends one whose end was left out
MAX_HEADER = 512
RECIPIENT = re.compile(r"\bto=([^\s<]+)")
FUNCTIONS = "functions."


class HarmonyReader(ToolCallReader):
    """One choice's harmony text, fed as it is produced: its `analysis` messages as reasoning,
    calls to `functions.*` as tool calls (with `read_calls`; else their text is content), any
    other message's text as content. With `stream`, a call's first delta goes once the first
    piece of its arguments is written, then each piece as it comes (their text is the call's
    `arguments`, as the model wrote it); a whole answer's call whose arguments are not JSON
    (cut off) is content."""

    def __init__(self, stream: bool = False, call_ids: Callable[[], str] | None = None,
                 read_calls: bool = False) -> None:
        super().__init__(stream, call_ids)
        self.read_calls = read_calls
        self._held = ""
        self._state = "header"  # then "body" (a message's text), or "raw": text that is not harmony
        self._started = False  # whether a message header has been read
        self._channel, self._call = "", None  # the message's: its channel, and if it is a call, the call
        self._arguments: list[str] = []  # the call's text so far

    def feed(self, text: str) -> ReadText:
        self._held += text
        read = ReadText()
        while self._held:
            if self._state == "raw":
                read.content += self._content(self._held)
                self._held = ""
            elif self._state == "header":
                if not self._header():
                    break
            else:
                at, marker = min(((self._held.find(m), m) for m in MESSAGE_ENDS if m in self._held),
                                 default=(-1, ""))
                if at < 0:  # all of it, but what may begin a marker
                    keep = max(marker_prefix_at_end(self._held, m) for m in MESSAGE_ENDS)
                    read += self._body(self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    break
                read += self._body(self._held[:at])
                read += self._message_ended()
                self._held = self._held[at + (0 if marker == START else len(marker)):]
                self._state = "header"
        return read

    def finish(self) -> ReadText:
        read = ReadText()
        if self._state == "header" and self._held.strip() and "<|" not in self._held:
            read.content += self._content(self._held)  # not harmony: as written (a header cut off is dropped)
        elif self._state != "header":
            read += self._body(self._held)
            read += self._message_ended(ended=True)
        self._held = ""
        read.content += self._content("", final=True)
        return read

    def _header(self) -> bool:
        """Reads the header the held text begins with; False until it has come whole."""
        text = self._held.lstrip() if not self._started else self._held
        at = text.find(MESSAGE)
        header = text[:at] if at >= 0 else text
        if not self._opens(text) and not any(marker.startswith(text) for marker in (START, CHANNEL, "to=")) or \
                len(header) > MAX_HEADER or any(marker in header for marker in (END, CALL, RETURN)):
            self._state = "raw"  # not harmony: content, from here on
            return True
        if at < 0:
            return False
        self._held = text[at + len(MESSAGE):]
        self._started, self._state = True, "body"
        channel = header.partition(CHANNEL)[2]
        self._channel = re.split(r"\s|<\|", channel, maxsplit=1)[0]
        recipient = RECIPIENT.search(header)
        name = recipient.group(1).removeprefix(FUNCTIONS) if recipient else ""
        self._call = None
        if recipient and self.read_calls and recipient.group(1).startswith(FUNCTIONS) and name:
            self._call = (self.calls_made, self.call_ids(), name)
            self._arguments = []
        return True

    def _opens(self, text: str) -> bool:
        """Whether `text` begins as a message header does (the first may begin with its recipient)."""
        return text.startswith((START, CHANNEL)) or (not self._started and text.startswith("to="))

    def _body(self, text: str) -> ReadText:
        if not text:
            return ReadText()
        if self._call is None:
            if self._channel == "analysis":
                return ReadText(reasoning=text)
            return ReadText(self._content(text))
        self._arguments.append(text)
        if not self.stream:
            return ReadText()
        index, call_id, name = self._call
        first = len(self._arguments) == 1
        return ReadText(calls=self.send(CallPiece(index, text, name if first else None, call_id if first else None)))

    def _message_ended(self, ended: bool = False) -> ReadText:
        """A call's message has ended (`ended`: with the answer, where its end marker, the
        model's end of sequence, is not in the text): whole, it is a call if its arguments are
        JSON; in a stream, one whose arguments are not is cut."""
        call, self._call = self._call, None
        if call is None:
            return ReadText()
        arguments = "".join(self._arguments)
        whole = _is_json(arguments)
        if self.stream:
            if not whole and self._arguments:
                self.cut = call[0]
            return ReadText()
        if not whole:
            return ReadText(self._content(arguments))
        index, call_id, name = call
        return ReadText(calls=self.send(CallPiece(index, arguments, name, call_id)))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True
