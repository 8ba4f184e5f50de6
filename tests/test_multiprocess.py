"""Several processes under torchrun, against one process: same tokens, same logprobs."""

import json
import math

import pytest

from tests.conftest import REPO, run_workers

# (kind, shard count, processes): the runs compared with one process on one shard; under
# torchrun they share one launch per process count (module fixture `runs`)
RUNS = [("gqa", 2, 2),  # two shards on two processes
        ("mha", 2, None),  # merge: 2 shards on 1 process
        ("mha", 4, 2),  # merge: 4 shards on 2 processes
        ("gqa", 1, 2)]  # split: 1 shard on 2 processes


def _assert_same(got, want):
    assert got["shapes_ok"] and want["shapes_ok"]
    for key in ("completions", "echoed"):
        for g, w in zip(got[key], want[key]):
            assert g["generation"] == w["generation"] and g["tokens"] == w["tokens"]
            assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(g["logprobs"],
                                                                          w["logprobs"]))
    # the same seed on every rank: the same samples as one process
    assert [s["generation"] for s in got["sampled"]] == [s["generation"] for s in want["sampled"]]
    assert "".join(got["pieces"]) == got["stream_text"] == want["stream_text"]


@pytest.fixture(scope="module")
def one_process(checkpoints, tokenizer_path, tmp_path_factory):
    outputs = run_workers([dict(ckpt_dir=checkpoints(kind, 1), tokenizer_path=tokenizer_path)
                           for kind in ("gqa", "mha")], None, tmp_path_factory.mktemp("one"))
    return dict(zip(("gqa", "mha"), outputs))


@pytest.fixture(scope="module")
def runs(checkpoints, tokenizer_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    outputs = {}
    for nproc in (None, 2):
        mine = [run for run in RUNS if run[2] == nproc]
        jobs = [dict(ckpt_dir=checkpoints(kind, n_shards), tokenizer_path=tokenizer_path)
                for kind, n_shards, _ in mine]
        outputs.update(zip(mine, run_workers(jobs, nproc, tmp)))
    return outputs


def test_two_processes_on_two_shards_equal_one_process_on_merged_weights(runs, one_process):
    got = runs["gqa", 2, 2]
    assert got["world"] == 2
    _assert_same(got, one_process["gqa"])


@pytest.mark.parametrize("kind, n_shards, nproc", RUNS[1:])
def test_any_shard_count_on_any_valid_process_count(kind, n_shards, nproc, runs, one_process):
    got = runs[kind, n_shards, nproc]
    assert got["world"] == (nproc or 1)
    _assert_same(got, one_process[kind])


def test_two_nodes_through_torchrun_rendezvous(checkpoints, tokenizer_path, tmp_path,
                                               one_process):
    """Two "machines" of one process each, joined by torchrun's c10d rendezvous on loopback."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    out = tmp_path / "nodes.json"
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "llama-test",
               "--rdzv_endpoint", f"127.0.0.1:{port}", str(REPO / "tests" / "mp_worker.py"),
               checkpoints("mha", 2), tokenizer_path, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    got = json.loads(out.read_text())
    assert got["world"] == 2
    _assert_same(got, one_process["mha"])
