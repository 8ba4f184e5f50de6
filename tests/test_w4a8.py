"""int4 weights times int8 activations (quantize="int4", activations="int8";
llama/kernels/cpu_w4a8.cpp, llama/layers/w8a8.py's PackedW4A8): the kernel against float64
products of the int4 format's values and the activations rounded in torch
(cpu_kernels.int8_blocks), rows alone or in a batch, thread counts, inf and NaN, the layout and
its inverse. (Thread counts, inf and NaN, the model with the route: tests/test_w8a8.py, for
both weights; a token prefilled or decoded: tests/test_session.py.)"""

import pytest
import torch

from llama.kernels import cpu_kernels
from llama.layers.linear import PackedInt4
from llama.layers.w8a8 import PackedW4A8
from llama.quantize.formats import quantize_int4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"native CPU kernels unavailable: "
                                       f"{cpu_kernels.unavailable_reason()}")
# (outputs, inputs, group size): one group of 512, a partial group, 7B's w2 width (11008:
# 21.5 groups), groups of 64 and 128 (a scale and zero spanning several blocks), output counts
# no tile divides
SHAPES = [(16, 512, 32), (37, 992, 32), (5, 11008, 32), (67, 1536, 64), (20, 640, 128)]


def int4_weight(n, k, group_size, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    return quantize_int4(w, group_size)


def activations(rows, k, seed=1):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 5 % k] *= 60  # an outlier channel: its block gets a coarser scale than the others
    return x


def float64_products(x, q4):
    """sum_b d * sum_{k in b} q * ((v - 8) * scale + zero): the int4 format's weight, in
    float64, times x rounded in blocks of 32 by the torch restatement."""
    q, d = cpu_kernels.int8_blocks(x)
    values = q4.values().double()
    group = q4.in_features // q4.scales.shape[1]
    w = ((values - 8) * q4.scales.double().repeat_interleave(group, 1)
         + q4.zeros.double().repeat_interleave(group, 1))
    rows, k = x.shape
    qb = q.double().view(rows, k // 32, 32)
    wb = w.view(w.shape[0], k // 32, 32)
    return (torch.einsum("rbk,obk->rob", qb, wb) * d.double()[:, None, :]).sum(-1)


def packed(q4):
    return cpu_kernels.w4a8_layout(q4.values(), q4.scales, q4.zeros)


@pytest.mark.parametrize("n, k, group_size", SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 7, 20])
def test_products_of_the_blockwise_rounded_activations(n, k, group_size, rows):
    """Within float32 rounding of float64's sums; a row's outputs the same bits alone as in
    the batch; and not the int16 route's function."""
    q4, x = int4_weight(n, k, group_size), activations(rows, k, seed=rows)
    weight, sz = packed(q4)
    y = cpu_kernels.w4a8_mm(x, weight, sz, group_size)
    ref = float64_products(x, q4)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6
    assert torch.equal(cpu_kernels.w4a8_mm(x[-1:].contiguous(), weight, sz, group_size),
                       y[-1:])
    y16 = PackedInt4(q4).product(x)
    assert not torch.equal(y, y16)
    assert float((y - y16).norm() / y16.norm()) < 0.05


def test_the_layout_and_its_inverses():
    """w4a8_parts gives back each column's value, scale and zero (zeros past the columns);
    int4_parts undoes pack_int4 (the default route's layout, from which the model converts)."""
    n, k = 21, 1100 // 32 * 32
    q4 = int4_weight(n, k, 64)
    values, scales, zeros = cpu_kernels.w4a8_parts(*packed(q4))
    assert torch.equal(values[:, :k], q4.values()) and not values[:, k:].any()
    assert torch.equal(scales[:, :k], q4.scales.repeat_interleave(64, 1))
    assert torch.equal(zeros[:, :k], q4.zeros.repeat_interleave(64, 1))
    assert not scales[:, k:].any() and not zeros[:, k:].any()
    default = PackedInt4(q4)
    values, scales, zeros = cpu_kernels.int4_parts(default.weight, default.scales_and_zeros, n)
    assert torch.equal(values, q4.values())
    assert torch.equal(scales, q4.scales) and torch.equal(zeros, q4.zeros)


@pytest.mark.parametrize("n, k, group_size", SHAPES)
def test_the_native_conversion_is_the_torch_forms(n, k, group_size):
    """w4a8_pack (from the default int4 layout, in one pass) equals w4a8_layout of the
    values, scales and zeros int4_parts recovers from that layout."""
    default = PackedInt4(int4_weight(n, k, group_size))
    native = cpu_kernels.w4a8_pack(default.weight, default.scales_and_zeros, n, group_size)
    torch_form = cpu_kernels.w4a8_layout(*cpu_kernels.int4_parts(
        default.weight, default.scales_and_zeros, n))
    assert all(torch.equal(a, b) for a, b in zip(native, torch_form))


def test_the_kernel_refuses_bad_layouts():
    x = torch.randn(2, 600)
    with pytest.raises(RuntimeError, match="K rounded up to a multiple of 512, halved"):
        cpu_kernels.w4a8_mm(x, torch.zeros(4, 256, dtype=torch.uint8),
                            torch.zeros(4, 32, dtype=torch.bfloat16), 32)
    with pytest.raises(RuntimeError, match="sz must be"):
        cpu_kernels.w4a8_mm(x, torch.zeros(4, 512, dtype=torch.uint8),
                            torch.zeros(4, 64), 32)
    with pytest.raises(RuntimeError, match="G 32, 64 or 128"):
        cpu_kernels.w4a8_mm(x, torch.zeros(4, 512, dtype=torch.uint8),
                            torch.zeros(4, 64, dtype=torch.bfloat16), 16)


def test_packed_weight_keeps_the_values_scales_and_zeros():
    q4 = int4_weight(2100, 96, 32)
    default = PackedInt4(q4)
    routed = PackedW4A8(default)
    assert torch.equal(routed.dequantize(), default.dequantize())
    x = torch.randn(2, 3, 96)
    y = routed.product(x)
    assert y.shape == (2, 3, 2100)
    assert torch.equal(y.view(6, 2100), cpu_kernels.w4a8_mm(x.view(6, 96), *packed(q4), 32))
