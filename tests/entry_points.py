"""Run by tests.conftest.run_entry_points: several command lines of `python`, one after the
other in this one process, each run as python runs it (runpy: `-m module` or a script, as
__main__, with its sys.argv and sys.path[0]), its output caught at file descriptors 1 and 2 and
its exit status the one python would give. For command lines refused before anything loads:
torch's import is paid once for all of them.

    python tests/entry_points.py COMMANDS.json RESULTS.json
"""

import json
import os
import runpy
import sys
import tempfile
import traceback


def status_of(exit: SystemExit) -> int:
    """The process status python gives a SystemExit (a message is printed to stderr)."""
    if exit.code is None or isinstance(exit.code, int):
        return exit.code or 0
    print(exit.code, file=sys.stderr)
    return 1


def run(args):
    """Runs `python *args` here; returns its exit status."""
    try:
        if args[0] == "-m":
            sys.argv = [args[1]] + args[2:]  # runpy sets argv[0] to the module's file
            sys.path[0] = os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exit:
        return status_of(exit)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def caught(args):
    """(status, stdout, stderr) of run(args), the output as the file descriptors received it."""
    saved = sys.stdout, sys.stderr, os.dup(1), os.dup(2), os.getcwd()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            status = run(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = saved[:2]
            os.dup2(saved[2], 1)
            os.dup2(saved[3], 2)
            os.close(saved[2])
            os.close(saved[3])
            os.chdir(saved[4])
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
    return [status, *texts]


if __name__ == "__main__":
    commands_path, results_path = sys.argv[1:]  # before the commands set sys.argv
    with open(commands_path) as f:
        commands = json.load(f)
    results = [caught(args) for args in commands]
    with open(results_path, "w") as f:
        json.dump(results, f)
