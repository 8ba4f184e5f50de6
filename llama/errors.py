"""The library's errors about its callers' arguments, and its warning. Every module may raise
them, the lowest included (tokenizers, layers, checkpoints), so they live here rather than
with the checks that use most of them (llama/engine/validation.py, which names them too)."""


class ArgumentError(Exception):
    """A caller's argument is wrong. `param` names it; the message starts with that name."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ArgumentValueError(ArgumentError, ValueError):
    """The argument has the right type but a value that cannot be used."""


class ArgumentTypeError(ArgumentError, TypeError):
    """The argument has the wrong type (e.g. a str where a number is expected)."""


class ArgumentFileNotFoundError(ArgumentError, FileNotFoundError):
    """The argument names a file that does not exist."""


class LlamaWarning(UserWarning):
    """Something that works but is probably not what the caller wants."""
