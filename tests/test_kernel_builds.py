"""The native kernels as an AVX2-only CPU or any x86-64 compiles them (their own builds, in
a cache of their own), run on this machine: their products and attention against this
machine's build or restated references, bit for bit where the kernels promise it."""

import platform
import textwrap

import pytest
import torch

from llama.kernels import cpu_kernels
from llama.quantize.formats import quantize_int4
from tests.conftest import run_script
from tests.test_native_kernels import activations

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"native CPU kernels unavailable: "
                                       f"{cpu_kernels.unavailable_reason()}")


BUILD_CHECK = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from llama.kernels import cpu_kernels
    from llama.quantize.formats import quantize_int4, quantize_int8
    stale = Path(sys.argv[1]) / f"llama_cpu_kernels_{cpu_kernels._fingerprint()}"
    stale.mkdir(parents=True)
    (stale / "lock").touch()  # what a build killed midway leaves
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
    print(cpu_kernels.isa(), cpu_kernels.int8_dot_products())
    # int4: integer group sums, then the same float operations in the same order per output
    # on every build, so the same bits as the building machine's (in argv[2])
    w, xs4, ys4 = torch.load(sys.argv[2])
    q4 = quantize_int4(w, 64)
    packed = cpu_kernels.pack_int4(q4.values(), q4.scales, q4.zeros)
    assert all(torch.equal(a, b) for a, b in zip(
        cpu_kernels.int4_pack(q4.weight, q4.scales, q4.zeros), packed))
    for x, y in zip(xs4, ys4):
        assert torch.equal(cpu_kernels.int4_mm(x, *packed, 64, 67), y), x.shape
        assert torch.equal(cpu_kernels.int4_mm(x[-1:].contiguous(), *packed, 64, 67), y[-1:])
    # int4 quantization: the torch quantizer's bits (this build's own code path)
    from llama.quantize import formats
    from tests.test_quantize import awkward_weights
    for dtype in (torch.float32, torch.bfloat16):
        wa = awkward_weights(dtype)
        ours = cpu_kernels.int4_quantize(wa, 32)
        formats._native_int4 = lambda weight: False
        ref = quantize_int4(wa, 32)
        formats._native_int4 = lambda weight: True
        assert all(torch.equal(a, b) for a, b in zip(ours, (ref.weight, ref.scales, ref.zeros)))
    q8 = quantize_int8(w)
    for rows in (1, 3, 7):
        x = torch.randn(rows, 192)
        # int8: exact integer sums, so the same bits as the AVX-512 build and torch
        xq, xs = cpu_kernels.int16_rows(x)
        ref8 = ((xq.long() @ q8.weight.long().t()).float() * xs[:, None]) * q8.scales.float()
        assert torch.equal(cpu_kernels.int8_mm(x, q8.weight, q8.scales), ref8), rows
        y = cpu_kernels.float_mm(x, w)  # float32: close to float64, each row as it is alone
        torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=1e-5,
                                   atol=1e-6)
        assert torch.equal(cpu_kernels.float_mm(x[-1:], w), y[-1:]), rows
        wb = w.to(torch.bfloat16)  # bfloat16 weights: float_mm's function on the widened weight
        yb = cpu_kernels.bf16_mm(x, wb)
        assert torch.equal(yb, cpu_kernels.float_mm(x, wb.float())), rows
        assert torch.equal(cpu_kernels.bf16_mm(x[-1:], wb), yb[-1:]), rows
    # decode attention (vectorised on AVX2 too): softmax attention in float64 over each row's
    # range; a bfloat16 cache gives the float32 result on the widened values, bit for bit
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(5)
    for bsz, kv, rep, hd, length in ((2, 3, 4, 128, 77), (1, 2, 1, 24, 19), (3, 1, 8, 64, 9)):
        k, v = (torch.randn(bsz, kv, length + 3, hd, generator=g)[:, :, :length] * 3
                for _ in range(2))
        q = torch.randn(bsz, kv, rep, hd, generator=g)
        starts = torch.randint(0, length // 2, (bsz,), generator=g)
        ends = torch.randint(length // 2 + 1, length + 1, (bsz,), generator=g)
        out = cpu_kernels.decode_attention(q, k, v, starts, ends, hd ** -0.5)
        keys = torch.arange(length)
        attend = (keys >= starts[:, None]) & (keys < ends[:, None])
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                             attn_mask=attend[:, None, None], scale=hd ** -0.5)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
        assert torch.equal(cpu_kernels.decode_attention(q, kb, vb, starts, ends, hd ** -0.5),
                           cpu_kernels.decode_attention(q, kb.float(), vb.float(), starts,
                                                        ends, hd ** -0.5))
    # int8 activations: exact block sums, then the same float operations in the same order
    (w8, scales8, xs8, ys8), (parts4, xs4, ys4) = torch.load(sys.argv[3])
    packed8, packed4 = cpu_kernels.w8a8_layout(w8), cpu_kernels.w4a8_layout(*parts4)
    for x, y in zip(xs8, ys8):
        assert torch.equal(cpu_kernels.w8a8_mm(x, packed8, scales8), y), x.shape
    for x, y in zip(xs4, ys4):  # int4 weights: the same, the scales' float work included
        assert torch.equal(cpu_kernels.w4a8_mm(x, *packed4, 64), y), x.shape
''')


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 builds")
@pytest.mark.parametrize("arch, isa", [("x86-64-v3", "avx2"), ("x86-64", "generic")])
def test_other_instruction_sets_build_and_compute_alike(arch, isa, tmp_path):
    """What an AVX2-only CPU (x86-64-v3: AVX2, FMA) or any x86-64 compiles, run here: a build
    of their own (the flags are part of its name), with int8 products equal bit for bit to
    torch's restatement, int4 and int8-activation products (int8 and int4 weights) to this
    machine's build (plain C++ loops there, vpdpbusd here), decode attention against float64,
    in a cache where a build was killed midway: it neither waits for that build's lock nor
    keeps its leftovers."""
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    script = tmp_path / "check.py"
    script.write_text(BUILD_CHECK)
    cache = tmp_path / "cache"
    w = torch.randn(67, 192, generator=torch.Generator().manual_seed(3)) * 0.02
    q4 = quantize_int4(w, 64)
    packed = cpu_kernels.pack_int4(q4.values(), q4.scales, q4.zeros)
    xs = [activations(rows, 192, seed=rows) for rows in (1, 3, 7, 20)]
    torch.save((w, xs, [cpu_kernels.int4_mm(x, *packed, 64, 67) for x in xs]),
               tmp_path / "int4.pt")
    w8 = torch.randint(-127, 128, (37, 1100), dtype=torch.int8,
                       generator=torch.Generator().manual_seed(4))
    scales8 = torch.full((37,), 0.01, dtype=torch.bfloat16)
    xs8 = [activations(rows, 1100, seed=rows) for rows in (1, 5, 9)]
    q4 = quantize_int4(torch.randn(37, 1088, generator=torch.Generator().manual_seed(5)), 64)
    parts4 = (q4.values(), q4.scales, q4.zeros)  # 2 groups of 512 and a group of 64
    xs4 = [activations(rows, 1088, seed=rows) for rows in (1, 5, 9)]
    torch.save(((w8, scales8, xs8, [cpu_kernels.w8a8_mm(x, cpu_kernels.w8a8_layout(w8), scales8)
                                    for x in xs8]),
                (parts4, xs4, [cpu_kernels.w4a8_mm(x, *cpu_kernels.w4a8_layout(*parts4), 64)
                               for x in xs4])), tmp_path / "w8a8.pt")
    result = run_script([str(script), str(cache), str(tmp_path / "int4.pt"),
                         str(tmp_path / "w8a8.pt")], timeout=600,
                        env={"LLAMA_KERNEL_ARCH": arch, "LLAMA_KERNEL_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [isa, "False"]  # int8 activations: plain C++ loops
    (built,) = cache.iterdir()  # the build's own directory, renamed into place
    assert (built / "built").exists() and not (built / "lock").exists()
