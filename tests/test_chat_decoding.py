"""Token-to-text decoding of a chat choice, on the real tiny tokenizer (no Ray needed).

The decoder turns tokens into text incrementally (a cost per token that does not
grow with the answer's length); these tests pin that what it sends, and the final
text, are exactly what decoding all the tokens at once gives, and that stop strings
split across tokens are still caught and never leak.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from serve_app.decoding import ChoiceDecoder

TEXTS = [
    "Hello, world! Ça va? 日本語のテキスト 🙂 emoji and more 🦦🦦 otters.",
    "def f(x):\n    return x + 1  # ünïcödé\n",
    "plain words here and there . , ! and then STOP and more words after it",
]


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-llama")
    assert tokenizer.is_fast  # the incremental path under test
    return tokenizer


def slow_twin(tokenizer) -> SimpleNamespace:
    """The same tokenizer's `decode` without a fast backend: the decoder's full-decode fallback."""
    return SimpleNamespace(decode=tokenizer.decode, is_fast=False)


def run(tokenizer, tokens: list[int], stop: list[str] = (), eos: set[int] = frozenset()) -> tuple[list[str], ChoiceDecoder]:
    decoder = ChoiceDecoder(tokenizer, set(eos), list(stop), max_tokens=len(tokens))
    deltas = [decoder.feed(token) for token in tokens]
    return deltas, decoder


def token_sequences(tokenizer) -> list[list[int]]:
    """Real text, and random ids (which split multi-byte characters and include special tokens)."""
    rng = random.Random(7)
    sequences = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(150)]
    return sequences


def test_sent_text_is_exactly_the_full_decode(tokenizer):
    mismatches = []
    for tokens in token_sequences(tokenizer):
        for decoding_with in (tokenizer, slow_twin(tokenizer)):
            deltas, decoder = run(decoding_with, tokens)
            full = tokenizer.decode(tokens, skip_special_tokens=True)
            if "".join(deltas) != full or decoder.result().text != full:
                mismatches.append((tokens, "".join(deltas), full))
            assert decoder.result().finish_reason == "length"
            assert decoder.result().completion_tokens == len(tokens)
    assert not mismatches, mismatches[:3]


def test_multibyte_characters_are_never_sent_in_halves(tokenizer):
    tokens = tokenizer.encode("🦦🙂日本", add_special_tokens=False)
    pieces = [tokenizer.decode([token]) for token in tokens]
    assert any("\ufffd" in piece for piece in pieces), "the test needs a character split across tokens"
    for decoding_with in (tokenizer, slow_twin(tokenizer)):
        deltas, _ = run(decoding_with, tokens)
        assert all("\ufffd" not in delta for delta in deltas), deltas
        assert "".join(deltas) == "🦦🙂日本"


@pytest.mark.parametrize("stop", [["STOP"], ["zzz", "P and"], ["there . ,"]])
def test_stop_string_across_tokens_ends_the_choice_without_leaking(tokenizer, stop):
    text = TEXTS[2]
    tokens = tokenizer.encode(text, add_special_tokens=False)
    expected = text[:min(text.find(s) for s in stop if s in text)]
    for decoding_with in (tokenizer, slow_twin(tokenizer)):
        deltas, decoder = run(decoding_with, tokens, stop)
        assert decoder.result().text == expected
        assert decoder.result().finish_reason == "stop"
        assert "".join(deltas) == expected
        assert decoder.result().completion_tokens < len(tokens)  # it stopped there, not at the end


@pytest.mark.parametrize("stop", [[". "], ["STOP"], ["P and"], ["there . ,"]])
def test_logprobs_leave_out_a_stop_strings_tokens_as_its_text_does(tokenizer, stop):
    """Streamed or not, a token held back (it may begin a stop string) keeps its entry back too,
    and the stop string's entries never go: the answer's logprob tokens joined are its text (and,
    where a token straddles the cut, the whole of that last token)."""
    from serve_app.token_bytes import TokenBytes

    text = "abc. def " + TEXTS[2]
    tokens = tokenizer.encode(text, add_special_tokens=False)
    decoder = ChoiceDecoder(tokenizer, set(), stop, max_tokens=len(tokens), top_logprobs=0,
                            token_bytes=TokenBytes(tokenizer))
    sent_text, sent_logprobs = "", []
    for token in tokens:
        sent_text += decoder.feed(token, (-1.0, []))
        sent_logprobs += decoder.take_logprobs()
        before_last = "".join(entry.token for entry in sent_logprobs[:-1])
        assert len(before_last) < len(sent_text) or not sent_logprobs  # no entry begins past the text sent
        if decoder.finish_reason is not None:
            break
    assert decoder.finish_reason == "stop" and sent_text == decoder.result().text == text[:text.find(stop[0])]
    joined = "".join(entry.token for entry in sent_logprobs)
    assert joined.startswith(sent_text) and len(joined) - len(sent_logprobs[-1].token) < len(sent_text)
    assert joined == sent_text or stop == ["there . ,"]  # that one begins inside the token " there"
    assert [entry.token for entry in decoder.result().logprobs] == [entry.token for entry in sent_logprobs]


def test_eos_ends_the_choice_and_is_not_text(tokenizer):
    tokens = tokenizer.encode("one two three", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    deltas, decoder = run(tokenizer, [*tokens, eos, *tokens], eos={eos})
    assert "".join(deltas) == decoder.result().text == "one two three"
    assert decoder.result().finish_reason == "stop"
    assert decoder.result().completion_tokens == len(tokens) + 1


def byte_fallback_tokenizer():
    """A Llama-2/Mistral-style tokenizer (SentencePiece pieces, byte fallback), built in memory."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "\u2581Hello", "\u2581the", "\u2581end", "ing"] + [f"<0x{b:02X}>" for b in range(256)]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                                   byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_fallback_run_that_turns_invalid_does_not_break_decoding():
    """A newline byte, then the start of an emoji that never completes: the decoder's byte run
    becomes invalid as a whole, which rewrites text already sent; decoding carries on."""
    tokenizer = byte_fallback_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(p) for p in ["\u2581Hello", "<0x0A>", "<0xF0>", "<0x9F>", "\u2581the",
                                                         "\u2581end"]]
    deltas, decoder = run(tokenizer, ids)
    text = decoder.result().text
    assert "".join(deltas) == text  # never contradicts what was sent
    assert text.startswith("Hello\n") and text.endswith(" the end"), text  # the word keeps its space


