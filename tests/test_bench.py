"""The benchmark program runs end to end and computes its ratios as it says."""

import shutil
import subprocess
import sys
import textwrap

import pytest

from benchmarks import bench, compared
from llama.kernels import cpu_kernels
from tests.conftest import REPO

# A stand-in for Meta's llama/model.py: its ModelArgs fields and Transformer(args) /
# load_state_dict / forward(tokens, start_pos) protocol, the math restated in
# tests/meta_reference.py, and a .cuda() call while building, as Meta's caches make.
STAND_IN = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import Optional

    import torch

    from tests.meta_reference import ReferenceModel


    @dataclass
    class ModelArgs:
        dim: int = 4096
        n_layers: int = 32
        n_heads: int = 32
        n_kv_heads: Optional[int] = None
        vocab_size: int = -1
        multiple_of: int = 256
        ffn_dim_multiplier: Optional[float] = None
        norm_eps: float = 1e-5
        max_batch_size: int = 32
        max_seq_len: int = 2048


    class Transformer(torch.nn.Module):
        def __init__(self, args):
            super().__init__()
            self.args = args
            self.cache = torch.zeros(1).cuda()

        def load_state_dict(self, state, strict=True):
            assert not strict and "rope.freqs" in state
            self.model = ReferenceModel(state, vars(self.args), self.args.max_batch_size,
                                        self.args.max_seq_len)

        def forward(self, tokens, start_pos):
            return self.model.forward(tokens, start_pos)
