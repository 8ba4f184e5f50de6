"""int8 activations (activations="int8", llama/layers/w8a8.py, llama/kernels/cpu_w8a8.cpp):
the kernel against the products of the activations rounded in torch (cpu_kernels.int8_blocks,
a restatement), its rounding bit for bit, rows alone or in a batch and thread counts, inf and
NaN (also with int4 weights: tests/test_w4a8.py), the layout; the model with the route against
int8 weights alone; and what is refused."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from llama.engine.validation import ArgumentValueError, LlamaWarning
from llama.kernels import cpu_kernels
from llama.layers.linear import PackedInt8
from llama.layers.w8a8 import PackedW4A8, PackedW8A8
from llama.quantize.formats import quantize_int4, quantize_int8
from tests.conftest import run_script

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"native CPU kernels unavailable: "
                                       f"{cpu_kernels.unavailable_reason()}")
# (outputs, inputs): one group, a block short of one, several groups and a partial block, 7B's
# w2 width (11008: 21.5 groups), an output count no tile divides
SHAPES = [(16, 512), (9, 100), (37, 1000), (5, 11008), (67, 1536)]


def activations(rows, k, seed=1):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 5 % k] *= 60  # an outlier channel: its block gets a coarser scale than the others
    return x


def int8_weight(n, k, seed=0):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8,
                         generator=torch.Generator().manual_seed(seed))


def blockwise_float64(x, w, scales):
    """sum_b d[r, b] * sum_{k in b} q[r, k] * w[o, k], times scales[o], in float64, from the
    torch restatement of the rounding."""
    q, d = cpu_kernels.int8_blocks(x)
    rows, k = x.shape
    nb = d.shape[1]
    qb = F.pad(q, (0, nb * 32 - k)).view(rows, nb, 32).double()
    wb = F.pad(w[:, :k], (0, nb * 32 - k)).view(w.shape[0], nb, 32).double()
    sums = torch.einsum("rbk,obk->rob", qb, wb)  # exact: integers below 2^53
    return (sums * d.double()[:, None, :]).sum(-1) * scales.double()


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 7, 20])
def test_products_of_the_blockwise_rounded_activations(n, k, rows):
    """Each block's integer sum is exact and the float32 sums over blocks are within float32
    rounding of float64's; every row's outputs are the same bits alone as in the batch."""
    w, x = int8_weight(n, k), activations(rows, k, seed=rows)
    scales = (torch.rand(n, generator=torch.Generator().manual_seed(2)) / 50).to(torch.bfloat16)
    packed = cpu_kernels.w8a8_layout(w)
    y = cpu_kernels.w8a8_mm(x, packed, scales)
    ref = blockwise_float64(x, w, scales)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6
    assert torch.equal(cpu_kernels.w8a8_mm(x[-1:].contiguous(), packed, scales), y[-1:])
    # and not the int16 route's function: the rounding is really coarser
    y16 = cpu_kernels.int8_mm(x, F.pad(w, (0, -k % 32)), scales)
    assert not torch.equal(y, y16)


def test_the_rounding_is_the_torch_restatements_bit_for_bit():
    """An identity weight returns each activation as the kernel rounded it, q * d, which must
    be int8_blocks' values exactly (and the round trip of the weight layout is lossless)."""
    k = 1100  # two groups and a partial block
    x = activations(6, k) * torch.logspace(-3, 3, k)  # blocks of very different scales
    eye = torch.eye(k, dtype=torch.int8)
    packed = cpu_kernels.w8a8_layout(eye)
    assert torch.equal(cpu_kernels.w8a8_values(packed)[:, :k], eye)
    assert not cpu_kernels.w8a8_values(packed)[:, k:].any()
    y = cpu_kernels.w8a8_mm(x, packed, torch.ones(k, dtype=torch.bfloat16))
    q, d = cpu_kernels.int8_blocks(x)
    assert q.abs().max() == 127 and (q == 0).float().mean() < 0.1
    assert torch.equal(y, q.float() * d.repeat_interleave(32, dim=1)[:, :k])


