"""Our native CPU kernels (llama/kernels/cpu_kernels.cpp, cpu_dense.cpp) against float products of
the
dequantized weights (int4), against integer products of the int16-rounded activations computed
in torch (int8) and against float64 (float32): row counts of decode steps, odd widths and
padding, sums past int32, 1 and 2 threads, rows alone or in a batch, and the fallback to
torch's kernels where they cannot be built. (The AVX2 and plain C++ builds:
tests/test_kernel_builds.py.)"""

import pytest
import torch
import torch.nn.functional as F

from llama.kernels import cpu_kernels
from llama.layers.float_linear import FloatKernel, native_route
from llama.layers.linear import linear, pack
from llama.quantize.formats import quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"native CPU kernels unavailable: "
                                       f"{cpu_kernels.unavailable_reason()}")
ROWS = [1, 2, 4, 7, 16]


def weights(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :3] *= 40  # outlier columns
    return w


def activations(rows, in_f, seed=1):
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed))
    x[:, 5 % in_f] *= 60  # an outlier channel, as in Llama's residual stream
    return x


def relative(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def padded_int8(q, width=None):
    align = cpu_kernels.INT8_WIDTH_ALIGN
    width = width or -(-q.in_features // align) * align
    return F.pad(q.weight, (0, width - q.in_features)).contiguous()


def int8_reference(x, q):
    """int8_mm restated: the int16 rows times the int8 weight, summed exactly in int64, then
    (sum * row scale) * weight row scale in float32."""
    xq, xs = cpu_kernels.int16_rows(x)
    sums = xq.long() @ q.weight.long().t()
    return (sums.float() * xs[:, None]) * q.scales.float()[None, :]


@pytest.mark.parametrize("rows", ROWS + [13, 130])
@pytest.mark.parametrize("out_f, in_f", [(64, 768), (67, 100), (5, 16), (130, 33), (3, 1),
                                         (9, 4100)])
def test_int8_kernel(rows, out_f, in_f):
    """(67, 100): 3 output rows past the last tile of 4 (1 past the last of 3 in a long
    product: 8 rows or more), 100 columns padded to 128; 13 rows: a group of 8, then 5; 4100:
    two chunks of integer sums, and 130 rows of it three blocks of activation rows (a prefill).
    Equal bit for bit to the restated product; against the float product of the dequantized
    weight, closer than bfloat16 activations get (the outlier channel is 60x the others)."""
    q = quantize_int8(weights(out_f, in_f))
    x = activations(rows, in_f)
    y = cpu_kernels.int8_mm(x, padded_int8(q), q.scales)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    assert torch.equal(y, int8_reference(x, q))
    reference = x.double() @ q.dequantize().double().t()
    bf16 = x.bfloat16().double() @ q.dequantize().double().t()
    assert relative(y, reference) < min(relative(bf16, reference), 2e-3)


def test_int8_kernel_sums_past_int32_and_non_finite_rows():
    """Rows of the largest int16 against weights of +-127 over 11008 columns (Llama-2-7B's w2):
    sums of ~4.6e10 stay exact. A row holding inf or NaN gives NaN, as a float product would,
    and leaves the other rows alone."""
    w = torch.full((6, 11008), 0.5)
    w[1::2] *= -1
    q = quantize_int8(w)
    x = torch.ones(4, 11008)
    x[2, 7], x[3, 9] = float("inf"), float("nan")
    y = cpu_kernels.int8_mm(x, padded_int8(q), q.scales)
    torch.testing.assert_close(y[:2], (x[:2].double() @ q.dequantize().double().t()).float(),
                               rtol=1e-6, atol=0)
    assert torch.equal(y[:2], int8_reference(x, q)[:2])
    assert torch.isnan(y[2:]).all()


def int4_reference(x, q):
    """What int4_mm computes, in float64: x's rows rounded to int16 (as int8_mm's) times the
    dequantized weight."""
    xq, xs = cpu_kernels.int16_rows(x)
    return (xq.double() * xs.double()[:, None]) @ q.dequantize().double().t()


@pytest.mark.parametrize("rows", ROWS + [130])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("out_f", [4, 17, 130])
def test_int4_kernel(rows, group_size, out_f):
    """Output rows padded to a multiple of 16 in the layout (the padding is never written);
    130 rows: a prefill, in blocks of rows. Against the float64 product of the int16-rounded
    rows and the dequantized weight; against the float product, closer than bfloat16
    activations get. Each row's outputs are the same bits alone as in the batch."""
    in_f = 2 * group_size + 128
    q = quantize_int4(weights(out_f, in_f), group_size)
    packed, sz = cpu_kernels.pack_int4(q.values(), q.scales, q.zeros)
    assert packed.shape == (-(-out_f // 16) * 16, in_f // 2)
    x = activations(rows, in_f)
    y = cpu_kernels.int4_mm(x, packed, sz, group_size, out_f)
    assert y.shape == (rows, out_f)
    assert relative(y, int4_reference(x, q)) < 2e-6
    reference = x.double() @ q.dequantize().double().t()
    bf16 = x.bfloat16().double() @ q.dequantize().double().t()
    assert relative(y, reference) < min(relative(bf16, reference), 2e-3)
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(cpu_kernels.int4_mm(x[r:r + 1], packed, sz, group_size, out_f),
                           y[r:r + 1])


def test_int4_kernel_group_sums_at_their_largest():
    """Rows of the largest int16 against nibbles of 15 over groups of 128 and 11008 columns:
    the integer sums stay exact; a row holding inf or NaN gives NaN and leaves the others."""
    w = torch.full((16, 11008), 1.0)
    w[1::2] *= -1
    q = quantize_int4(w, 128)
    packed, sz = cpu_kernels.pack_int4(q.values(), q.scales, q.zeros)
    x = torch.ones(3, 11008)
    x[2, 7] = float("nan")
    y = cpu_kernels.int4_mm(x, packed, sz, 128, 16)
    torch.testing.assert_close(y[:2].double(), x[:2].double() @ q.dequantize().double().t(),
                               rtol=1e-6, atol=0)
    assert torch.isnan(y[2]).all()


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_dequantize_gives_the_saved_formats_values(group_size):
    q = quantize_int4(weights(70, 256), group_size)
    packed, sz = cpu_kernels.pack_int4(q.values(), q.scales, q.zeros)
    full = q.dequantize()
    assert torch.equal(cpu_kernels.int4_dequantize(packed, sz, group_size, 0, 70), full)
    assert torch.equal(cpu_kernels.int4_dequantize(packed, sz, group_size, 3, 69,
                                                   torch.bfloat16), full[3:69].bfloat16())


@pytest.mark.parametrize("out_f, group_size", [(70, 32), (16, 64), (5, 128), (33, 32)])
def test_int4_packed_natively_is_pack_int4s_layout(out_f, group_size):
    """The load-time repacking in one pass (int4_pack) against pack_int4's torch operations,
    the layout's definition; rows past a multiple of 16 padded with zeros alike."""
    q = quantize_int4(weights(out_f, 256), group_size)
    ours = cpu_kernels.int4_pack(q.weight, q.scales, q.zeros)
    reference = cpu_kernels.pack_int4(q.values(), q.scales, q.zeros)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


@pytest.mark.parametrize("out_f, in_f", [(64, 768), (67, 100), (5, 16), (130, 33), (3, 1),
                                         (9, 4100)])
def test_float_kernel(out_f, in_f):
    """float32 products against float64, with column counts off the vector width and output
    rows past the last tile of 4. Each row's outputs are the same bits alone as in a batch of
    any size: a server's request computes the same alone or joining others."""
    w = weights(out_f, in_f)
    x = activations(16, in_f)
    y = cpu_kernels.float_mm(x, w)
    assert y.shape == (16, out_f) and y.dtype == torch.float32
    reference = x.double() @ w.double().t()
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5 * float(
        reference.abs().max()))
    for rows in ROWS:
        batch = cpu_kernels.float_mm(x[:rows], w)
        assert torch.equal(batch, y[:rows])
        assert torch.equal(cpu_kernels.float_mm(x[rows - 1: rows], w), y[rows - 1: rows])


def test_float_kernel_rejects_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="K as x's"):
        cpu_kernels.float_mm(torch.zeros(2, 8), torch.zeros(4, 9))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.float_mm(torch.zeros(8, 2).t(), torch.zeros(4, 8))


def test_results_do_not_depend_on_the_thread_count():
    """Each output is one thread's, summed in a fixed order: bit-identical on 1 and 2 threads
    (the weights are large enough to be split)."""
    q8 = quantize_int8(weights(1030, 512))
    q4 = quantize_int4(weights(1030, 512), 32)
    p4 = cpu_kernels.pack_int4(q4.values(), q4.scales, q4.zeros)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = activations(4, 512)
            results.append((cpu_kernels.int8_mm(x, q8.weight, q8.scales),
                            cpu_kernels.int4_mm(x, *p4, 32, 1030),
                            cpu_kernels.float_mm(x, weights(1030, 512))))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_the_library_routes_decode_steps_to_the_kernels(monkeypatch):
    calls = []
    for name in ("int8_mm", "int4_mm"):
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name,
                            lambda *a, f=original, n=name: calls.append(n) or f(*a))
    w = weights(96, 128)
    for packed in (pack(quantize_int8(w)), pack(quantize_int4(w, 32))):
        assert packed.our_kernels
        linear(torch.randn(4, 1, 128), packed)  # a decode step of 4 rows
        linear(torch.randn(1, 100, 128), packed)  # a prefill: the same kernels where vectorised
    # (a plain C++ build's int4 prefill takes the dequantised product)
    int4_prefill = ["int4_mm"] if cpu_kernels.int4_every_product() else []
    assert calls == ["int8_mm", "int8_mm", "int4_mm"] + int4_prefill


@pytest.mark.skipif(not cpu_kernels.fast_float(), reason="the float32 kernel is vectorised for "
                    "AVX2 and AVX-512 only; elsewhere models keep torch's products")
def test_float_products_take_the_kernel_when_wrapped_and_few_rows(monkeypatch):
    from llama.layers.float_linear import NATIVE_FLOAT_ROWS
    calls = []
    original = cpu_kernels.float_mm
    monkeypatch.setattr(cpu_kernels, "float_mm", lambda *a: calls.append(a[0].shape) or
                        original(*a))
    w = weights(96, 128)
    for rows, native in ((1, True), (4, True), (NATIVE_FLOAT_ROWS, True),
                         (NATIVE_FLOAT_ROWS + 1, True), (4, False)):
        x = activations(rows, 128).view(rows, 1, 128)
        y = linear(x, FloatKernel(w) if native else w)
        assert y.shape == (rows, 1, 96)
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert calls == [(1, 128), (4, 128), (NATIVE_FLOAT_ROWS, 128)]


def test_without_the_kernels_one_warning_and_torchs_kernels(monkeypatch, tmp_path):
    """A machine without a compiler or ninja: one line of warning, torch's routes, the same
    products (to bfloat16's precision)."""
    from torch.utils import cpp_extension

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_state",
                        {"tried": False, "ops": None, "isa": None, "error": None})
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    with pytest.warns(RuntimeWarning) as caught:
        assert not cpu_kernels.available()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "Ninja is required" in message and "torch's" in message
    assert cpu_kernels.isa() is None
    w = weights(64, 128)
    x = activations(2, 128)
    for q in (quantize_int8(w), quantize_int4(w, 32)):
        packed = pack(q)
        assert not packed.our_kernels
        assert relative(linear(x, packed), x.double() @ q.dequantize().double().t()) < 1e-2
    assert not cpu_kernels.available()  # no second attempt, no second warning


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state",
                        {"tried": False, "ops": None, "isa": None, "error": None})
    monkeypatch.setenv("LLAMA_NATIVE_KERNELS", "0")
    assert not cpu_kernels.available()
    assert not pack(quantize_int8(weights(8, 32))).our_kernels