''')


def test_ratio_is_the_median_of_run_by_run_ratios(capsys):
    results = {
        "this library": {"batch 1": {"time to first token (s)": [1.0, 2.0, 3.0],
                                     "decode tok/s": [10.0, 10.0, 30.0]}},
        "other": {"batch 1": {"time to first token (s)": [2.0, 2.0, 9.0],
                              "decode tok/s": [5.0, 20.0, 10.0]}},
    }
    bench.report(results)
    ttft, decode = capsys.readouterr().out.splitlines()
    # medians 2.0 against 2.0, but run by run the other took 2x, 1x and 3x as long
    assert "time to first token (s):     2.000 | other     2.000 (we are 2.00x)" in ttft
    # run by run we were 2x, 0.5x and 3x as fast
    assert "decode tok/s:    10.000 | other    10.000 (we are 2.00x)" in decode


def test_bench_runs_every_comparison(tmp_path):
    meta = tmp_path / "meta-llama"
    (meta / "llama").mkdir(parents=True)
    (meta / "llama" / "model.py").write_text(STAND_IN)
    command = [sys.executable, "-m", "benchmarks.bench", "--shape", "tiny",
               "--runs", "1", "--batch", "1", "2", "--prompt-len", "8", "--gen-len", "4",
               "--mixed", "3", "8", "--compare", "reference", "hf", "--meta", str(meta),
               "--root", str(tmp_path)]
    if not bench_can_compare_hf():
        command.remove("hf")
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("shape tiny:")
    for case in ("batch 1", "batch 2", "mixed 3/8"):
        line = next(line for line in lines if case in line and "time to first token" in line)
        assert "reference algorithm" in line and "Meta's model code" in line
    decode = [line for line in lines if "decode tok/s" in line]
    assert len(decode) == 2  # not for the mixed batch
    agree = [line for line in lines if "greedy tokens" in line]
    assert len(agree) == 3 and all("DIFFER" not in line for line in agree), agree
    assert all("Meta's model code identical" in line for line in agree)


def test_gen_len_one_times_prefill_only(tmp_path, monkeypatch):
    """Also: a mixed batch may hold prompts longer than --prompt-len; --gen-len 0 is refused
    (by bench.main, called here: it stops at its arguments)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--shape",
                          "tiny", "--runs", "1", "--batch", "1", "--prompt-len", "8",
                          "--gen-len", "1", "--mixed", "5", "20", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "mixed 5/20  time to first token" in out.stdout
    assert "the largest call, batch 2 x 21 tokens" in out.stdout
    assert "batch 1  time to first token" in out.stdout and "decode tok/s" not in out.stdout
    monkeypatch.setattr(sys, "argv", ["bench.py", "--gen-len", "0", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="^--gen-len and --prompt-len must be at least 1$"):
        bench.main()


def test_load_figures_for_both_layouts(tmp_path):
    """--format hf converts the checkpoint to Hugging Face's layout and loads both in turns."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--shape",
                          "tiny", "--load", "--format", "hf", "--runs", "1", "--root",
                          str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    meta, hub = out.stdout.splitlines()[1:]
    assert meta.startswith("load: ") and "x the weights" in meta
    assert hub.startswith("load, Hugging Face layout: ") and "against Meta's layout: " in hub
    assert (tmp_path / "tiny-hf" / "config.json").is_file()


def test_meta_path_without_model_file_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="no llama/model.py there"):
        compared.MetaOriginal(tmp_path, tmp_path, 16, 1)


def test_agreement_names_the_first_difference():
    assert bench.agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == "identical"
    assert bench.agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == "DIFFER (row 1, new token 1)"
    assert bench.agreement([[1, 2]], [[1, 2], [3]]) == "DIFFER (row count)"


def bench_can_compare_hf() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_profile_step_runs_on_the_cpu():
    """benchmarks/profile_step.py is a GPU tool; its --device cpu dry run keeps it working.
    The compiled step is traced by aot_eager: the same graph as inductor's, without its code
    generation (13-28 s here; the library's compiled step through inductor is tested in
    test_generation.py and test_compiled_choice.py)."""
    command = [sys.executable, "-m", "benchmarks.profile_step", "--shape", "tiny",
               "--device", "cpu", "--batch", "2", "--layers", "1", "--position", "6",
               "--backend", "aot_eager"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    for step in ("eager step at batch 2", "compiled step at batch 2"):
        assert step in out.stdout, out.stdout
    assert "2 rows:" in out.stdout  # the weight-read table


def test_quant_gpu_builds_and_decodes_a_quantized_model(capsys):
    """benchmarks/quant_gpu.py (run on lent GPUs, e.g. 70B in int8): its CPU smoke run."""
    from benchmarks import quant_gpu

    assert quant_gpu.main(["--shape", "tiny", "--device", "cpu", "--mode", "int8", "int4",
                           "--prompt-len", "4", "--gen-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "int8: built in" in out and "int4 g32: built in" in out
    assert out.count("eager decode, batch 1:") == 2


@pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable")
def test_kernel_compute_prints_a_figure_per_kernel_and_row_count(capsys):
    from benchmarks import kernel_compute

    kernel_compute.main(["--rows", "1", "3", "--out", "32", "--in", "256", "--calls", "2",
                         "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" (")[0]: line.split()[-2:] for line in lines[2:]}
    assert set(rows) == {"int8", "int4 g32", "int4 g128", "bf16", "float32"}
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells)


@pytest.mark.skipif(not cpu_kernels.available() or shutil.which("g++") is None
                    or "avx512_vnni" not in open("/proc/cpuinfo").read(),
                    reason="needs the native kernels, g++ and AVX-512 VNNI")
def test_kernel_compute_sets_each_figure_against_the_cores_rate(capsys):
    from benchmarks import kernel_compute

    kernel_compute.main(["--rows", "2", "16", "--out", "32", "--in", "256", "--calls", "2",
                         "--repeats", "1", "--only", "int8", "bf16", "--peak"])
    lines = capsys.readouterr().out.splitlines()
    ns = {line.split(" (")[0]: [float(c) for c in line.split()[-2:]] for line in lines[2:4]}
    assert lines[4].startswith("share of one core's rate (zmm FMAs ")
    shares = {line.split()[0]: [float(c.rstrip("%")) / 100 for c in line.split()[1:]]
              for line in lines[6:8]}
    fma, dot = (float(lines[4].split()[7].split("/")[0]),
                float(lines[4].split()[9].split("/")[0]))
    for name, per_instruction, rate in (("int8", 32, dot), ("bf16", 16, fma)):
        for rows, ns_per_weight, share in zip((2, 16), ns[name], shares[name]):
            # multiply-adds a ns over the instruction's, to the printed whole percent
            assert share == pytest.approx(rows / ns_per_weight / (rate * per_instruction),
                                          abs=0.01)
            assert 0 < share


@pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable")
def test_quantize_speed_prints_each_step(capsys):
    from benchmarks import quantize_speed
    from llama.quantize import formats

    native = formats._native_int4
    quantize_speed.main(["--out", "256", "--in", "1024", "--repeats", "1"])
    assert formats._native_int4 is native  # the torch timing puts the native route back
    lines = capsys.readouterr().out.splitlines()
    figures = {line[:24].strip(): float(line.split()[-1]) for line in lines[1:]}  # ms
    assert set(figures) == {"int4 quantize, native", "int4 quantize, torch",
                            "int4 repack, native", "int4 repack, torch", "int8 quantize"}
    assert all(ms > 0 for ms in figures.values())


@pytest.mark.skipif(shutil.which("g++") is None or "avx512f" not in open("/proc/cpuinfo").read(),
                    reason="needs g++ and an AVX-512 CPU")
def test_cpu_peak_prints_the_ceilings(capsys):
    from benchmarks import cpu_peak

    cpu_peak.main(["--iters", "20000", "--cores", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("one core: ") and "float32 multiply-adds/s" in lines[0]
    assert float(lines[0].split()[2]) > 0  # zmm FMAs per ns
    assert lines[-1].startswith("7B prefill ceiling on 2 cores: float32 FMAs ")


def test_kv_cache_decode_times_both_caches_for_every_cell(checkpoints, tokenizer_path, capsys):
    """Every (batch, position) cell in both tables, bfloat16's bytes half float32's."""
    from benchmarks import kv_cache_decode

    kv_cache_decode.main(["--ckpt", checkpoints("gqa", 1), "--tokenizer", tokenizer_path,
                          "--positions", "8", "40", "--batch", "1", "2", "--steps", "1",
                          "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    steps = [line.split() for line in lines[2:6]]
    assert [(int(cells[0]), int(cells[1])) for cells in steps] == [(1, 8), (1, 40), (2, 8),
                                                                    (2, 40)]
    for cells in steps:
        float32_mb, bfloat16_mb = float(cells[-5]), float(cells[-2])
        assert bfloat16_mb == pytest.approx(float32_mb / 2, abs=0.001) and bfloat16_mb > 0.001
        assert cells[-7].endswith("x") and float(cells[-7][:-1]) > 0
    assert lines[6].startswith("decode attention alone") and len(lines) == 11
    for line in lines[7:]:  # four times (ours and torch's, each cache), then three ratios
        cells = line.replace("(", " ").replace(")", " ").split()
        assert len(cells) == 19 and all(float(cells[i]) > 0 for i in (2, 5, 8, 11))
        assert all(cell.endswith("x") and float(cell[:-1]) > 0 for cell in cells[-5::2])
