"""The example scripts' command line (llama/cli/flags.py): flags read as fire reads them, unknown
ones refused, values checked, one help line per flag. Pure functions, no model."""

import importlib.util
import inspect
import math

import pytest

from llama.cli.flags import UsageError, check_flags, help_text, in_flag_terms, parse_flags
from llama.engine.validation import ArgumentTypeError, ArgumentValueError
from tests.conftest import REPO

SCRIPTS = ["example_text_completion.py", "example_chat_completion.py",
           "example_chat_interactive.py"]


def script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text_main():
    return script("example_text_completion.py").main


@pytest.fixture(scope="module")
def chat_main():
    return script("example_chat_interactive.py").main


def test_flags_are_read_as_fire_reads_them(text_main, chat_main):
    assert parse_flags(text_main, ["--temperature", "0", "--top_p=0.5", "--max-seq-len", "64",
                                   "--stream", "--noshow_speed", "-v"]) == dict(
        temperature=0, top_p=0.5, max_seq_len=64, stream=True, show_speed=False, verify=True)
    assert parse_flags(text_main, ["--temperature", "-1"]) == dict(temperature=-1)
    # text as typed for str flags (fire would give the tuple (1, 2) and the int 42)
    assert parse_flags(chat_main, ["--system", "1, 2", "--device=42"]) == dict(
        system="1, 2", device="42")
    assert math.isnan(parse_flags(text_main, ["--temperature", "nan"])["temperature"])
    assert parse_flags(text_main, ["--verify=false"]) == dict(verify=False)


@pytest.mark.parametrize("argv, message", [
    (["--max_seqlen", "64"], r"unknown flag --max_seqlen \(did you mean --max_seq_len\?\)"),
    (["--max_seqlen=64"], r"unknown flag --max_seqlen \(did you mean"),
    (["--quiet"], r"^unknown flag --quiet$"),
    (["-s", "1"], r"unknown flag -s"),  # -s could be --stream or --show_speed
    (["--", "--help"], r"unknown flag --"),
    # a stray word is refused, not made the checkpoint directory (fire fills parameters)
    (["llama-2-7b/"], r"unexpected argument 'llama-2-7b/' \(flags are written --name value, "
                      r"e.g. --ckpt_dir llama-2-7b/\)"),
    (["--temperature", "0", "extra"], r"unexpected argument 'extra'"),
])
def test_unknown_flags_and_extra_values_are_refused(text_main, argv, message):
    with pytest.raises(UsageError, match=message):
        parse_flags(text_main, argv)


@pytest.mark.parametrize("argv, error, message", [
    (["--temperature", "nan"], ArgumentValueError, "^temperature must be a finite number"),
    (["--temperature", "abc"], ArgumentTypeError, "^temperature must be a number, got str"),
    (["--top_p", "2"], ArgumentValueError, r"^top_p must be in \(0, 1\]"),
    (["--max_gen_len", "3.5"], ArgumentTypeError, "^max_gen_len must be an integer, got 3.5"),
    (["--dtype", "float64"], ArgumentValueError, "^dtype 'float64' is not supported"),
    (["--stream=maybe"], ArgumentTypeError, "^stream must be True or False"),
    (["--ckpt_dir"], ArgumentTypeError, "^ckpt_dir must be followed by a value"),
])
def test_values_are_checked_before_main_runs(text_main, argv, error, message):
    with pytest.raises(error, match=message):
        check_flags(text_main, parse_flags(text_main, argv))


def test_defaults_fill_what_is_not_given(text_main):
    flags = check_flags(text_main, parse_flags(text_main, ["--max_gen_len", "8"]))
    assert flags["max_gen_len"] == 8 and flags["max_seq_len"] == 128
    assert flags["ckpt_dir"] is None and flags["stream"] is False


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_has_one_line_per_flag_with_its_default(name):
    module = script(name)
    text = help_text(module.main, name, getattr(module, "DEMO_DEFAULTS", None))
    lines = text.splitlines()
    assert lines[0] == f"usage: python {name} [--flag value ...]"
    assert "Optional[" not in text and "--show_speed" not in lines[3]  # the summary line
    for parameter in inspect.signature(module.main).parameters:
        rows = [line for line in lines if line.startswith(f"  --{parameter} ")
                or line == f"  --{parameter}" or line.startswith(f"  --{parameter}  ")]
        assert len(rows) == 1, (parameter, text)
        description = rows[0].split(None, 2)[-1]
        assert "(default:" in description and len(description) > 25, rows[0]
    ckpt = next(line for line in lines if line.startswith("  --ckpt_dir"))
    assert "demo model" in ckpt
    for flag, value in getattr(module, "DEMO_DEFAULTS", {}).items():
        row = next(line for line in lines if line.startswith(f"  --{flag}"))
        assert f"{value} with the demo model" in row


def test_library_messages_become_flags():
    assert in_flag_terms("prompt 2 has 40 tokens, more than max_seq_len=8",
                         ["max_seq_len", "device"]) == \
        "prompt 2 has 40 tokens, more than --max_seq_len=8"
    assert in_flag_terms("device 'cuda' is not here: leave device unset", ["device"],
                         "device") == "--device 'cuda' is not here: leave --device unset"
    # a plain word is left alone unless the error is about it; paths are left alone
    assert in_flag_terms("on this device, in /data/max_seq_len/x", ["device", "max_seq_len"]) \
        == "on this device, in /data/max_seq_len/x"
