"""Servers for the tests: `python -m llama.server` (or under torchrun) on 127.0.0.1 at a free
port, waited for until /health answers, always stopped afterwards."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

from tests.conftest import REPO, free_port


class ServerUrl(str):
    """The base URL ("http://127.0.0.1:PORT"), and the server's `process` (its `log` file
    readable with read_log, also after it stopped)."""
    process: subprocess.Popen


@contextmanager
def running_server(*args, nproc=None, timeout=120, env=None, code=None):
    """Yields the ServerUrl of a server started with `args`; stops it on leaving. `env`
    overrides the environment's defaults here (one torch thread, no GPU). `code`, if given,
    is run with `python -c` instead of `-m llama.server` (it calls llama.server.app.main itself,
    after patching what a test needs patched), with the same arguments."""
    port = free_port()
    entry = ["-m", "llama.server"] if code is None else ["-c", code]
    server = entry + ["--port", str(port)] + list(args)
    if nproc is None:
        command = [sys.executable] + server
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port())] + server
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO), **(env or {})}
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, text=True,
                               start_new_session=True)
    process.log = log
    url = ServerUrl(f"http://127.0.0.1:{port}")
    url.process = process
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}):\n"
                                   f"{read_log(process)[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if json.loads(response.read())["status"] == "ok":
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not answer /health in time")
            time.sleep(0.2)
        yield url
    finally:
        stop(process)


def refused_by_the_parser(argv, capsys):
    """(exit status, stderr) of llama.server's main(argv) run in this process, for a command
    line its argument parser refuses (SystemExit, before the model or uvicorn is touched).
    `python -m llama.server` makes these the process's status and stderr, as
    tests/test_server_api.py checks with real processes."""
    from llama.server.app import main

    try:
        main(argv)
    except SystemExit as refused:
        return refused.code, capsys.readouterr().err
    raise AssertionError(f"main({argv}) was not refused")


def read_log(process) -> str:
    process.log.seek(0)
    return process.log.read()


def stop(process, timeout=30):
    """SIGINT, as Ctrl-C would send it (to the whole process group: torchrun and its
    workers); SIGKILL if it does not end in time. Returns the exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def streamed_arguments(client, kwargs):
    """The argument pieces of the openai client's stream helper, and its final completion."""
    pieces = []
    with client.chat.completions.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces.append(event.arguments_delta)
        return pieces, stream.get_final_completion()
