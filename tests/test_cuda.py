"""On a CUDA GPU (skipped without one, as in CI): float32 on the GPU gives the CPU's greedy
tokens; bfloat16 is the default there and stays close to float32; the compiled decode step runs
as CUDA graphs with the eager step's results; the KV cache holds only what a call needs; and
torchrun with nccl gives what one CPU process gives."""

import json
import math

import pytest
import torch

from llama.model import KVCache
from tests.conftest import REPO, run_script
from tests.test_generation import PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _assert_same_completions(got, want, abs_tol=1e-4):
    # float32 on two devices: the sums run in other orders, so logprobs agree to ~1e-6
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert [g["generation"] for g in got] == [w["generation"] for w in want]
    for g, w in zip(got, want):
        assert all(math.isclose(a, b, abs_tol=abs_tol) for a, b in zip(g["logprobs"],
                                                                        w["logprobs"]))


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_float32_on_the_gpu_gives_the_cpu_tokens(kind, build):
    cpu = build(kind)
    gpu = build(kind, device="cuda", dtype="float32")
    assert gpu.model.output.weight.is_cuda
    for echo in (False, True):
        want = cpu.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True,
                                   echo=echo)
        got = gpu.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True,
                                  echo=echo)
        _assert_same_completions(got, want)


def test_the_gpu_default_is_bfloat16_close_to_float32(build):
    half = build("gqa", device="cuda")
    full = build("gqa", device="cuda", dtype="float32")
    assert half.model.output.weight.dtype == torch.bfloat16  # H100 and the like support it
    tokens = torch.randint(3, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    tokens = tokens.cuda()
    logits = [g.model.forward(tokens, 0, g.model.new_cache(3, 20)) for g in (half, full)]
    assert logits[0].dtype == torch.float32  # logits come back in float32 either way
    error = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert error < 3e-2, f"bfloat16 logits are {error:.3g} away from float32 (relative)"
    # and generation runs end to end in bfloat16
    assert all(isinstance(r["generation"], str)
               for r in half.text_completion(PROMPTS, temperature=0, max_gen_len=8))


def test_compiled_decode_step_runs_as_cuda_graphs_with_eager_results(build):
    from torch._dynamo.utils import counters

    gpu = build("gqa", device="cuda", dtype="float32")
    # prompts of different lengths: the step also takes the rows' padding
    eager = gpu.text_completion(PROMPTS[:3], temperature=0, max_gen_len=10, logprobs=True)
    gpu.compile_decode()  # CUDA graphs: the default on a GPU
    counters.clear()
    for _ in range(2):  # the first call records the graph, the second replays it
        compiled = gpu.text_completion(PROMPTS[:3], temperature=0, max_gen_len=10,
                                       logprobs=True)
        _assert_same_completions(compiled, eager, abs_tol=1e-5)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    # a new cache of the same shape (new addresses): the graph must write the new one
    gpu.free_cache()
    _assert_same_completions(gpu.text_completion(PROMPTS[:3], temperature=0, max_gen_len=10,
                                                 logprobs=True), eager, abs_tol=1e-5)
    # another batch size compiles its own graph; results stay the eager ones
    gpu._compiled_step = None
    eager_one = gpu.text_completion(PROMPTS[3:], temperature=0, max_gen_len=10, logprobs=True)
    gpu.compile_decode()
    compiled_one = gpu.text_completion(PROMPTS[3:], temperature=0, max_gen_len=10,
                                       logprobs=True)
    _assert_same_completions(compiled_one, eager_one, abs_tol=1e-5)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_kv_cache_on_the_gpu_holds_only_what_the_call_needs(build):
    gpu = build("gqa", device="cuda", dtype="float32", max_seq_len=4096, max_batch_size=8)
    # a first call sets up what stays for the process (cuBLAS takes a 32 MiB workspace on an
    # H100 at its first product); the second call's peak is its own
    gpu.text_completion(["Hi"], temperature=0, max_gen_len=3)
    gpu.free_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    gpu.text_completion(["Hi"], temperature=0, max_gen_len=3)
    per_token = KVCache.bytes_per_token(gpu.model.params, torch.float32)
    prompt_len = len(gpu.tokenizer.encode("Hi", bos=True, eos=False))
    cache = gpu._cache
    assert cache.k[0].is_cuda and cache.nbytes == per_token * 1 * (prompt_len + 3)
    up_front = per_token * 8 * 4096  # what max_batch_size x max_seq_len would cost
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < up_front / 50, f"the call's peak was {peak} bytes (all slots: {up_front})"


def test_torchrun_with_nccl_on_the_gpu_equals_one_cpu_process(checkpoints, tokenizer_path,
                                                              tmp_path):
    """Two shards merged onto one GPU process under torchrun (nccl backend), in float32."""
    import os

    outputs = {}
    for name, nproc, device, env in [
            ("cpu", None, "cpu", None),
            ("gpu", 1, "cuda", {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES",
                                                                       "0")})]:
        out = tmp_path / f"{name}.json"
        result = run_script([str(REPO / "tests" / "mp_worker.py"), checkpoints("mha", 2),
                             tokenizer_path, str(out), device, "float32"], nproc=nproc, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs[name] = json.loads(out.read_text())
    got, want = outputs["gpu"], outputs["cpu"]
    assert got["shapes_ok"] and got["world"] == 1
    _assert_same_completions(got["completions"], want["completions"])
    _assert_same_completions(got["echoed"], want["echoed"])
    assert "".join(got["pieces"]) == got["stream_text"] == want["stream_text"]


def test_a_cpu_model_moved_with_cuda_equals_one_built_there(build):
    """Meta-style code moves a model with .cuda() / .half() and calls forward(tokens, 0)."""
    tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    moved = build("gqa").model
    moved.forward(tokens, 0)  # its own cache and fused matrices follow the move
    moved.cuda()
    built = build("gqa", device="cuda", dtype="float32").model
    torch.testing.assert_close(moved.forward(tokens.cuda(), 0), built.forward(tokens.cuda(), 0),
                               atol=1e-5, rtol=1e-5)
    moved.half()
    half = build("gqa", device="cuda", dtype="float16").model
    torch.testing.assert_close(moved.forward(tokens.cuda(), 0), half.forward(tokens.cuda(), 0),
                               atol=0, rtol=0)
    assert moved.layers[0].attention.cache_k.is_cuda


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_on_the_gpu_computes_its_weights_and_compiles(mode, build,
                                                                         checkpoints):
    """Quantized weights packed for CUDA (int8 dequantised in the product, int4 through
    tinygemm): the logits of the float model of the dequantized weights, on the GPU in
    bfloat16; the compiled step (CUDA graphs) gives the eager step's greedy tokens."""
    from tests.test_quantized_model import _dequantized_model, _relative, _tokens

    gpu = build("gqa", device="cuda", quantize=mode)
    expected = _dequantized_model(checkpoints, "gqa", mode).forward(_tokens(), 0)
    got = gpu.model.forward(_tokens().cuda(), 0).cpu()
    assert _relative(got, expected) < 3e-2  # bfloat16 activations and products
    eager = gpu.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    gpu.compile_decode()
    compiled = gpu.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    assert [c["generation"] for c in compiled] == [e["generation"] for e in eager]
