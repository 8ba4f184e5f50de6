"""Checks of the arguments people pass, shared by the library (Llama.build, generation), the
example scripts (before anything is loaded) and anything else that takes the same arguments.

Every check raises an `ArgumentError` whose message starts with the argument's name and says
what was wrong and what is accepted; `error.param` is that name (a command line can show it as
a flag, a server as the field of a request). The checks only look at values: no files, no
devices, no global state.
"""

import math
import numbers
import os
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from llama.errors import (  # noqa: F401 (LlamaWarning: importable from here, as before)
    ArgumentError,
    ArgumentFileNotFoundError,
    ArgumentTypeError,
    ArgumentValueError,
    LlamaWarning,
)

# Llama 2 was trained on contexts of this many tokens (Llama 2 paper, section 2.2); Llama 3
# on 8192, and Llama 3.1+ (scaled rotary positions) extended to 131072 (Meta's model cards).
LLAMA2_CONTEXT = 4096
LLAMA3_CONTEXT, LLAMA31_CONTEXT = 8192, 131072
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if isinstance(value, str) else repr(value)


def check_number(name: str, value: Any) -> float:
    """A finite int or float (not a bool, not a str)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(name, f"{name} must be a number, got {_got(value)}")
    if not math.isfinite(value):
        raise ArgumentValueError(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_temperature(value: Any) -> float:
    number = check_number("temperature", value)
    if number < 0:
        raise ArgumentValueError("temperature", f"temperature must be >= 0 (0 is greedy), "
                                                f"got {value!r}")
    return number


def check_top_p(value: Any) -> float:
    number = check_number("top_p", value)
    if not 0 < number <= 1:
        raise ArgumentValueError("top_p", f"top_p must be in (0, 1], got {value!r}")
    return number


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """An int (not a bool, not a float such as 8.0) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(name, f"{name} must be an integer, got {_got(value)}")
    if minimum is not None and value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        raise ArgumentValueError(name, f"{name} must be {what}, got {value!r}")
    return value


def check_optional_int(name: str, value: Any, minimum: Optional[int] = None) -> Optional[int]:
    return None if value is None else check_int(name, value, minimum)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(name, f"{name} must be True or False, got {_got(value)}")
    return value


def check_path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(name, f"{name} must be a path (str), got {_got(value)}")
    return os.fspath(value)


def check_dtype(value: Any) -> Optional[torch.dtype]:
    """None (the device's default), a name in DTYPES, or one of those torch dtypes. float64
    is refused: it would double float32's memory and time, yet be no more exact, as norms,
    rotary embedding and logits are computed in float32 whatever the dtype (as Meta's are)."""
    return _named_dtype("dtype", value, DTYPES, f"use one of {', '.join(DTYPES)}")


KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_kv_cache_dtype(value: Any) -> Optional[torch.dtype]:
    """None (the activations' dtype), "bfloat16" or "float32", or those torch dtypes: what the
    KV cache keeps keys and values in (Transformer.set_kv_cache_dtype)."""
    return _named_dtype("kv_cache_dtype", value, KV_CACHE_DTYPES,
                        "use bfloat16 or float32 (or leave it out: the activations' dtype)")


def _named_dtype(param: str, value: Any, names: Dict[str, torch.dtype], advice: str
                 ) -> Optional[torch.dtype]:
    """None, a name in `names` or one of its dtypes; else ArgumentError ending in `advice`."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in names.values():
        return value
    if isinstance(value, str) and value in names:
        return names[value]
    if not isinstance(value, (str, torch.dtype)):
        raise ArgumentTypeError(param, f"{param} must be a str such as 'bfloat16', got "
                                       f"{_got(value)}")
    raise ArgumentValueError(param, f"{param} {str(value).replace('torch.', '')!r} is not "
                                    f"supported; {advice}")


def check_device(value: Any) -> Optional[torch.device]:
    """None (a GPU when there is one, else the CPU), or 'cpu', 'cuda', 'cuda:N'. Whether CUDA
    is available is for the caller to check (llama.engine.distributed.choose_device)."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise ArgumentTypeError("device", f"device must be a str such as 'cpu' or 'cuda', got "
                                          f"{_got(value)}")
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ArgumentValueError("device", f"device {str(value)!r} is not supported; use 'cpu', "
                                           f"'cuda' or 'cuda:N'")
    return device


