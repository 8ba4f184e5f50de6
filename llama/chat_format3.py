"""The Llama 3 chat prompt format (3.0 to 3.3), as pure functions of a dialog:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
    ...
    <|start_header_id|>assistant<|end_header_id|>\n\n          (the model answers from here)

as Meta's llama_models ChatFormat builds it: the system prompt is a turn of its own, contents
are encoded as given (not stripped), and the model ends its answer with <|eot_id|>. The dialog
rules are Llama 2's (chat_format.validate_dialog)."""

import re
from typing import List

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
    """One turn: its header, its content, <|eot_id|>."""
    return (header_tokens(message["role"], tokenizer)
            + tokenizer.encode(message["content"], bos=False, eos=False)
            + [tokenizer.special_tokens["<|eot_id|>"]])


def dialog_to_tokens(dialog: Dialog, tokenizer, index: int = 0) -> List[int]:
    """Token ids of a dialog in the Llama 3 chat format, ending with the assistant's header for
    the model to complete. `tokenizer` is a Llama3Tokenizer (its special ids are needed)."""
    validate_dialog(dialog, index)
    tokens = [tokenizer.bos_id]
    for message in dialog:
        tokens += message_tokens(message, tokenizer)
    return tokens + header_tokens("assistant", tokenizer)
