"""The Llama 3 chat prompt format (3.0 to 3.3), as pure functions of a dialog:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
    ...
    <|start_header_id|>assistant<|end_header_id|>\n\n          (the model answers from here)

as Meta's llama_models ChatFormat builds it: the system prompt is a turn of its own, contents
are encoded as given (not stripped), and the model ends its answer with <|eot_id|>. The dialog
rules are Llama 2's (chat_format.validate_dialog).

Dialogs with tool calls (Llama 3.1+, constrained/tools3.py) also have `ipython` turns (a tool's
result) and assistant turns with `tool_calls` (each call's text, written after the content;
the turn ends with <|eom_id|>, as the model ends a call), under looser rules
(validate_tool_dialog)."""

import re
from typing import List, Sequence

from llama.chat_format import Dialog, validate_dialog
from llama.tokenizer3 import SPECIAL_TOKENS

SPECIAL_TAGS = list(SPECIAL_TOKENS)
_SPECIAL_TAGS = frozenset(SPECIAL_TAGS)
_TAG = re.compile(r"<\|[^|<>]{1,40}\|>")


def has_special_tags(dialog: Dialog) -> bool:
    """Whether a message spells one of Llama 3's special tokens ("<|eot_id|>", ...). The
    tokenizer would encode it as plain text, but a dialog that tries to pass for the format's
    markup is refused, as Llama 2's [INST] is."""
    return any(tag in _SPECIAL_TAGS for message in dialog
               for tag in _TAG.findall(message["content"]))


def header_tokens(role: str, tokenizer) -> List[int]:
    """<|start_header_id|>{role}<|end_header_id|>\\n\\n"""
    return ([tokenizer.special_tokens["<|start_header_id|>"]]
            + tokenizer.encode(role, bos=False, eos=False)
            + [tokenizer.special_tokens["<|end_header_id|>"]]
            + tokenizer.encode("\n\n", bos=False, eos=False))


def message_tokens(message, tokenizer) -> List[int]:
    """One turn: its header, its content (and its calls' texts, each encoded on its own, as
    Meta's ChatFormat does), <|eot_id|> (<|eom_id|> after calls)."""
    calls = message.get("tool_calls") or []
    tokens = (header_tokens(message["role"], tokenizer)
              + tokenizer.encode(message["content"], bos=False, eos=False))
    for call in calls:
        tokens += tokenizer.encode(call, bos=False, eos=False)
    return tokens + [tokenizer.special_tokens["<|eom_id|>" if calls else "<|eot_id|>"]]


def dialog_to_tokens(dialog: Dialog, tokenizer, index: int = 0) -> List[int]:
    """Token ids of a dialog in the Llama 3 chat format, ending with the assistant's header for
    the model to complete. `tokenizer` is a Llama3Tokenizer (its special ids are needed)."""
    validate_dialog(dialog, index)
    return _tokens(dialog, tokenizer)


def tool_dialog_to_tokens(dialog, tokenizer, index: int = 0) -> List[int]:
    """dialog_to_tokens for a dialog with tool calls and results (validate_tool_dialog)."""
    validate_tool_dialog(dialog, index)
    return _tokens(dialog, tokenizer)


def _tokens(dialog, tokenizer) -> List[int]:
    tokens = [tokenizer.bos_id]
    for message in dialog:
        tokens += message_tokens(message, tokenizer)
    return tokens + header_tokens("assistant", tokenizer)


TOOL_ROLES = ("system", "user", "assistant", "ipython")


def validate_tool_dialog(dialog, index: int = 0) -> None:
    """Raise TypeError/ValueError naming dialog `index` unless it is a tool dialog: an
    optional system prompt, then user turns (several in a row may come: the functions are
    told in one), assistant turns (never two in a row; with `tool_calls`, a list of texts)
    and ipython turns (tool results, after a call or another result), ending with a user or
    ipython turn for the model to answer."""
    where = f"dialog {index + 1}"  # as people count
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise TypeError(f"{where} must be a non-empty list of {{'role', 'content'}} messages")
    previous = None
    for position, message in enumerate(dialog):
        here = f"{where}, message {position + 1}"
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise TypeError(f"{here}: expected a dict with 'role' and a str 'content', got "
                            f"{message!r}")
        role = message.get("role")
        if role not in TOOL_ROLES:
            raise ValueError(f"{here}: role must be one of {', '.join(TOOL_ROLES)}, got "
                             f"{role!r}")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not _texts(calls)):
            raise TypeError(f"{here}: tool_calls must be a list of call texts, on an "
                            f"assistant turn")
        if role == "system" and position != 0:
            raise ValueError(f"{here}: a system message may only come first")
        if role == "assistant" and previous in (None, "system", "assistant"):
            raise ValueError(f"{here}: an assistant turn must follow a user or ipython turn")
        if role == "ipython" and not (previous == "ipython" or (
                previous == "assistant" and dialog[position - 1].get("tool_calls"))):
            raise ValueError(f"{here}: a tool result (ipython) must follow a call or another "
                             f"result")
        previous = role
    if previous not in ("user", "ipython"):
        raise ValueError(f"{where}: the last message must be from the user or a tool, got "
                         f"{previous!r}")


def _texts(calls) -> bool:
    return isinstance(calls, Sequence) and not isinstance(calls, str) and all(
        isinstance(call, str) for call in calls)
