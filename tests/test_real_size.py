"""benchmarks/real_size.py at a tiny shape: the checkpoint it writes is Meta's layout, and a run
measures a format in a process of its own, or says why a format is not run."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import real_size
from llama.checkpoints.meta import full_shapes  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

QUICK = ["--prompt-len", "12", "--gen-len", "8", "--batch", "1", "2", "--turns", "2",
         "--turn-tokens", "16", "--answer-tokens", "4", "--bandwidth-gib", "0.0625"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-size") / "tiny"
    assert real_size.main(["--write", str(out), "--shape", "tiny", "--seed", "3"]) == 0
    return out


def test_writes_meta_layout_in_bfloat16(tiny):
    args = real_size.shape_args("tiny")
    assert sorted(p.name for p in tiny.iterdir()) == ["consolidated.00.pth", "params.json",
                                                      "tokenizer.model"]
    # params.json as Meta writes it: the shape, vocab_size -1
    assert json.loads((tiny / "params.json").read_text()) == {
        "dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05,
        "vocab_size": -1, "n_kv_heads": 2}
    assert Tokenizer(str(tiny / "tokenizer.model")).n_words == args.vocab_size == 32000
    state = torch.load(tiny / "consolidated.00.pth", weights_only=True)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    assert shapes == {**full_shapes(args), "rope.freqs": (args.head_dim // 2,)}
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    # scaled as a trained model's: norms near 1, products by 1/sqrt(fan-in), output 4x that
    norm = state["layers.1.ffn_norm.weight"].float()
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.15
    w2 = state["layers.0.feed_forward.w2.weight"].float()
    assert abs(w2.std() * w2.shape[1] ** 0.5 - 1) < 0.05
    output = state["output.weight"].float()
    assert abs(output.std() * 64 ** 0.5 - 4) < 0.1
    # written once: a second --write of the same shape leaves it, another shape is refused
    stamp = (tiny / "consolidated.00.pth").stat().st_mtime_ns
    assert real_size.main(["--write", str(tiny), "--shape", "tiny"]) == 0
    assert (tiny / "consolidated.00.pth").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="holds another checkpoint"):
        real_size.main(["--write", str(tiny), "--shape", "S"])


def test_run_measures_a_format_in_its_own_process(tiny, tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert real_size.main(["--run", str(tiny), "--formats", "float32", "--json", str(out)]
                          + QUICK) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    (row,) = figures["results"]
    assert row["format"] == "float32" and "not_run" not in row, row
    assert row["weight_dtype"] == "float32"
    # the step's weights: every checkpoint tensor but the embedding, in float32
    state = torch.load(tiny / "consolidated.00.pth", weights_only=True)
    assert row["weights_per_step"] == 4 * sum(
        t.numel() for name, t in state.items() if name not in ("tok_embeddings.weight",
                                                               "rope.freqs"))
    assert set(row["decode_tok_s"]) == {"1", "2"}
    assert all(rate > 0 for rate in row["decode_tok_s"].values()) and row["prefill_tok_s"] > 0
    assert row["peak_rss"] >= row["peak_rss_load"] > 0 and row["load_s"] > 0
    chat = row["chat_completion"]
    assert len(chat["ttft_s"]) == 2 and chat["prompt_tokens"][1] > chat["prompt_tokens"][0]
    from llama import Llama

    if hasattr(Llama, "chat_session"):  # the session's turns, where the library has them
        session = row["chat_session"]
        assert len(session["ttft_s"]) == 2
        assert session["prompt_tokens"][1] > session["prompt_tokens"][0]
    else:
        assert "chat_session" not in row and "(no chat_session)" in printed
    # the largest call fits the max_seq_len the run chose
    assert figures["max_seq_len"] >= chat["prompt_tokens"][1] + 4
    # the rate around the format, the run's best at least as high
    assert 0 < row["read_bandwidth"] <= figures["read_bandwidth"]
    table = [line for line in printed.splitlines() if line.startswith("| float32 |")]
    assert len(table) == 1 and table[0].count("|") == printed.splitlines()[3].count("|")
    assert printed.rstrip().endswith("--json " + str(out) + " " + " ".join(QUICK))


def test_a_format_that_does_not_fit_is_not_run(tiny, capsys):
    assert real_size.main(["--run", str(tiny), "--formats", "int8", "default",
                           "--memory-limit", "0.001"] + QUICK) == 0
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| int8 |", "| default |"))}
    assert "not run: needs ~1.0 GiB (weights 0.0, KV cache 0.0, working 1.0); 0.0 GiB " \
           "available (--memory-limit)" in rows["int8"]
    # refused here, or by Llama.build's own memory check where the library has one
    assert "| not run: " in rows["default"]


def test_read_rate_counts_weights_per_row_and_the_cache():
    row = {"weights_per_step": 1000, "kv_per_token": 2, "prompt_len": 10, "gen_len": 20}
    # per token: 1000 / 4 rows of weights, 2 bytes x 20 positions on average of cache
    assert real_size.read_rate(row, 4, 3.0) == 3.0 * (250 + 40)


def test_each_row_is_set_against_the_bandwidth_around_it():
    row = {"format": "int8", "weight_dtype": "bfloat16", "load_s": 1.0, "peak_rss_load": 2**30,
           "peak_rss": 2**31, "prefill_tok_s": 10.0, "decode_tok_s": {"1": 2.0},
           "weights_per_step": 10e9, "kv_per_token": 0, "prompt_len": 8, "gen_len": 8}
    slow = {**row, "format": "int4", "read_bandwidth": 25e9,
            "read_bandwidth_before_after": [25e9, 21e9]}
    lines = real_size.table([row, slow], 40e9, [1]).splitlines()
    # 2 tok/s x 10 GB = 20 GB/s: half of the run's 40 where a row has no figure of its own,
    # 80% of the higher of the 25 and 21 measured before and after the other
    assert "| 40.0 | 20 (50%) |" in lines[2] and "| 25.0 / 21.0 | 20 (80%) |" in lines[3]
    assert lines[0].count("|") == lines[2].count("|") == lines[3].count("|")


def test_decode_ab_takes_turns_between_two_formats(tiny, capsys):
    """benchmarks/decode_ab.py: both formats held at once, a row per round and row count with
    each format's milliseconds and their ratio."""
    from benchmarks import decode_ab

    assert decode_ab.main(["--ckpt", str(tiny), "--formats", "int8", "int4", "--rows", "1",
                           "2", "--rounds", "2", "--steps", "2", "--prompt-len", "8"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in rows:
        first, second, ratio = float(r[2]), float(r[3]), float(r[4])
        assert first > 0 and second > 0 and abs(ratio - first / second) < 0.05 * ratio + 0.01


def test_trees_measures_each_checkout_with_its_own_library(tiny, tmp_path, capsys):
    """benchmarks/trees.py: each tree's rows come from a process importing that tree's llama
    (a stand-in tree whose build refuses the format shows its refusal, where this repository's
    runs), with every figure over the first row's."""
    from benchmarks import trees

    older = tmp_path / "older"
    (older / "llama").mkdir(parents=True)
    (older / "llama" / "__init__.py").write_text(
        "class Llama:\n"
        "    @staticmethod\n"
        "    def build(*args, quantize=None, **kwargs):\n"
        "        raise TypeError('no int8 in this tree')\n")
    repo = Path(trees.__file__).resolve().parents[1]
    assert trees.main(["--ckpt", str(tiny), "--trees", str(repo), str(older), "--formats",
                       "int8", "--rounds", "1", "--runs", "1", "--prompt-len", "8",
                       "--gen-len", "4"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| tree")]
    assert len(rows) == 2
    ours, theirs = rows
    assert ours[1].strip() == "int8" and float(ours[2]) > 0
    assert 0.1 < float(ours[3]) < 64  # GiB: a process that loaded torch and a tiny model
    assert ours[4].strip().endswith("(1.00x)") and ours[5].strip().endswith("(1.00x)")
    assert "Llama.build refused: TypeError: no int8 in this tree" in theirs[2]
    with pytest.raises(SystemExit):  # not a checkout of this repository
        trees.main(["--ckpt", str(tiny), "--trees", str(tmp_path), "--formats", "int8"])
