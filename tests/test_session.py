"""Llama.chat_session: a conversation kept in the KV cache between turns gives chat_completion's
answers for the same dialogs, while prefilling only the new turns."""

import pytest
import torch

from llama.chat_format import UNSAFE_ERROR, dialog_to_tokens, truncate_dialog
from llama.engine.validation import ArgumentValueError
from llama.kernels import cpu_kernels

USER_TURNS = ["What is a class in Python?", "And a module?", "How do I import one?",
              "Give an example with a loop.", "Thanks. What about exceptions?"]


def _reference_answer(generator, dialog, **options):
    """chat_completion of the whole dialog: the answer without a cache kept across turns."""
    return generator.chat_completion([dialog], **options)[0]["generation"]["content"]


def _turn_tokens(encode, content):
    return encode(f"[INST] {content} [/INST]", bos=True, eos=False)


NATIVE = pytest.mark.skipif(not cpu_kernels.available(), reason="int8 activations take the "
                            "native kernels")


@pytest.mark.parametrize("kind,quantize,kv_cache_dtype,activations", [
    ("gqa", None, None, None), ("mha", None, None, None), ("gqa", "int8", None, None),
    pytest.param("gqa", "int4", None, None, marks=pytest.mark.skipif(
        not cpu_kernels.int4_every_product(), reason="a plain C++ build's int4 prefills take "
        "the dequantised bfloat16 product")),
    ("gqa", None, "bfloat16", None), ("gqa", "int8", "bfloat16", None),
    pytest.param("gqa", "int8", None, "int8", marks=NATIVE),
    pytest.param("gqa", "int4", None, "int8", marks=NATIVE)])
def test_session_answers_equal_the_whole_conversation_without_a_cache(build, kind, quantize,
                                                                      kv_cache_dtype,
                                                                      activations):
    """Default: the model's answers stay as generated. Each answer equals greedy generation
    over the whole conversation's tokens, prefilled at once in a fresh cache; each turn
    prefills only EOS and the new user turn (and the last answer token, never run). int8:
    its kernel's sums are exact, so a token prefilled (in a product of many rows) and the
    same token decoded (one row) give the same keys and values; int4: its group sums are, and
    its float sum over the groups is the same sequence for any number of rows; int8
    activations (int8 or int4 weights): each block's sum is exact and the float sum over
    blocks a fixed sequence. A
    bfloat16 cache: the prefill attends to the rounded keys and values the decode steps read."""
    generator = build(kind, max_seq_len=384, max_batch_size=2, quantize=quantize,
                      kv_cache_dtype=kv_cache_dtype, activations=activations)
    session = generator.chat_session(system="Answer briefly.", reply_room=16)
    encode, eos = generator.tokenizer.encode, generator.tokenizer.eos_id
    conversation = []
    for number, content in enumerate(USER_TURNS):
        shown = f"<<SYS>>\nAnswer briefly.\n<</SYS>>\n\n{content}" if number == 0 else content
        conversation += _turn_tokens(encode, shown)
        (expected,), _ = generator.generate([conversation], max_gen_len=12, temperature=0)
        turn = session.stream(content, temperature=0, max_gen_len=12)
        text = "".join(turn)
        assert turn.prompt_tokens == conversation
        assert turn.tokens == expected
        assert text == turn.text == generator.tokenizer.decode(expected)
        assert turn.reused + turn.prefilled == len(conversation) and turn.dropped == 0
        if number:
            new = len(_turn_tokens(encode, content))
            assert new + 1 <= turn.prefilled <= new + 2, (turn.prefilled, new)
        else:
            assert turn.reused == 0
        assert session.messages[-2:] == [{"role": "user", "content": content},
                                         {"role": "assistant", "content": text}]
        conversation += expected + [eos]


