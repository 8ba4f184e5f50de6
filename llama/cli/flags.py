"""What the example scripts share: running a script's `main(**flags)` from the command line,
finding the weights, and process-level setup that a library must not do (exit codes, silencing
the other ranks' stdout).

A script declares its flags as the keyword arguments of `main`, with defaults, type hints and
a Google-style "Args:" docstring (one line of help per flag), and ends with `run(main)`:

    def main(ckpt_dir: Optional[str] = None, temperature: float = 0.6):
        '''Complete some prompts.

        Args:
            ckpt_dir: checkpoint directory (default: the bundled demo model)
            temperature: sampling temperature, 0 for greedy
        '''

    if __name__ == "__main__":
        run(main)

Flags are written as for fire.Fire(main) (`--name value`, `--name=value`, `--flag` and
`--noflag` for booleans, values parsed by fire's parser); see `run` for what it adds.
"""

import argparse
import difflib
import inspect
import os
import re
import sys
import time
import typing
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from fire.parser import DefaultParseValue

from llama.checkpoints.meta import CheckpointError
from llama.engine.validation import (
    ArgumentError,
    ArgumentFileNotFoundError,
    ArgumentTypeError,
    LlamaWarning,
    check_arguments,
    check_bool,
    check_ckpt_dir,
    check_int,
    check_number,
)

# The library's typed errors: a person's mistake or situation, said in one line. Anything else
# is a bug and keeps its traceback.
EXPECTED_ERRORS = (ArgumentError, CheckpointError, MemoryError)

# Why the demo model gets other defaults than real weights (see run's demo_defaults).
DEMO_REASONS = {"max_gen_len": "it rarely ends an answer by itself",
                "max_seq_len": "it was trained on 256-token contexts"}


class UsageError(Exception):
    """A command line that names no flag of the script, or gives too many values."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the `python -m llama.*` tools, whose mistakes read as the scripts' do:
    one `error: ...` line naming the flag (with "did you mean" for a misspelt one) and where
    the help is, instead of the whole usage; status 2. Flags are spelt as the scripts' (Meta's
    `--max_seq_len`); `add_alias` keeps a former spelling working, unlisted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aliases: Dict[str, str] = {}

    def add_alias(self, alias: str, flag: str) -> None:
        """Take `alias` (e.g. `--max-shard-size`, as a tool once spelt it) for `flag`; the
        help lists only `flag`."""
        self._aliases[alias] = flag

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        respelled = []
        for token in args:
            name, equals, value = token.partition("=")
            respelled.append(self._aliases[name] + equals + value if name in self._aliases
                             else token)
        return super().parse_known_args(respelled, namespace)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [o for action in self._actions for o in action.option_strings
                     if o.startswith("--")]
            given = unknown.group(1).split()[0]
            close = difflib.get_close_matches(given.partition("=")[0], flags, n=1)
            message = (f"unknown flag {given}" + (f" (did you mean {close[0]}?)" if close else "")
                       if given.startswith("-") else
                       f"unexpected argument {given!r} (flags are written --name value)")
        self.exit(2, f"error: {message}; `{self.prog} --help` lists the flags\n")


def run(main: Callable, demo_defaults: Optional[Dict[str, Any]] = None,
        argv: Optional[Sequence[str]] = None) -> None:
    """Run `main` with the flags of the command line (default sys.argv[1:]), then exit.

    Before `main` runs: `--help` prints one line per flag and exits; an unknown or misspelt
    flag ends the script (status 2); every flag's value is checked (llama.engine.validation, and the
    type hints); without --ckpt_dir, the flags in `demo_defaults` that were not given take
    those values, said on stderr with the bundled demo model's note. While it runs, the
    library's typed errors (EXPECTED_ERRORS) end the script with one `error: ...` line, in
    terms of flags, printed by rank 0 only, and status 1 on every rank; Ctrl-C ends it with
    status 130 and no traceback; LlamaWarnings are one `warning: ...` line on rank 0. Other
    errors keep their traceback. Afterwards every rank leaves the process group.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) or "script"
    names = list(inspect.signature(main).parameters)
    show_warnings_as_lines(names)
    try:
        if "-h" in argv or "--help" in argv:
            if is_rank0():
                print(help_text(main, prog, demo_defaults))
            sys.exit(0)
        flags = parse_flags(main, argv)
        demo = "ckpt_dir" in names and flags.get("ckpt_dir") is None
        applied = {name: value for name, value in (demo_defaults or {}).items()
                   if demo and name not in flags}
        flags = check_flags(main, {**flags, **applied})
        if demo:
            _announce_demo_model(applied)
        main(**flags)
    except UsageError as error:
        _say(f"error: {error}; `python {prog} --help` lists the flags")
        _leave(status=2)
    except EXPECTED_ERRORS as error:
        _say(f"error: {in_flag_terms(str(error), names, getattr(error, 'param', None))}")
        _leave(status=1)
    except KeyboardInterrupt:
        _say("interrupted")
        _leave(status=130)
    _leave(status=0)


