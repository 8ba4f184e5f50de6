"""python -m llama.convert: Meta's layout to a directory transformers loads, Hugging Face's to
Meta's shards, round trips bit for bit, and its errors."""

import json
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.args import ModelArgs
from llama.checkpoints.meta import check_shard
from llama.hf.bridge import to_hf_state_dict
from llama.hf.convert import main as convert
from llama.hf.convert import parse_size, plan_files, write_safetensors
from llama.model import Transformer
from tests.conftest import run_script
from tests.hf_fixtures import code_tokenizer_path, hub  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers")


def _build(ckpt_dir, tokenizer_path=None):
    return Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=64, max_batch_size=4,
                       verbose=False, device="cpu")


def _tokens(vocab=1000):
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


def _run(*argv):
    assert convert([str(a) for a in argv]) == 0


def _safetensors(directory: Path):
    """Every tensor of a Hugging Face directory, by name."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _meta_shards(directory: Path):
    return [torch.load(path, weights_only=True)
            for path in sorted(directory.glob("consolidated.*.pth"))]


def _equal(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["gqa", "code"])
def test_to_hf_loads_in_transformers_with_the_same_logits(kind, hub, tmp_path):
    """From two Meta shards, into safetensors files of at most 40 KB."""
    src = hub.meta(kind, n_shards=2)
    dst = tmp_path / "hf"
    _run(src, dst, "--to", "hf", "--max_shard_size", "40KB")
    files = sorted(dst.glob("*.safetensors"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == {p.name for p in files}
    for path in files:  # at most 40 KB of weights, or one tensor larger than that alone
        names = [n for n, file in index["weight_map"].items() if file == path.name]
        assert len(names) == 1 or path.stat().st_size <= 40_000 + 4096, path
    config = json.loads((dst / "config.json").read_text())
    args = hub.args(kind)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == \
        "bfloat16" and config["rope_theta"] == args.rope_theta and \
        config["max_position_embeddings"] == 4096 and config["tie_word_embeddings"] is False
    for name in ("generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (dst / name).is_file()
    assert _equal(_safetensors(dst), to_hf_state_dict(hub.state(kind), args))
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        want = model(tokens).logits
    torch.testing.assert_close(_build(src).model.forward(tokens, 0), want, atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(_build(dst).model.forward(tokens, 0), want, atol=1e-4,
                               rtol=1e-4)


def test_to_hf_tokenizer_loads_in_transformers(hub, tmp_path):
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through it
    dst = tmp_path / "hf"
    _run(hub.meta("gqa"), dst, "--to", "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(dst)
    ours = _build(dst).tokenizer
    # single spaces: the fixture tokenizer collapses runs of spaces (SentencePiece's default),
    # Llama's and transformers' reading of any Llama tokenizer.model do not
    for text in ["The meaning of life is", "def f(x):\n\treturn x", "上下五千年，英雄万万千。"]:
        ids = ours.encode(text, bos=True, eos=False)
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_to_meta_loads_here_and_in_a_strict_load_state_dict(hub, tmp_path):
    src = hub("gqa", max_shard_size="40KB")
    for n_shards in (1, 2):
        dst = tmp_path / f"meta-{n_shards}"
        _run(src, dst, "--to", "meta", "--shards", n_shards)
        assert sorted(p.name for p in dst.iterdir()) == sorted(
            ["params.json", "checklist.chk", "tokenizer.model"]
            + [f"consolidated.{i:02d}.pth" for i in range(n_shards)])
        params = json.loads((dst / "params.json").read_text())
        assert params["vocab_size"] == -1 and params["n_kv_heads"] == 2
        generator = _build(dst)
        torch.testing.assert_close(generator.model.forward(_tokens(), 0),
                                   _build(src).model.forward(_tokens(), 0), atol=1e-4,
                                   rtol=1e-4)
    state = _meta_shards(tmp_path / "meta-1")[0]
    args = ModelArgs(vocab_size=1000, **{k: v for k, v in params.items()
                                         if k != "vocab_size"})
    check_shard(tmp_path / "meta-1" / "consolidated.00.pth", state, args, 1)
    state.pop("rope.freqs")
    state = {name: tensor.float() for name, tensor in state.items()}  # as Llama.build on a CPU
    model = Transformer.from_state_dict(args, state)  # load_state_dict(strict=True)
    torch.testing.assert_close(model.forward(_tokens(), 0), generator.model.forward(_tokens(), 0),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, tied", [("gqa", False), ("mha", False), ("code", True)])
def test_meta_to_hf_to_meta_is_bit_exact(kind, tied, hub, tmp_path):
    src = hub.meta(kind, tied=tied, n_shards=2)
    _run(src, tmp_path / "hf", "--to", "hf", "--max-shard-size", "100KB")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())[
        "tie_word_embeddings"] is tied
    _run(tmp_path / "hf", tmp_path / "back", "--to", "meta", "--shards", 2)
    for a, b in zip(_meta_shards(src), _meta_shards(tmp_path / "back")):
        assert _equal(a, b)  # rope.freqs too: Meta's inverse frequencies, in bfloat16
        # each tensor saved alone, not as a view of a larger storage
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size()
                   for t in b.values())
    assert json.loads((tmp_path / "back" / "params.json").read_text()) == \
        json.loads((src / "params.json").read_text()) | {"multiple_of": 64}  # same width 192


@pytest.mark.parametrize("kind, tied", [("gqa", False), ("code", True)])
def test_hf_to_meta_to_hf_is_bit_exact(kind, tied, hub, tmp_path):
    src = hub(kind, max_shard_size="40KB", tied=tied)
    _run(src, tmp_path / "meta", "--to", "meta", "--shards", 2)
    _run(tmp_path / "meta", tmp_path / "back", "--to", "hf")
    assert _equal(_safetensors(src), _safetensors(tmp_path / "back"))
    want = json.loads((src / "config.json").read_text())
    got = json.loads((tmp_path / "back" / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert got[field] == want[field], field
    assert got["rope_theta"] == want["rope_parameters"]["rope_theta"]


def test_command_line_errors(hub, tmp_path, capsys):
    src = hub("gqa")
    assert convert([str(src), str(tmp_path / "x"), "--to", "meta", "--shards", "3"]) == 1
    assert "cannot be split across 3 shards; use one of [1, 2] for --shards" in \
        capsys.readouterr().err
    assert convert([str(src), str(src), "--to", "meta"]) == 1
    assert "must be a different directory" in capsys.readouterr().err
    _run(src, tmp_path / "meta", "--to", "meta")
    assert convert([str(src), str(tmp_path / "meta"), "--to", "meta"]) == 1
    assert "already holds ['consolidated.00.pth', 'params.json']" in capsys.readouterr().err
    assert convert([str(src), str(tmp_path / "y"), "--to", "hf"]) == 1
    assert "in Hugging Face's layout already" in capsys.readouterr().err
    assert convert([str(hub.meta("gqa")), str(tmp_path / "y"), "--to", "meta"]) == 1
    assert "config.json not found" in capsys.readouterr().err
    config = json.loads((src / "config.json").read_text())
    refused = tmp_path / "refused"
    refused.mkdir()
    for path in src.iterdir():
        (refused / path.name).write_bytes(path.read_bytes())
    (refused / "config.json").write_text(json.dumps({**config, "rope_scaling": {
        "type": "yarn", "factor": 2.0}}))
    assert convert([str(refused), str(tmp_path / "z"), "--to", "meta"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "rope_scaling={'type': 'yarn', 'factor': 2.0} is not supported" in err
    other = tmp_path / "other.model"
    other.write_bytes((hub.meta("code") / "tokenizer.model").read_bytes())
    assert convert([str(hub.meta("gqa")), str(tmp_path / "w"), "--to", "hf", "--tokenizer",
                    str(other)]) == 1
    assert "has 32016 pieces but the weights have 1000 vocabulary rows" in \
        capsys.readouterr().err


def test_flags_are_spelt_as_the_other_tools_and_the_dashed_ones_still_work(hub, tmp_path,
                                                                             capsys):
    """--max_shard_size, as --max_seq_len elsewhere (Meta's scripts' spelling); the dashed
    spellings of the first releases are taken, unlisted; mistakes are one line."""
    src = hub.meta("gqa")
    for name, flags in (("under", ["--max_shard_size", "40KB", "--max_position_embeddings=96"]),
                        ("dash", ["--max-shard-size", "40KB", "--max-position-embeddings=96"])):
        _run(src, tmp_path / name, "--to", "hf", *flags)
        assert json.loads((tmp_path / name / "config.json").read_text())[
            "max_position_embeddings"] == 96
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2  # 40 KB files
    assert (tmp_path / "under" / "model.safetensors.index.json").read_bytes() == \
        (tmp_path / "dash" / "model.safetensors.index.json").read_bytes()
    with pytest.raises(SystemExit) as shown:
        convert(["--help"])
    assert shown.value.code == 0
    help_text = capsys.readouterr().out
    assert "--max_shard_size" in help_text and "--max_position_embeddings" in help_text
    assert "--max-" not in help_text
    with pytest.raises(SystemExit) as refused:
        convert([str(src), str(tmp_path / "x"), "--to", "hf", "--max_shard_sise", "1GB"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (
        "error: unknown flag --max_shard_sise (did you mean --max_shard_size?); "
        "`python -m llama.convert --help` lists the flags\n")


def test_console_script_runs_the_module(hub, tmp_path):
    result = run_script(["-m", "llama.convert", str(hub("gqa")), str(tmp_path / "m"), "--to",
                         "meta"])
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and (tmp_path / "m" / "consolidated.00.pth").is_file()


def test_safetensors_writer_and_file_plan(tmp_path):
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7),
               "c": torch.randn(2, 2).half()[:, :1]}  # not contiguous
    entries = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", entries, tensors.__getitem__)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b", "c"] and f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors.items())
    assert plan_files([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"],
                                                                        ["d"]]
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("40KB") == 40_000 and \
        parse_size("123") == 123
