"""What a newcomer trips over first (issue #25's second newcomer pass): wrong paths and stray
words on the command line, `--quantize none`, text that is not UTF-8, the interactive chat's
commands and cut answers, and reshard's tokenizer."""

import shutil
import subprocess
import sys

import pytest

from llama.cli.flags import check_flags, parse_flags, resolve_model_paths
from llama.engine.validation import ArgumentFileNotFoundError, ArgumentValueError
from tests.conftest import REPO, run_entry_points, run_script


def _text_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_example",
                                                  REPO / "example_text_completion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_wrong_ckpt_dir_is_named_not_the_tokenizer(tmp_path):
    with pytest.raises(ArgumentFileNotFoundError, match="ckpt_dir 'nope' does not exist"):
        resolve_model_paths("nope", None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentFileNotFoundError, match="is not a directory"):
        resolve_model_paths(str(tmp_path / "file"), None)


def test_quantize_none_as_the_help_says():
    main = _text_main()
    assert check_flags(main, parse_flags(main, ["--quantize", "none"]))["quantize"] is None
    result = run_script(["example_text_completion.py", "--quantize", "none", "--max_gen_len",
                         "2"], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]


STRAY_WORD = ["example_text_completion.py", "llama-2-7b/"]


def test_a_stray_word_is_refused_by_the_scripts(mistakes):
    status, _, stderr = mistakes[tuple(STRAY_WORD)]
    assert status == 2
    assert "unexpected argument 'llama-2-7b/'" in stderr
    assert "--ckpt_dir llama-2-7b/" in stderr


def test_text_that_is_not_utf8_is_an_argument_error(library):
    with pytest.raises(ArgumentValueError, match=r"prompt 1 holds '\\udce9'"):
        library.text_completion(["caf\udce9"], max_gen_len=2)
    with pytest.raises(ArgumentValueError, match="dialog 1, message 1 content"):
        library.chat_completion([[{"role": "user", "content": "\ud800"}]], max_gen_len=2)
    with pytest.raises(ArgumentValueError, match="prompt holds"):
        library.stream_text("x\ud800")


@pytest.fixture(scope="module")
def library():
    from llama import Llama
    from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

    return Llama.build(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, 128, 1, device="cpu", verbose=False)


def test_the_chat_refuses_unknown_commands_marks_cut_answers_and_reads_bad_bytes():
    lines = b"/help\nHello \xe9\xff there\n//slash message\n/exit\n"
    result = subprocess.run([sys.executable, "example_chat_interactive.py", "--max_gen_len",
                             "4", "--temperature", "0"], input=lines, capture_output=True,
                            cwd=REPO, timeout=240,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO),
                                 "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:"
                                 "surrogateescape", "CUDA_VISIBLE_DEVICES": ""})
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "(unknown command /help" in out
    assert out.count("Assistant: ") == 2  # the bad bytes' line and the // one were answered
    assert out.count("[cut: --max_gen_len") == 2  # 4 tokens: the demo model never ends so soon
    assert b"Traceback" not in result.stderr


def test_reshard_copies_the_tokenizer(checkpoints, tokenizer_path, tmp_path):
    from llama.checkpoints.reshard import main as reshard_main

    src = tmp_path / "src"
    shutil.copytree(checkpoints("gqa", 2), src)
    shutil.copy(tokenizer_path, src / "tokenizer.model")
    assert reshard_main([str(src), str(tmp_path / "one"), "--mp", "1"]) == 0
    assert (tmp_path / "one" / "tokenizer.model").read_bytes() == \
        (src / "tokenizer.model").read_bytes()


TOOL_MISTAKES = [
    (["-m", "llama.server", "--max_bach_size", "2"],
     "error: unknown flag --max_bach_size (did you mean --max_batch_size?); "
     "`python -m llama.server --help` lists the flags"),
    (["-m", "llama.server", "stray"], "error: unexpected argument 'stray'"),
    (["-m", "llama.reshard", "a", "b", "--mp", "1", "--mpp"],
     "error: unknown flag --mpp (did you mean --mp?)"),
    (["-m", "llama.quantize", "a", "b", "--mode", "int8", "--group-size", "32"],
     "error: unknown flag --group-size (did you mean --group_size?)"),
    (["-m", "llama.convert", "a", "b", "--to", "hf", "--max_shard_sise", "1GB"],
     "error: unknown flag --max_shard_sise (did you mean --max_shard_size?); "
     "`python -m llama.convert --help` lists the flags"),
    (["-m", "llama.memory", "4096", "--family", "llama3"], "error: unknown flag --family"),
    (["-m", "llama.checklist", "checklist.chk", "--lst"],
     "error: unknown flag --lst (did you mean --list?); `python -m llama.checklist --help` "
     "lists the flags"),
]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """(status, stdout, stderr) by command line, of the mistaken command lines of this module:
    each run as `python` runs it, all in one process (refused before anything loads)."""
    commands = [STRAY_WORD] + [args for args, _ in TOOL_MISTAKES]
    results = run_entry_points(commands, tmp_path_factory.mktemp("mistakes"))
    return dict(zip(map(tuple, commands), results))


@pytest.mark.parametrize("args, says", TOOL_MISTAKES)
def test_the_tools_say_mistakes_as_the_scripts_do(args, says, mistakes):
    status, _, stderr = mistakes[tuple(args)]
    assert status == 2 and stderr.startswith(says), stderr
    assert "usage:" not in stderr
