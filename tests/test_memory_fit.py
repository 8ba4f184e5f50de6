"""Memory decided before loading (llama/checkpoints/memory_fit.py): sizes, the cgroup limits read
from fake
trees, and Llama.build under LLAMA_MEMORY_LIMIT: refused before any weight is read with one
line naming the settings that fit, or loaded when it fits."""

import dataclasses

import pytest
import torch

from llama.checkpoints import memory_fit
from llama.checkpoints import meta as checkpoint
from llama.checkpoints.memory import LLAMA2
from llama.checkpoints.memory_fit import GIB, NotEnoughMemoryError, check_fits, estimate, parse_size
from llama.engine.validation import ArgumentValueError
from llama.layers import fused
from tests.conftest import model_args


def test_sizes():
    assert parse_size("8GiB") == parse_size("8G") == parse_size("8 gib") == 8 * GIB
    assert parse_size("7.5G") == int(7.5 * GIB)
    assert parse_size("8000MB") == 8 * 10 ** 9 and parse_size("123") == 123
    for bad in ("eight", "8XB", "", "-1G"):
        with pytest.raises(ArgumentValueError, match="LLAMA_MEMORY_LIMIT"):
            parse_size(bad)


def test_7b_estimate_by_format():
    """Weights per format from the shapes (int8 and int4 keep a bfloat16 embedding), the
    float32 cache at max_batch_size x max_seq_len: 32 layers x 2 x 4096 x 4 bytes a token."""
    args = dataclasses.replace(LLAMA2["7B"], max_seq_len=512, max_batch_size=4)
    bf16 = estimate(args, 1, None, None, torch.bfloat16, torch.float32)
    f32 = estimate(args, 1, None, None, torch.float32, torch.float32)
    int8 = estimate(args, 1, "int8", None, torch.bfloat16, torch.float32)
    int4 = estimate(args, 1, "int4", 32, torch.bfloat16, torch.float32)
    assert f32.weights == 2 * bf16.weights == 2 * 2 * 6_738_415_616
    assert int4.weights < int8.weights < 0.53 * bf16.weights
    assert bf16.cache == 4 * 512 * 32 * 2 * 4096 * 4
    assert 0.25 * GIB < bf16.working < GIB


def _tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_cgroup_v2_and_v1_limits(tmp_path):
    """The limit less what is used, reclaimable page cache not counted as used; the lowest
    level wins; 'max' (v2) or a huge number (v1) is no limit."""
    v2 = _tree(tmp_path / "v2", {
        "proc": "0::/job/step\n",
        "fs/job/memory.max": str(10 * GIB), "fs/job/memory.current": str(3 * GIB),
        "fs/job/memory.stat": f"anon 1\ninactive_file {GIB}\n",
        "fs/job/step/memory.max": "max", "fs/job/step/memory.current": str(3 * GIB)})
    assert memory_fit.cgroup_available(v2 / "fs", v2 / "proc") == 8 * GIB
    v1 = _tree(tmp_path / "v1", {
        "proc": "4:memory:/not/visible/here\n1:cpu:/\n",  # a container: its own root mounted
        "fs/memory/memory.limit_in_bytes": str(6 * GIB),
        "fs/memory/memory.usage_in_bytes": str(2 * GIB),
        "fs/memory/memory.stat": f"inactive_file 5\ntotal_inactive_file {GIB // 2}\n"})
    assert memory_fit.cgroup_available(v1 / "fs", v1 / "proc") == int(4.5 * GIB)
    unlimited = _tree(tmp_path / "none", {
        "proc": "0::/\n", "fs/memory.max": "max", "fs/memory.current": "5"})
    assert memory_fit.cgroup_available(unlimited / "fs", unlimited / "proc") is None


def only_the_limit(monkeypatch, limit: str) -> None:
    """LLAMA_MEMORY_LIMIT=`limit` decides, not what this shared machine has free at the moment
    (a 7B benchmark beside the suite once left less than a 20 GiB case needs)."""
    monkeypatch.setattr(memory_fit, "mem_available", lambda: 64 * GIB)
    monkeypatch.setattr(memory_fit, "cgroup_available", lambda: None)
    monkeypatch.setenv("LLAMA_MEMORY_LIMIT", limit)


