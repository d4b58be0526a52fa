"""Structured output: `response_format` `json_object` and `json_schema`, by constrained decoding.

OpenAI clients ask for JSON with `response_format` (`client.chat.completions.parse`
with a pydantic model sends a `json_schema`), and expect an answer that parses, not
a model's best effort. As vLLM does with its `guidance` backend, the schema becomes
a grammar for llguidance (Microsoft's low-level guidance library: a Rust matcher over
the tokenizer's vocabulary, no torch inside), and at every decoding step the tokens
that cannot continue the grammar are masked out of the row's logits before it samples
(`sampling.SamplingPlan`). The answer ends once the JSON is complete; one cut off by
`max_tokens` ends as `length`, as OpenAI's does.

The grammar is built here, from the request alone (the ingress passes it on in the
job); it is compiled against the model's tokenizer on the replica, where a schema the
matcher refuses becomes a 400 naming `response_format` (`tools` for a forced call's).

A reasoning model (`reasoning_parser`) thinks first: as vLLM does, its answer comes
under the grammar only once the thinking has ended (`AnswerGrammar`), so the thinking is
free text and the content after it is the JSON (for gpt-oss, once its final channel's
header has been written).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance

from serve_app.errors import InvalidRequest
from serve_app.reasoning import END, START, Opening, ReasoningFormat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def json_grammar(schema: dict[str, Any] | None, any_whitespace: bool, param: str = "response_format") -> str:
    """The grammar of a JSON answer: any JSON object where `schema` is None (`json_object`),
    else one that validates against `schema`. Without `any_whitespace`, no whitespace outside
    strings: small models given the choice can write newlines until `max_tokens` runs out,
    which is why vLLM has `disable_any_whitespace`."""
    schema = {"type": "object"} if schema is None else schema
    # As vLLM's guidance backend: defaults (a schema's own "x-guidance" wins), oneOf read as anyOf.
    defaults = {"whitespace_flexible": any_whitespace, "coerce_one_of": True}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
    except (ValueError, TypeError, OverflowError) as exc:  # not JSON it can write: a lone surrogate, a huge int
        raise InvalidRequest(f"{param}'s schema cannot be used: {exc}", param=param) from None


def is_schema(param: str) -> bool:
    """Whether the grammar named by request field `param` is a JSON schema's (else a regex's, a
    choice's or a grammar's), for the words of its errors."""
    return param in ("response_format", "tools", "guided_json", "structured_outputs.json",
                     "structured_outputs.json_object")


def text_grammar(kind: str, value: str | list[str], param: str) -> str:
    """The grammar of an answer that is a match of `value`, a regular expression (Rust's `regex`
    syntax, as llguidance reads it), one of a list of strings, or a Lark (or llama.cpp GBNF)
    grammar, as vLLM's guidance backend builds them; a grammar llguidance cannot read is a 400."""
    text = json.dumps(value) if kind == "choice" else value
    if kind == "choice" and not value:
        raise InvalidRequest(f"{param} needs at least one string.", param=param)
    try:
        return llguidance.grammar_from(kind, text)
    except (ValueError, TypeError) as exc:  # what it cannot read at all; the rest shows where it is compiled
        raise InvalidRequest(f"{param} cannot be used: {exc}", param=param) from None


HARMONY_ANSWER = "<|channel|>final<|message|>"
"""Where gpt-oss's answer (its final channel's text) begins, after its thinking."""
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
"""Where gpt-oss's reasoning (its analysis channel's text) begins; it ends at `<|end|>`."""
HARMONY_MESSAGE_END = "<|end|>"


