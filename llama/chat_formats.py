"""The chat format of a tokenizer's family: Llama 2's [INST] format (chat_format.py) for a
SentencePiece tokenizer, Llama 3's header format (chat_format3.py) for a tiktoken one. The
library, the server and the interactive chat ask here, so a checkpoint gets its own format
without anything to pass."""

from typing import List, Optional

from llama import chat_format, chat_format3
from llama.chat_format import Dialog
from llama.tokenizers import family


def dialog_tokens(tokenizer, dialog: Dialog, index: int = 0) -> List[int]:
    """The prompt's token ids for a dialog (validated; errors name dialog `index`)."""
    if family(tokenizer) == "llama3":
        return chat_format3.dialog_to_tokens(dialog, tokenizer, index)
    return chat_format.dialog_to_tokens(dialog, tokenizer.encode, index)


def has_special_tags(tokenizer, dialog: Dialog) -> bool:
    """Whether a message spells the format's markup: such a dialog is refused, not run."""
    if family(tokenizer) == "llama3":
        return chat_format3.has_special_tags(dialog)
    return chat_format.has_special_tags(dialog)


def truncate_dialog(tokenizer, dialog: Dialog, max_tokens: int) -> Optional[Dialog]:
    """Drop the oldest exchanges until the dialog's prompt fits in `max_tokens` (see
    chat_format.truncate_dialog)."""
    return chat_format.drop_oldest_turns(
        dialog, lambda d: len(dialog_tokens(tokenizer, d)) <= max_tokens)
