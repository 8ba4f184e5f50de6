"""`python -m llama.server --prefix_cache MIB` through the official openai client: chats whose
turns resend the conversation answer as the library does without any cache, concurrently, in
one process or two under torchrun, with a budget that holds everything or evicts all along;
/health shows the blocks found."""

import subprocess
import sys
import threading

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llama import Llama  # noqa: E402
from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.server_fixtures import refused_by_the_parser, running_server  # noqa: E402

SYSTEM = {"role": "system", "content": "Answer briefly, in plain words, as a patient teacher."}
CONVERSATIONS = [["What is a list?", "And a tuple?", "Which is faster?"],
                 ["How do I open a file?", "And close it?", "What does with do?"],
                 ["What is a class?", "And an instance?", "Show me one."]]


@pytest.fixture(scope="module")
def library():
    """The library built as a server with these options is (memoised per options)."""
    built = {}

    def build(**options):
        key = tuple(sorted(options.items()))
        if key not in built:
            built[key] = Llama.build(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, 512, 4, device="cpu",
                                     verbose=False, **options)
        return built[key]

    return build


def _chat(url, questions, said):
    """One client's conversation, turn by turn, each request the whole dialog so far."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    dialog = [SYSTEM]
    for question in questions:
        dialog.append({"role": "user", "content": question})
        answer = client.chat.completions.create(model="llama-demo", messages=dialog,
                                                temperature=0, max_tokens=16)
        said.append((list(dialog), answer.choices[0].message.content))
        dialog.append({"role": "assistant", "content": answer.choices[0].message.content})


@pytest.mark.parametrize("budget, nproc, options", [
    pytest.param("4", None, {}, id="4MiB"), pytest.param("0.25", None, {}, id="4-blocks"),
    pytest.param("4", 2, {}, id="4MiB-torchrun"),
    pytest.param("4", 2, {"kv_cache_dtype": "bfloat16"}, id="4MiB-torchrun-bfloat16-kv-cache"),
    pytest.param("4", None, {"quantize": "int8", "activations": "int8"},
                 id="4MiB-int8-activations")])
def test_concurrent_chats_answer_as_without_a_cache(budget, nproc, options, library):
    """--kv_cache_dtype bfloat16: as the library with the same cache (half the bytes);
    --quantize int8 --activations int8: as the library with that route (prefills and decode
    steps round alike, so the blocks found give the answers computed without them)."""
    library = library(**options)
    flags = [f"--{name}={value}" for name, value in options.items()]
    with running_server("--max_batch_size", "2", "--prefix_cache", budget, *flags,
                        nproc=nproc) as url:
        said = []
        threads = [threading.Thread(target=_chat, args=(url, questions, said))
                   for questions in CONVERSATIONS]  # three clients on two slots
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        health = httpx.get(url + "/health").json()
    assert len(said) == 9
    for dialog, answer in said:
        want = library.chat_completion([dialog], temperature=0, max_gen_len=16)[0]
        assert answer == want["generation"]["content"], dialog
    # the server's cache, --max_batch_size 2 x 512 tokens, per process (two split the heads)
    cache = library.model.new_cache(2, 512)
    assert health["kv_cache"] == {"dtype": options.get("kv_cache_dtype", "float32"),
                                  "bytes": cache.nbytes // (nproc or 1)}
    stats = health["prefix_cache"]
    assert stats["block_size"] == 16
    assert stats["hits"] + stats["misses"] == 9
    prompt_tokens = stats["hit_tokens"] + stats["prefilled_tokens"]
    if budget == "4":
        # every later turn found its conversation so far (the system prompt at least)
        assert stats["hits"] >= 6
        assert stats["prefilled_tokens"] < prompt_tokens / 2, stats
    else:
        assert stats["capacity_blocks"] == 4 and stats["blocks"] <= 4
        assert stats["hits"] >= 1


def test_a_negative_budget_is_refused_before_loading(capsys):
    status, stderr = refused_by_the_parser(["--prefix_cache", "-1"], capsys)
    assert status == 2
    assert "--prefix_cache must be 0 (off) or more MiB, got -1.0" in stderr


def test_the_chat_turns_benchmark_runs_and_prefills_only_new_turns(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.chat_turns", "--quick",
                          "--threads", "1", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    tables = out.stdout.split("\n\n")[1:]
    assert len(tables) == 3  # library (wall and CPU seconds) and server
    for table in tables:
        rows = [line.split() for line in table.splitlines() if line.split()[0].isdigit()]
        assert len(rows) == 3
        prompts, prefilled = [int(r[1]) for r in rows], [int(r[2]) for r in rows]
        assert prefilled[0] == prompts[0] and prompts[2] > prompts[1] > prompts[0]
        assert all(p < whole for p, whole in zip(prefilled[1:], prompts[1:]))
    assert "turn 3 over turn 1, with the cache:" in out.stdout