@dataclass(frozen=True)
class ThinkingMarkers:
    """Where a reasoning model's thinking starts (`<think>`'s token id; None where every answer
    thinks first) and the token ids that end it (`</think>`, or harmony's final channel's header),
    its format, and the ids that end an answer (not allowed while it thinks: the answer must
    reach its JSON). For gpt-oss, also where its reasoning proper (the analysis channel's
    message) begins and ends: its thinking holds more (headers, a commentary channel's call)."""

    start: int | None
    end: tuple[int, ...]
    fmt: ReasoningFormat
    eos_ids: frozenset[int]
    analysis: tuple[int, ...] | None = None
    message_end: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, fmt: ReasoningFormat | None,
           eos_ids: set[int]) -> "ThinkingMarkers | None":
        """None without a `reasoning_parser`, or where the tokenizer has no single token for each
        marker that decodes to it with special tokens skipped, as the answer is decoded (a marker
        flagged special would vanish from the text `reasoning.ReasoningReader` reads): then the
        thinking's end cannot be told token by token, and such a model cannot take a grammar
        (`GrammarCompiler`). DeepSeek-R1 and its distills, Qwen3 and QwQ all have both. gpt-oss's
        thinking ends where its final channel's header does, whose markers are special tokens
        (its answers are decoded with them kept)."""
        if fmt is None:
            return None
        if fmt == "openai_gptoss":
            ids = tuple(tokenizer.encode(HARMONY_ANSWER, add_special_tokens=False))
            if tokenizer.decode(list(ids), skip_special_tokens=False) != HARMONY_ANSWER or \
                    tokenizer.decode(list(ids), skip_special_tokens=True) == HARMONY_ANSWER:
                return None  # its markers are no special tokens of this tokenizer
            return cls(start=None, end=ids, fmt=fmt, eos_ids=frozenset(eos_ids),
                       analysis=tuple(tokenizer.encode(HARMONY_ANALYSIS, add_special_tokens=False)),
                       message_end=frozenset(tokenizer.encode(HARMONY_MESSAGE_END, add_special_tokens=False)[:1]))
        vocab = tokenizer.get_vocab()
        ids = [vocab.get(START), vocab.get(END)]
        if None in ids or [tokenizer.decode([i], skip_special_tokens=True) for i in ids] != [START, END]:
            return None
        return cls(start=ids[0], end=(ids[1],), fmt=fmt, eos_ids=frozenset(eos_ids))


class Thinking:
    """Whether one answer is thinking, token by token, from where the prompt leaves it
    (`opening`): with `qwen3` an answer thinks only if its first token is `<think>`; a
    DeepSeek-R1 or gpt-oss answer (or one whose prompt opened the thinking) thinks from its
    first token. `tokens` counts the tokens of what is read out as `reasoning`, as vLLM
    counts `reasoning_tokens`: the thinking less its markers (a leading `<think>` too, which
    the reader drops), or gpt-oss's analysis messages (not their headers, nor a call)."""

    def __init__(self, markers: ThinkingMarkers, opening: Opening = None) -> None:
        self.markers = markers
        self.state: Literal["answer", "thinking", "may_think"] = (
            "answer" if opening == "answer" else
            "thinking" if opening == "thinking" or markers.start is None or markers.fmt == "deepseek_r1"
            else "may_think")
        self.tokens = 0
        self._counting = markers.analysis is None  # gpt-oss: only inside an analysis message
        self._first = True  # no token of the thinking yet
        self._window = max(len(markers.end), len(markers.analysis or ()))
        self._recent: tuple[int, ...] = ()  # the thinking's last tokens, as many as its markers have

    def follow(self, token: int) -> None:
        if self.state == "may_think":
            self.state = "thinking" if token == self.markers.start else "answer"
            return
        if self.state != "thinking":
            return
        first, self._first = self._first, False
        end, analysis = self.markers.end, self.markers.analysis
        self._recent = (*self._recent, token)[-self._window:]
        if self._recent[-len(end):] == end:
            self.state = "answer"
            if self._counting:  # the end's tokens before this one were counted: they were not thinking
                self.tokens -= len(end) - 1
        elif analysis is None:
            self.tokens += not (first and token == self.markers.start)
        elif self._counting:
            self._counting = token not in self.markers.message_end
            self.tokens += self._counting
        else:
            self._counting = self._recent[-len(analysis):] == analysis