def parse_flags(main: Callable, argv: Sequence[str]) -> Dict[str, Any]:
    """The flags given on the command line, {name: value}, parsed as fire.Fire(main) would:
    `--name value`, `--name=value`, `--name` (True) / `--noname` (False) before another flag or
    at the end, a unique first letter (`-v`), `-` for `_` in names. Unlike fire, a value not
    preceded by a flag is refused rather than given to the next parameter. Parameters annotated as
    str get the text as
    typed; others get fire's parse (`0` int, `0.6` float, `None`, `[1, 2]` list, else a str).
    Raises UsageError for a flag `main` does not have, or a value left over."""
    parameters = inspect.signature(main).parameters
    names = list(parameters)
    raw: Dict[str, Any] = {}
    positional: List[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not _is_flag(token):
            positional.append(token)
            continue
        key, equals, value = token.lstrip("-").partition("=")
        key = key.replace("-", "_")
        bare = not equals and (index == len(argv) or _is_flag(argv[index]))
        if key not in names and len(key) == 1:
            matches = [name for name in names if name[0] == key]
            key = matches[0] if len(matches) == 1 else key
        if key not in names and bare and key.startswith("no") and key[2:] in names:
            raw[key[2:]] = False
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UsageError(f"unknown flag {token.partition('=')[0]}{hint}")
        if bare:
            raw[key] = True
        elif equals:
            raw[key] = value
        else:
            raw[key] = argv[index]
            index += 1
    if positional:  # fire would fill parameters with them: a stray word became ckpt_dir
        raise UsageError(f"unexpected argument {positional[0]!r} (flags are written "
                         f"--name value, e.g. --ckpt_dir {positional[0]})")
    return {name: _parse_value(parameters[name], value) for name, value in raw.items()}


def check_flags(main: Callable, flags: Dict[str, Any]) -> Dict[str, Any]:
    """Every parameter of `main`, given or defaulted, checked against its type hint and
    llama.engine.validation's rules for its name (ArgumentError for the first bad one)."""
    values = {name: parameter.default
              for name, parameter in inspect.signature(main).parameters.items()}
    values.update(flags)
    hints = typing.get_type_hints(main)
    for name, value in values.items():
        kind, optional = _hint(hints.get(name))
        if value is None and optional:
            continue
        if kind is str and not isinstance(value, str):
            raise ArgumentTypeError(name, f"{name} must be followed by a value, e.g. "
                                          f"{name} 'text'")
        if kind is bool:
            check_bool(name, value)
        elif kind is int:
            check_int(name, value)
        elif kind is float:
            check_number(name, value)
    if isinstance(values.get("quantize"), str) and values["quantize"].lower() == "none":
        values["quantize"] = None  # the help's word for the checkpoint's own precision
    check_arguments(values)
    return values


def help_text(main: Callable, prog: str, demo_defaults: Optional[Dict[str, Any]] = None) -> str:
    """The usage line, main's summary, then one line per flag: what it does and its default
    (from the "Args:" section of main's docstring)."""
    from fire import docstrings

    doc = docstrings.parse(inspect.getdoc(main) or "")
    described = {arg.name: " ".join((arg.description or "").split()) for arg in doc.args or []}
    hints = typing.get_type_hints(main)
    rows = []
    for name, parameter in inspect.signature(main).parameters.items():
        kind, _ = _hint(hints.get(name))
        if kind is bool:
            flag = f"--{name}"
        else:
            flag = f"--{name} " + {int: "N", float: "X"}.get(kind, _metavar(name))
        text = described.get(name, "")
        if "default" not in text:
            default = parameter.default
            shown = ("off" if default is False else "on" if default is True
                     else "none" if default is None else default)
            text += f" (default: {shown})"
        if demo_defaults and name in demo_defaults:
            text = text[:-1] + f"; {demo_defaults[name]} with the demo model)"
        rows.append((flag, text.strip()))
    rows.append(("-h, --help", "show this help and exit"))
    width = max(len(flag) for flag, _ in rows) + 2
    lines = [f"usage: python {prog} [--flag value ...]",
             f"       torchrun --nproc_per_node N {prog} [--flag value ...]", ""]
    if doc.summary:
        lines += [doc.summary, ""]
    if doc.description:
        lines += [doc.description, ""]
    lines.append("flags:")
    lines += [f"  {flag:<{width}}{text}" for flag, text in rows]
    return "\n".join(lines)


def in_flag_terms(message: str, names: Sequence[str], param: Optional[str] = None) -> str:
    """A library message as a command-line user reads it: the script's parameter names become
    flags. Names with an underscore are replaced wherever they stand; a plain word only when it
    is the parameter the error is about (the library names it only as that)."""
    for name in names:
        if "_" in name or name == param:
            message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/])", f"--{name}", message)
    return message


