"""Loading: strict, safe, and with errors that say what to do; on-disk resharding."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.checkpoints.fixtures import train_tokenizer
from llama.checkpoints.meta import CheckpointError, check_world_size, slice_plan, valid_world_sizes
from llama.checkpoints.reshard import main as reshard_main
from llama.engine.validation import ArgumentError
from llama.model import ModelArgs
from tests.conftest import model_args


@pytest.fixture
def copy_of(checkpoints, tmp_path):
    def _copy(kind="gqa", n_shards=1):
        dst = tmp_path / f"{kind}-{n_shards}"
        shutil.copytree(checkpoints(kind, n_shards), dst)
        return dst
    return _copy


def _build(ckpt_dir, tokenizer_path, **kwargs):
    kwargs.setdefault("device", "cpu")
    return Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=32, max_batch_size=2,
                       verbose=False, **kwargs)


def test_missing_paths_say_what_is_missing(tmp_path, tokenizer_path, copy_of):
    with pytest.raises(ArgumentError, match="^ckpt_dir '.*nope' does not exist") as caught:
        _build(tmp_path / "nope", tokenizer_path)
    assert caught.value.param == "ckpt_dir" and "--" not in str(caught.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.pth checkpoint files"):
        _build(empty, tokenizer_path)
    ckpt = copy_of()
    with pytest.raises(FileNotFoundError, match="^tokenizer_path '.*' does not exist"):
        _build(ckpt, str(tmp_path / "tokenizer.model"))
    with pytest.raises(ValueError, match="^tokenizer_path '.*' is neither a SentencePiece model"):
        _build(ckpt, str(ckpt / "params.json"))
    (ckpt / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json not found"):
        _build(ckpt, tokenizer_path)


def test_missing_and_extra_tensors_are_named(copy_of, tokenizer_path):
    ckpt = copy_of()
    state = torch.load(ckpt / "consolidated.00.pth")
    del state["layers.1.feed_forward.w3.weight"]
    state["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.1.feed_forward.w3"
                                              r".weight'\].*unexpected tensors "
                                              r"\['layers.0.attention.bias'\]"):
        _build(ckpt, tokenizer_path)


def test_wrong_shape_is_named(copy_of, tokenizer_path):
    ckpt = copy_of()
    state = torch.load(ckpt / "consolidated.00.pth")
    state["layers.0.attention.wk.weight"] = state["layers.0.attention.wk.weight"][:8]
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wk.weight has shape "
                                              r"\(8, 64\), expected \(32, 64\)"):
        _build(ckpt, tokenizer_path)


def test_truncated_shard_names_the_file(copy_of, tokenizer_path):
    ckpt = copy_of()
    shard = ckpt / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="consolidated.00.pth is truncated or corrupted.*"
                                              "re-download"):
        _build(ckpt, tokenizer_path)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: its download did not complete"),
    (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "is a web page"),
    (b"\x80\x02garbage that is no checkpoint", "is truncated or corrupted"),
])
def test_files_that_are_no_checkpoint(content, message, copy_of, tokenizer_path):
    ckpt = copy_of()
    (ckpt / "consolidated.00.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"consolidated.00.pth {message}"):
        _build(ckpt, tokenizer_path)


def test_legacy_format_shards_still_load(copy_of, tokenizer_path, build):
    ckpt = copy_of()
    state = torch.load(ckpt / "consolidated.00.pth")
    torch.save(state, ckpt / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    legacy = _build(ckpt, tokenizer_path).text_completion(["Hi"], temperature=0, max_gen_len=4)
    assert legacy == build("gqa").text_completion(["Hi"], temperature=0, max_gen_len=4)


def test_flipped_byte_is_caught_by_verify(copy_of, tokenizer_path):
    ckpt = copy_of()
    shard = ckpt / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load alone would not notice
    shard.write_bytes(bytes(data))
    _build(ckpt, tokenizer_path)
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        _build(ckpt, tokenizer_path, verify=True)


def test_a_pickle_that_would_run_code_is_refused_without_running(copy_of, tokenizer_path,
                                                                  tmp_path):
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = copy_of()
    state = torch.load(ckpt / "consolidated.00.pth")
    state["norm.weight"] = Exploit()
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused.*could run arbitrary code"):
        _build(ckpt, tokenizer_path)
    assert not marker.exists()


def test_tokenizer_that_does_not_match_the_embedding(copy_of, tmp_path):
    other = str(train_tokenizer(tmp_path / "small.model", 600))
    with pytest.raises(CheckpointError, match="1000 vocabulary rows but the tokenizer has 600"):
        _build(copy_of(), other)


def test_params_json_errors(copy_of, tokenizer_path):
    ckpt = copy_of()
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "dimension": 3}))
    with pytest.raises(CheckpointError, match="fields this library does not know: "
                                              r"\['dimension'\]"):
        _build(ckpt, tokenizer_path)
    (ckpt / "params.json").write_text(json.dumps({**params, "n_heads": 5}))
    with pytest.raises(CheckpointError, match="divisible by n_heads"):
        _build(ckpt, tokenizer_path)
    (ckpt / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _build(ckpt, tokenizer_path)


def test_impossible_process_counts_list_the_ones_that_work():
    args = model_args("gqa")  # 4 heads, 2 kv heads
    assert valid_world_sizes(args) == [1, 2]
    with pytest.raises(CheckpointError, match=r"cannot be split across 4 processes; use one "
                                              r"of \[1, 2\]"):
        check_world_size(args, 4)
    seventy = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                        ffn_dim_multiplier=1.3, vocab_size=32000)
    assert valid_world_sizes(seventy) == [1, 2, 4, 8]


def test_slice_plan_merges_and_splits():
    assert slice_plan(8, 4, 2, 1) == [(2, 0, 2), (3, 0, 2)]  # merge two shards
    assert slice_plan(8, 1, 4, 2) == [(0, 4, 6)]  # split one
    assert slice_plan(12, 2, 3, 1) == [(0, 4, 6), (1, 0, 2)]  # straddle a boundary


@pytest.mark.parametrize("kind, start, middle", [("mha", 4, 1), ("gqa", 2, 1), ("mha", 1, 2)])
def test_reshard_on_disk_round_trips_bit_exactly(kind, start, middle, checkpoints, tmp_path):
    src = Path(checkpoints(kind, start))
    assert reshard_main([str(src), str(tmp_path / "mid"), "--mp", str(middle)]) == 0
    assert reshard_main([str(tmp_path / "mid"), str(tmp_path / "back"), "--mp", str(start)]) == 0
    for index in range(start):
        name = f"consolidated.{index:02d}.pth"
        original, again = torch.load(src / name), torch.load(tmp_path / "back" / name)
        assert original.keys() == again.keys()
        for key in original:
            assert original[key].dtype == again[key].dtype
            assert torch.equal(original[key], again[key]), key
    mid = torch.load(tmp_path / "mid" / "consolidated.00.pth")
    assert "rope.freqs" in mid
    from llama.checkpoints.checklist import verify_checklist
    verify_checklist(str(tmp_path / "back" / "checklist.chk"))
    assert (tmp_path / "back" / "params.json").read_text() == (src / "params.json").read_text()


def test_reshard_refuses_impossible_sizes(checkpoints, tmp_path, capsys):
    assert reshard_main([checkpoints("gqa", 1), str(tmp_path / "x"), "--mp", "3"]) == 1
    err = capsys.readouterr().err
    assert "cannot be split across 3 shards; use one of [1, 2] for --mp" in err
    assert "torchrun" not in err