def refusal(args, mode=None, group_size=None, cache_dtype=None) -> str:
    """check_fits's one line for a bfloat16 checkpoint on the CPU (float32 activations)."""
    with pytest.raises(NotEnoughMemoryError) as caught:
        check_fits(args, 1, mode, group_size, torch.bfloat16, torch.float32,
                   torch.device("cpu"), bf16_checkpoint=True, cache_dtype=cache_dtype)
    return str(caught.value)


def test_the_7b_refusal_at_8_gib_names_quantization(monkeypatch):
    only_the_limit(monkeypatch, "8GiB")
    args = dataclasses.replace(LLAMA2["7B"], max_seq_len=512, max_batch_size=4)
    message = refusal(args)
    assert "\n" not in message and "8.0 GiB is available (LLAMA_MEMORY_LIMIT)" in message
    assert "weights 12.6 GiB bfloat16" in message
    assert "--quantize int4: " in message and "--quantize int8 --max_seq_len 256: " in message
    # at 20 GiB the default fits; float32 asked for does not, and is told of the default
    monkeypatch.setenv("LLAMA_MEMORY_LIMIT", "20GiB")
    check_fits(args, 1, None, None, torch.bfloat16, torch.float32, torch.device("cpu"),
               bf16_checkpoint=True)
    with pytest.raises(NotEnoughMemoryError, match=r"no --dtype \(bfloat16 weights"):
        check_fits(args, 1, None, None, torch.float32, torch.float32, torch.device("cpu"),
                   bf16_checkpoint=True)


def test_build_is_refused_before_reading_weights_and_loads_when_it_fits(
        build, checkpoints, monkeypatch):
    """A limit between what int8 weights need and what the default needs: the default build
    is refused (no tensor cut from the shards), naming --quantize int8 with its size; the
    int8 build then loads under the same limit."""
    args = dataclasses.replace(model_args("gqa"), max_seq_len=64, max_batch_size=4)
    need = estimate(args, 1, None, None, torch.bfloat16, torch.float32).total
    need8 = estimate(args, 1, "int8", None, torch.bfloat16, torch.float32).total
    assert need8 < need
    monkeypatch.setenv("LLAMA_MEMORY_LIMIT", str(need8))
    original = checkpoint.rank_state_dict
    read = []
    monkeypatch.setattr(checkpoint, "rank_state_dict",
                        lambda *a, **k: read.append(1) or original(*a, **k))
    with pytest.raises(NotEnoughMemoryError) as caught:
        build("gqa")
    assert read == []
    assert f"--quantize int8: {need8 / GIB:.1f} GiB" in str(caught.value)
    generator = build("gqa", quantize="int8")
    assert read == [1]
    assert generator.text_completion(["The"], max_gen_len=2, temperature=0)
    monkeypatch.setenv("LLAMA_MEMORY_LIMIT", str(need))
    build("gqa")
    # memory the caller keeps beside the model (a server's prefix cache) is counted
    with pytest.raises(NotEnoughMemoryError, match=r"reserved beside the model") as caught:
        build("gqa", reserve_memory=GIB)
    assert read == [1, 1]
    with pytest.raises(ArgumentValueError, match="reserve_memory"):
        build("gqa", reserve_memory=-1)


