"""Fixtures built at test time: a tokenizer trained on Python's own documentation and random
checkpoints in Meta's exact layout (one file per model-parallel rank)."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from llama.checkpoints.fixtures import LLAMA3_SHAPE, train_tokenizer, write_random_checkpoint
from llama.checkpoints.saving import params_json, save_checkpoint, split_state_dict
from llama.model import ModelArgs

REPO = Path(__file__).resolve().parent.parent
VOCAB = 1000

SHAPES = {
    # grouped-query attention, as in 70B: 4 query heads share 2 kv heads
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
    # multi-head attention, as in 7B/13B
    "mha": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32),
    # Llama 3.x's rules: rope_theta 500000, Meta's llama3 scaling, ffn_dim_multiplier, GQA
    "llama3": LLAMA3_SHAPE,
}
SEEDS = {"gqa": 11, "mha": 12, "llama3": 13}


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    return tmp_path_factory.mktemp("llama-fixtures")


@pytest.fixture(scope="session")
def tokenizer_path(fixture_root):
    return str(train_tokenizer(fixture_root / "tokenizer.model", VOCAB))


def model_args(kind: str, **overrides) -> ModelArgs:
    return ModelArgs(vocab_size=VOCAB, **{**SHAPES[kind], **overrides})


class Checkpoints:
    """Checkpoint directories by (shape, shard count); the same weights for every count."""

    def __init__(self, root: Path):
        self.root = root
        self.full = {}

    def __call__(self, kind: str, n_shards: int = 1) -> str:
        out = self.root / f"{kind}-mp{n_shards}"
        if not out.exists():
            self.full[kind] = write_random_checkpoint(out, model_args(kind), n_shards,
                                                      seed=SEEDS[kind])
        return str(out)

    def state(self, kind: str):
        self(kind, 1)
        return self.full[kind]

    def params(self, kind: str) -> dict:
        return json.loads((Path(self(kind, 1)) / "params.json").read_text())


@pytest.fixture(scope="session")
def checkpoints(fixture_root, tokenizer_path):
    return Checkpoints(fixture_root)


@pytest.fixture(scope="session")
def build(checkpoints, tokenizer_path):
    """Llama.build in this process (one model-parallel rank) with small defaults."""
    from llama import Llama

    def _build(kind="gqa", n_shards=1, max_seq_len=64, max_batch_size=4, device="cpu",
               **kwargs):
        # the CPU unless a test asks for a GPU (tests/test_cuda.py): the expected values are
        # float32 computations
        return Llama.build(checkpoints(kind, n_shards), tokenizer_path, max_seq_len=max_seq_len,
                           max_batch_size=max_batch_size, verbose=False, device=device,
                           **kwargs)

    return _build


@pytest.fixture(scope="session")
def eos_checkpoint(checkpoints, fixture_root, build):
    """The gqa weights with EOS made likely: its output row copies (and slightly outweighs) the
    row of the token greedy decoding picks most often, so rows stop at different steps."""
    generator = build("gqa")
    prompts = [generator.tokenizer.encode(p, bos=True, eos=False)
               for p in ["The", "In Python, a class", "Return the", "x = 1"]]
    tokens, _ = generator.generate(prompts, max_gen_len=24, temperature=0)
    most_common = Counter(t for row in tokens for t in row).most_common(1)[0][0]
    state = {k: v.clone() for k, v in checkpoints.state("gqa").items()}
    state["output.weight"][2] = state["output.weight"][most_common] * 1.1
    out_dir = fixture_root / "gqa-eos"
    save_checkpoint(out_dir, split_state_dict(state, 1), params_json(model_args("gqa")))
    return str(out_dir), state


def run_script(args, nproc=None, timeout=240, env=None, cwd=REPO):
    """Run a Python script as plain `python` or under torchrun; returns CompletedProcess.
    GPUs are hidden from it unless `env` names CUDA_VISIBLE_DEVICES (the scripts would pick
    a GPU and half precision, and the tests expect float32 results)."""
    if nproc is None:
        command = [sys.executable] + list(args)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port())] + list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")])),
                **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_workers(jobs, nproc, tmp_path) -> list:
    """What tests/mp_worker.py's main writes for each job (a dict of its keyword arguments
    but out_path). nproc None: in this process, a process group of one (on the CPU unless
    the job names a device); else all the jobs in turn in one torchrun launch of `nproc`
    processes, each job building its own model (a launch costs seconds: torch's import in
    every process, the group's rendezvous)."""
    from tests import mp_worker

    jobs = [{**job, "out_path": str(tmp_path / f"worker-{nproc}-{i}.json")}
            for i, job in enumerate(jobs)]
    if nproc is None:
        for job in jobs:
            mp_worker.main(**{"device": "cpu", **job})
    else:
        listing = tmp_path / f"worker-{nproc}-jobs.json"
        listing.write_text(json.dumps(jobs))
        result = run_script([mp_worker.__file__, "--jobs", str(listing)], nproc=nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(Path(job["out_path"]).read_text()) for job in jobs]


def run_entry_points(commands, tmp_path, env=None) -> list:
    """[(status, stdout, stderr)] of `python *command` for each command (["-m", module, ...]
    or [script, ...]), run one after the other in one child process (tests/entry_points.py,
    under run_script's environment), each as python runs it: for command lines refused before
    anything loads, which would each pay torch's import in a process of their own."""
    listing, results = tmp_path / "entry-points.json", tmp_path / "entry-points-results.json"
    listing.write_text(json.dumps(commands))
    child = run_script([str(REPO / "tests" / "entry_points.py"), str(listing), str(results)],
                       env=env)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    return [tuple(result) for result in json.loads(results.read_text())]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
