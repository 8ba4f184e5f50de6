"""bfloat16 weights with float32 activations (llama/layers/bf16.py, llama/kernels/cpu_dense.cpp):
the kernel
against float64 and against the float32 kernel on the widened weight, rows alone or batched,
long products through widened blocks, the fallback without the kernels, and a default CPU
model (bfloat16 storage) against the same checkpoint loaded in float32."""

import pytest
import torch
import torch.nn.functional as F

from llama.checkpoints.fixtures import write_random_checkpoint
from llama.kernels import cpu_kernels
from llama.layers import bf16
from llama.layers.fused import projections
from llama.layers.linear import linear
from tests.conftest import model_args

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason=f"native CPU kernels unavailable: "
                                          f"{cpu_kernels.unavailable_reason()}")
ROWS = [1, 2, 3, 4, 7, 16, 37]


def weights(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :3] *= 40  # outlier columns
    return w.to(torch.bfloat16)


def activations(rows, in_f, seed=1):
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed))
    x[:, 5 % in_f] *= 60
    return x


@needs_kernels
@pytest.mark.parametrize("out_f, in_f", [(64, 768), (67, 100), (5, 16), (130, 33), (3, 1),
                                         (9, 4100), (4, 15)])
def test_kernel_against_float64_and_each_row_alone(out_f, in_f):
    """Widths off every vector length, output rows past the last tile (of 4 weight rows, of 3
    in a long product). The function is the float32 product of the widened weight: the same
    bits as the float32 kernel's."""
    w = weights(out_f, in_f)
    x = activations(37, in_f)  # a long product: 4 groups of 8 rows, then the 5 left
    y = cpu_kernels.bf16_mm(x, w)
    assert y.shape == (37, out_f) and y.dtype == torch.float32
    reference = x.double() @ w.double().t()
    torch.testing.assert_close(y.double(), reference, rtol=1e-5,
                               atol=1e-5 * float(reference.abs().max()))
    assert torch.equal(y, cpu_kernels.float_mm(x, w.float()))
    for rows in ROWS:
        assert torch.equal(cpu_kernels.bf16_mm(x[:rows], w), y[:rows])
        assert torch.equal(cpu_kernels.bf16_mm(x[rows - 1: rows], w), y[rows - 1: rows])


@needs_kernels
def test_kernel_does_not_depend_on_the_thread_count():
    w, x = weights(1030, 512), activations(5, 512)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpu_kernels.bf16_mm(x, w))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*results)


@needs_kernels
def test_kernel_rejects_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_kernels.bf16_mm(torch.zeros(2, 8), torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="K as x's"):
        cpu_kernels.bf16_mm(torch.zeros(2, 8), torch.zeros(4, 9, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 4, 16, 17, 100])
def test_linear_routes_bf16_weights_and_computes_the_float32_product(rows, monkeypatch):
    """The kernel where it is vectorised, at any row count (a prefill's rows each as alone);
    elsewhere blocks of weight rows widened for the float32 GEMM (600 rows in blocks of 256:
    256, 256 and 88). The float32 product either way."""
    calls = []
    original = cpu_kernels.bf16_mm
    monkeypatch.setattr(cpu_kernels, "bf16_mm", lambda *a: calls.append(a[0].shape[0]) or
                        original(*a))
    w = weights(600, 96)
    x = activations(rows, 96).view(rows, 1, 96)
    y = linear(x, w)
    assert y.shape == (rows, 1, 600) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-5, atol=1e-5)
    assert calls == ([rows] if cpu_kernels.fast_float() else [])
    if cpu_kernels.fast_float():
        assert torch.equal(y[-1], linear(x[-1], w))  # the last row alone: the same bits
    torch.testing.assert_close(bf16.widened_product(x.view(rows, 96), w, 256),
                               F.linear(x, w.float()).view(rows, 600), rtol=1e-5, atol=1e-5)


