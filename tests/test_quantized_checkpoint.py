"""Quantized checkpoints: `python -m llama.quantize` writes Meta's layout once (from Meta's or
Hugging Face's float files), Llama.build loads it directly on any process count to exactly what
quantizing at load computes, strictly and safely, and every refusal says what is wrong."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.checkpoints.checklist import verify_checklist
from llama.checkpoints.memory import LLAMA2, markdown_table, weight_bytes
from llama.checkpoints.meta import CheckpointError, full_shapes, shard_shape
from llama.checkpoints.reshard import main as reshard_main
from llama.engine.validation import ArgumentError
from llama.quantize.cli import main as quantize_main
from llama.quantize.cli import quantize_checkpoint
from llama.quantize.formats import Quantization
from tests.conftest import REPO, model_args, run_script, run_workers
from tests.hf_fixtures import code_tokenizer_path, hub  # noqa: F401 (fixtures)

MODES = [("int8", None), ("int4", 32)]


@pytest.fixture(scope="session")
def quantized(checkpoints, fixture_root):
    """Quantized checkpoint directories, written once: (kind, source shards, mode, shards)."""
    made = {}

    def _quantized(kind="gqa", n_src=1, mode="int8", n_shards=None, group_size=None):
        key = (kind, n_src, mode, n_shards, group_size)
        if key not in made:
            out = fixture_root / "quantized" / "-".join(map(str, key))
            quantize_checkpoint(Path(checkpoints(kind, n_src)), out, mode, group_size, n_shards,
                                say=lambda line: None)
            made[key] = out
        return made[key]

    return _quantized


def _build(ckpt_dir, tokenizer_path, **kwargs):
    return Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=64, max_batch_size=4,
                       verbose=False, device="cpu", **kwargs)


def _logits(generator):
    tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    return generator.model.forward(tokens, 0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("mode, group_size", MODES)
def test_the_command_writes_metas_layout(mode, group_size, checkpoints, tokenizer_path,
                                         tmp_path, capsys):
    src = Path(checkpoints("gqa", 2))
    dst = tmp_path / "q"
    assert quantize_main([str(src), str(dst), "--mode", mode]) == 0
    assert "2 shard(s) -> 2 shard(s)" in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json",
        "tokenizer.model"]  # the tokenizer beside the source, as Meta's downloads keep it
    params = json.loads((dst / "params.json").read_text())
    entry = {"mode": mode, **({"group_size": group_size} if group_size else {})}
    assert params == {**json.loads((src / "params.json").read_text()), "quantization": entry}
    verify_checklist(str(dst / "checklist.chk"))
    quantization = Quantization(mode, group_size)
    args = model_args("gqa")
    shapes = full_shapes(args, quantization)
    for index in range(2):
        name = f"consolidated.{index:02d}.pth"
        shard = torch.load(dst / name, weights_only=True)
        original = torch.load(src / name, weights_only=True)
        assert shard.keys() == set(shapes) | {"rope.freqs"}
        assert torch.equal(shard["rope.freqs"], original["rope.freqs"])
        for key, shape in shapes.items():
            assert tuple(shard[key].shape) == shard_shape(key, shape, 2, mode), key
        assert shard["layers.0.attention.wq.weight"].dtype == (
            torch.int8 if mode == "int8" else torch.uint8)
        assert shard["layers.0.attention.wq.scales"].dtype == torch.bfloat16
        assert torch.equal(shard["tok_embeddings.weight"], original["tok_embeddings.weight"])
        # a shard saves its own slices only (no whole storages of the source behind views)
        stored = sum(t.untyped_storage().nbytes() for t in shard.values())
        assert stored == sum(t.numel() * t.element_size() for t in shard.values())


def test_the_module_and_its_errors_from_the_shell(checkpoints, tmp_path):
    result = run_script(["-m", "llama.quantize", checkpoints("gqa"), str(tmp_path / "q"),
                         "--mode", "int8"])
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr  # runpy's about the module imported twice: filtered
    result = run_script(["-m", "llama.quantize", checkpoints("gqa"), str(tmp_path / "x"),
                         "--mode", "int3"])
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown --mode 'int3'; choose one of: int8, int4"


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("mode, group_size", MODES)
def test_a_saved_checkpoint_loads_to_what_quantizing_at_load_gives(kind, mode, group_size,
                                                                   quantized, build,
                                                                   tokenizer_path):
    expected = build(kind, quantize=mode)
    logits = _logits(expected)
    prompts = ["The meaning of life is", "x = 1"]
    tokens = expected.text_completion(prompts, temperature=0, max_gen_len=8, logprobs=True)
    # from 1 and 2 source shards, written as 1 or 2 shards, all loaded on this 1 process
    for n_src, n_shards in ((1, None), (2, None), (2, 1), (1, 2)):
        generator = _build(quantized(kind, n_src, mode, n_shards), tokenizer_path)
        assert torch.equal(_logits(generator), logits), (n_src, n_shards)
        assert generator.text_completion(prompts, temperature=0, max_gen_len=8,
                                         logprobs=True) == tokens
    # quantize= may repeat the file's mode
    again = _build(quantized(kind, 1, mode), tokenizer_path, quantize=mode)
    assert torch.equal(_logits(again), logits)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_from_a_hugging_face_directory(mode, hub, build, tmp_path):
    src = hub("gqa", max_shard_size="40KB")  # several safetensors files, tokenizer inside
    dst = tmp_path / "q"
    assert quantize_main([str(src), str(dst), "--mode", mode]) == 0
    assert (dst / "tokenizer.model").is_file()
    assert json.loads((dst / "params.json").read_text())["quantization"]["mode"] == mode
    generator = _build(dst, None)  # the copied tokenizer
    expected = _build(src, None, quantize=mode)  # the Hub directory quantized at load
    assert torch.equal(_logits(generator), _logits(expected))
    assert torch.equal(_logits(generator), _logits(build("gqa", quantize=mode)))


@pytest.fixture(scope="module")
def two_process_runs(quantized, checkpoints, tokenizer_path, tmp_path_factory):
    """mp_worker's outputs on 2 processes, by (mode, label), from one torchrun launch: the
    float checkpoint quantized at load, the saved checkpoint of 1 shard and of 2 shards."""
    runs = {}
    for mode in ("int8", "int4"):
        runs[mode, "at load"] = dict(ckpt_dir=checkpoints("gqa", 2), quantize=mode)
        runs[mode, "1 shard"] = dict(ckpt_dir=str(quantized("gqa", 1, mode)))
        runs[mode, "2 shards"] = dict(ckpt_dir=str(quantized("gqa", 1, mode, 2)))
    jobs = [{**job, "tokenizer_path": tokenizer_path, "device": "cpu"} for job in runs.values()]
    return dict(zip(runs, run_workers(jobs, 2, tmp_path_factory.mktemp("two"))))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_two_processes_load_saved_checkpoints_as_they_quantize_at_load(mode, two_process_runs):
    """On 2 processes: the float checkpoint quantized at load (whole-row int8 scales through
    the all-reduce), and the saved checkpoint of 1 shard (split at load) and of 2 shards, give
    the same tokens and logprobs, exactly."""
    outputs = {label: two_process_runs[mode, label]
               for label in ("at load", "1 shard", "2 shards")}
    assert outputs["1 shard"]["completions"] == outputs["at load"]["completions"]
    assert outputs["2 shards"] == outputs["1 shard"]


def test_a_process_count_that_splits_int4_groups_names_the_counts_that_work(
        quantized, tokenizer_path):
    # gqa's wo has 64 columns: 32 per rank on 2, not a multiple of 64
    ckpt = quantized("gqa", 1, "int4", None, 64)
    result = run_script(["example_text_completion.py", "--ckpt_dir", str(ckpt),
                         "--tokenizer_path", tokenizer_path, "--max_gen_len", "2"], nproc=2)
    assert result.returncode == 1
    assert ("error: layers.0.attention.wo.weight (split by columns over 2 processes): 32 "
            "input columns are not a multiple of the checkpoint's int4 group size 64, so its "
            "groups cannot be split so; numbers of processes that keep whole groups of 64: "
            "[1]; or quantize the float checkpoint with a group size that fits: 32"
            in result.stderr)


def test_quantize_must_agree_with_the_file(quantized, tokenizer_path):
    with pytest.raises(ArgumentError, match=r"quantize='int4', but .* holds int8 weights "
                                            r"already .* not quantized again: pass "
                                            r"quantize=None \(or 'int8'\)"):
        _build(quantized("gqa", 1, "int8"), tokenizer_path, quantize="int4")
    with pytest.raises(ArgumentError, match=r"group_size=64, but .* holds int4 \(groups of 32\) "
                                            r"weights"):
        _build(quantized("gqa", 1, "int4"), tokenizer_path, quantize="int4", group_size=64)


def test_strict_keys_shapes_and_types(quantized, tokenizer_path, tmp_path):
    src = quantized("gqa", 1, "int4")
    cases = {
        "missing": (lambda s: s.pop("layers.1.feed_forward.w2.zeros"),
                    r"missing tensors \['layers.1.feed_forward.w2.zeros'\]"),
        "extra": (lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(3)}),
                  r"unexpected tensors \['layers.0.attention.wq.bias'\]"),
        "shape": (lambda s: s.update({"layers.0.attention.wk.scales":
                                      s["layers.0.attention.wk.scales"][:, :1]}),
                  r"layers.0.attention.wk.scales has shape \(32, 1\), expected \(32, 2\)"),
        "dtype": (lambda s: s.update({"layers.0.attention.wk.scales":
                                      s["layers.0.attention.wk.scales"].float()}),
                  r"layers.0.attention.wk.scales is float32, expected bfloat16 for int4 "
                  r"\(groups of 32\) weights"),
    }
    for label, (edit, message) in cases.items():
        ckpt = _copy(src, tmp_path / label)
        state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
        edit(state)
        torch.save(state, ckpt / "consolidated.00.pth")
        with pytest.raises(CheckpointError, match=message):
            _build(ckpt, tokenizer_path)


def test_params_json_that_disagrees_with_the_tensors_names_the_files(
        quantized, checkpoints, tokenizer_path, tmp_path):
    def with_entry(src, name, entry):
        ckpt = _copy(src, tmp_path / name)
        params = json.loads((ckpt / "params.json").read_text())
        params.pop("quantization", None)
        if entry is not None:
            params["quantization"] = entry
        (ckpt / "params.json").write_text(json.dumps(params))
        return ckpt

    int8, int4 = quantized("gqa", 1, "int8"), quantized("gqa", 1, "int4")
    for ckpt, message in [
        (with_entry(int8, "a", {"mode": "int4", "group_size": 32}),
         r"a/consolidated.00.pth holds int8 weights but .*a/params.json says \"quantization\": "
         r"\{\"mode\": \"int4\", \"group_size\": 32\}"),
        (with_entry(int4, "b", {"mode": "int4", "group_size": 64}),
         r"b/consolidated.00.pth holds int4 \(groups of 32\) weights but .*b/params.json says"),
        (with_entry(int8, "c", None),
         r"c/consolidated.00.pth holds int8 weights but .*c/params.json has no "
         r"\"quantization\" entry"),
        (with_entry(Path(checkpoints("gqa")), "d", {"mode": "int8"}),
         r"d/consolidated.00.pth holds float weights but .*d/params.json says"),
        (with_entry(int8, "e", {"mode": "int3"}),
         r"e/params.json: \"quantization\": unknown quantization mode 'int3'"),
        (with_entry(int8, "f", {"mode": "int4"}), r"f/params.json: \"quantization\": int4 "
                                                  r"group_size must be one of"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            _build(ckpt, tokenizer_path)


def test_shards_whose_int8_scales_differ_are_not_joined(quantized, tokenizer_path, tmp_path):
    ckpt = _copy(quantized("gqa", 1, "int8", 2), tmp_path / "q")
    state = torch.load(ckpt / "consolidated.01.pth", weights_only=True)
    state["layers.0.attention.wo.scales"] = state["layers.0.attention.wo.scales"] * 2
    torch.save(state, ckpt / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="layers.0.attention.wo.scales differs between "
                                              "consolidated.00.pth and consolidated.01.pth"):
        _build(ckpt, tokenizer_path)


def test_a_pickle_that_would_run_code_is_refused(quantized, tokenizer_path, tmp_path):
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = _copy(quantized("gqa", 1, "int8"), tmp_path / "q")
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wq.scales"] = Exploit()
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused.*could run arbitrary code"):
        _build(ckpt, tokenizer_path)
    assert not marker.exists()


def test_command_errors(checkpoints, quantized, tmp_path, capsys):
    src = checkpoints("gqa")

    def fails(*argv):
        assert quantize_main([str(a) for a in argv]) == 1
        return capsys.readouterr().err

    with pytest.raises(ValueError, match="unknown --mode 'int3'; choose one of: int8, int4"):
        quantize_checkpoint(Path(src), tmp_path / "x", "int3")
    assert fails(src, tmp_path / "x", "--mode", "int4", "--group_size", "128") == (
        "error: output.weight: 64 input columns are not a multiple of the int4 group size "
        "128; group sizes that divide it: 32, 64\n")
    assert ("error: layers.0.attention.wo.weight (split by columns over 2 shards): 32 input "
            "columns are not a multiple of the int4 group size 64; group sizes that divide it: "
            "32; numbers of shards that keep whole groups of 64: [1]") in fails(
        src, tmp_path / "x", "--mode", "int4", "--group_size", "64", "--shards", "2")
    assert "error: --group_size must be one of (32, 64, 128), got 48\n" == fails(
        src, tmp_path / "x", "--mode", "int4", "--group_size", "48")
    assert "--group_size applies to --mode int4 only" in fails(
        src, tmp_path / "x", "--mode", "int8", "--group_size", "32")
    assert "cannot be split across 3 shards; use one of [1, 2] for --shards" in fails(
        src, tmp_path / "x", "--mode", "int8", "--shards", "3")
    assert "holds int8 weights already" in fails(quantized("gqa", 1, "int8"), tmp_path / "x",
                                                 "--mode", "int4")
    assert "already holds" in fails(src, quantized("gqa", 1, "int8"), "--mode", "int8")
    assert not (tmp_path / "x").exists()  # nothing written before the checks pass
    from llama.hf.convert import main as convert_main
    assert convert_main([str(quantized("gqa", 1, "int8")), str(tmp_path / "hf"), "--to",
                         "hf"]) == 1
    assert "holds int8 weights" in capsys.readouterr().err


def test_reshard_rewrites_a_quantized_checkpoint_bit_exactly(quantized, tokenizer_path,
                                                             tmp_path):
    src = quantized("gqa", 1, "int4")
    assert reshard_main([str(src), str(tmp_path / "two"), "--mp", "2"]) == 0
    assert reshard_main([str(tmp_path / "two"), str(tmp_path / "back"), "--mp", "1"]) == 0
    original = torch.load(src / "consolidated.00.pth", weights_only=True)
    again = torch.load(tmp_path / "back" / "consolidated.00.pth", weights_only=True)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert torch.equal(_logits(_build(tmp_path / "two", tokenizer_path)),
                       _logits(_build(src, tokenizer_path)))
    assert reshard_main([str(quantized("gqa", 1, "int4", None, 64)), str(tmp_path / "x"),
                         "--mp", "2"]) == 1


def test_memory_figures_are_the_shards_bytes_and_readmes_table(quantized):
    args = model_args("gqa")
    for mode, group_size in MODES:
        ckpt = quantized("gqa", 1, mode, 2)
        for index in range(2):
            shard = torch.load(ckpt / f"consolidated.{index:02d}.pth", weights_only=True)
            del shard["rope.freqs"]
            assert sum(t.numel() * t.element_size() for t in shard.values()) == weight_bytes(
                args, mode, group_size or 32, 2, torch.bfloat16)
    seven = 6_738_415_616  # Meta's 7B parameter count
    assert weight_bytes(LLAMA2["7B"]) == 2 * seven
    assert markdown_table() in (REPO / "README.md").read_text()