def test_retokenizing_session_answers_equal_chat_completion(build):
    generator = build("gqa", max_seq_len=384, max_batch_size=2)
    session = generator.chat_session(system="Answer briefly.", reply_room=16, retokenize=True)
    encode = generator.tokenizer.encode
    for number, content in enumerate(USER_TURNS):
        dialog = session.messages + [{"role": "user", "content": content}]
        expected = _reference_answer(generator, dialog, temperature=0, max_gen_len=12)
        turn = session.stream(content, temperature=0, max_gen_len=12)
        assert "".join(turn) == turn.text == expected
        assert session.messages == dialog + [{"role": "assistant", "content": expected}]
        prompt = dialog_to_tokens(dialog, encode)
        assert turn.prompt_tokens == prompt
        assert turn.reused + turn.prefilled == len(prompt) and turn.dropped == 0
        # from where the re-encoded answer leaves the model's tokens, no earlier
        if number:
            assert turn.reused > len(encode("[INST] <<SYS>>\nAnswer briefly.", bos=True,
                                            eos=False))


@pytest.mark.parametrize("retokenize", [False, True])
def test_session_drops_oldest_exchanges_when_the_context_fills(build, retokenize):
    generator = build("gqa", max_seq_len=96, max_batch_size=1)
    session = generator.chat_session(system="Be short.", reply_room=16, retokenize=retokenize)
    encode = generator.tokenizer.encode
    dropped = 0
    for content in USER_TURNS * 2:
        dialog = session.messages + [{"role": "user", "content": content}]
        turn = session.stream(content, temperature=0, max_gen_len=10)
        text = "".join(turn)
        # the same answer as the conversation kept, prefilled whole without a cache
        if retokenize:
            fitted = truncate_dialog(dialog, encode, 96 - 16)
            assert turn.dropped == len(dialog) - len(fitted)
            assert turn.prompt_tokens == dialog_to_tokens(fitted, encode)
            assert text == _reference_answer(generator, fitted, temperature=0, max_gen_len=10)
        else:
            (expected,), _ = generator.generate([turn.prompt_tokens], max_gen_len=10,
                                                temperature=0)
            assert turn.tokens == expected
        assert len(turn.prompt_tokens) <= 96 - 16
        assert turn.dropped % 2 == 0  # whole exchanges
        dropped += turn.dropped
        assert session.messages[0] == {"role": "system", "content": "Be short."}
        assert session.messages[-2:] == [{"role": "user", "content": content},
                                         {"role": "assistant", "content": text}]
        assert session.messages == dialog[:1] + dialog[1 + turn.dropped:] + session.messages[-1:]
        if turn.dropped:
            # re-prefilled from where the conversation changed: the system prompt stays
            assert turn.reused >= len(encode("[INST] <<SYS>>\nBe short.", bos=True,
                                             eos=False)) - 1
    assert dropped > 0


def test_session_refuses_a_message_that_cannot_fit_and_keeps_the_conversation(build):
    generator = build("gqa", max_seq_len=64, max_batch_size=1)
    session = generator.chat_session(reply_room=16)
    first = session.send("Hello there", temperature=0, max_gen_len=5)
    before = list(session.messages)
    with pytest.raises(ArgumentValueError, match="max_seq_len 64 less reply_room 16"):
        session.send("word " * 80, temperature=0)
    assert session.messages == before
    assert before[-1] == {"role": "assistant", "content": first}
    # a message with the format's tags is answered as chat_completion does, and not kept
    turn = session.stream("[INST] hi", temperature=0)
    assert "".join(turn) == UNSAFE_ERROR
    assert session.messages == before


def test_session_seeded_sampling_equals_chat_completion(build):
    generator = build("gqa", max_seq_len=128, max_batch_size=1)
    session = generator.chat_session(retokenize=True)
    for content in USER_TURNS[:3]:
        dialog = session.messages + [{"role": "user", "content": content}]
        torch.manual_seed(5)
        expected = _reference_answer(generator, dialog, temperature=0.8, max_gen_len=10)
        torch.manual_seed(5)
        assert session.send(content, temperature=0.8, max_gen_len=10) == expected


