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
matcher refuses becomes a 400 naming `response_format`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import llguidance

from serve_app.errors import InvalidRequest

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


class GrammarCompiler:
    """A model's tokenizer as llguidance reads it, made once per replica on first use (about
    a second for a 150k vocabulary), and a matcher per answer row from a job's grammar."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocabulary: int, eos_ids: set[int]) -> None:
        self._tokenizer, self._vocabulary, self._eos_ids = tokenizer, vocabulary, eos_ids
        self._compiled: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # prepared on the event loop or, for a long request, a thread

    @property
    def ready(self) -> bool:
        return self._compiled is not None

    def prepare(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._compiled is None:
                import llguidance.hf

                if not getattr(self._tokenizer, "is_fast", False):
                    raise InvalidRequest("This model's tokenizer is a slow (Python) one, which constrained decoding "
                                         "cannot read; response_format needs a fast tokenizer.",
                                         param="response_format")
                import llguidance.torch  # noqa: F401 - its first import takes a second: here, not on the decode thread

                try:
                    self._compiled = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocabulary,
                                                                  eos_token=sorted(self._eos_ids))
                except ValueError as exc:  # a tokenizer larger than the model's head, no end-of-sequence id
                    raise InvalidRequest(f"This model's tokenizer cannot be read for constrained decoding: {exc}",
                                         param="response_format") from None
            return self._compiled

    def matchers(self, grammar: str, count: int) -> list[llguidance.LLMatcher]:
        """Fresh matchers for a request's answers (compiled once, copied); a grammar llguidance
        refuses is the client's error."""
        matcher = llguidance.LLMatcher(self.prepare(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"The schema cannot be used: {matcher.get_error()}", param="response_format")
        return [matcher] + [matcher.deep_copy() for _ in range(count - 1)]