# ---------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("bsz, kv_heads, rep, head_dim, length", [
    (1, 12, 1, 64, 200), (4, 3, 1, 64, 33), (3, 2, 4, 128, 77), (2, 1, 8, 32, 5),
    (2, 2, 2, 24, 19)])
def test_decode_attention_kernel(bsz, kv_heads, rep, head_dim, length):
    """Against softmax attention in float64 over each row's own range of a strided view of a
    longer cache (as the model passes it); 24: a head size the vectorised loops do not cover."""
    g = torch.Generator().manual_seed(length)
    cache_k, cache_v = (torch.randn(bsz, kv_heads, length + 9, head_dim, generator=g) * 3
                        for _ in range(2))
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    q = torch.randn(bsz, kv_heads, rep, head_dim, generator=g)
    starts = torch.randint(0, length // 2, (bsz,), generator=g)
    ends = torch.randint(length // 2 + 1, length + 1, (bsz,), generator=g)
    out = cpu_kernels.decode_attention(q, k, v, starts, ends, head_dim ** -0.5)
    keys = torch.arange(length)
    attend = (keys >= starts[:, None]) & (keys < ends[:, None])  # (bsz, length)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=attend[:, None, None], scale=head_dim ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_rejects_ranges_outside_the_cache():
    q, k = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 8, 16)
    for starts, ends in (([0], [9]), ([3], [3]), ([-1], [2])):
        with pytest.raises(RuntimeError, match="row 0 attends keys"):
            cpu_kernels.decode_attention(q, k, k, torch.tensor(starts), torch.tensor(ends), 1.0)


def _opt_in(model, kernels):
    """Our kernels for `model`: "attention" alone, or "all" (use_native_kernels). Returns the
    operators it should then call."""
    if kernels == "attention":
        model.native_attention = True
        return {"llama_kernels::decode_attention"}
    model.use_native_kernels()
    return {"llama_kernels::float_mm"} | (
        {"llama_kernels::decode_attention"} if cpu_kernels.fast_attention() else set())


KERNELS = [pytest.param("attention", marks=pytest.mark.skipif(
               not cpu_kernels.fast_attention(), reason="the attention kernel is vectorised for "
               "AVX-512 and AVX2 only; elsewhere models keep torch's")),
           pytest.param("all", marks=pytest.mark.skipif(
               not cpu_kernels.fast_float(), reason="no vectorised build here"))]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("compiled", [False, True])
def test_a_model_decodes_alike_with_the_native_kernels(build, compiled, kernels):
    """A float32 model opted in against torch's routes: a left-padded batch (rows attend from
    their own first slot), greedy, eager and compiled (the kernels are operators the compiled
    step calls)."""
    from tests.test_engine import PROMPTS
    results = []
    for native in (False, True):
        # float32 weights (the CPU default keeps the checkpoint's bfloat16: tests/test_bf16.py)
        generator = build("gqa", max_seq_len=64, max_batch_size=4, dtype=torch.float32)
        expected = _opt_in(generator.model, kernels) if native else set()
        if compiled:
            generator.compile_decode()
        prompts = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:4]]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results.append(generator.generate(prompts, 12, temperature=0, logprobs=True))
        ran = {e.key for e in prof.key_averages()}
        assert ran & {"llama_kernels::decode_attention", "llama_kernels::float_mm"} == expected
    (tokens, logprobs), (native_tokens, native_logprobs) = results
    assert native_tokens == tokens
    for got, want in zip(native_logprobs, logprobs):
        assert got == pytest.approx(want, abs=1e-4)


def test_quantized_cpu_models_take_the_native_kernels(build):
    quantized, plain = build("gqa", quantize="int8").model, build("gqa").model
    assert quantized.native_attention == cpu_kernels.fast_attention()
    assert quantized.layers[0].feed_forward.w13 is quantized.layers[0].feed_forward._w13.packed
    assert not plain.native_attention and plain.layers[0].attention._qkv.route is None
    plain.use_native_kernels()
    assert (plain.layers[0].attention._qkv.route is native_route) == cpu_kernels.fast_float()
