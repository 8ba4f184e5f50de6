"""The example scripts end to end: one process, two under torchrun, and the interactive chat
driven through a real pseudo-terminal as a person would type into it."""

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import REPO, free_port, run_entry_points, run_script

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


BAD_FLAGS = [
    (["--max_seqlen", "64"], 2, "error: unknown flag --max_seqlen (did you mean --max_seq_len?)"),
    (["--temperature", "-1"], 1, "error: --temperature must be >= 0 (0 is greedy), got -1"),
]


def _missing(tmp):
    """The chat script given a checkpoint directory and a tokenizer that do not exist."""
    return ("example_chat_completion.py", "--ckpt_dir", str(tmp / "nope"), "--tokenizer_path",
            str(tmp / "nope.model"))


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """The scripts on mistaken command lines, all run in one process (tests/entry_points.py):
    (status, stdout, stderr) by command line, and the folder _missing names."""
    tmp = tmp_path_factory.mktemp("mistakes")
    commands = [("example_text_completion.py", *flags) for flags, _, _ in BAD_FLAGS]
    commands.append(_missing(tmp))
    return tmp, dict(zip(commands, run_entry_points([list(c) for c in commands], tmp)))


@pytest.mark.parametrize("flags, status, message", BAD_FLAGS)
def test_bad_flags_end_the_script_in_one_line_before_loading(flags, status, message, mistakes):
    returncode, stdout, stderr = mistakes[1][("example_text_completion.py", *flags)]
    assert returncode == status
    assert stderr.splitlines() == [stderr.splitlines()[0]]  # one line, no load
    assert stderr.startswith(message) and stdout == ""


def test_missing_checkpoint_and_tokenizer_name_the_checkpoint_flag(mistakes):
    tmp, results = mistakes
    returncode, _, stderr = results[_missing(tmp)]
    assert returncode == 1
    assert stderr.splitlines() == [
        f"error: --ckpt_dir '{tmp / 'nope'}' does not exist: it should be a checkpoint "
        f"directory such as llama-2-7b/, holding params.json and consolidated.NN.pth (see "
        f"download.sh), or a Hugging Face directory holding config.json and *.safetensors"]


def test_impossible_process_count_is_said_once_under_torchrun(checkpoints, tokenizer_path):
    result = run_script(["example_text_completion.py", "--ckpt_dir", checkpoints("gqa"),
                         "--tokenizer_path", tokenizer_path], nproc=3)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert log.count("error: this model") == 1
    assert "cannot be split across 3 processes; use one of [1, 2] for torchrun " \
           "--nproc_per_node" in log
    assert "example_text_completion.py\", line" not in log  # no traceback of the script


