"""The example scripts end to end: one process, two under torchrun, and the interactive chat
driven through a real pseudo-terminal as a person would type into it."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, run_script

PROMPT_STARTS = ["I believe the meaning of life is", "Simply put, the theory of relativity",
                 "A brief message congratulating", "Translate English to French:"]


def _generations(stdout):
    assert "> initializing" not in stdout  # fairscale's chatter goes to stderr
    return stdout.splitlines()


@pytest.fixture(scope="module")
def text_one_process(checkpoints, tokenizer_path):
    result = run_script(["example_text_completion.py", "--ckpt_dir", checkpoints("gqa", 1),
                         "--tokenizer_path", tokenizer_path, "--temperature", "0",
                         "--max_gen_len", "12"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_text_example_prints_prompts_and_completions(text_one_process):
    out = text_one_process.stdout
    for start in PROMPT_STARTS:
        assert start in out
    assert out.count("\n> ") == 4
    assert out.count("==================================") == 4
    assert "Loaded in" in text_one_process.stderr and "Loaded in" not in out


def test_text_example_under_torchrun_matches_one_process(text_one_process, checkpoints,
                                                        tokenizer_path):
    result = run_script(["example_text_completion.py", "--ckpt_dir", checkpoints("gqa", 2),
                         "--tokenizer_path", tokenizer_path, "--temperature", "0",
                         "--max_gen_len", "12"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _generations(result.stdout) == _generations(text_one_process.stdout)


def test_text_example_streaming_prints_the_same(text_one_process, checkpoints, tokenizer_path):
    result = run_script(["example_text_completion.py", "--ckpt_dir", checkpoints("gqa", 1),
                         "--tokenizer_path", tokenizer_path, "--temperature", "0",
                         "--max_gen_len", "12", "--stream", "--show_speed"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _generations(result.stdout) == _generations(text_one_process.stdout)
    assert "tokens/s" in result.stderr


def test_chat_example_one_and_two_processes(checkpoints, tokenizer_path):
    runs = [run_script(["example_chat_completion.py", "--ckpt_dir", checkpoints("gqa", n),
                        "--tokenizer_path", tokenizer_path, "--temperature", "0",
                        "--max_gen_len", "8"], nproc=nproc)
            for n, nproc in ((1, None), (2, 2))]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    out = runs[0].stdout
    assert "User: what is the recipe of mayonnaise?" in out
    assert "System: Always answer with Haiku" in out
    assert out.count("> Assistant: ") == 4
    assert _generations(runs[1].stdout) == _generations(out)


class Terminal:
    """A program on a pseudo-terminal: type lines, wait for what it prints."""

    def __init__(self, command, env):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=slave, stdout=slave,
                                        stderr=slave, close_fds=True, start_new_session=True)
        os.close(slave)
        self.screen = ""

    def expect(self, text, timeout=120, count=1):
        deadline = time.time() + timeout
        while self.screen.count(text) < count:
            if time.time() > deadline:
                raise AssertionError(f"waited for {text!r}; screen:\n{self.screen[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:
                    if self.process.poll() is not None:
                        continue
        return self.screen

    def type(self, line):
        os.write(self.master, line.encode() + b"\n")

    def close(self):
        try:
            return self.process.wait(timeout=60)
        finally:
            os.close(self.master)


def _answer(screen_after_prompt: str) -> str:
    """The answer text, without the speed report that follows it."""
    answer = screen_after_prompt.split("User: ")[0]
    return re.sub(r"\(\d+ tokens, [\d.]+ tokens/s\)", "", answer).strip()


@pytest.mark.parametrize("nproc", [None, 2])
def test_interactive_chat_in_a_terminal(nproc, checkpoints, tokenizer_path):
    script = ["example_chat_interactive.py", "--ckpt_dir", checkpoints("gqa", nproc or 1),
              "--tokenizer_path", tokenizer_path, "--temperature", "0", "--max_seq_len", "96",
              "--max_gen_len", "12", "--system", "Answer briefly", "--show_speed"]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port())] + script
    else:
        command = [sys.executable] + script
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    term = Terminal(command, env)
    term.expect("User: ")
    term.type("Hello there, what is a list?")
    term.expect("Assistant: ")
    term.expect("User: ", count=2)
    first_answer = _answer(term.screen.split("Assistant: ")[1])
    term.type("And a dictionary, explained at some length please?")
    term.expect("User: ", count=3)
    term.type("Tell me more about dictionaries and sets and tuples and lists in Python")
    term.expect("User: ", count=4)
    assert "(dropped the" in term.screen  # the history outgrew max_seq_len
    assert "tokens/s)" in term.screen
    term.type("/reset")
    term.expect("(conversation reset)")
    term.type("Hello there, what is a list?")
    term.expect("User: ", count=6)
    after_reset = _answer(term.screen.split("Assistant: ")[-1])
    assert after_reset == first_answer  # a fresh conversation answers as the first did
    term.type("/exit")
    term.expect("Bye.")
    assert term.close() == 0


def test_interactive_chat_ends_on_ctrl_d(checkpoints, tokenizer_path):
    command = [sys.executable, "example_chat_interactive.py", "--ckpt_dir", checkpoints("gqa"),
               "--tokenizer_path", tokenizer_path]
    term = Terminal(command, {**os.environ, "PYTHONPATH": str(REPO)})
    term.expect("User: ")
    os.write(term.master, b"\x04")  # Ctrl-D at an empty line
    term.expect("Bye.")
    assert term.close() == 0
