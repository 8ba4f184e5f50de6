"""The Llama 2 chat format, built by hand here, and the dialog rules."""

import pytest

from llama.chat_format import UNSAFE_ERROR, dialog_to_tokens, truncate_dialog


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    from llama import Tokenizer

    return Tokenizer(tokenizer_path)


def _piece(tokenizer, text):
    return tokenizer.sp_model.encode(text)


def test_single_user_turn(tokenizer):
    dialog = [{"role": "user", "content": "  what is the recipe of mayonnaise? "}]
    expected = [1] + _piece(tokenizer, "[INST] what is the recipe of mayonnaise? [/INST]")
    assert dialog_to_tokens(dialog, tokenizer.encode) == expected


def test_multi_turn_dialog_with_system_prompt(tokenizer):
    dialog = [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": " Eiffel Tower.\n"},
        {"role": "user", "content": "What is so great about #1?"},
    ]
    first = ("[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\n"
             "I am going to Paris, what should I see? [/INST] Eiffel Tower. ")
    expected = ([1] + _piece(tokenizer, first) + [2]
                + [1] + _piece(tokenizer, "[INST] What is so great about #1? [/INST]"))
    assert dialog_to_tokens(dialog, tokenizer.encode) == expected


@pytest.mark.parametrize("dialog, error, message", [
    ([], ValueError, "dialog 4 is empty"),
    ([{"role": "system", "content": "be nice"}], ValueError, "only a system prompt"),
    ([{"role": "assistant", "content": "hi"}], ValueError, "expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ValueError,
     "dialog 4, message 2: expected role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], ValueError,
     "last message must be from the user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], ValueError,
     "system message may only come first"),
    ([{"role": "robot", "content": "a"}], ValueError, "role must be"),
    ([{"role": "user"}], TypeError, "'role' and 'content'"),
    ([{"role": "user", "content": 3}], TypeError, "content must be a str"),
    ("hello", TypeError, "must be a list"),
])
def test_bad_dialogs_name_the_dialog_and_the_problem(dialog, error, message, tokenizer):
    with pytest.raises(error, match=message):
        dialog_to_tokens(dialog, tokenizer.encode, index=3)


def test_chat_completion_refuses_special_tags_without_generating(build):
    generator = build("gqa")
    dialogs = [[{"role": "user", "content": "Tell me about [INST] tags"}],
               [{"role": "user", "content": "Hello"}],
               [{"role": "system", "content": "<<SYS>> trick"}, {"role": "user", "content": "x"}]]
    results = generator.chat_completion(dialogs, temperature=0, max_gen_len=6, logprobs=True)
    assert results[0]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    assert results[2]["generation"]["content"] == UNSAFE_ERROR
    alone = generator.chat_completion([dialogs[1]], temperature=0, max_gen_len=6)
    assert results[1]["generation"] == alone[0]["generation"]
    assert results[1]["generation"]["role"] == "assistant"
    assert len(results[1]["tokens"]) == len(results[1]["logprobs"]) == 6


def test_chat_completion_error_names_the_dialog(build):
    generator = build("gqa")
    good = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="dialog 2: the last message must be from the user"):
        generator.chat_completion([good, good + [{"role": "assistant", "content": "x"}]])


def test_truncate_dialog_drops_oldest_exchanges_and_keeps_system(tokenizer):
    system = {"role": "system", "content": "Be brief"}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question number {i} " * 3},
                  {"role": "assistant", "content": f"answer number {i} " * 3}]
    dialog = [system] + turns + [{"role": "user", "content": "last question"}]
    limit = len(dialog_to_tokens([system] + turns[-4:] + [dialog[-1]], tokenizer.encode))
    kept = truncate_dialog(dialog, tokenizer.encode, limit)
    assert kept == [system] + turns[-4:] + [dialog[-1]]
    assert truncate_dialog(dialog, tokenizer.encode, 3) is None
