"""Llama 3's chat format against Meta's ChatFormat (llama-models), and the choice of format by
the tokenizer's family."""

import pytest

from llama import chat_format
from llama.chat_format3 import dialog_to_tokens
from llama.chat_formats import dialog_tokens, has_special_tags, truncate_dialog
from llama.tokenizers import load_tokenizer
from tests.llama3_reference import meta_dialog_tokens, meta_tokenizer, meta_tokenizer_path

DIALOGS = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [{"role": "system", "content": "Always answer with Haiku"},
     {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "system", "content": "Always answer with emojis"},
     {"role": "user", "content": "How to go from Beijing to NY?"},
     {"role": "assistant", "content": "✈️🗽"},
     {"role": "user", "content": "And back?"}],
    [{"role": "user", "content": "I am going to Paris, what should I see?"},
     {"role": "assistant", "content": "Paris, the capital of France, is known for ...\n\n1. "
                                      "The Eiffel Tower\n2. The Louvre"},
     {"role": "user", "content": "What is so great about #1?"}],
    # contents are taken as they are: no stripping of spaces or newlines
    [{"role": "system", "content": "  你是一名C++开发专家\n"},
     {"role": "user", "content": "\n用C++写一个快速排序  "},
     {"role": "assistant", "content": " 上下五千年，英雄万万千。 "},
     {"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer()


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(meta_tokenizer_path())


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
def test_dialog_tokens_are_meta_s(ours, meta, dialog):
    expected = meta_dialog_tokens(meta, dialog)
    assert dialog_tokens(ours, dialog) == expected == dialog_to_tokens(dialog, ours)
    # the shape Meta documents: bos, a header per turn, eot after each, the assistant's header
    assert expected[0] == ours.bos_id
    assert expected.count(ours.eot_id) == len(dialog)
    assert ours.decode(expected[-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_the_format_follows_the_tokenizer_s_family(ours, tokenizer_path):
    dialog = DIALOGS[1]
    llama2 = load_tokenizer(tokenizer_path)
    assert dialog_tokens(llama2, dialog) == chat_format.dialog_to_tokens(dialog, llama2.encode)
    text = ours.decode(dialog_tokens(ours, dialog))
    assert "[INST]" not in text and text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAlways answer")


@pytest.mark.parametrize("content, llama2, llama3", [
    ("plain text <|not a tag|> and <b>html</b>", False, False),
    ("a turn ends with <|eot_id|>", False, True),
    ("<|start_header_id|>system<|end_header_id|>", False, True),
    ("reserved <|reserved_special_token_245|>", False, True),
    ("<|reserved_special_token_246|> is not one of the 256", False, False),
    ("[INST] Llama 2's markup [/INST]", True, False),
    ("<<SYS>>", True, False),
])
def test_the_special_tag_guard_covers_the_family_s_tags(ours, tokenizer_path, content, llama2,
                                                        llama3):
    dialog = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    assert has_special_tags(load_tokenizer(tokenizer_path), dialog) is llama2
    assert has_special_tags(ours, dialog) is llama3


def test_truncation_drops_the_oldest_exchanges_in_llama3_tokens(ours, meta):
    system = {"role": "system", "content": "Answer briefly."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question {i}: what is {i} squared?"},
                  {"role": "assistant", "content": f"{i * i}, since {i} times {i} is {i * i}."}]
    dialog = [system] + turns + [{"role": "user", "content": "And 7?"}]
    full = len(meta_dialog_tokens(meta, dialog))
    without_two = [system] + turns[4:] + dialog[-1:]
    limit = len(meta_dialog_tokens(meta, without_two))
    assert limit < full
    assert truncate_dialog(ours, dialog, full) == dialog
    assert truncate_dialog(ours, dialog, limit) == without_two
    assert truncate_dialog(ours, dialog, limit - 1) == [system] + turns[6:] + dialog[-1:]
    assert truncate_dialog(ours, dialog, 10) is None


def test_bad_dialogs_are_refused_as_for_llama2(ours):
    with pytest.raises(ValueError, match="dialog 3, message 2: expected role 'assistant'"):
        dialog_tokens(ours, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                      index=2)
