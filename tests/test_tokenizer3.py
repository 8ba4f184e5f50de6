"""The Llama 3 tokenizer against Meta's (llama-models) on the same tokenizer.model, and the
loader that tells a Llama 3 tokenizer.model from a Llama 2 one."""

import pytest

from llama import Llama3Tokenizer, Tokenizer, load_tokenizer
from llama.engine.text import TextTracker
from llama.engine.validation import ArgumentError
from llama.tokenizers import stop_tokens
from tests.llama3_reference import meta_package, meta_tokenizer, meta_tokenizer_path

TEXTS = [
    "",
    "The meaning of life is",
    "Hello, world! I'm sure you'll like it; they've said we'd go. DON'T SHOUT.",
    "上下五千年，英雄万万千。",
    "你是一名C++开发专家。用C++写一个快速排序",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n\tpivot = xs[0]  # 1st\r\n",
    "Emoji 😀🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and skin 👍🏽.",
    "   leading spaces, trailing spaces   ",
    "runs:  two   three\n\n\nnewlines\t\ttabs \n \n mixed\r\n\r\nCRLF",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F",
    "Ünïcödé naïve café — “quotes” … ½ ∑ ∫ Ωμέγα Привет مرحبا नमस्ते",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|eom_id|> <|end_of_text|> <|reserved_special_token_3|> <|python_tag|> <|image|>",
    "[INST] <<SYS>>\nLlama 2 markup\n<</SYS>>\n\n [/INST]",
    "a" * 30_000 + " " * 26_000 + "b",  # runs longer than the 25,000 characters Meta cuts at
]


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer()


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(meta_tokenizer_path())


def test_the_loader_picks_the_family_from_the_file(ours, tokenizer_path):
    assert isinstance(ours, Llama3Tokenizer) and ours.family == "llama3"
    llama2 = load_tokenizer(tokenizer_path)
    assert isinstance(llama2, Tokenizer) and llama2.family == "llama2"
    assert stop_tokens(llama2) == [llama2.eos_id] == [2]


def test_ids_and_special_tokens_are_meta_s(ours, meta):
    assert ours.n_words == meta.n_words == 128256
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id)
    assert (ours.eot_id, ours.eom_id) == (meta.eot_id, meta.eom_id) == (128009, 128008)
    assert ours.special_tokens == meta.special_tokens and len(ours.special_tokens) == 256
    assert sorted(stop_tokens(ours)) == sorted(meta.stop_tokens) == [128001, 128008, 128009]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("bos, eos", [(True, False), (False, False), (True, True)])
def test_encode_is_meta_s_token_for_token(ours, meta, text, bos, eos):
    assert ours.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_round_trips_and_is_meta_s(ours, meta, text):
    tokens = ours.encode(text, bos=False, eos=False)
    assert ours.decode(tokens) == text == meta.decode(tokens)
    # token by token too: a piece of a character decodes as Meta's does (U+FFFD)
    assert [ours.decode([t]) for t in tokens] == [meta.decode([t]) for t in tokens]
    assert [ours.decode(t) for t in tokens] == [ours.decode([t]) for t in tokens]  # as SP's
    # each token's bytes, as the server reports them, make up the text's
    assert b"".join(bytes(ours.token_text(t)[1]) for t in tokens) == text.encode("utf-8")


def test_special_token_text_is_plain_text_but_special_ids_decode_to_their_names(ours):
    assert ours.eot_id not in ours.encode("<|eot_id|>", bos=False, eos=False)
    assert ours.decode([ours.bos_id, ours.eot_id]) == "<|begin_of_text|><|eot_id|>"


def test_streamed_text_equals_the_decoded_text(ours):
    """TextTracker's incremental decoding (stream pieces, stop strings) with byte-level
    tokens that split characters."""
    text = "上下五千年，英雄万万千。 Emoji 😀🎉👨‍👩‍👧‍👦 and a STOP sign, then 更多的文字 " * 3
    tokens = ours.encode(text, bos=False, eos=False)
    tracker, pieces = TextTracker(ours), []
    for token in tokens:
        tracker.add(token)
        pieces.append(tracker.piece())
    pieces.append(tracker.rest())
    assert "".join(pieces) == tracker.text == text
    assert not any("\ufffd" in piece for piece in pieces)
    stopped = TextTracker(ours, ["STOP"])
    for token in tokens:
        if stopped.add(token):
            break
    assert stopped.text == text[: text.index("STOP")]
    assert ours.decode(stopped.tokens_before_stop()) == text[: text.index("STOP")].rstrip(" ")


def test_other_tiktoken_files_are_refused_by_name(tmp_path):
    llama4 = meta_package().__file__.replace("__init__.py", "llama4/tokenizer.model")
    with pytest.raises(ArgumentError, match="tiktoken BPE file of 200000 tokens, not Llama 3's"):
        load_tokenizer(llama4)
    damaged = tmp_path / "tokenizer.model"
    damaged.write_bytes(b"IQ== 0\nIg== 1\nnot base64! 2\n")
    with pytest.raises(ArgumentError, match="line 3 is not '<base64 token> <rank>'"):
        load_tokenizer(str(damaged))
    neither = tmp_path / "neither.model"
    neither.write_bytes(b"\x00\x01binary")
    with pytest.raises(ArgumentError, match="neither a SentencePiece model"):
        load_tokenizer(str(neither))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_tokenizer(str(tmp_path / "missing.model"))


def test_a_long_text_fed_in_pieces_is_meta_s(ours, meta):
    """Python's documentation: 465,126 characters, encoded in pieces of 400,000 as Meta does."""
    from llama.checkpoints.fixtures import python_docs_text

    text = python_docs_text()
    assert len(text) > 400_000
    tokens = ours.encode(text, bos=True, eos=True)
    assert tokens == meta.encode(text, bos=True, eos=True)
    assert ours.decode(tokens[1:-1]) == text