@pytest.mark.parametrize("pieces, text", [
    (["<0xC3>", "<0xA9>", "<0x83>", "ing"], "\u00e9\ufffding"),  # é, a stray byte, then a word
    (["<0xC3>", "<0xA9>", "<0xF2>"], "\u00e9\ufffd"),  # é, then a character that never ends
    (["<0x41>", "<0x83>", "ing"], "A\ufffding"),
])
def test_a_stray_byte_after_a_sent_character_comes_out_as_a_replacement_character(pieces, text):
    """A byte that makes its run invalid is never sent as text; after a restarted stream it
    used to be dropped for good (the stream cut it as context it had sent): the answer lost a
    character. It comes out as U+FFFD, streamed and final alike."""
    tokenizer = byte_fallback_tokenizer()
    deltas, decoder = run(tokenizer, [tokenizer.convert_tokens_to_ids(p) for p in pieces])
    assert ("".join(deltas), decoder.result().text) == (text, text)


def test_stop_string_after_an_unfinished_character_is_held_back(tokenizer):
    """The full-decode path ends in U+FFFD while a character is incomplete; a stop string's
    start just before it must still wait."""
    text = "Price: xa\u20ac and more"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for decoding_with in (tokenizer, slow_twin(tokenizer)):
        deltas, decoder = run(decoding_with, tokens, ["a\u20ac"])
        assert decoder.result().text == "".join(deltas) == "Price: x"