def test_int8_activations_are_counted(build, monkeypatch):
    """int8 activations lay the weights out with their columns padded to 512: 7B's w2 (11008
    columns -> 11264) adds 32 layers x 4096 rows x 256 bytes with int8 weights, x (128 bytes
    of values + a scale and zero per group) with int4 ones. The largest product (the output,
    32000 x 4096) is laid out anew at load beside the old one. On the small model, the
    estimate adds what the loaded model's weights gain, and a limit that fits int8 weights
    without the padding refuses the build before loading, offering int4 (with int8
    activations)."""
    args = dataclasses.replace(LLAMA2["7B"], max_seq_len=512, max_batch_size=4)

    def added(mode, group_size=None, world_size=1):
        need = [estimate(args, world_size, mode, group_size, torch.bfloat16, torch.float32,
                         activations=a) for a in (None, "int8")]
        assert need[1].cache == need[0].cache
        return need[1].weights - need[0].weights, need[1].working - need[0].working

    int8_working = estimate(args, 1, "int8", None, torch.bfloat16, torch.float32).working
    assert added("int8") == (32 * 4096 * 256, max(0, 32000 * 4096 + memory_fit.BASE_WORKING
                                                  - int8_working))
    assert added("int8", world_size=2)[0] == 32 * 4096 * 256 // 2
    assert added("int4", 32)[0] == 32 * 4096 * (128 + 8 * 4)
    assert added("int4", 128)[0] == 32 * 4096 * (128 + 2 * 4)

    small = dataclasses.replace(model_args("gqa"), max_seq_len=64, max_batch_size=4)
    held = {}
    for activations in (None, "int8"):
        model = build("gqa", quantize="int8", activations=activations).model
        held[activations] = sum(p.packed.nbytes for _, _, p in fused.projections(model))
    need = {activations: estimate(small, 1, "int8", None, torch.bfloat16, torch.float32,
                                  activations=activations) for activations in (None, "int8")}
    assert held["int8"] - held[None] == need["int8"].weights - need[None].weights > 0
    model = build("gqa", quantize="int4", group_size=64, activations="int8").model
    saved = sum(n * (k // 2 + k // 64 * 4) for n, k in (
        p.packed.shape for _, _, p in fused.projections(model)))
    held4 = sum(p.packed.nbytes for _, _, p in fused.projections(model))
    assert held4 - saved == (estimate(small, 1, "int4", 64, torch.bfloat16, torch.float32,
                                      activations="int8").weights
                             - estimate(small, 1, "int4", 64, torch.bfloat16,
                                        torch.float32).weights) > 0
    # fits int8 weights alone and int4 ones with int8 activations; not int8 ones with them
    need4 = estimate(small, 1, "int4", None, torch.bfloat16, torch.float32,
                     activations="int8").total
    assert max(need[None].total, need4) < need["int8"].total
    monkeypatch.setenv("LLAMA_MEMORY_LIMIT", str(max(need[None].total, need4)))
    with pytest.raises(NotEnoughMemoryError, match=r"--quantize int4: "):
        build("gqa", quantize="int8", activations="int8")


def test_scripts_end_in_one_line(checkpoints, tokenizer_path):
    from tests.conftest import run_script

    result = run_script(["example_text_completion.py", "--ckpt_dir", checkpoints("gqa", 1),
                         "--tokenizer_path", tokenizer_path, "--max_seq_len", "64"],
                        env={"LLAMA_MEMORY_LIMIT": "1MiB"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "is available (LLAMA_MEMORY_LIMIT)" in last and "nothing was loaded" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dtype, embedding, norms, kept", [
    (None, torch.bfloat16, torch.float32, "bfloat16 embedding, float32 norms"),
    (torch.float32, torch.float32, torch.float32, "float32 embedding and norms")])
def test_the_load_report_names_the_dtypes_the_model_holds(checkpoints, tokenizer_path, capsys,
                                                        dtype, embedding, norms, kept):
    """The memory line printed while loading a quantized model names the dtypes its embedding
    and norms are held in (a bfloat16 checkpoint keeps a bfloat16 embedding by default), as
    the loaded model has them."""
    from llama import Llama

    model = Llama.build(checkpoints("gqa", 1), tokenizer_path, max_seq_len=32,
                        max_batch_size=1, device="cpu", quantize="int8", dtype=dtype).model
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("Memory on this rank"))
    assert f"(int8 projections and output, {kept});" in line
    assert (model.tok_embeddings.weight.dtype, model.norm.weight.dtype) == (embedding, norms)
