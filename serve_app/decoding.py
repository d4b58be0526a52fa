"""Turning one choice's tokens into text: incremental detokenization, stop strings,
`max_tokens`, end of sequence, and logprob entries.

Each row of the decode batch (`chat_engine`) has its own `ChoiceDecoder`. The
work per token does not grow with the answer's length: text is decoded
incrementally, stop strings are searched only in text not yet sent, and the text
held back (a possible start of a stop string, half a character) is as short as
it can be.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream  # incremental decoding in the fast tokenizers' own library

from serve_app.jobs import ChatChoiceResult, TokenAlternative, TokenLogprob
from serve_app.token_bytes import TokenBytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from serve_app.structured_output import Thinking


class IncrementalText:
    """A choice's text, decoded as its tokens arrive, at a cost that does not grow with its length.

    Decoding all tokens again at every step costs O(length) per token: about
    0.25 ms per row per step at 1,000 tokens here, so 8 ms a step for a batch
    of 32, the order of a GPU forward pass. Fast tokenizers decode through
    `tokenizers`' `DecodeStream` instead (a few tokens of context; the bytes of
    an unfinished UTF-8 character wait for the rest), the approach of vLLM's
    detokenizer. Slow (Python) tokenizers decode in full each time (see `_decode_all`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.text = ""
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens) if self._backend else None
        self._context = ""  # text of tokens a restarted stream was given as context, not yet cut off
        self._held: list[int] = []  # the last tokens, whose text the stream holds back (part of a character)

    def add(self, token: int) -> str:
        """Append a token; returns the whole text so far."""
        self.tokens.append(token)
        if self._stream is None:
            self.text = self._decode_all()
            return self.text
        text = self._step(token)
        self._held = self._held + [token] if text is None else []
        self.text += text or ""
        return self.text

    def _decode_all(self) -> str:
        """All tokens again, without `clean_up_tokenization_spaces`: that clean-up joins a space
        to the punctuation after it ("a " then "a ." becomes "a."), so a later token would
        rewrite text already sent, and the streamed deltas would miss text the final answer has.
        Without it, text already decoded stays as it was, as with the fast tokenizers' stream
        (which never cleans up either)."""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _step(self, token: int) -> str | None:
        try:
            return self._cut_context(self._stream.step(self._backend, token))
        except Exception:  # noqa: BLE001 - retried below; a real problem raises again there
            # Byte-fallback decoders (Llama 2, Mistral) can turn a finished character back into
            # U+FFFD once a later byte makes its run invalid, which breaks the stream's prefix
            # check. Restart the stream, as vLLM does; what was sent stays. The stream is fed
            # again the tokens it held back (never sent: their bytes come out as U+FFFD, as a
            # full decode gives them) and this one. The last token whose text was sent is its
            # context (not sent again), so that a SentencePiece decoder does not strip this
            # word's leading space as the start of a text; without it if even that fails.
            unsent = [*self._held, token]
            sent_before = self.tokens[-1 - len(unsent):-len(unsent)]
            for context in ([sent_before] if sent_before else []) + [[]]:
                try:
                    return self._restart(context, unsent)
                except Exception:  # noqa: BLE001 - an older tokenizers, or that token is in the bad run
                    pass
            self._stream, self._context = DecodeStream(skip_special_tokens=self.skip_special_tokens), ""
            return self._stream.step(self._backend, token)

    def _restart(self, context: list[int], tokens: list[int]) -> str | None:
        """A new stream that has seen `context`, fed `tokens`; their text (None: all held back).
        A context that decodes to clean text is counted as read; one that ends inside a character
        (U+FFFD, the usual case here: the bytes of the run that went bad) comes out again at the
        start of the next text, and is cut off there (see `_cut_context`)."""
        stream = DecodeStream(ids=context, skip_special_tokens=self.skip_special_tokens)
        text = self._backend.decode(context, skip_special_tokens=self.skip_special_tokens) if context else ""
        cut = text if text.endswith("\ufffd") else ""
        pieces = [stream.step(self._backend, token) for token in tokens]  # raises before any state changes
        self._stream, self._context = stream, cut
        made = [self._cut_context(piece) for piece in pieces if piece is not None]
        return "".join(made) if made else None

    def _cut_context(self, text: str | None) -> str | None:
        if text is None or not self._context:
            return text
        context, self._context = self._context, ""
        return text[len(context):] if text.startswith(context) else text

    def complete(self) -> str:
        """The final text, as a full decode gives it: bytes of a character the output
        ended inside come out as U+FFFD instead of waiting for more. Where a byte run that went
        bad makes the full decode contradict text already sent, that text stays, and the bytes
        held back at the end come out as their own decode gives them (U+FFFD)."""
        if self._stream is not None and self.tokens:
            full = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
            if full.startswith(self.text):  # never contradict what was already sent
                self.text = full
            elif self._held:
                self.text += self._backend.decode(self._held, skip_special_tokens=self.skip_special_tokens)
            self._held = []
        return self.text