def product(weights, n, k):
    """x -> the int8-activation route's product with random int8 or int4 (g32) weights."""
    if weights == "int8":
        packed = cpu_kernels.w8a8_layout(int8_weight(n, k))
        scales = torch.full((n,), 0.01, dtype=torch.bfloat16)
        return lambda x: cpu_kernels.w8a8_mm(x, packed, scales)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k ** 0.5
    q4 = quantize_int4(w, 32)
    packed, sz = cpu_kernels.w4a8_layout(q4.values(), q4.scales, q4.zeros)
    return lambda x: cpu_kernels.w4a8_mm(x, packed, sz, 32)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_thread_counts_give_the_same_bits(weights):
    mm, x = product(weights, 300, 2048), activations(37, 2048)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mm(x)
        torch.set_num_threads(2)
        two = mm(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("weights, k", [("int8", 700), ("int4", 704)])
def test_a_row_with_inf_or_nan_gives_nan_and_leaves_the_others(weights, k):
    mm, x = product(weights, 20, k), activations(3, k)
    clean = mm(x)
    for bad in (float("inf"), float("nan")):
        dirty = x.clone()
        dirty[1, 650] = bad  # in the last, partial group
        y = mm(dirty)
        assert y[1].isnan().all()
        assert torch.equal(y[[0, 2]], clean[[0, 2]])


def test_the_kernel_refuses_bad_layouts():
    x = torch.randn(2, 600)
    with pytest.raises(RuntimeError, match="K rounded up to a multiple of 512"):
        cpu_kernels.w8a8_mm(x, torch.zeros(4, 512, dtype=torch.uint8),
                            torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="scales must be"):
        cpu_kernels.w8a8_mm(x, torch.zeros(4, 1024, dtype=torch.uint8), torch.ones(4))


def test_packed_weight_keeps_the_int8_values_and_scales():
    w = torch.randn(70, 300) * 0.02
    int8 = PackedInt8(quantize_int8(w))
    packed = PackedW8A8(int8)
    assert torch.equal(packed.int8_values(), int8.weight[:, :300])
    assert torch.equal(packed.dequantize(), int8.dequantize())
    x = torch.randn(2, 3, 300)
    y = packed.product(x)
    assert y.shape == (2, 3, 70)
    assert torch.equal(y.view(6, 70), cpu_kernels.w8a8_mm(x.view(6, 300), packed.weight,
                                                          packed.scales))


# ------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("weights, packed", [("int8", PackedW8A8), ("int4", PackedW4A8)])
def test_the_model_takes_the_route_for_every_product(build, weights, packed):
    """Every packed int8 (int4) weight becomes a PackedW8A8 (PackedW4A8): the fused ones and
    the single layers'; a second call changes nothing. The logits stay close to the weights
    alone (the demo-model and outlier figures are in docs/QUANTIZATION.md) but are a
    different function."""
    plain = build("gqa", quantize=weights)
    routed = build("gqa", quantize=weights, activations="int8")
    model = routed.model
    kinds = [type(layer.attention._qkv.packed) for layer in model.layers]
    kinds += [type(layer.feed_forward.w2.weight) for layer in model.layers]
    assert set(kinds) == {packed} and isinstance(model.output.weight, packed)
    output = model.output.weight
    assert plain.model.output.weight.quantize == output.quantize == weights
    assert output.with_int8_activations() is output
    model.use_int8_activations()
    assert model.output.weight is output
    tokens = torch.tensor([plain.tokenizer.encode("a class is a way to bundle data", bos=True,
                                                  eos=False)])
    a = plain.model.forward(tokens, 0, plain.model.new_cache(1, 64))
    b = model.forward(tokens, 0, model.new_cache(1, 64))
    assert not torch.equal(a, b)
    assert float((a - b).norm() / a.norm()) < 0.05


def test_what_is_refused(build):
    with pytest.raises(ArgumentValueError, match="pass quantize='int8' or 'int4' too .* the "
                                                 "weights here are full precision"):
        build("gqa", activations="int8")
    with pytest.raises(ArgumentValueError, match="activations must be 'int8'"):
        build("gqa", quantize="int8", activations="int16")
    with pytest.raises(ArgumentValueError, match="the weights here are full precision"):
        build("gqa").model.use_int8_activations()


def test_build_warns_where_the_route_would_be_slow(build, monkeypatch):
    """int8 activations run on vpdpbusd where the kernels were built for AVX-512 VNNI on a CPU
    that has it (read here from /proc/cpuinfo); elsewhere Llama.build warns, before loading,
    that the route is slower than leaving it out."""
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert cpu_kernels.int8_dot_products() == (cpu_kernels.isa() == "avx512"
                                               and "avx512_vnni" in flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build("gqa", quantize="int8", activations="int8")
    slow = [w for w in caught if "no AVX-512 VNNI" in str(w.message)]
    assert len(slow) == (0 if cpu_kernels.int8_dot_products() else 1)
    monkeypatch.setattr(cpu_kernels, "int8_dot_products", lambda: False)
    with pytest.warns(LlamaWarning, match=r"activations='int8': the CPU kernels here \(\w+\) "
                                          r"have no AVX-512 VNNI, .* leave activations out"):
        build("gqa", quantize="int4", activations="int8")


def test_the_script_takes_the_flag(checkpoints, tokenizer_path):
    """With int4 weights (int8 ones take the same path through the flags), then none."""
    script = ["example_text_completion.py", "--ckpt_dir", checkpoints("gqa", 1),
              "--tokenizer_path", tokenizer_path, "--max_seq_len", "128", "--max_gen_len", "4",
              "--quantize", "int4"]
    result = run_script(script + ["--activations", "int8"])
    assert result.returncode == 0, result.stderr
    assert "int4 weights, int8 activations (blocks of 32)" in result.stderr
    assert result.stdout.count("\n> ") == 4
    result = run_script(script[:-2] + ["--activations", "int8"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pass quantize='int8' or 'int4' too" in result.stderr.strip().splitlines()[-1]
