"""The interactive chat's --json, on one process and two under torchrun: on random weights
only the constraint makes JSON, and two ranks answer exactly as one (every rank took the same
token at every step, the constrained ones included)."""

import json
import os
import subprocess
import sys

import jsonschema

from tests.conftest import REPO, free_port

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "ok": {"type": "boolean"},
                                          "n": {"type": "integer"}},
          "required": ["name", "ok", "n"]}


def chat(checkpoint, tokenizer_path, flags, nproc=None):
    script = ["example_chat_interactive.py", "--ckpt_dir", checkpoint, "--tokenizer_path",
              tokenizer_path, *flags, "--temperature", "1", "--seed", "3",
              "--max_seq_len", "160", "--max_gen_len", "60"]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port())] + script
    else:
        command = [sys.executable] + script
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, input="Hello, who are you?\nAnd now?\n"
                          "/exit\n", capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [line.split("Assistant: ", 1)[1] for line in done.stdout.splitlines()
               if "Assistant: " in line]
    assert len(answers) == 2, done.stdout
    return answers


def test_json_chat_under_torchrun_answers_as_one_process(checkpoints, tokenizer_path,
                                                         tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    alone = chat(checkpoints("gqa", 1), tokenizer_path, ["--schema", str(path)])
    for answer in alone:
        jsonschema.validate(json.loads(answer), SCHEMA)
    assert chat(checkpoints("gqa", 2), tokenizer_path, ["--schema", str(path)], 2) == alone
    for answer in chat(checkpoints("gqa", 1), tokenizer_path, ["--json"]):
        assert isinstance(json.loads(answer), dict)