def byte_level_tokenizer():
    """A GPT-2-style byte-level tokenizer, built in memory. Its alphabet writes bytes 0xA1-0xFF
    (but 0xAD) as the same code point, so "STOP\u00c3" is the token of the bytes b"STOP\xc3":
    letters, then the first byte of "\u00e9" (0xC3 0xA9)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<eos>", "X", "STOP\u00c3", "\u00a9"]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.mark.parametrize("ending", ["eos", "max_tokens"])
def test_stop_string_in_text_held_back_for_an_unfinished_character_does_not_leak(ending):
    """The decode stream holds "STOP\xc3" back whole while the character is unfinished, so
    the stop check sees nothing; the choice then ends (EOS, or `max_tokens`) and the completed
    text shows "STOP". It must end the choice there, as a stop string, not leak."""
    tokenizer = byte_level_tokenizer()
    x, stop_and_lead_byte = tokenizer.convert_tokens_to_ids(["X", "STOP\u00c3"])
    tokens = [x, stop_and_lead_byte] + ([tokenizer.eos_token_id] if ending == "eos" else [])
    deltas, decoder = run(tokenizer, tokens, ["STOP"], eos={tokenizer.eos_token_id})
    assert decoder.result().text == "".join(deltas) == "X"
    assert decoder.result().finish_reason == "stop"
    # A stop string the completed text does not hold changes nothing: the half character comes out.
    deltas, decoder = run(tokenizer, tokens, ["STOPS"], eos={tokenizer.eos_token_id})
    assert decoder.result().text == "".join(deltas) == "XSTOP\ufffd"
    assert decoder.result().finish_reason == ("stop" if ending == "eos" else "length")


def slow_cleaning_tokenizer():
    """A real slow (Python) tokenizer, one character a token, that cleans up tokenization
    spaces: its full decode of "a", " ", "." is "a." (the space joined to the period)."""
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):
        pieces = ["<eos>", "a", " ", ".", "b"]

        def __init__(self, **kwargs):
            self.ids = {p: i for i, p in enumerate(self.pieces)}
            super().__init__(eos_token="<eos>", **kwargs)

        @property
        def vocab_size(self):
            return len(self.pieces)

        def get_vocab(self):
            return dict(self.ids)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.ids[token]

        def _convert_id_to_token(self, index):
            return self.pieces[index]

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

    tokenizer = CharTokenizer(clean_up_tokenization_spaces=True)
    assert not tokenizer.is_fast and tokenizer.decode(tokenizer.encode("a .", add_special_tokens=False)) == "a."
    return tokenizer


@pytest.mark.parametrize("text, ending", [("a .", "max_tokens"), ("a .", "eos"), ("a . b", "max_tokens")])
def test_slow_tokenizer_clean_up_does_not_rewrite_sent_text(text, ending):
    """Clean-up would turn the sent "a " into "a." one token later, so the stream would never
    send the period the final text has. Streamed and final text must agree: both uncleaned,
    as the fast tokenizers' stream gives them."""
    tokenizer = slow_cleaning_tokenizer()
    tokens = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if ending == "eos" else [])
    deltas, decoder = run(tokenizer, tokens, eos={tokenizer.eos_token_id})
    assert "".join(deltas) == decoder.result().text == text



def test_held_back_tail_is_the_longest_stop_prefix_the_text_ends_with():
    """What may still become a stop string: checked against every prefix length, on random text."""
    from serve_app.decoding import _stop_prefix_at_end

    rng = random.Random(3)
    for _ in range(5000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 9)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        brute = max((k for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), default=0)
        assert _stop_prefix_at_end(text, stop) == brute, (text, stop)



@pytest.mark.parametrize("text, stop, min_tokens", [
    ("Hello\n\nworld and more words here", "\n\n", 3), ("x### y ### z and then more", "###", 3),
    ("plain words here and there . , ! and then STOP and more words after it", "e", 4),
    ("plain words here and there . , ! and then STOP and more words after it", "STOP", 2)])
def test_min_tokens_counts_stop_strings_only_after_it_as_vllm(tokenizer, text, stop, min_tokens):
    """A stop string must end in the text after the first min_tokens tokens (it may begin
    inside it); what was streamed is always the start of the final text."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    decoder = ChoiceDecoder(tokenizer, set(), [stop], max_tokens=len(tokens), min_tokens=min_tokens)
    sent = "".join(decoder.feed(token) for token in tokens)
    floor = len(tokenizer.decode(tokens[:min_tokens]))
    at = text.find(stop, max(0, floor - len(stop) + 1))
    assert decoder.text == (text if at < 0 else text[:at]) and sent == decoder.text
    assert decoder.finish_reason == ("length" if at < 0 else "stop")


def test_coalesced_deltas_join_per_choice_and_leave_their_inputs_as_they_were():
    """A streamed message carries each choice's deltas since the last one as one: texts and
    logprobs joined in order, the finish_reason of the last that has one; the deltas merged
    (the engine's own) are not changed."""
    from serve_app.chat_engine import merge_deltas
    from serve_app.jobs import ChoiceDelta, TokenLogprob

    def token(text: str) -> TokenLogprob:
        return TokenLogprob(token=text, logprob=-1.0, bytes=list(text.encode()))

    first = ChoiceDelta(0, "Hel", None, [token("Hel")])
    deltas = [first, ChoiceDelta(1, "A", None, None), ChoiceDelta(0, "lo", None, [token("lo")]),
              ChoiceDelta(1, "B", "length", None), ChoiceDelta(0, "", "stop", [])]
    zero, one = merge_deltas(deltas)
    assert (zero.index, zero.text, zero.finish_reason, [t.token for t in zero.logprobs]) == (0, "Hello", "stop", ["Hel", "lo"])
    assert (one.index, one.text, one.finish_reason, one.logprobs) == (1, "AB", "length", None)
    assert [t.token for t in first.logprobs] == ["Hel"]
    assert merge_deltas([]) == []