class AnswerGrammar:
    """One answer's grammar (an llguidance matcher), applied from where the answer is meant to
    be JSON: from its first token, or for a reasoning model from the token after `</think>`
    (with `qwen3`, the first token may also be `<think>`, which starts the thinking; any
    other is the JSON's), as vLLM starts it, and where `reasoning.ReasoningReader` reads the
    content from (the prompt's `Opening` first). While the answer thinks, its tokens are
    free, but for the end of the answer: the JSON must come (or `max_tokens` cut it off)."""

    def __init__(self, matcher: llguidance.LLMatcher, thinking: ThinkingMarkers | None,
                 opening: Opening = None, param: str = "response_format") -> None:
        self.matcher, self.param = matcher, param
        self._thinking = None if thinking is None else Thinking(thinking, opening)

    @property
    def _state(self) -> Literal["answer", "thinking", "may_think"]:
        return "answer" if self._thinking is None else self._thinking.state

    def fill_mask(self, allowed: Any, row: int) -> None:
        """Write the tokens allowed next into row `row` of the int32 bitmask `allowed` (32 token ids
        a word). A matcher's error shows in `follow`. (`fill_masks` does it for a batch's rows.)"""
        fill_masks([(row, self)], allowed)

    @property
    def matched(self) -> bool:
        """Whether the matcher says which tokens may come next (not while the answer thinks)."""
        return self._state != "thinking"

    def amend_mask(self, allowed: Any, row: int) -> None:
        """The row's mask, as the matcher wrote it (or not, while thinking), amended for the thinking."""
        if self._state == "thinking":
            allowed[row].fill_(-1)
            for eos in self._thinking.markers.eos_ids:
                word, bit = divmod(eos, 32)
                allowed[row, word] &= ~((1 << bit) if bit < 31 else -(1 << 31))
        elif self._state == "may_think":
            word, bit = divmod(self._thinking.markers.start, 32)
            allowed[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)  # int32: bit 31 is the sign

    def follow(self, token: int, ended: bool) -> bool:
        """Advance past the row's chosen token (unless that token `ended` the answer); True once
        the grammar is complete (the answer ends there). A grammar that failed (while computing
        its mask, its mask then allows only the end: the answer would look complete) or that
        refuses the token (every token it allows was ruled out by the model itself, a -inf
        logit) fails the request."""
        if self._state != "answer":
            was = self._state
            self._thinking.follow(token)
            if "thinking" in (was, self._state):  # a token of the thinking, its markers included
                return False
        if self.matcher.is_error() or not (ended or self.matcher.consume_token(token)):
            # That request fails (a 400: its schema is past the parser's limits), its batch-mates go on.
            if is_schema(self.param):
                raise InvalidRequest(f"The answer could not follow its schema: {_matcher_error(self.matcher)}. The "
                                     "schema goes past what constrained decoding can follow (hundreds of optional "
                                     "properties, say).", param=self.param)
            raise InvalidRequest(f"The answer could not follow its grammar: {_matcher_error(self.matcher)}. The "
                                 "grammar goes past what constrained decoding can follow (thousands of alternatives "
                                 "in one rule, say).", param=self.param)
        return not ended and self.matcher.is_stopped()


_executor: llguidance.LLExecutor | None = None


def fill_masks(grammars: list[tuple[int, AnswerGrammar]], allowed: Any) -> None:
    """Each (row, grammar)'s tokens allowed next into that row of the int32 bitmask `allowed`.
    The matchers' masks of a batch's rows are computed together on llguidance's thread pool
    (`LLExecutor`, most of the machine's cores), outside the GIL, as SGLang's llguidance
    backend computes them; one row alone, on this thread."""
    from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

    global _executor
    matchers = [(grammar.matcher, row) for row, grammar in grammars if grammar.matched]
    if len(matchers) == 1:
        fill_next_token_bitmask(matchers[0][0], allowed, matchers[0][1])
    elif matchers:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        fill_next_token_bitmask_par(_executor, matchers, allowed)
    for row, grammar in grammars:
        grammar.amend_mask(allowed, row)


