"""The keyboard of an interactive chat: Ctrl-C while an answer streams stops that answer and
keeps the conversation; Ctrl-D at the prompt leaves, Ctrl-C there interrupts (KeyboardInterrupt:
the script exits with status 130, as a shell's command stopped by Ctrl-C).

Under torchrun a Ctrl-C signal cannot be used for this: the terminal sends SIGINT to torchrun
(its workers run in sessions of their own), and torchrun then stops every worker. So when rank
0 reads a terminal, Ctrl-C is made an ordinary key there (the terminal's ISIG flag is turned
off while the chat runs): at the prompt it ends the line being typed (it is the terminal's
end-of-line character, VEOL), and while an answer streams a thread reads it as a key press.
After that first Ctrl-C during an answer, the terminal sends signals again, so a second one
leaves whatever is still running (through torchrun, which then stops every process). The
terminal's settings are restored when the chat ends, also on SIGTERM or SIGHUP. Keys other
than Ctrl-C typed while an answer streams are dropped.

Without a terminal (input from a pipe), a single process stops the answer on SIGINT instead.
"""

import contextlib
import os
import select
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

try:
    import termios
except ImportError:  # not on Windows: Ctrl-C is then left to the default SIGINT handling
    termios = None

CTRL_C = b"\x03"
# The terminal's UTF-8 line editing flag (termios has it from Python 3.12 on; Linux's value).
IUTF8 = getattr(termios, "IUTF8", 0o40000 if sys.platform.startswith("linux") else 0)


class Keyboard:
    """Use on rank 0 only: `read_line` for the user's turns, `answering` around each answer."""

    def __init__(self, stdin=None):
        stdin = stdin or sys.stdin
        self.fd: Optional[int] = None
        self.encoding = getattr(stdin, "encoding", None) or "utf-8"
        try:
            if termios is not None and stdin.isatty():
                self.fd = stdin.fileno()
                self.saved = termios.tcgetattr(self.fd)
        except (OSError, ValueError, getattr(termios, "error", OSError)):
            self.fd = None
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self._old_handlers = {}
        if self.fd is not None:
            for sig in (signal.SIGTERM, signal.SIGHUP):  # restore the terminal on the way out
                self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)
            self._set(isig=False, canonical=True)

    def close(self) -> None:
        """Give the terminal its settings back."""
        if self.fd is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self.fd = None

    def read_line(self, prompt: str) -> Optional[str]:
        """A line typed after `prompt`, or None for Ctrl-D (at an empty line: the input
        ends). Raises KeyboardInterrupt for Ctrl-C (a key on a terminal, else SIGINT)."""
        try:
            print(prompt, end="", flush=True)
            return self._read()
        except KeyboardInterrupt:  # (a signal may come as the prompt is printed)
            print(flush=True)  # the line said next (on stderr) starts a line of its own
            raise

    def _read(self) -> Optional[str]:
        if self.fd is None:
            try:
                return input()
            except EOFError:
                print()
                return None
        self._set(isig=False, canonical=True)
        # In canonical mode one read returns one line, ended by Enter, Ctrl-C (VEOL) or Ctrl-D.
        data = os.read(self.fd, 65536)
        if CTRL_C in data:
            raise KeyboardInterrupt
        if not data:
            print()
            return None
        return data.decode(self.encoding, "replace").rstrip("\n")

    @contextlib.contextmanager
    def answering(self) -> Iterator[Callable[[], bool]]:
        """While the body streams an answer: yields a function that says whether Ctrl-C was
        pressed."""
        pressed = threading.Event()
        if self.fd is None:
            if self.under_torchrun:  # torchrun takes the signal and stops every process
                yield pressed.is_set
                return

            def on_sigint(signum, frame):
                pressed.set()
                signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one leaves

            old = signal.signal(signal.SIGINT, on_sigint)
            try:
                yield pressed.is_set
            finally:
                signal.signal(signal.SIGINT, old)
            return
        self._set(isig=False, canonical=False)
        done = threading.Event()
        reader = threading.Thread(target=self._watch, args=(pressed, done), daemon=True)
        reader.start()
        try:
            yield pressed.is_set
        finally:
            done.set()
            reader.join()
            self._set(isig=False, canonical=True)

    def _watch(self, pressed: threading.Event, done: threading.Event) -> None:
        while not done.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready and CTRL_C in os.read(self.fd, 1024):
                pressed.set()
                self._set(isig=True, canonical=False)  # a second Ctrl-C is a signal again
                return

    def _set(self, isig: bool, canonical: bool) -> None:
        attrs = termios.tcgetattr(self.fd)
        lflag = attrs[3]
        for flag, on in ((termios.ISIG, isig), (termios.ICANON, canonical),
                         (termios.ECHO, canonical)):
            lflag = lflag | flag if on else lflag & ~flag
        attrs[3] = lflag
        if canonical and self.encoding.lower().replace("-", "") == "utf8":
            attrs[0] |= IUTF8  # backspace erases a whole character (你), not its last byte
        attrs[6] = list(attrs[6])
        attrs[6][termios.VEOL] = CTRL_C if canonical else self.saved[6][termios.VEOL]
        if not canonical:
            attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)
