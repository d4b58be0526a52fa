"""The raw UTF-8 bytes each token contributes to the generated text, for OpenAI-style logprobs.

Why this exists
---------------
OpenAI's logprobs entries carry ``bytes`` next to ``token`` precisely because one token may be only
*part* of a character: "é", "€", CJK characters or emoji are often split over two to four tokens.
``tokenizer.decode([id])`` of such a token is U+FFFD, whose UTF-8 is ``EF BF BD`` -- useless for a
client that wants to join the ``bytes`` of consecutive tokens back into the real character.
:class:`TokenBytes` returns the token's real bytes instead, so that for generated ids ``a, b, ...``
``TokenBytes(a) + TokenBytes(b) + ...`` is the UTF-8 of the decoded text (see the space rule below).

``token`` vs ``bytes``
----------------------
An entry's ``token`` string is its bytes as text (:meth:`TokenBytes.text`): U+FFFD where they are
part of a character, since a string cannot hold half a character while the bytes can; clients that
care rebuild the text from ``bytes``. For whole characters the two agree, a SentencePiece word's
space included (``tokenizer.decode([id])`` would strip it: "world" for ``▁world``), so the tokens of
an answer joined are its text, as with OpenAI's byte-level tokens.

How the tokenizer family is found
---------------------------------
The *decoder* of the fast tokenizer's backend (``tokenizer.backend_tokenizer.decoder``, read as its
JSON) is what defines the text of a token sequence, so it is the source of truth; its steps
(a ``Sequence`` is flattened) are replayed on the single token string from the backend's vocabulary:

* ``byte_level`` -- a ``ByteLevel`` step (GPT-2, Llama-3, Qwen, ...): vocabulary strings are over the
  GPT-2 ``bytes_to_unicode`` alphabet; each character maps back to one byte. As in the Rust decoder,
  a token holding a character outside that alphabet is taken as its own UTF-8.
* ``sentencepiece`` -- ``ByteFallback`` / ``Metaspace`` / ``Replace("▁", " ")`` steps (Llama-2,
  Mistral, Gemma, ...): ``<0xNN>`` tokens are the raw byte ``NN`` (when a ``ByteFallback`` step is
  present); other tokens are their string with ``▁`` replaced by a space, as UTF-8.
* ``fallback`` -- no backend (slow tokenizer), no decoder, or any decoder step not listed here
  (``WordPiece``, ``CTC``, regex ``Replace``, ...): ``tokenizer.decode([id]).encode("utf-8")``,
  i.e. exactly today's behaviour, U+FFFD included.

Special tokens (``<|eot_id|>``, ``</s>``, ...) in every family are their text as UTF-8.
Ids the tokenizer does not know (models often pad the logits beyond the vocabulary, so top-k
alternatives may name them) give whatever ``decode`` gives, or ``b""`` if decode fails.

The leading-space rule (SentencePiece)
--------------------------------------
SentencePiece-style tokenizers mark a word start with ``▁`` and usually prepend one to the input, so
the first token of a text is e.g. ``▁Hello``. Their decoders drop that one space at the very start of
the decoded text (a ``Strip`` step after ``Fuse``, or ``Metaspace``'s ``prepend_scheme``). That is a
property of the *whole text*, not of a token, so it is deliberately **not** applied here: every token
gets its own bytes including its space (``▁Hello`` -> ``b" Hello"``), as OpenAI reports tokens like
``" world"`` and as vLLM (which decodes each token in context) does. Consequently the joined bytes of
an encoded text can be ``b" " + text.encode()`` for such tokenizers. A ``Strip`` *before* any
``Fuse`` does act on every single token in the Rust decoder, and is applied.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

__all__ = ["TokenBytes", "Family", "bytes_to_unicode"]

Family = Literal["byte_level", "sentencepiece", "fallback"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SUPPORTED_STEPS = frozenset({"ByteLevel", "ByteFallback", "Replace", "Metaspace", "Fuse", "Strip"})
# A token while the decoder steps run: text, or raw bytes once a byte step has turned it into bytes.
_Piece = Union[str, bytes]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE: dict[str, int] = {ch: b for b, ch in bytes_to_unicode().items()}


class TokenBytes:
    """``TokenBytes(tokenizer)(token_id) -> bytes``: the raw bytes a token contributes to the text.

    Results are cached per id (a plain dict: lookups are GIL-atomic, and a racing duplicate
    computation stores the same value). ``family`` says which rule applies (see the module doc).
    """

    family: Family

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}
        self._backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        self._steps: list[dict[str, Any]] = []
        self._special: dict[int, str] = self._special_tokens()
        self.family = self._detect()

    def __call__(self, token_id: int) -> bytes:
        token_id = int(token_id)
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text(self, token_id: int) -> str:
        """The token as logprobs show it: its bytes as text (U+FFFD for part of a character), so
        `token` and `bytes` agree and a SentencePiece word keeps its space (" world", as OpenAI
        shows it, where `decode([id])` strips it to "world"); cached: a step with
        `top_logprobs: 20` asks for 21 per row."""
        cached = self._texts.get(token_id)
        if cached is None:
            cached = self._texts[token_id] = self(token_id).decode("utf-8", "replace")
        return cached

    # -- detection -----------------------------------------------------------------------------

    def _detect(self) -> Family:
        decoder = self._decoder_json()
        if decoder is None:
            return "fallback"
        steps = _flatten(decoder)
        if not steps or not all(_supported(step) for step in steps):
            return "fallback"
        types = {step["type"] for step in steps}
        self._steps = steps
        if "ByteLevel" in types:
            return "byte_level"
        if types & {"ByteFallback", "Metaspace"} or any(
                step["type"] == "Replace" and step["pattern"]["String"] == "▁" for step in steps):
            return "sentencepiece"
        self._steps = []
        return "fallback"

    def _decoder_json(self) -> dict[str, Any] | None:
        """The backend decoder as JSON; the component alone if it pickles, else from the whole
        tokenizer JSON (which also serialises the vocabulary, so it is only the second choice)."""
        if self._backend is None:
            return None
        try:
            decoder = self._backend.decoder
            if decoder is None:
                return None
            state = decoder.__getstate__()
            return json.loads(state.decode() if isinstance(state, bytes) else state)
        except Exception:  # noqa: BLE001 - any failure here just means "try the full JSON"
            pass
        try:
            return json.loads(self._backend.to_str()).get("decoder")
        except Exception:  # noqa: BLE001 - unknown backend: use decode()
            return None

    def _special_tokens(self) -> dict[int, str]:
        """id -> text of the tokens flagged special (backend's added tokens, else transformers')."""
        try:
            added = (self._backend.get_added_tokens_decoder() if self._backend is not None
                     else self._tokenizer.added_tokens_decoder)
            return {int(i): tok.content for i, tok in added.items() if getattr(tok, "special", False)}
        except Exception:  # noqa: BLE001
            pass
        try:
            ids, names = self._tokenizer.all_special_ids, self._tokenizer.all_special_tokens
            return {int(i): str(name) for i, name in zip(ids, names)}
        except Exception:  # noqa: BLE001
            return {}

    # -- per token -----------------------------------------------------------------------------

    def _compute(self, token_id: int) -> bytes:
        special = self._special.get(token_id)
        if special is not None:
            return special.encode("utf-8")
        token = self._backend.id_to_token(token_id) if self._steps else None
        if token is None:  # fallback family, or an id beyond the vocabulary
            return self._decoded(token_id)
        piece: _Piece = token
        fused = False  # after Fuse the steps act on the whole text: a Strip there is the text-start rule
        for step in self._steps:
            kind = step["type"]
            if kind == "Fuse":
                fused = True
            elif isinstance(piece, bytes):
                continue  # raw bytes are final; text steps do not apply to them
            elif kind == "ByteLevel":
                piece = _byte_level(piece)
            elif kind == "ByteFallback":
                match = _BYTE_TOKEN.fullmatch(piece)
                if match:
                    piece = bytes([int(match.group(1), 16)])
            elif kind == "Replace":
                piece = piece.replace(step["pattern"]["String"], step["content"])
            elif kind == "Metaspace":  # its prepend_scheme strip is the text-start rule: not applied
                piece = piece.replace(step.get("replacement", "▁"), " ")
            elif kind == "Strip" and not fused:
                piece = _strip(piece, step.get("content", " "), int(step.get("start", 0)),
                               int(step.get("stop", 0)))
        return piece if isinstance(piece, bytes) else piece.encode("utf-8")

    def _decoded(self, token_id: int) -> bytes:
        try:
            return str(self._tokenizer.decode([token_id])).encode("utf-8")
        except Exception:  # noqa: BLE001 - e.g. an id beyond the vocabulary
            return b""


def _flatten(decoder: dict[str, Any]) -> list[dict[str, Any]]:
    if decoder.get("type") == "Sequence":
        return [step for inner in decoder.get("decoders", []) for step in _flatten(inner)]
    return [decoder]


def _supported(step: dict[str, Any]) -> bool:
    if step.get("type") not in _SUPPORTED_STEPS:
        return False
    if step["type"] == "Replace":  # only literal patterns; a regex would need the Rust regex dialect
        pattern = step.get("pattern")
        return isinstance(pattern, dict) and isinstance(pattern.get("String"), str) and "content" in step
    return True


def _byte_level(token: str) -> bytes:
    """As the Rust ByteLevel decoder: every char in the alphabet -> its byte, else the token's UTF-8."""
    try:
        return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
    except KeyError:
        return token.encode("utf-8")


def _strip(token: str, content: str, start: int, stop: int) -> str:
    """The Rust Strip decoder on one token: drop up to ``start``/``stop`` leading/trailing ``content``."""
    begin = 0
    while begin < min(start, len(token)) and token[begin] == content:
        begin += 1
    end = len(token)
    while len(token) - end < stop and end > begin and token[end - 1] == content:
        end -= 1
    return token[begin:end]