def test_bf16_weight_wrapper():
    w = weights(70, 48)
    wrapped = bf16.Bf16Weight(w)
    assert wrapped.shape == (70, 48) and wrapped.dtype == torch.float32
    assert wrapped.device == torch.device("cpu") and wrapped.nbytes == 70 * 48 * 2
    assert torch.equal(wrapped.dequantize(), w.float())
    x = activations(3, 48)
    assert torch.equal(linear(x, wrapped), linear(x, w))
    torch.testing.assert_close(wrapped.product(x), x @ w.float().t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bfloat16"):
        bf16.Bf16Weight(w.float())


def test_without_the_kernels_the_widened_product(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state",
                        {"tried": True, "ops": None, "isa": None, "error": "no compiler"})
    w = weights(300, 40)
    for rows in (1, 5, 40):
        x = activations(rows, 40)
        torch.testing.assert_close(linear(x, w), x @ w.float().t(), rtol=1e-5, atol=1e-5)


def test_a_default_cpu_model_stores_bf16_and_computes_the_float32_function(build):
    """The same checkpoint by default (bfloat16 matrices) and with dtype=float32: Meta's API
    (tensors under Meta's names, forward(tokens, 0)), float32 activations and cache, logits
    equal within float32 rounding, the same greedy tokens."""
    default, full = build("gqa"), build("gqa", dtype=torch.float32)
    attention = default.model.layers[0].attention
    assert isinstance(attention.wq.weight, torch.Tensor)
    assert attention.wq.weight.dtype == torch.bfloat16
    assert default.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert default.model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    tokens = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(3))
    logits = default.model.forward(tokens, 0)
    assert logits.dtype == torch.float32 and attention.cache_k.dtype == torch.float32
    torch.testing.assert_close(logits, full.model.forward(tokens, 0), rtol=1e-5, atol=2e-5)
    assert default.model.new_cache(2, 8).k[0].dtype == torch.float32
    prompts = [default.tokenizer.encode(p, bos=True, eos=False)
               for p in ["The", "In Python, a class", "x = 1"]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got, _ = default.generate(prompts, max_gen_len=16, temperature=0)
    want, _ = full.generate(prompts, max_gen_len=16, temperature=0)
    assert got == want
    ran = {e.key for e in prof.key_averages()}
    assert ("llama_kernels::bf16_mm" in ran) == cpu_kernels.fast_float()
    def bytes_of(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert bytes_of(default.model) < 0.51 * bytes_of(full.model)


def test_explicit_dtypes_and_float32_checkpoints_keep_their_meaning(build, tmp_path,
                                                                  tokenizer_path):
    """dtype=bfloat16: bfloat16 weights and activations, as before. A float32 checkpoint
    stays float32 by default."""
    from llama import Llama

    half = build("gqa", dtype=torch.bfloat16).model
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    tokens = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(4))
    half.forward(tokens, 0)
    assert half.layers[0].attention.cache_k.dtype == torch.bfloat16
    write_random_checkpoint(tmp_path / "f32", model_args("gqa"), dtype=torch.float32)
    model = Llama.build(str(tmp_path / "f32"), tokenizer_path, max_seq_len=32,
                        max_batch_size=2, verbose=False, device="cpu").model
    assert all(p.dtype == torch.float32 for p in model.parameters())


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_bf16_activations_take_the_kernel_for_few_rows(rows, monkeypatch):
    """dtype=bfloat16 (bfloat16 weights and activations): up to NATIVE_BF16_ROWS rows our
    kernel on the activations widened (exact), its float32 sums rounded to bfloat16 once; more
    rows oneDNN's bfloat16 GEMM (F.linear). Either is the bfloat16 product within one rounding
    of the float64 one."""
    from llama.layers.float_linear import NATIVE_BF16_ROWS, Bf16Kernel, native_route

    calls = []
    original = cpu_kernels.bf16_mm
    monkeypatch.setattr(cpu_kernels, "bf16_mm", lambda *a: calls.append(a[0].shape[0]) or
                        original(*a))
    w = weights(130, 100)
    x = activations(rows, 100).to(torch.bfloat16).view(rows, 1, 100)
    routed = native_route(w, activations=torch.bfloat16)
    assert isinstance(routed, Bf16Kernel)
    y = linear(x, routed)
    assert y.shape == (rows, 1, 130) and y.dtype == torch.bfloat16
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -8, atol=1e-3)
    if rows <= NATIVE_BF16_ROWS:
        assert calls == [rows]
        want = original(x.view(rows, 100).float(), w).to(torch.bfloat16).view(rows, 1, 130)
        assert torch.equal(y, want)
        assert torch.equal(linear(x[-1], routed), y[-1])  # the last row alone: the same bits
    else:
        assert calls == [] and torch.equal(y, F.linear(x, w))
    # under float32 activations a bfloat16 weight keeps linear()'s mixed route
    assert native_route(w) is w and native_route(w, activations=torch.float32) is w


@needs_kernels
def test_a_bf16_cpu_model_decodes_through_the_kernel(build):
    """dtype=bfloat16 on the CPU: the projections take Bf16Kernel (decode steps through our
    kernel, prefills through oneDNN), and the logits of a prefill and of decode steps stay
    within bfloat16 rounding of the same model on torch's routes."""
    from llama.layers.float_linear import Bf16Kernel

    generator = build("gqa", dtype=torch.bfloat16)
    model = generator.model
    tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(5))

    def logits_of_steps():
        out = [model.forward(tokens[:, :8], 0)[:, -1]]
        out += [model.forward(tokens[:, i:i + 1], i)[:, -1] for i in range(8, 12)]
        return torch.stack(out)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        routed = logits_of_steps()
    assert "llama_kernels::bf16_mm" in {e.key for e in prof.key_averages()}
    attention = model.layers[0].attention
    assert isinstance(attention._qkv.product_weight(attention), Bf16Kernel)
    for _, _, projection in projections(model):
        projection.set_route(None)
    plain = logits_of_steps()
    assert routed.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(routed, plain, rtol=0, atol=0.03 * float(plain.abs().max()))