PositionLogprobs = tuple[float, list[tuple[int, float]]]
"""At one position: the chosen token's log-probability, and (token id, log-probability) of the
most likely tokens, best first."""


class ChoiceDecoder:
    """Turns one choice's tokens into text deltas, and decides truthfully why it ended.

    Text that may still become a stop string, or half a UTF-8 character, is
    held back until it is known to be safe to send.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int], stop: list[str], max_tokens: int,
                 top_logprobs: int | None = None, token_bytes: TokenBytes | None = None,
                 skip_special_tokens: bool = True, min_tokens: int = 0, thinking: Thinking | None = None) -> None:
        self.tokenizer, self.eos_ids, self.stop, self.max_tokens = tokenizer, eos_ids, stop, max_tokens
        self.thinking = thinking  # counts a reasoning model's thinking tokens (usage's reasoning_tokens)
        self.min_tokens = min_tokens  # stop strings count only after this many tokens, as in vLLM
        self._stop_floor = 0  # a stop string must end past this much text: that of the first min_tokens tokens
        self.top_logprobs = top_logprobs  # None: no logprobs asked for
        self.token_bytes = token_bytes  # a token's own bytes (part of a character, maybe) for logprobs
        self.decoded = IncrementalText(tokenizer, skip_special_tokens)
        self.text = ""
        self.sent = 0
        self.used = 0
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.logprob_starts: list[int] = []  # where each entry's token begins in `text`
        self.logprobs_sent = 0

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None

    def feed(self, token: int, logprobs: PositionLogprobs | None = None) -> str:
        """Add one token (with the model's log-probabilities at its position, when asked for);
        returns the text that may be sent now."""
        if self.finish_reason is not None:
            return ""
        self.used += 1
        if token in self.eos_ids:
            return self._finish("stop")
        if self.thinking is not None:
            self.thinking.follow(token)
        if logprobs is not None and self.wants_logprobs:
            self.logprobs.append(self._token_logprob(token, logprobs))
            self.logprob_starts.append(len(self.text))
        self.text = self.decoded.add(token)
        if self.used <= self.min_tokens:
            cut, self._stop_floor = None, len(self.text)
        else:
            cut = self._stop_at()
        if cut is not None:
            return self._finish("stop", cut)
        if self.used >= self.max_tokens:
            return self._finish("length")
        safe = len(self.text) - self._unsafe_tail()
        delta, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return delta

    def end(self) -> str:
        """End the choice now, as its grammar is complete (`structured_output`): what was held
        back goes out; a stop string in it still cuts it. Completed by the last token max_tokens
        allows, the answer is whole: it ended as `stop`, not `length`."""
        if self.finish_reason == "length":
            self.finish_reason = "stop"
        return self._finish("stop") if self.finish_reason is None else ""

    @property
    def reasoning_tokens(self) -> int:
        return 0 if self.thinking is None else self.thinking.tokens

    def result(self) -> ChatChoiceResult:
        return ChatChoiceResult(text=self.text, finish_reason=self.finish_reason or "stop",
                                completion_tokens=self.used, reasoning_tokens=self.reasoning_tokens,
                                logprobs=self.logprobs if self.wants_logprobs else None)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """Entries not yet sent (None when not asked for), travelling with the next delta: those
        whose token's text has begun to be sent, all once the choice has ended. A token held back
        (it may begin a stop string) keeps its entry back too: cut off, its entry never goes."""
        if not self.wants_logprobs:
            return None
        ready = len(self.logprobs) if self.finish_reason is not None else \
            bisect.bisect_left(self.logprob_starts, self.sent)
        new, self.logprobs_sent = self.logprobs[self.logprobs_sent:ready], max(self.logprobs_sent, ready)
        return new

    def _alternative(self, token: int, logprob: float) -> TokenAlternative:
        if self.token_bytes is None:
            text = self.tokenizer.decode([token])
            return TokenAlternative(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
        # The text has U+FFFD for part of a character; `bytes` has the real ones.
        return TokenAlternative(token=self.token_bytes.text(token), logprob=logprob, bytes=list(self.token_bytes(token)))

    def _token_logprob(self, token: int, logprobs: PositionLogprobs) -> TokenLogprob:
        chosen_logprob, ranked = logprobs
        chosen = self._alternative(token, chosen_logprob)
        top = [self._alternative(i, v) for i, v in ranked[:self.top_logprobs or 0]]
        return TokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes, top=top)

    def _stop_at(self) -> int | None:
        """Where the first stop string starts, if the text now holds one.

        Only the unsent tail is searched (plus a stop string's length before
        it): the sent text never changes and was searched when it was new. Under
        `min_tokens` only a stop string that ends after the first min_tokens tokens'
        text counts (it may begin in it), as vLLM checks them.
        """
        start = max(self.sent, self._stop_floor)
        found = (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop)
        return min((i for i in found if i >= 0), default=None)

    def _finish(self, reason: str, stop_at: int | None = None) -> str:
        """End the choice; returns the text not sent yet (up to the stop string, if one ended it).

        Ending with no stop string found (EOS, `max_tokens`) completes the text: what the decode
        stream held back for the rest of a character comes out, and can hold a stop string the
        check never saw ("STOP" in a byte-level token "STOP\\xc3"). It is searched for there too,
        and ends the choice as any stop string does. `complete` only ever extends the text, so
        what was already sent still stands.
        """
        if stop_at is None:
            self.text = self.decoded.complete()
            stop_at = self._stop_at()
        if stop_at is not None:
            reason, self.text = "stop", self.text[:stop_at]
            # The stop string's tokens leave with their text: a token that begins at the cut or past it.
            kept = max(bisect.bisect_left(self.logprob_starts, stop_at), self.logprobs_sent)
            del self.logprobs[kept:], self.logprob_starts[kept:]
        self.finish_reason = reason
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def _unsafe_tail(self) -> int:
        """How many trailing characters must wait: a possible start of a stop string,
        or replacement characters a later token may still turn into a real character."""
        decided = self.text.rstrip("\ufffd")
        return len(self.text) - len(decided) + max((_stop_prefix_at_end(decided, s) for s in self.stop), default=0)


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with (0 if none).

    Only places where `stop`'s first character occurs in the last len(stop) - 1
    characters can start one, so ordinary text costs a `find` or two per step. Text
    that repeats `stop`'s first character all along its tail costs one comparison per
    repeat; stop strings are at most `MAX_STOP_CHARS` long, which bounds that.
    """
    start = text.find(stop[0], max(0, len(text) - len(stop) + 1))
    while start != -1:
        if stop.startswith(text[start:]):
            return len(text) - start
        start = text.find(stop[0], start + 1)
    return 0