def test_demo_chat_stops_answers_at_64_tokens_and_says_so():
    result = run_script(["example_chat_completion.py", "--temperature", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "With the demo model: --max_gen_len 64 (it rarely ends an answer by itself); give " \
           "these flags to change them." in result.stderr
    assert result.stdout.count("> Assistant: ") == 4


def test_help_is_printed_at_once_in_a_terminal():
    """No pager, even with stdout on a terminal and PAGER set."""
    term = Terminal([sys.executable, "example_chat_interactive.py", "--help"],
                    {**os.environ, "PAGER": "less", "PYTHONPATH": str(REPO)})
    term.expect("-h, --help")
    assert term.close() == 0
    assert "--max_seq_len N" in term.screen


def _take_as_controlling_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # in the child, after setsid: as a shell would


class Terminal:
    """A program on a pseudo-terminal, its controlling terminal (so Ctrl-C would send SIGINT
    unless the program turns that off): type lines, wait for what it prints."""

    def __init__(self, command, env):
        self.master, self.slave = pty.openpty()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=self.slave,
                                        stdout=self.slave, stderr=self.slave, close_fds=True,
                                        start_new_session=True,
                                        preexec_fn=_take_as_controlling_terminal)
        self.screen = ""

    def expect(self, text, timeout=120, count=1):
        return self._read_until(lambda: self.screen.count(text) >= count, timeout, repr(text))

    def more(self, chars, timeout=120):
        """Wait until `chars` more characters are on the screen."""
        wanted = len(self.screen) + chars
        return self._read_until(lambda: len(self.screen) >= wanted, timeout, f"{chars} chars")

    def _read_until(self, done, timeout, what):
        deadline = time.time() + timeout
        while not done():
            if time.time() > deadline:
                raise AssertionError(f"waited for {what}; screen:\n{self.screen[-3000:]}")
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

    def rest(self, timeout=60):
        """The screen once the program has exited and printed all it prints."""
        self._read_until(lambda: self.process.poll() is not None, timeout, "its exit")
        while select.select([self.master], [], [], 0.2)[0]:
            self.screen += os.read(self.master, 65536).decode("utf-8", "replace")
        return self.screen

    def close(self):
        """The program's exit status; afterwards `lflag` holds the terminal's local modes."""
        try:
            return self.process.wait(timeout=60)
        finally:
            self.lflag = termios.tcgetattr(self.slave)[3]
            os.close(self.master)
            os.close(self.slave)


def _answer(screen_after_prompt: str) -> str:
    """The answer text, without the speed report that follows it nor the marker of an answer
    cut at --max_gen_len."""
    answer = screen_after_prompt.split("User: ")[0].replace(
        " [cut: --max_gen_len or --max_seq_len reached]", "")
    return re.sub(r"\(\d+ tokens, [\d.]+ tokens/s, \d+ prompt tokens prefilled\)", "",
                  answer).strip()


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
    assert "prompt tokens prefilled)" in term.screen
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


@pytest.mark.parametrize("nproc", [None, 2])
def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(nproc, checkpoints, tokenizer_path):
    """The first Ctrl-C stops the answer being written (on every rank: rank 0's key is
    broadcast after each token), and the conversation goes on; Ctrl-C at the prompt then
    interrupts every process (torchrun never sees a signal): status 130, as a shell's command
    stopped by Ctrl-C, one line and no traceback."""
    script = ["example_chat_interactive.py", "--ckpt_dir", checkpoints("gqa", nproc or 1),
              "--tokenizer_path", tokenizer_path, "--temperature", "0", "--max_seq_len", "2048",
              "--max_gen_len", "1500"]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port())] + script
    else:
        command = [sys.executable] + script
    term = Terminal(command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    term.expect("User: ")
    for turn in (1, 2):
        term.type("Hello there, what is a list?")
        term.expect("Assistant: ", count=turn)
        term.more(20)  # it has begun to answer
        os.write(term.master, b"\x03")  # Ctrl-C
        term.expect("[stopped]", count=turn)
        term.expect("User: ", count=turn + 1)
    os.write(term.master, b"\x03")  # Ctrl-C at the prompt
    term.expect("interrupted")
    term.rest()
    status = term.close()
    # torchrun ends with its own status (1) when its workers fail, as they do here (130 each)
    assert status == (130 if nproc is None else 1), term.screen[-3000:]
    assert term.screen.count("interrupted") == 1 and "Bye." not in term.screen
    assert 'example_chat_interactive.py", line' not in term.screen  # no traceback of ours
    if nproc is None:
        assert "Traceback" not in term.screen
    else:
        assert "exitcode  : 130" in term.screen, term.screen[-3000:]
    assert all(term.lflag & flag for flag in (termios.ISIG, termios.ICANON, termios.ECHO))


def _chat_on_a_pipe(checkpoints, tokenizer_path):
    """The interactive chat reading a pipe (no terminal to read Ctrl-C from), and a function
    that reads what it prints until `done(all of it)`, then returns all of it."""
    command = [sys.executable, "example_chat_interactive.py", "--ckpt_dir", checkpoints("gqa"),
               "--tokenizer_path", tokenizer_path, "--temperature", "0", "--max_seq_len",
               "2048", "--max_gen_len", "1500"]
    # SIGINT as a terminal's user has it: a CI job started in the background inherits it
    # ignored (bash ignores SIGINT in asynchronous commands), and so would the chat
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    screen = [b""]

    def read_until(done):
        deadline = time.time() + 120
        while not done(screen[0]):
            assert time.time() < deadline, screen[0][-3000:]
            if select.select([process.stdout], [], [], 0.5)[0]:
                part = os.read(process.stdout.fileno(), 65536)
                assert part, f"the chat ended: {screen[0][-3000:]!r}"
                screen[0] += part
        return screen[0]

    return process, read_until


def test_sigint_at_the_prompt_exits_130_in_one_line(checkpoints, tokenizer_path):
    """Ctrl-C (SIGINT) at the prompt interrupts the chat: status 130, as a shell's command
    stopped by Ctrl-C; one "interrupted" line, no traceback."""
    process, read_until = _chat_on_a_pipe(checkpoints, tokenizer_path)
    try:
        read_until(lambda screen: b"User: " in screen)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
        screen = read_until(lambda screen: True) + process.stdout.read()
    finally:
        process.kill()  # if still running
    assert status == 130, screen[-3000:]
    assert screen.decode().splitlines()[-1] == "interrupted", screen[-3000:]
    assert b"Traceback" not in screen and b"Bye." not in screen


def test_sigint_without_a_terminal_stops_an_answer(checkpoints, tokenizer_path):
    """Input from a pipe: one process stops an answer on SIGINT; the end of the input
    (Ctrl-D) ends the chat with status 0."""
    process, read_until = _chat_on_a_pipe(checkpoints, tokenizer_path)
    read_until(lambda screen: b"User: " in screen)
    process.stdin.write(b"Hello there, what is a list?\n")
    process.stdin.flush()
    begun = len(read_until(lambda screen: b"Assistant: " in screen)) + 20
    read_until(lambda screen: len(screen) >= begun)
    process.send_signal(signal.SIGINT)
    read_until(lambda screen: b"[stopped]" in screen and screen.count(b"User: ") == 2)
    process.stdin.close()  # Ctrl-D
    read_until(lambda screen: b"Bye." in screen)
    assert process.wait(timeout=60) == 0


def test_the_chat_prompt_edits_chinese_and_ctrl_c_interrupts():
    """The prompt's line editing (the terminal's, as with input()): backspace erases a whole
    character of a Chinese line; Ctrl-C ends the line as an interrupt."""
    # llama/cli/keyboard.py imports nothing of the package: loaded from its file, the program
    # does not pay for torch's import (llama/__init__.py's)
    program = ("import importlib.util, sys\n"
               "spec = importlib.util.spec_from_file_location('keyboard', sys.argv[1])\n"
               "module = importlib.util.module_from_spec(spec)\n"
               "spec.loader.exec_module(module)\n"
               "keyboard = module.Keyboard()\n"
               "try:\n"
               "    for _ in range(2): print(repr(keyboard.read_line('User: ')), flush=True)\n"
               "except KeyboardInterrupt:\n"
               "    print('KeyboardInterrupt', flush=True)\n"
               "finally:\n"
               "    keyboard.close()\n")
    term = Terminal([sys.executable, "-c", program, str(REPO / "llama" / "cli" / "keyboard.py")],
                    {**os.environ, "PYTHONPATH": str(REPO)})
    term.expect("User: ")
    os.write(term.master, "上下五千年，英雄万万千。你好吗\x7f\x7f\n".encode())
    term.expect("'上下五千年，英雄万万千。你'")
    os.write(term.master, b"abc\x03")
    term.expect("KeyboardInterrupt")
    assert term.close() == 0
    assert all(term.lflag & flag for flag in (termios.ISIG, termios.ICANON, termios.ECHO))
