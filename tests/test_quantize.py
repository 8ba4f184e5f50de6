"""Quantized weights: the saved formats' bounds and splits, and every product route against the
float product of the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from llama.kernels import cpu_kernels
from llama.layers import linear as products
from llama.layers.linear import (
    CPU_INT4_KERNEL_ROWS,
    CPU_INT8_KERNEL_ROWS,
    NATIVE_INT4_ROWS,
    PackedInt4,
    PackedInt8,
    check_int4_device,
    linear,
    pack,
)
from llama.quantize import formats as qz
from llama.quantize.formats import (
    GROUP_SIZES,
    Int4Weight,
    QuantizationError,
    from_tensors,
    quantize,
    quantize_int4,
    quantize_int8,
)
from llama.quantize.shards import concat, narrow

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def llama_like(out_f, in_f, seed=0, dtype=torch.float32):
    """Gaussian weights with heavy-tailed rows and a few large entries, a zero row, and a row
    of one repeated value (constant groups)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w *= torch.rand(out_f, 1, generator=g) * 3 + 0.1
    w.view(-1)[torch.randint(0, w.numel(), (20,), generator=g)] *= 30
    w[1] = 0
    w[2] = 0.37
    return w.to(dtype)


def group_bound(q: Int4Weight) -> torch.Tensor:
    return q.scales.float().repeat_interleave(q.group_size, dim=1) / 2


# --- the saved formats -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_within_half_a_step(dtype):
    w = llama_like(96, 160, dtype=dtype)
    q = quantize_int8(w)
    assert q.weight.dtype == torch.int8 and q.scales.dtype == torch.bfloat16
    assert q.weight.shape == (96, 160) and q.scales.shape == (96,)
    assert int(q.weight.abs().max()) <= 127
    error = (w.float() - q.dequantize()).abs()
    assert bool((error <= q.scales.float()[:, None] / 2).all())
    # the scale is as small as the grid allows: each row's largest |w| lands near +-127
    assert bool((q.weight[3:].abs().amax(dim=1) >= 126).all())
    assert q.nbytes == 96 * 160 + 96 * 2


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_round_trip_within_half_a_step(group_size):
    w = llama_like(48, 256)
    w[5] = 0.5 + torch.rand(256) * 1e-3  # narrow groups far from 0: bfloat16 zeros are coarse
    w[6, :group_size] = -4.0 - torch.rand(group_size) * 1e-2
    q = quantize_int4(w, group_size)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (48, 128)
    assert q.scales.shape == q.zeros.shape == (48, 256 // group_size)
    assert q.scales.dtype == q.zeros.dtype == torch.bfloat16
    assert q.group_size == group_size
    assert bool((q.dequantize() - w).abs().le(group_bound(q)).all())
    values = q.values()
    assert values.shape == (48, 256) and int(values.max()) <= 15
    # each ordinary group's extremes land on the grid's ends
    assert bool((values[10:].view(38, -1, group_size).amax(dim=2) == 15).all())
    assert bool((values[10:].view(38, -1, group_size).amin(dim=2) == 0).all())


def test_int4_nibble_layout_is_low_first():
    q = quantize_int4(torch.arange(64, dtype=torch.float32).view(1, 64), 32)
    ramp = q.values()[0, :32].tolist()  # an increasing ramp keeps its order, end to end
    assert ramp == sorted(ramp) and ramp[0] == 0 and ramp[-1] == 15
    first, second = q.values()[0, 0], q.values()[0, 1]
    assert int(q.weight[0, 0]) == int(first) | (int(second) << 4)


def test_quantizing_in_chunks_gives_the_same_values(monkeypatch):
    w = llama_like(80, 128)
    whole8, whole4 = quantize_int8(w), quantize_int4(w, 32)
    monkeypatch.setattr(qz, "_ROWS_PER_CHUNK", 3 * 128)  # 3 rows at a time
    for a, b in ((whole8, quantize_int8(w)), (whole4, quantize_int4(w, 32))):
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), name


