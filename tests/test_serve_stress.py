"""The server with clients that hang up (benchmarks/serve_stress.py, scaled down): the others
get their full answers, equal to the library's alone, and the server ends clean. And the
serving benchmark's smoke run goes end to end."""

import asyncio
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fastapi")

from benchmarks import serve_stress
from benchmarks.serve_clients import expected_answers, request_mix  # noqa: E402
from llama import Llama  # noqa: E402
from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.server_fixtures import read_log, running_server  # noqa: E402


def test_a_third_hanging_up_leaves_the_others_answers_whole():
    library = Llama.build(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, 512, 1, device="cpu",
                          verbose=False)
    asks = request_mix(library.tokenizer, 30, seed=3, prompt_lens=(8, 16, 48),
                       answer_lens=(6, 12, 24))
    plan = serve_stress.hang_up_plan(len(asks), 1 / 3, seed=3, max_delay=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads crawl while the machine runs anything else
    try:
        expected = expected_answers(library, asks)
    finally:
        torch.set_num_threads(threads)
    with running_server("--max_batch_size", "4") as url:  # 6 clients: some wait for a slot
        before = serve_stress.health(url)
        answers, _ = asyncio.run(serve_stress.stress(int(url.rsplit(":", 1)[1]), asks, plan,
                                                     clients=6))
        after = serve_stress.settled_health(url)
        summary, problems = serve_stress.check(answers, plan, expected, before, after)
        assert url.process.poll() is None
        log = read_log(url.process)
    assert problems == []
    assert summary["kept"] == 20 and summary["hung up mid-stream"] > 0
    assert summary["cancelled"] > 0  # some hang-ups were noticed before their answer ended
    assert "Traceback" not in log, log[-3000:]


def _quick_run(script, root):
    """A benchmark's --quick run; returns its output and the rows of its tables."""
    out = subprocess.run([sys.executable, "-m", "benchmarks." + script[:-3], "--quick",
                          "--threads", "1", "--root", str(root)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, [line for line in out.stdout.splitlines() if line.startswith("| ")]


def test_serve_bench_quick_runs_end_to_end(tmp_path):
    _, rows = _quick_run("serve_bench.py", tmp_path)
    assert len(rows) == 3  # the header and 1 and 2 clients
    assert all(row.split(" | ")[-2] == "6/6" for row in rows[1:]), rows


def test_prefill_chunks_compares_alike_answers(tmp_path):
    stdout, rows = _quick_run("prefill_chunks.py", tmp_path)
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| 0", "| 4"]
    assert "answers the same under every value: True" in stdout