def resolve_model_paths(ckpt_dir: Optional[str], tokenizer_path: Optional[str]
                        ) -> Tuple[str, str]:
    """The given paths, or the bundled demo model when no ckpt_dir is given (`run` says so on
    stderr). Without tokenizer_path, tokenizer.model in ckpt_dir or its parent."""
    if ckpt_dir is None:
        from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

        return DEMO_CKPT_DIR, tokenizer_path or DEMO_TOKENIZER_PATH
    check_ckpt_dir(ckpt_dir, ArgumentFileNotFoundError)
    if tokenizer_path is None:
        candidates = [os.path.join(ckpt_dir, "tokenizer.model"),
                      os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "tokenizer.model")]
        found = [path for path in candidates if os.path.isfile(path)]
        if not found:
            raise ArgumentFileNotFoundError(
                "tokenizer_path", f"tokenizer_path not given and no tokenizer.model found in "
                                  f"{ckpt_dir} or its parent: pass tokenizer_path")
        tokenizer_path = found[0]
    return ckpt_dir, tokenizer_path


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def quiet_other_ranks() -> None:
    """Under torchrun every rank runs the script; only rank 0 should print."""
    if not is_rank0():
        sys.stdout = open(os.devnull, "w")


def _announce_demo_model(applied: Dict[str, Any]) -> None:
    from llama.cli.demo import demo_model_message

    _say(demo_model_message())
    if applied:
        reasons = "; ".join(DEMO_REASONS[name] for name in applied if name in DEMO_REASONS)
        given = " ".join(f"--{name} {value}" for name, value in applied.items())
        _say(f"With the demo model: {given}" + (f" ({reasons})" if reasons else "")
             + "; give these flags to change them.")


def _parse_value(parameter: inspect.Parameter, value: Any) -> Any:
    if not isinstance(value, str):
        return value  # True or False from --flag / --noflag
    kind, _ = _hint(parameter.annotation)
    if kind is str:
        return value
    if kind is bool and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind in (int, float):
        try:
            return kind(value)  # "nan" and "inf" are numbers here, for the range check
        except ValueError:
            pass
    return DefaultParseValue(value)


def _hint(annotation) -> Tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        others = [a for a in args if a is not type(None)]
        return (others[0] if len(others) == 1 else None), True
    return annotation, False


def _metavar(name: str) -> str:
    return "DIR" if name.endswith("_dir") else "FILE" if name.endswith("_path") else "TEXT"


def _is_flag(token: str) -> bool:
    return token.startswith("--") or re.match("^-[a-zA-Z]", token) is not None  # not "-1"


def _say(line: str) -> None:
    if is_rank0():
        print(line, file=sys.stderr, flush=True)


def show_warnings_as_lines(names: Sequence[str]) -> None:
    """From here on, a LlamaWarning prints as one `warning: ...` line on rank 0, with the
    command's flag `names` for the library's parameter names (in_flag_terms); other warnings
    as before."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, LlamaWarning):
            return original(message, category, filename, lineno, file, line)
        _say(f"warning: {in_flag_terms(str(message), names)}")

    warnings.showwarning = show


def _leave(status: int) -> None:
    """Leave the process group (with the others when all went well), then exit."""
    import torch.distributed as dist

    from llama.engine.distributed import shutdown

    sys.stdout.flush()
    if status == 0:
        shutdown()
        sys.exit(0)
    if dist.is_initialized():
        dist.destroy_process_group()  # no barrier: another rank may be gone already
    if not is_rank0():
        # torchrun stops every process once one has failed: let rank 0 print its line first.
        time.sleep(1.0)
    sys.exit(status)