def _matcher_error(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error in words, on one line, without the parser state it appends for its
    developers (from `<state>` on)."""
    words = " ".join(matcher.get_error().split("<state>", 1)[0].split())[:400]
    return ("no JSON value can follow it (a $ref to itself with nothing else, say)"
            if words == "NoExtensionBias" else words)


GRAMMAR_STACK_BYTES = 256 << 20
"""The stack of the thread that compiles grammars: llguidance's compiler recurses once per
nesting level, and a 50 KB JSON schema chaining 1,000 `$ref`s overflowed a thread's default
8 MiB (a segfault: the replica's process died with every request in it). 256 MiB compiled
twice the deepest that `limits.max_grammar_chars` lets through. Linux reserves it, and
commits only the pages the recursion touches."""


def grammar_executor() -> ThreadPoolExecutor:
    """One thread, with a `GRAMMAR_STACK_BYTES` stack, on which a replica compiles its requests'
    grammars one after another: never on the event loop (a costly regex takes seconds, every
    stream held meanwhile), and never on more than one core at once (llguidance lets go of the
    GIL, but a thread cannot be stopped: a burst of costly grammars from clients that left
    would otherwise take every core). A queued compile whose request is cancelled never runs."""
    previous = threading.stack_size(GRAMMAR_STACK_BYTES)  # for threads started from now on:
    try:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar compiler")
        executor.submit(lambda: None).result()  # this one, started now
    finally:
        threading.stack_size(previous)
    return executor


class GrammarCompiler:
    """A model's tokenizer as llguidance reads it, made once per replica on first use (about
    a second for a 150k vocabulary), and a grammar per answer row from a job's grammar."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocabulary: int, eos_ids: set[int],
                 reasoning: ReasoningFormat | None = None) -> None:
        self._tokenizer, self._vocabulary, self._eos_ids = tokenizer, vocabulary, eos_ids
        self._reasoning = reasoning
        self._thinking = ThinkingMarkers.of(tokenizer, reasoning, {i for i in eos_ids if i < vocabulary})
        self._compiled: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # prepared on the event loop or, for a long request, a thread

    @property
    def ready(self) -> bool:
        return self._compiled is not None

    def prepare(self, param: str = "response_format") -> llguidance.LLTokenizer:
        """Read the tokenizer once; one it cannot read is a 400 naming `param` (the request field
        that asked for a grammar)."""
        with self._lock:
            if self._compiled is None:
                import llguidance.hf

                if not getattr(self._tokenizer, "is_fast", False):
                    raise InvalidRequest("This model's tokenizer is a slow (Python) one, which constrained decoding "
                                         "(a JSON response_format, a forced tool_choice) cannot read: it needs a "
                                         "fast tokenizer.", param=param)
                import llguidance.torch  # noqa: F401 - its first import takes a second: here, not on the decode thread

                try:
                    self._compiled = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocabulary,
                                                                  eos_token=sorted(self._eos_ids))
                except ValueError as exc:  # a tokenizer larger than the model's head, no end-of-sequence id
                    raise InvalidRequest(f"This model's tokenizer cannot be read for constrained decoding: {exc}",
                                         param=param) from None
            return self._compiled

    def grammars(self, grammar: str, count: int, param: str = "response_format",
                 opening: Opening = None) -> list[AnswerGrammar]:
        """Fresh grammars for a request's answers (compiled once, copied), starting where the
        prompt leaves the answer (`opening`); a grammar llguidance refuses is the client's error,
        named by `param` (the request field the grammar came from)."""
        if self._reasoning is not None and self._thinking is None:
            lacks = ("no special tokens for <|channel|> and <|message|>" if self._reasoning == "openai_gptoss" else
                     f"no single ordinary token for {START} and {END}")
            raise InvalidRequest(
                f"This model's answers are read for thinking (reasoning_parser {self._reasoning}), but its tokenizer "
                f"has {lacks}, so where the thinking ends, and the JSON starts, cannot be told: it cannot take "
                "response_format json_object or json_schema, a forced tool_choice or structured_outputs.", param=param)
        matcher = llguidance.LLMatcher(self.prepare(param), grammar, log_level=0)
        if not matcher.is_error():  # the first token's mask: a schema no value can match fails it
            matcher.compute_bitmask()
        if matcher.is_error():
            what = "schema" if is_schema(param) else "grammar"
            raise InvalidRequest(f"The {what} cannot be used: {_matcher_error(matcher)}", param=param)
        matchers = [matcher] + [matcher.deep_copy() for _ in range(count - 1)]
        return [AnswerGrammar(each, self._thinking, opening, param) for each in matchers]

    def thinking(self, opening: Opening = None) -> Thinking | None:
        """A tracker of one answer's thinking (None where the model does not think, or its
        tokenizer cannot tell where the thinking ends token by token)."""
        return None if self._thinking is None else Thinking(self._thinking, opening)

