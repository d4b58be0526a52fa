"""TokenBytes: the raw bytes of each token, for logprobs ``bytes`` (no Ray: tokenizers, trained
here or the tiny default model's)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from serve_app.token_bytes import TokenBytes, bytes_to_unicode

TEXTS = ["héllo € 你好 🙂 plain", "plain ascii text", "naïve café — 日本語 👍🏽 end", "é"]
REPLACEMENT = "\ufffd".encode()
TRAIN = ["hello world, the quick brown fox", "plain text with a café in it", "hello hello plain"]


def joined(tb: TokenBytes, tok, text: str) -> bytes:
    return b"".join(tb(i) for i in tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tiny_llama(models_dir: Path):
    return AutoTokenizer.from_pretrained(models_dir / "tiny-llama")


def sentencepiece_like(*, strip: bool) -> PreTrainedTokenizerFast:
    """A Llama-2 / Mistral (strip=True) or Gemma (strip=False) style tokenizer: BPE over '▁'-marked
    text with <0xNN> byte fallback. Trained on mostly-ASCII text, so é is one token while €, CJK and
    emoji fall back to bytes."""
    normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")] if strip else [normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if strip else steps)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|eot_id|>"])


def byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3 style byte-level BPE with a special token, hand-built (no model files)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TRAIN, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|eot_id|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eot_id|>")


def test_bytes_to_unicode_is_a_bijection_over_bytes():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("a")] == "a"


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_llama_is_byte_level_and_bytes_rebuild_the_text(tiny_llama, text):
    tb = TokenBytes(tiny_llama)
    assert tb.family == "byte_level"
    assert joined(tb, tiny_llama, text) == text.encode("utf-8")


def test_tiny_llama_partial_character_gives_its_real_byte(tiny_llama):
    tb = TokenBytes(tiny_llama)
    ids = tiny_llama("€", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the test needs € split over several tokens"
    assert tiny_llama.decode([ids[0]]) == "\ufffd"  # what `token` keeps showing
    assert tb(ids[0]) == b"\xe2" and REPLACEMENT not in tb(ids[0])
    assert b"".join(tb(i) for i in ids) == "€".encode()


def test_tiny_llama_special_tokens_give_their_text(tiny_llama):
    tb = TokenBytes(tiny_llama)
    for name in ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]:
        assert tb(tiny_llama.convert_tokens_to_ids(name)) == name.encode()
    # Including inside a real encoding, e.g. the prompt's leading <s>.
    ids = tiny_llama("hi")["input_ids"]
    assert tb(ids[0]) == b"<s>"


@pytest.mark.parametrize("text", TEXTS)
def test_hand_built_byte_level(text):
    tok = byte_level()
    tb = TokenBytes(tok)
    assert tb.family == "byte_level"
    assert joined(tb, tok, text) == text.encode()
    assert tb(tok.convert_tokens_to_ids("<|eot_id|>")) == b"<|eot_id|>"


@pytest.mark.parametrize("strip", [True, False], ids=["llama2-strip", "gemma-no-strip"])
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_rebuilds_text(text, strip):
    tok = sentencepiece_like(strip=strip)
    tb = TokenBytes(tok)
    assert tb.family == "sentencepiece"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Documented rule: each token keeps its own '▁' space, so the text-start space the Llama-2
    # decoder strips (after its Prepend('▁') normalizer) is present in the joined bytes.
    expected = (" " + text if strip else text).encode()
    assert b"".join(tb(i) for i in ids) == expected
    assert tok.decode(ids) == text  # sanity: the decoder itself round-trips


def test_sentencepiece_byte_tokens_and_spaces():
    tok = sentencepiece_like(strip=True)
    tb = TokenBytes(tok)
    ids = tok("€", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert [tb(i) for i in ids[-3:]] == [b"\xe2", b"\x82", b"\xac"]
    assert tok.decode([ids[-3]]) == "\ufffd" and REPLACEMENT not in tb(ids[-3])
    assert tb(tok.convert_tokens_to_ids("<0x41>")) == b"A"
    ids = tok("hello plain", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁hello")  # the learned word, with its '▁'
    assert tb(ids[0]).startswith(b" hello")
    for piece, i in tok.get_vocab().items():  # every ordinary piece: '▁' -> ' ', as UTF-8
        if not piece.startswith("<"):
            assert tb(i) == piece.replace("▁", " ").encode()
    assert tb(tok.convert_tokens_to_ids("é")) == "é".encode()  # a whole-character vocabulary entry


def test_sentencepiece_tokens_as_logprobs_show_them_keep_their_space():
    """`token` is the entry's bytes as text: a word keeps the space `decode([id])` strips, so the
    tokens of a text joined are that text (after the one space the decoder drops at its start)."""
    tok = sentencepiece_like(strip=True)
    tb = TokenBytes(tok)
    ids = tok("hello plain €", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]) == "▁hello▁" and tok.decode([ids[0]]) == "hello "  # stripped alone
    assert tb.text(ids[0]) == " hello " and all(tb.text(i).encode() == tb(i) for i in ids[:-3])
    assert "".join(tb.text(i) for i in ids[:-3]) == " hello plain "
    assert [tb.text(i) for i in ids[-3:]] == ["\ufffd"] * 3  # the euro sign's three bytes: part of a character each


def test_sentencepiece_special_tokens_give_their_text():
    tok = sentencepiece_like(strip=True)
    tb = TokenBytes(tok)
    for name in ["<s>", "</s>", "<unk>", "<|eot_id|>"]:
        assert tb(tok.convert_tokens_to_ids(name)) == name.encode()


def test_metaspace_decoder_is_sentencepiece():
    vocab = {"<unk>": 0, "▁hi": 1, "▁there": 2, "!": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tb = TokenBytes(tok)
    assert tb.family == "sentencepiece"
    assert [tb(i) for i in (1, 2)] == [b" hi", b" there"]


def test_unknown_decoder_falls_back_to_decode():
    vocab = {"[UNK]": 0, "[SEP]": 1, "hello": 2, "##s": 3}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]")
    tb = TokenBytes(tok)
    assert tb.family == "fallback"
    assert tb(3) == tok.decode([3]).encode() and tb(1) == b"[SEP]"


def test_ids_beyond_the_vocabulary_do_not_raise(tiny_llama):
    tb = TokenBytes(tiny_llama)
    assert isinstance(tb(len(tiny_llama) + 1000), bytes)


def test_results_are_cached(tiny_llama):
    tb = TokenBytes(tiny_llama)
    first = tb(100)
    assert tb(100) is first and 100 in tb._cache