def check_text(name: str, value: str, param: Optional[str] = None) -> str:
    """A str that UTF-8 can write (so the tokenizer can read it): not one with half of a
    surrogate pair, as bytes decoded with errors="surrogateescape" give."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ArgumentValueError(param or name, f"{name} holds {value[error.start:error.end]!r} at "
                                       f"character {error.start}, which is not text (invalid "
                                       f"UTF-8 read with surrogateescape?): decode it as "
                                       f"UTF-8 first") from None
    return value


def check_dialog(dialog, index: int, validate: Optional[Callable] = None) -> None:
    """A dialog the chat format can write (`validate(dialog, index)`: by default
    chat_format.validate_dialog, Llama 2's rules), its errors typed as arguments of the API
    ("dialogs"), and every content text."""
    from llama.chat_format import validate_dialog

    try:
        (validate or validate_dialog)(dialog, index)
    except TypeError as error:
        raise ArgumentTypeError("dialogs", str(error)) from None
    except ValueError as error:
        raise ArgumentValueError("dialogs", str(error)) from None
    for position, message in enumerate(dialog):
        check_text(f"dialog {index + 1}, message {position + 1} content", message["content"],
                   "dialogs")


def check_stop(value: Any) -> List[str]:
    """None, a string, or a list of non-empty strings; returned as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise ArgumentTypeError("stop", f"stop must be a list of strings, got {_got(value)}")
    if not all(value):
        raise ArgumentValueError("stop", f"stop strings must not be empty, got {value!r}")
    return list(value)


# What each argument of the public API (and of the example scripts' flags, which take the same
# names) must be. Arguments not named here are not checked by check_arguments.
def check_quantize(value: Any) -> Optional[str]:
    """None (full precision), "int8" or "int4"."""
    from llama.quantize.formats import MODES

    if value is not None and value not in MODES:
        raise ArgumentValueError("quantize", f"quantize must be one of "
                                             f"{', '.join(map(repr, MODES))} (or None for full "
                                             f"precision), got {_got(value)}")
    return value


def check_activations(value: Any) -> Optional[str]:
    """None (float activations; int8 and int4 kernels round them to int16 per row) or "int8":
    int8 or int4 weights times activations rounded to int8 in blocks of 32
    (llama/layers/w8a8.py)."""
    if value is not None and value != "int8":
        raise ArgumentValueError("activations", f"activations must be 'int8' (with "
                                                f"quantize='int8' or 'int4') or None, got "
                                                f"{_got(value)}")
    return value


def check_group_size(value: Any) -> Optional[int]:
    """None (the default, 32) or an int4 group size: 32, 64 or 128."""
    from llama.quantize.formats import GROUP_SIZES

    if value is not None and (isinstance(value, bool) or value not in GROUP_SIZES):
        raise ArgumentValueError("group_size", f"group_size must be one of {GROUP_SIZES} "
                                               f"(int4 only), got {_got(value)}")
    return value


CHECKS: Dict[str, Callable[[Any], Any]] = {
    "ckpt_dir": lambda v: None if v is None else check_path("ckpt_dir", v),
    "tokenizer_path": lambda v: None if v is None else check_path("tokenizer_path", v),
    "max_seq_len": partial(check_int, "max_seq_len", minimum=1),
    "max_batch_size": partial(check_int, "max_batch_size", minimum=1),
    "model_parallel_size": partial(check_optional_int, "model_parallel_size", minimum=1),
    "max_gen_len": partial(check_optional_int, "max_gen_len", minimum=0),
    "temperature": check_temperature,
    "top_p": check_top_p,
    "seed": partial(check_int, "seed"),
    "device": check_device,
    "dtype": check_dtype,
    "kv_cache_dtype": check_kv_cache_dtype,
    "stop": check_stop,
    "quantize": check_quantize,
    "group_size": check_group_size,
    "activations": check_activations,
    **{name: partial(check_bool, name)
       for name in ("verify", "verbose", "logprobs", "echo", "stream", "show_speed")},
}


def check_arguments(arguments: Dict[str, Any]) -> None:
    """Check every argument whose name is in CHECKS; raise ArgumentError for the first bad
    one. Others are left alone."""
    for name, value in arguments.items():
        if name in CHECKS:
            CHECKS[name](value)


def context_warning(max_seq_len: int, rope_theta: float,
                    rope_type: Optional[str] = None) -> Optional[str]:
    """A sentence when max_seq_len goes past the context the model was trained on: Llama 2's
    (rotary base 10000), Llama 3's (base 500000) or Llama 3.1's (`rope_type` "llama3", Meta's
    scaled rotary positions), else None (other bases, such as Code Llama's, and other
    scalings, such as the Hub's long-context fine-tunes, were trained on other lengths)."""
    if rope_type == "llama3":
        family, trained = "Llama 3.1+", LLAMA31_CONTEXT
    elif rope_type is not None:
        return None
    elif rope_theta == 500000.0:
        family, trained = "Llama 3", LLAMA3_CONTEXT
    elif rope_theta == 10000.0:
        family, trained = "Llama 2", LLAMA2_CONTEXT
    else:
        return None
    if max_seq_len <= trained:
        return None
    return (f"max_seq_len={max_seq_len} is above the {trained} tokens {family} was "
            f"trained on: text past {trained} tokens will degrade, and the KV cache "
            f"grows with every token kept")


def check_generation_arguments(prompt_tokens, max_gen_len, temperature, top_p, stop, params,
                               n_words: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """Raises ArgumentError for the first bad argument; returns the stop strings as a list.
    Errors call prompt i `names[i]` (default "prompt 1", "prompt 2", ...: counted from 1, as
    people count; a chat's are its dialogs)."""
    check_int("max_gen_len", max_gen_len, 0)
    check_temperature(temperature)
    check_top_p(top_p)
    stop = check_stop(stop)
    if not isinstance(prompt_tokens, (list, tuple)):
        raise ArgumentTypeError("prompt_tokens",
                                "prompt_tokens must be a list of lists of token ids")
    if len(prompt_tokens) > params.max_batch_size:
        raise ArgumentValueError(
            "prompt_tokens", f"{len(prompt_tokens)} prompts exceed max_batch_size="
                             f"{params.max_batch_size}: pass fewer prompts per call, or build "
                             f"with a larger max_batch_size")
    for index, tokens in enumerate(prompt_tokens):
        where = names[index] if names is not None else f"prompt {index + 1}"
        if not isinstance(tokens, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ArgumentTypeError("prompt_tokens", f"{where} must be a list of int token ids")
        if len(tokens) == 0:
            raise ArgumentValueError("prompt_tokens", f"{where} is empty: it needs at least "
                                                      f"one token (e.g. BOS)")
        if len(tokens) > params.max_seq_len:
            raise ArgumentValueError(
                "prompt_tokens", f"{where} has {len(tokens)} tokens, more than max_seq_len="
                                 f"{params.max_seq_len}: shorten it, or build with a larger "
                                 f"max_seq_len")
        bad = [t for t in tokens if not 0 <= t < n_words]
        if bad:
            raise ArgumentValueError(
                "prompt_tokens", f"{where} has token ids outside the vocabulary [0, {n_words}): "
                                 f"{bad[:5]}")
    return stop


def check_ckpt_dir(ckpt_dir, error=None) -> None:
    """Raise `error` (ArgumentValueError by default) naming ckpt_dir unless it is a directory,
    saying what a checkpoint directory of either layout holds."""
    if os.path.isdir(ckpt_dir):
        return
    problem = "is not a directory" if os.path.exists(ckpt_dir) else "does not exist"
    raise (error or ArgumentValueError)(
        "ckpt_dir", f"ckpt_dir {os.fspath(ckpt_dir)!r} {problem}: it should be a checkpoint "
                    f"directory such as llama-2-7b/, holding params.json and consolidated.NN.pth "
                    f"(see download.sh), or a Hugging Face directory holding config.json and "
                    f"*.safetensors")
