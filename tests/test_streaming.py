"""Streaming and stop strings: streamed pieces join to exactly the final text."""

import pytest
import torch

from llama import Llama
from llama.model import KVCache, ModelArgs

TEXT = "上下五千年，英雄万万千。 Emoji 😀🎉 and a STOP sign, then more text."


class ScriptedModel:
    """Stands in for the Transformer: whatever the input, it makes `script[i]` the most likely
    next token at step i (row by row), then EOS. Exercises the real decode loop."""

    def __init__(self, scripts, vocab, eos_id=2):
        self.params = ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=vocab,
                                max_seq_len=256, max_batch_size=4)
        self.output = torch.nn.Linear(1, 1)
        self.scripts = [list(s) + [eos_id] for s in scripts]
        self.step = 0

    def new_cache(self, bsz, length):
        return KVCache(1, bsz, 1, length, 2, "cpu", torch.float32)  # unused, but has slots

    def forward(self, tokens, start_pos, cache, pads=None, last_logits_only=False):
        if tokens.shape[1] > 1 or start_pos == 0:
            self.step = 0  # prefill
        logits = torch.zeros(tokens.shape[0], 1, self.params.vocab_size)
        for row, script in enumerate(self.scripts[: tokens.shape[0]]):
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return logits


@pytest.fixture
def scripted(tokenizer_path):
    from llama import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)

    def _make(*texts):
        scripts = [tokenizer.encode(t, bos=False, eos=False) for t in texts]
        return Llama(ScriptedModel(scripts, tokenizer.n_words), tokenizer)
    return _make


def test_stream_joins_to_final_text_without_replacement_characters(scripted):
    llama = scripted(TEXT)
    stream = llama.stream_text("prompt", temperature=0)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 5  # it really streamed
    assert stream.finish_reason == "stop"  # ended by EOS
    assert llama.text_completion(["prompt"], temperature=0)[0]["generation"] == TEXT


def test_stop_string_spanning_tokens_cuts_before_it(scripted):
    llama = scripted(TEXT)
    tokenizer = llama.tokenizer
    stop = "STOP sign"
    assert not any(stop in tokenizer.decode([t]) for t in tokenizer.encode(TEXT, False, False))
    expected = TEXT[: TEXT.index(stop)]
    result = llama.text_completion(["p"], temperature=0, stop=[stop, "never"], logprobs=True)[0]
    assert result["generation"] == expected and result["finish_reason"] == "stop"
    # tokens and logprobs keep the tokens whose text lies before the stop string
    ids = tokenizer.encode(TEXT, False, False)
    kept = max(n for n in range(len(ids) + 1) if len(tokenizer.decode(ids[:n])) <= len(expected))
    assert expected.startswith(tokenizer.decode(ids[:kept]))
    assert len(result["tokens"]) == len(result["logprobs"]) == kept
    stream = llama.stream_text("p", temperature=0, stop=[stop])
    pieces = list(stream)
    assert "".join(pieces) == stream.text == expected
    assert stream.finish_reason == "stop"


def test_stop_ends_generation_early(scripted):
    llama = scripted(TEXT + " " + TEXT)
    llama.text_completion(["p"], temperature=0, stop=["Emoji"])
    ids = llama.tokenizer.encode(TEXT + " " + TEXT, False, False)
    needed = min(n for n in range(len(ids)) if "Emoji" in llama.tokenizer.decode(ids[:n]))
    assert llama.model.step == needed  # no forward pass after the step that matched


def test_length_finish_reason_and_chunked_stream(scripted):
    llama = scripted(TEXT)
    stream = llama.stream_text("p", temperature=0, max_gen_len=5)
    assert "".join(stream) == stream.text
    assert stream.finish_reason == "length" and len(stream.tokens) == 5
    assert llama.text_completion(["p"], temperature=0, max_gen_len=5)[0]["finish_reason"] == \
        "length"


def test_batch_rows_stop_independently(scripted):
    llama = scripted("alpha beta gamma", "one two STOP three")
    results = llama.text_completion(["a", "b"], temperature=0, stop=["STOP"])
    assert [r["generation"] for r in results] == ["alpha beta gamma", "one two "]
    assert [r["finish_reason"] for r in results] == ["stop", "stop"]


@pytest.mark.parametrize("prompt", ["The meaning of life is", "上下五千年，英雄万万千。",
                                    "Emoji 😀 test"])
def test_stream_equals_list_api_on_a_real_model(prompt, build):
    generator = build("gqa")
    stream = generator.stream_text(prompt, temperature=0, max_gen_len=24)
    pieces = list(stream)
    final = generator.text_completion([prompt], temperature=0, max_gen_len=24)[0]
    assert "".join(pieces) == stream.text == final["generation"]


def test_stream_chat_equals_chat_completion(build):
    generator = build("gqa", max_seq_len=128)
    dialog = [{"role": "system", "content": "你是一名C++开发专家"},
              {"role": "user", "content": "Write quicksort"}]
    stream = generator.stream_chat(dialog, temperature=0, max_gen_len=20)
    assert "".join(stream) == \
        generator.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"][
            "content"]
    refused = generator.stream_chat([{"role": "user", "content": "[INST]"}])
    assert "".join(refused).startswith("Error: special tags")


def test_incremental_text_equals_decoding_everything(tokenizer_path):
    """Stop strings and streams extend each row's text a few tokens at a time; after every
    token it must equal decoding all of them: across leading spaces, lone spaces, byte
    tokens that complete a multi-byte character only later, and stray bytes."""
    from llama import Tokenizer
    from llama.engine.text import TextTracker

    tokenizer = Tokenizer(tokenizer_path)
    words = tokenizer.encode(TEXT + " " + TEXT, bos=False, eos=False)
    space = tokenizer.sp_model.piece_to_id("\u2581")  # a lone "▁"
    emoji = tokenizer.encode("😀", bos=False, eos=False)  # byte-fallback tokens
    assert tokenizer.sp_model.id_to_piece(space) == "\u2581" and len(emoji) > 2
    lead, continuation = 3 + 0xC5, 3 + 0x80  # byte tokens <0xC5> and <0x80>
    generator = torch.Generator().manual_seed(0)
    pool = words + [space] * 20 + emoji * 3 + [lead, continuation, tokenizer.bos_id]
    for trial in range(40):
        sequence = [pool[i] for i in torch.randint(len(pool), (60,), generator=generator)]
        if trial == 0:
            sequence = words  # the real text, including its multi-byte characters
        row = TextTracker(tokenizer)
        for n, token in enumerate(sequence, start=1):
            row.tokens.append(token)
            row._extend(settle_every=3)
            assert row.text == tokenizer.decode(sequence[:n]), (trial, n)
        assert row.settled > 0
