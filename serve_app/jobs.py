"""What the ingress hands a model deployment, and what it gets back.

These are the only types that cross the ingress/model boundary: already
validated, already resolved against the model's limits, free of HTTP. Model
code imports this module and never `protocol`, so it cannot grow a dependency
on the wire format.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.reasoning import Opening

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class ChatJob:
    """One chat completion: plain-text messages and resolved sampling parameters."""

    messages: list[dict[str, Any]]  # as chat templates take them (`translate.template_message`)
    max_tokens: int
    max_tokens_explicit: bool
    max_tokens_param: str = "max_tokens"  # the request's name for it, for errors
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None  # None: the checkpoint's (see `sampling.make_rows`); 0: all
    min_p: float | None = None
    min_tokens: int = 0  # no end-of-sequence token, no stop string before this many
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    tools: list[dict[str, Any]] | None = None  # for the chat template, as the request gave them
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # more variables for the chat template
    skip_special_tokens: bool = True  # False where a tool call's markers may be special tokens (`tool_calls`)
    grammar: str | None = None  # what the answer must follow (`structured_output`); None: free text
    grammar_param: str = "response_format"  # the request field the grammar came from, for its errors



def generator_seed(seed: int, index: int) -> int:
    """The seed of the generator that draws the `index`-th choice's or image's numbers: `seed +
    index`, so the i-th of a request is the first of `seed + i` (one image of a seeded batch can
    be made again alone).

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, which would make
    seeds 2**32 apart draw the same numbers (and `-1` the same as 4294967295). A value past 32
    bits is hashed down to 32 instead, so every bit of a 64-bit seed counts; values below
    2**32 stay as they are, drawing what `manual_seed(value)` draws."""
    value = (seed + index) % 2**64
    if value < 2**32:
        return value
    return int.from_bytes(hashlib.blake2b(value.to_bytes(8, "little"), digest_size=4).digest(), "little")


def prompt_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 template_kwargs: dict[str, Any] | None = None) -> int:
    """How much text a conversation gives the chat template: each message's content, thinking and
    tool calls as JSON, the tools' definitions and the template's extra variables as JSON (a
    template may print any of them: the ingress's `limits.max_prompt_chars`, and the replica's
    measure of a prompt long enough to template off its event loop)."""
    def as_json(value: Any) -> int:
        return len(json.dumps(value, ensure_ascii=False)) if value else 0

    return (sum(len(message["content"]) + len(message.get("reasoning_content") or "") + as_json(message.get("tool_calls"))
                for message in messages)
            + as_json(tools) + as_json(template_kwargs))


@dataclass(frozen=True)
class TokenAlternative:
    """A token as text, its UTF-8 bytes, and its log probability under the model."""

    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob(TokenAlternative):
    """A generated token, with the `top_logprobs` most likely tokens at its position."""

    top: list[TokenAlternative] = field(default_factory=list)


@dataclass(frozen=True)
class ChatChoiceResult:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    reasoning_tokens: int = 0  # of completion_tokens, those of a reasoning model's thinking
    logprobs: list[TokenLogprob] | None = None  # None unless the request asked for them


@dataclass(frozen=True)
class ChatResult:
    choices: list[ChatChoiceResult]
    prompt_tokens: int
    opening: Opening = None  # where the prompt leaves a reasoning model's answer (`reasoning`)

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(choice.reasoning_tokens for choice in self.choices)


@dataclass(frozen=True)
class ChoiceDelta:
    """New text for one choice; `finish_reason` is set on the choice's last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens behind `text`, when asked for


@dataclass(frozen=True)
class ChatStreamChunk:
    """One message of a streamed completion: the deltas produced since the last one.

    Token counts are running totals, so the last chunk carries the usage.
    """

    deltas: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    opening: Opening = None  # as ChatResult's
    reasoning_tokens: int = 0  # of completion_tokens, those of the thinking (a running total too)


@dataclass(frozen=True)
class ImageJob:
    """Text-to-image when `init_image` is None, else image-to-image (inpainting with a mask)."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int | None = None
    negative_prompt: str | None = None
    init_image: bytes | None = None
    mask_image: bytes | None = None
    strength: float | None = None  # None: the model's default for the edit (image-to-image or inpainting)
    output_format: ImageFormat = "png"
    quality: int | None = None  # JPEG/WebP quality 0-100; None: the encoder's default

    @property
    def pipeline_steps(self) -> int:
        """`num_inference_steps` to ask the pipeline for. Image-to-image runs only
        int(steps * strength) of them, so an edit asks for enough that one at least runs
        (a small strength needs many; int(161 * (1 / 161)) is 0 in floating point).
        The ingress refuses a strength below 1 / max_steps first: a strength near zero
        would ask for more steps than a float can count one by one."""
        steps = self.steps
        if self.init_image is not None and self.strength is None:
            raise ValueError("an edit's strength is chosen (ImageModel.prepare) before its steps are counted")
        if self.init_image is not None and int(steps * self.strength) < 1:
            steps = max(steps, math.ceil(1 / self.strength))
            while int(steps * self.strength) < 1:
                steps += 1
        return steps


@dataclass(frozen=True)
class ImageResult:
    """Encoded images in the job's `output_format`, exactly `n` of them, each `width` x `height`."""

    images: list[bytes]