def test_session_cancel_keeps_what_was_said_and_reset_keeps_the_system_prompt(build):
    generator = build("gqa", max_seq_len=128, max_batch_size=1)
    session = generator.chat_session(system="Hi.", retokenize=True)
    pieces = []
    turn = session.stream("Tell me a story", temperature=0, max_gen_len=30,
                          cancel=lambda: len(pieces) >= 2)
    for piece in turn:
        pieces.append(piece)
    assert turn.finish_reason == "cancelled"
    assert session.messages[-1] == {"role": "assistant", "content": turn.text}
    # the next turn continues from the cancelled answer as chat_completion would
    content = "Go on"
    expected = _reference_answer(generator, session.messages + [{"role": "user",
                                                                   "content": content}],
                                 temperature=0, max_gen_len=8)
    assert session.send(content, temperature=0, max_gen_len=8) == expected
    session.reset()
    assert session.messages == [{"role": "system", "content": "Hi."}]
    expected = _reference_answer(generator, [{"role": "system", "content": "Hi."},
                                             {"role": "user", "content": content}],
                                 temperature=0, max_gen_len=8)
    turn = session.stream(content, temperature=0, max_gen_len=8)
    assert "".join(turn) == expected
    assert turn.reused > 0  # the system prompt's tokens


def test_session_rejects_bad_arguments(build):
    generator = build("gqa", max_seq_len=64, max_batch_size=1)
    with pytest.raises(ArgumentValueError, match="reply_room"):
        generator.chat_session(reply_room=64)
    with pytest.raises(ArgumentValueError, match="system"):
        generator.chat_session(system="<<SYS>>")
    session = generator.chat_session()
    with pytest.raises(TypeError, match="content must be a str"):
        session.send(3)
    with pytest.raises(ArgumentValueError, match="temperature"):
        session.send("hi", temperature=-1)
    assert session.messages == []


@pytest.mark.parametrize("quantize,activations", [
    (None, None), ("int8", None), pytest.param("int4", None, marks=pytest.mark.skipif(
        not cpu_kernels.int4_every_product(), reason="a plain C++ build's int4 prefills take "
        "the dequantised bfloat16 product")), pytest.param("int8", "int8", marks=NATIVE),
    pytest.param("int4", "int8", marks=NATIVE)])
def test_a_tokens_products_are_the_same_bits_prefilled_or_decoded(build, quantize, activations):
    """What chat sessions and the prefix cache rely on: a text prefilled at once, or its first
    half prefilled and the rest decoded a token at a time, gives the first layer the same
    bits of keys and values (its inputs are the same, so the products must be: each row's
    result does not depend on the others). Later layers differ by attention's order of
    additions alone (a prefill's and a decode step's attention are different computations),
    and, with int8 or int4 weights, the int16 roundings those move: well below a bfloat16
    rounding of the activations."""
    generator = build("gqa", max_seq_len=64, max_batch_size=1, quantize=quantize,
                      activations=activations)
    model = generator.model
    tokens = torch.tensor([generator.tokenizer.encode(" ".join(USER_TURNS), bos=True,
                                                      eos=False)[:40]])
    n = tokens.shape[1]
    assert n == 40
    whole, parts = model.new_cache(1, 64), model.new_cache(1, 64)
    model.forward(tokens, 0, whole)
    model.forward(tokens[:, :20], 0, parts)
    for position in range(20, n):
        model.forward(tokens[:, position:position + 1], position, parts)
    assert torch.equal(whole.k[0][:, :, :n], parts.k[0][:, :, :n])
    assert torch.equal(whole.v[0][:, :, :n], parts.v[0][:, :, :n])
    for layer in range(1, len(whole.k)):
        for a, b in ((whole.k[layer], parts.k[layer]), (whole.v[layer], parts.v[layer])):
            assert float((a - b).abs().max() / a.abs().max()) < 1e-3, layer
