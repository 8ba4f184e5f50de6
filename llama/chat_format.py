"""The Llama 2 chat prompt format, as pure functions of a dialog."""

from typing import Callable, List, Literal, Optional, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog, index: int = 0, path: Optional[str] = None) -> None:
    """Raise TypeError/ValueError if the dialog cannot be formatted, naming it as people count
    ("dialog 1" for index 0, its messages "message 1", ...), or, given `path` (the field of a
    JSON request, e.g. "messages"), as that field and its items ("messages[0]")."""
    where = path or f"dialog {index + 1}"

    def at(position: int) -> str:
        return f"{path}[{position}]" if path else f"{where}, message {position + 1}"

    if not isinstance(dialog, (list, tuple)):
        raise TypeError(f"{where} must be a list of {{'role', 'content'}} messages, "
                        f"got {type(dialog).__name__}")
    if not dialog:
        raise ValueError(f"{where} is empty: it needs at least one user message")
    for position, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"{at(position)}: expected a dict with 'role' and 'content', got "
                            f"{message!r}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{at(position)}: role must be 'system', 'user' or 'assistant', "
                             f"got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise TypeError(f"{at(position)}: content must be a str, got "
                            f"{type(message['content']).__name__}")
        if message["role"] == "system" and position != 0:
            raise ValueError(f"{at(position)}: a system message may only come first")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where} has only a system prompt: add a user message after it")
    for position, message in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"{at(position + len(dialog) - len(turns))}: expected role {expected!r}, got "
                f"{message['role']!r}; after an optional system prompt, roles must alternate "
                f"user, assistant, user, ...")
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be from the user, got "
                         f"{turns[-1]['role']!r}")


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in message["content"] for tag in SPECIAL_TAGS for message in dialog)


def fold_system_prompt(dialog: Dialog) -> Dialog:
    """Merge a leading system message into the first user message, as Llama 2 was trained."""
    if dialog[0]["role"] != "system":
        return list(dialog)
    first_user = {"role": dialog[1]["role"],
                  "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    return [first_user] + list(dialog[2:])


def dialog_to_tokens(dialog: Dialog, encode: Callable[..., List[int]],
                     index: int = 0) -> List[int]:
    """Token ids of a dialog in the Llama 2 chat format. `encode(text, bos, eos)` is
    Tokenizer.encode. Each completed exchange is `<s>[INST] user [/INST] answer </s>`; the last
    user turn is `<s>[INST] user [/INST]`, to be completed by the model."""
    validate_dialog(dialog, index)
    dialog = fold_system_prompt(dialog)
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += encode(f"{B_INST} {prompt['content'].strip()} {E_INST} "
                         f"{answer['content'].strip()} ", bos=True, eos=True)
    tokens += encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def truncate_dialog(dialog: Dialog, encode: Callable[..., List[int]], max_tokens: int
                    ) -> Optional[Dialog]:
    """Drop the oldest user/assistant exchanges (keeping any system prompt and the last user
    turn) until the dialog fits in `max_tokens`. None if even the last turn alone is too long."""
    return drop_oldest_turns(dialog, lambda d: len(dialog_to_tokens(d, encode)) <= max_tokens)


def drop_oldest_turns(dialog: Dialog, fits: Callable[[Dialog], bool]) -> Optional[Dialog]:
    """truncate_dialog for any format: `fits(dialog)` says whether a candidate is short enough."""
    system = [dialog[0]] if dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system):])
    while True:
        candidate = system + turns
        if fits(candidate):
            return candidate
        if len(turns) <= 1:
            return None
        turns = turns[2:]