def awkward_weights(dtype):
    """Groups a quantizer can get wrong: llama-like rows, scales from tiny (subnormal) to huge,
    constant groups, zeros, exact ties between grid points, negative ramps."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(48, 256, generator=g) * 0.02
    w[1] *= 1e-39 / 0.02  # subnormal floats
    w[2] *= 1e30
    w[3, :64] = 0.5  # constant groups
    w[4] = 0.0
    w[5] = torch.arange(256) * 0.25 - 32  # ramps land on halves between grid points
    w[6] = -torch.arange(256, dtype=torch.float32) * 3
    w[7, ::5] = 7.0  # outliers
    return w.to(dtype)


@pytest.mark.skipif(not cpu_kernels.available(), reason="our CPU kernels did not build here")
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_quantized_natively_is_the_torch_quantizers_bits(group_size, dtype, monkeypatch):
    w = awkward_weights(dtype)
    native = quantize_int4(w, group_size)
    monkeypatch.setattr(qz, "_native_int4", lambda weight: False)
    reference = quantize_int4(w, group_size)
    for name, tensor in reference.tensors().items():
        assert torch.equal(native.tensors()[name], tensor), name
    # one group's inf or NaN: refused as the torch version refuses it
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = w.clone()
        bad[9, 37] = value
        monkeypatch.setattr(qz, "_native_int4", lambda weight: True)
        with pytest.raises(ValueError, match="wo.weight: holds inf or NaN"):
            quantize_int4(bad, group_size, name="wo.weight")


def test_tensors_round_trip():
    for q in (quantize_int8(llama_like(16, 64)), quantize_int4(llama_like(16, 64), 64)):
        back = from_tensors(q.tensors())
        assert type(back) is type(q)
        assert all(torch.equal(t, back.tensors()[k]) for k, t in q.tensors().items())


def test_row_parallel_int8_slices_use_the_whole_rows_scale():
    """wo and w2 are split by columns across ranks: quantized with the whole row's absmax,
    each rank's slice holds exactly the full weight's values and scales (2 processes == 1)."""
    w = llama_like(64, 256)
    full = quantize_int8(w)
    absmax = torch.maximum(qz.row_absmax(w[:, :128]), qz.row_absmax(w[:, 128:]))  # all-reduce
    halves = [quantize_int8(w[:, i * 128:(i + 1) * 128], absmax=absmax) for i in range(2)]
    for i, half in enumerate(halves):
        expected = narrow(full, 1, i * 128, 128)
        assert torch.equal(half.weight, expected.weight)
        assert torch.equal(half.scales, expected.scales)
    joined = concat(halves, dim=1)
    assert torch.equal(joined.weight, full.weight) and torch.equal(joined.scales, full.scales)
    with pytest.raises(QuantizationError, match="absmax is below"):
        quantize_int8(w[:, :128], absmax=absmax / 2)
    with pytest.raises(QuantizationError, match="share their rows' scales"):
        concat([quantize_int8(w[:, :128]), quantize_int8(w[:, 128:])], dim=1)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_groups_never_straddle_a_split(group_size):
    w = llama_like(32, 512)
    full = quantize_int4(w, group_size)
    for rank in range(2):
        mine = quantize_int4(w[:, rank * 256:(rank + 1) * 256], group_size)
        theirs = narrow(full, 1, rank * 256, 256)
        assert all(torch.equal(t, theirs.tensors()[k]) for k, t in mine.tensors().items())
    parts = [narrow(full, 1, r * 256, 256) for r in range(2)]
    assert all(torch.equal(t, concat(parts, dim=1).tensors()[k])
               for k, t in full.tensors().items())
    rows = [narrow(full, 0, 0, 10), narrow(full, 0, 10, 22)]
    assert all(torch.equal(t, concat(rows).tensors()[k]) for k, t in full.tensors().items())


# --- products --------------------------------------------------------------------------------

def relative_error(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


NATIVE = cpu_kernels.available()
# our kernels where they build (tests/test_native_kernels.py), and torch's in every case
ROUTES = [pytest.param(True, id="native", marks=pytest.mark.skipif(
    not NATIVE, reason="native CPU kernels unavailable")), pytest.param(False, id="torch")]


def check_product(packed, q, x):
    """The packed product against F.linear of the dequantized weight: with x's rows rounded to
    int16, as our int8 and int4 kernels take them, and with x rounded to bfloat16, as torch's
    kernels and the dequantised product take it."""
    y = linear(x, packed)
    assert y.shape == (*x.shape[:-1], q.out_features) and y.dtype == x.dtype
    w = q.dequantize()
    rows = x.numel() // x.shape[-1]
    # our int8 kernel takes every row count; our int4 one too where vectorised
    if packed.our_kernels and (isinstance(packed, PackedInt8) or rows <= NATIVE_INT4_ROWS
                               or cpu_kernels.int4_every_product()):
        # float32 products of the float32 dequantized weights, in another order of additions
        xq, xs = cpu_kernels.int16_rows(x.float().reshape(-1, x.shape[-1]))
        xf = xq.float() * xs[:, None]
        assert relative_error(y, F.linear(xf, w).view(y.shape)) < (
            1e-6 if x.dtype == torch.float32 else 5e-3)
    else:
        assert relative_error(y, F.linear(x.float(), w)) < 1e-2
        assert relative_error(y, F.linear(x.bfloat16().float(), w)) < 5e-3


@pytest.mark.parametrize("native", ROUTES)
@pytest.mark.parametrize("rows", [1, 4, CPU_INT8_KERNEL_ROWS, CPU_INT8_KERNEL_ROWS + 1, 48, 49,
                                  300])
@pytest.mark.parametrize("in_features", [192, 100])  # 100: padded to 128 for the CPU kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_products(rows, in_features, dtype, native):
    q = quantize_int8(llama_like(200, in_features))
    packed = PackedInt8(q, "cpu", dtype, our_kernels=native)
    assert packed.our_kernels == native
    assert (packed.out_features, packed.in_features) == (200, in_features)
    assert torch.equal(packed.dequantize(), q.dequantize())
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    check_product(packed, q, x)
    check_product(packed, q, x.view(1, rows, in_features))  # (bsz, seqlen, dim) as in the model


@pytest.mark.parametrize("native", ROUTES)
@pytest.mark.parametrize("rows", [1, 4, NATIVE_INT4_ROWS, NATIVE_INT4_ROWS + 1,
                                  CPU_INT4_KERNEL_ROWS, CPU_INT4_KERNEL_ROWS + 1])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_products(rows, group_size, native):
    q = quantize_int4(llama_like(202, 256), group_size)  # 202 rows: padded in either layout
    packed = PackedInt4(q, "cpu", our_kernels=native)
    assert packed.our_kernels == native
    assert torch.equal(packed.dequantize(), q.dequantize())
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    check_product(packed, q, x)
    check_product(packed, q, x.view(rows, 1, 256))
    check_product(PackedInt4(q, "cpu", torch.bfloat16, our_kernels=native), q, x.bfloat16())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 4, 300])
def test_row_concatenation_equals_separate_products(mode, rows):
    """The model fuses wq|wk|wv (and w1|w3) into one product."""
    pieces = [quantize(llama_like(n, 128, seed=n), mode, 32) for n in (64, 32, 32)]
    x = torch.randn(rows, 128)
    fused = linear(x, pack(pieces, "cpu"))
    separate = torch.cat([linear(x, pack(p, "cpu")) for p in pieces], dim=1)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("native", ROUTES)
def test_packed_sizes(native):
    w = llama_like(256, 512)
    q8, q4 = quantize_int8(w), quantize_int4(w, 128)
    assert PackedInt8(q8, our_kernels=native).nbytes == q8.nbytes == 256 * 512 + 256 * 2
    assert PackedInt4(q4, our_kernels=native).nbytes == q4.nbytes == 256 * 256 + 256 * 4 * 2 * 2
    # rows padded to a multiple of 16 in our layout, of 64 in torch's
    padded = 208 if native else 256
    assert (PackedInt4(quantize_int4(llama_like(200, 512), 128), our_kernels=native).nbytes
            == padded * 256 + padded * 4 * 2 * 2)


def test_the_cpu_int4_layout_is_the_one_prefills_read():
    """Prefills dequantise packed int4 weights by reading torch's CPU layout; a torch whose
    layout differs is detected at run time (prefills then use the kernel) and fails here."""
    assert products._cpu_layout_known()
    q = quantize_int4(llama_like(130, 64), 32)
    assert torch.equal(PackedInt4(q, our_kernels=False)._block_t(64, 130, torch.float32).t(),
                       q.dequantize()[64:])


def test_products_of_a_non_contiguous_input():
    x = torch.randn(128, 6).t()  # (6, 128), transposed
    for q in (quantize_int8(llama_like(32, 128)), quantize_int4(llama_like(32, 128), 32)):
        torch.testing.assert_close(linear(x, pack(q)), linear(x.contiguous(), pack(q)))


@pytest.mark.parametrize("native", ROUTES)
def test_compiled_products_on_the_cpu_equal_eager_ones(native):
    """A compiled decode step traces linear() on packed weights as one graph (our kernels are
    operators with shape functions: inductor calls them)."""
    w = llama_like(128, 64)
    for packed in (PackedInt8(quantize_int8(w), our_kernels=native),
                   PackedInt4(quantize_int4(w, 32), our_kernels=native)):
        step = torch.compile(lambda x, p=packed: linear(x, p), fullgraph=True, dynamic=False)
        x = torch.randn(2, 1, 64)
        with torch.no_grad():
            torch.testing.assert_close(step(x), linear(x, packed))


# --- bad input -------------------------------------------------------------------------------

def test_unknown_mode_lists_the_choices():
    assert qz.check_mode(None) is None and qz.check_mode("int4") == "int4"
    with pytest.raises(ValueError, match=r"'int3'.*None, 'int8', 'int4'"):
        qz.check_mode("int3")
    with pytest.raises(ValueError, match="'int8', 'int4'"):
        quantize(torch.ones(4, 32), "fp8")


def test_width_not_divisible_by_the_group_size_names_tensor_and_sizes():
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w2\.weight: 96 input "
                                         r"columns .* group size 64; .*: 32"):
        quantize_int4(torch.ones(8, 96), 64, name="layers.0.feed_forward.w2.weight")
    with pytest.raises(ValueError, match="use int8"):
        quantize_int4(torch.ones(8, 100), 32, name="w")
    with pytest.raises(ValueError, match=r"group size 48 is not one of \(32, 64, 128\)"):
        quantize_int4(torch.ones(8, 96), 48)
    assert qz.group_sizes_for(2816) == (32, 64, 128) and qz.group_sizes_for(352) == (32,)
    with pytest.raises(ValueError, match="group boundaries .* 32"):
        narrow(quantize_int4(torch.ones(4, 256), 64), 1, 0, 96)


def test_weights_that_cannot_be_quantized():
    bad = torch.ones(4, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="wq.weight: holds inf or NaN"):
        quantize_int8(bad, name="wq.weight")
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_int8(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="int8 only"):
        quantize(torch.ones(4, 32), "int4", absmax=torch.ones(4))
    with pytest.raises(ValueError, match="weight\\+scales"):
        from_tensors({"weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="one format"):
        concat([quantize_int8(torch.ones(4, 32)), quantize_int4(torch.ones(4, 32), 32)])


def test_int4_on_a_device_without_a_kernel_says_which_have_one():
    with pytest.raises(ValueError, match="CPU and on CUDA GPUs of compute capability 8.0"):
        check_int4_device(torch.device("meta"))
    check_int4_device(torch.device("cpu"))


def test_which_tensors_are_quantized():
    assert qz.is_quantized("output.weight")
    assert qz.is_quantized("layers.3.attention.wo.weight")
    assert qz.is_quantized("layers.3.feed_forward.w3.weight")
    assert not qz.is_quantized("tok_embeddings.weight")
    assert not qz.is_quantized("layers.3.ffn_norm.weight")


# --- CUDA (skipped without a GPU) ------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("rows", [1, 4, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_products_on_cuda(rows, dtype):
    q = quantize_int8(llama_like(200, 256))
    packed = pack(q, "cuda", dtype)
    x = torch.randn(rows, 256, device="cuda", dtype=dtype)
    y = linear(x, packed)
    assert y.dtype == dtype and y.device.type == "cuda"
    ref = F.linear(x.float(), q.dequantize().cuda())
    assert relative_error(y, ref) < 1e-2


@needs_cuda
@pytest.mark.parametrize("rows", [1, 4, 300])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_products_on_cuda(rows, group_size):
    if torch.cuda.get_device_capability()[0] < 8:
        with pytest.raises(ValueError, match="compute capability 8.0"):
            pack(quantize_int4(llama_like(32, 256), group_size), "cuda")
        return
    q = quantize_int4(llama_like(200, 256), group_size)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        y = linear(x.to(dtype), pack(q, "cuda", dtype))
        ref = F.linear(x.float(), q.dequantize().cuda())
        assert y.dtype == dtype and relative_error(y, ref) < 1e-2
    pieces = [quantize_int4(llama_like(n, 256, seed=n), group_size) for n in (64, 48)]
    fused = linear(x, pack(pieces, "cuda", torch.bfloat16))
    separate = torch.cat([linear(x, pack(p, "cuda", torch.bfloat16)) for p in pieces], dim=1)
    torch.testing.assert_close(fused, separate)


@needs_cuda
def test_compiled_products_on_cuda():
    q8, q4 = quantize_int8(llama_like(128, 256)), quantize_int4(llama_like(128, 256), 64)
    packed = [pack(q8, "cuda", torch.bfloat16)]
    if torch.cuda.get_device_capability()[0] >= 8:
        packed.append(pack(q4, "cuda", torch.bfloat16))
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    for p in packed:
        step = torch.compile(lambda x, p=p: linear(x, p), fullgraph=True)
        torch.testing.assert_close(step(x), linear(x, p), rtol=2e-2, atol=2e-2)
