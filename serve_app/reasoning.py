"""A reasoning model's thinking, read out of its answer into `reasoning`.

Reasoning models (DeepSeek-R1 and its distills, Qwen3, QwQ) think in the answer itself,
between `<think>` and `</think>`, and clients expect the thinking apart from the answer:
vLLM's reasoning parsers return it in the message's `reasoning` (before vLLM 0.11,
`reasoning_content`, DeepSeek's name, which many clients still read; this server sends
both). A chat model's config names the format (`reasoning_parser`, vLLM's names):

- `deepseek_r1`: the chat template opens the thinking in the prompt, so the answer
  starts inside it: everything up to `</think>` is reasoning (all of it, if the answer
  ends before one), a leading `<think>` is dropped. Also for Qwen3's thinking-only
  models (2507), whose template does the same.
- `qwen3`: the answer thinks only if it starts with `<think>` (Qwen3 with
  `enable_thinking` false writes none, and then all of it is content).

Whatever the format, the prompt has the last word where it ends in a marker (`Opening`):
a chat template that ends it with `<think>` opened the thinking (Qwen3's thinking-only
2507 models, DeepSeek-R1's), one that ends it with `</think>` closed it (Qwen3 with
`enable_thinking` false, DeepSeek-V3.1 with `thinking` off): the answer is content.

The thinking streams as it comes, as does the content after it; the content's leading
whitespace (the blank line after `</think>`) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serve_app.tool_calls import marker_prefix_at_end

ReasoningFormat = Literal["deepseek_r1", "qwen3", "openai_gptoss"]
"""`openai_gptoss` is gpt-oss's harmony format, read by `harmony.HarmonyReader` (thinking and
calls both), not by `ReasoningReader`."""

START, END = "<think>", "</think>"

Opening = Literal["thinking", "answer"] | None
"""Where the prompt leaves the answer: inside the thinking, after it, or None (the format says)."""


def prompt_opening(prompt: str) -> Opening:
    """The `Opening` of a templated prompt, from the marker it ends with (whitespace aside)."""
    tail = prompt.rstrip()
    return "answer" if tail.endswith(END) else "thinking" if tail.endswith(START) else None


@dataclass
class Split:
    """A piece of an answer: its thinking and its content."""

    reasoning: str = ""
    content: str = ""


class ReasoningReader:
    """One choice's text, fed as it is produced; `finish` once it has ended."""

    def __init__(self, fmt: ReasoningFormat, opening: Opening = None) -> None:
        self._starts_inside = opening == "thinking" or (opening is None and fmt == "deepseek_r1")
        self._state: Literal["start", "reasoning", "after", "content"] = "content" if opening == "answer" else "start"
        self._held = ""

    def feed(self, text: str) -> Split:
        self._held += text
        split = Split()
        if self._state == "start":
            opening = self._held.lstrip()
            if opening.startswith(START):
                self._state, self._held = "reasoning", opening[len(START):]
            elif START.startswith(opening):
                return split  # whitespace, or part of a `<think>`: wait for more
            else:
                self._state = "reasoning" if self._starts_inside else "content"
        if self._state == "reasoning":
            at = self._held.find(END)
            if at < 0:  # all of it, but the start of an END
                keep = marker_prefix_at_end(self._held, END)
                split.reasoning, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
                return split
            split.reasoning, self._held, self._state = self._held[:at], self._held[at + len(END):], "after"
        if self._state == "after":  # the content's leading whitespace is dropped
            self._held = self._held.lstrip()
            if not self._held:
                return split
            self._state = "content"
        split.content, self._held = self._held, ""
        return split

    def finish(self) -> Split:
        held, self._held = self._held, ""
        if self._state == "start":
            return Split(reasoning=held) if self._starts_inside and held.strip() else Split(content=held)
        if self._state == "reasoning":
            return Split(reasoning=held)
        return Split(content=held if self._state == "content" else "")

