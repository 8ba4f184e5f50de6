"""Native CPU kernels: int8 and int4 weight products (llama/kernels/cpu_kernels.cpp and
cpu_int4.cpp), int8 and int4 weights by int8 activations (cpu_w8a8.cpp, cpu_w4a8.cpp), int4
rounding (cpu_quantize.cpp), float32 and bfloat16-weight products (cpu_dense.cpp) and a decode
step's attention (cpu_attention.cpp); cpu_tensor.h, cpu_common.h, cpu_tiles.h and cpu_blocks.h
hold what they share, and cpu_ops.cpp registers the operators.

Compiled for this machine (-O3 -march=native) the first time a process needs them, with
torch.utils.cpp_extension, and cached: in `LLAMA_KERNEL_CACHE` if set, else torch's extension
directory (~/.cache/torch_extensions), under a name that includes the source's and this CPU's
fingerprint, so a machine of another kind builds its own. Where they cannot be built (no C++
compiler or ninja, `LLAMA_NATIVE_KERNELS=0`) one warning says so and `available()` is False:
llama/layers/linear.py then takes torch's own int8/int4 kernels.

They are registered as torch operators (torch.ops.llama_kernels.*) with shape functions, so a
compiled decode step (torch.compile) keeps them as calls of their own.
"""

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu_ops.cpp", "cpu_kernels.cpp", "cpu_int4.cpp", "cpu_dense.cpp",
                        "cpu_attention.cpp", "cpu_quantize.cpp", "cpu_w8a8.cpp",
                        "cpu_w4a8.cpp")]
# in the fingerprint, not compiled alone
HEADERS = [Path(__file__).with_name(name)
           for name in ("cpu_tensor.h", "cpu_common.h", "cpu_tiles.h", "cpu_blocks.h")]
INT4_BLOCK = 16  # output rows of the int4 kernel's blocks: its weights are padded to a multiple
INT8_WIDTH_ALIGN = 32  # int8 weights are zero-padded to a multiple of 32 columns
I16_MAX = 32767
W8A8_GROUP = 512  # columns of w8a8_mm's groups (16 blocks of 32): its weights are padded to it

_lock = threading.Lock()
_state = {"tried": False, "ops": None, "isa": None, "error": None}


def available() -> bool:
    """Whether the native kernels are (or can now be) loaded; builds them on first call."""
    return _ops() is not None


def isa() -> Optional[str]:
    """The instruction set the loaded kernels were compiled for ('avx512', 'avx2', 'generic'),
    None when they are not available."""
    return _state["isa"] if available() else None


def int8_dot_products() -> bool:
    """Whether int8 activations (w8a8_mm, w4a8_mm) run on vpdpbusd here (an AVX-512 VNNI build
    on a CPU with it). Elsewhere they give the same bits through plain C++ loops, slower than
    the int16 route of int8_mm / int4_mm; False too where the kernels are unavailable."""
    return available() and bool(_ops().int8_dot_products())


def unavailable_reason() -> Optional[str]:
    available()
    return _state["error"]


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(rows, N) float32 = x (rows, K) float32 @ (weight (N, W >= K) int8 * scales (N,) bf16).T,
    with x's rows rounded to int16 first (one scale per row, max|x| / 32767; int16_rows gives
    them) and the sums taken in integers: exact, so the same on every CPU and thread count.
    The weight's columns beyond K are zero, W a multiple of 32."""
    return _ops().int8_mm(x, weight, scales)


def int16_rows(x: torch.Tensor):
    """What int8_mm multiplies: x's rows (rows, K) float32 as int16 values (rows, K) and one
    float32 scale per row, max|x| / 32767 (NaN where a row has an inf or NaN). Computed in
    torch, the same operations as the kernel's: the reference its tests compare against."""
    amax = x.abs().amax(1)
    scales = amax / I16_MAX
    # a tensor numerator: scalar / tensor is computed as scalar * (1 / tensor) in torch
    inv = torch.where(amax > 0, torch.full_like(amax, I16_MAX) / amax, torch.zeros_like(amax))
    q = (x * inv[:, None]).round().to(torch.int16)
    bad = ~torch.isfinite(x).all(1)
    return q.masked_fill_(bad[:, None], 0), scales.masked_fill_(bad, float("nan"))


def w8a8_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(rows, N) float32 = x (rows, K) float32 @ (weight * scales (N,) bf16).T, with x's rows
    rounded to int8 in blocks of 32 columns (one scale per block, max|x| / 127; int8_blocks
    gives them) and each block's products summed in integers (llama/kernels/cpu_w8a8.cpp).
    `packed`: w8a8_layout of the int8 weight."""
    return _ops().w8a8_mm(x, packed, scales, x.shape[1])


def w8a8_layout(weight: torch.Tensor) -> torch.Tensor:
    """An int8 weight (N, K) (zero columns past its inputs allowed) in w8a8_mm's layout:
    (N, P) uint8, P = K rounded up to W8A8_GROUP with zeros, each value + 128, and per group
    of 16 blocks of 32 columns, 8 steps of 64 bytes: byte 4j + t of step s is column
    32j + 4s + t (so int32 lane j of the kernel's vectors sums block j)."""
    n, k = weight.shape
    w = weight if k % W8A8_GROUP == 0 else F.pad(weight, (0, -k % W8A8_GROUP))
    out = torch.empty(w.shape, dtype=torch.uint8)  # one copy, then + 128 in place
    # (N, group, block j, step s, byte t) -> (N, group, s, j, t)
    out.view(n, -1, W8A8_GROUP // 64, 16, 4).copy_(
        w.view(torch.uint8).view(n, -1, 16, W8A8_GROUP // 64, 4).permute(0, 1, 3, 2, 4))
    return out.bitwise_xor_(128)


def w8a8_values(packed: torch.Tensor) -> torch.Tensor:
    """The int8 weight (N, P) that w8a8_layout packed (columns past its own zero)."""
    n = packed.shape[0]
    w = packed.view(n, -1, W8A8_GROUP // 64, 16, 4).permute(0, 1, 3, 2, 4)
    return (w.contiguous().view(n, -1) ^ 128).view(torch.int8)


def int8_blocks(x: torch.Tensor):
    """What w8a8_mm multiplies: x (rows, K) float32 as int8 values (rows, K) and one float32
    scale per row and block of 32 columns (rows, K / 32 rounded up), max|x| / 127 (NaN for a
    block with an inf or NaN). Computed in torch, the same operations as the kernel's."""
    rows, k = x.shape
    blocks = F.pad(x, (0, -k % 32)).view(rows, -1, 32)
    amax = blocks.abs().amax(2)
    bad = ~torch.isfinite(blocks).all(2)
    inv = torch.where((amax > 0) & ~bad, torch.full_like(amax, 127.0) / amax,
                      torch.zeros_like(amax))
    q = (blocks.nan_to_num(0.0, 0.0, 0.0) * inv[..., None]).round().to(torch.int8)
    return q.view(rows, -1)[:, :k], (amax / 127).masked_fill_(bad, float("nan"))


def w4a8_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """(rows, N) float32 products with an int4 weight in w4a8_layout (groups of `group_size`
    columns), x's rows rounded to int8 in blocks of 32 columns as w8a8_mm's are (int8_blocks)
    and each block's products summed in integers; per block, with its group's scale s and
    m = zero - 8 * scale in float32, d * (s * sum(q * v) + m * sum(q))
    (llama/kernels/cpu_w4a8.cpp)."""
    return _ops().w4a8_mm(x, packed, sz, x.shape[1], group_size)


def w4a8_layout(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """An int4 weight, values (N, K) uint8 in 0..15 and scales, zeros (N, K / G) bfloat16 (G a
    multiple of 32), in w4a8_mm's layout: (packed (N, P / 2) uint8, sz (N, P / G * 2)
    bfloat16), P = K rounded up to W8A8_GROUP. The values in w8a8_layout's order (without its
    + 128), steps 2p and 2p + 1 of each group in the low and high nibbles of 64 bytes; sz per
    group of W8A8_GROUP columns: its 512 / G weight groups' scales, then their zeros (zero
    past K). The torch form of w4a8_pack (which the model's conversion calls): the tests'
    reference."""
    n, k = values.shape
    pad = -k % W8A8_GROUP
    v = F.pad(values, (0, pad)).view(n, -1, 16, W8A8_GROUP // 64, 4)
    steps = v.permute(0, 1, 3, 2, 4).reshape(n, -1, W8A8_GROUP // 128, 2, 64)
    packed = (steps[..., 0, :] | (steps[..., 1, :] << 4)).reshape(n, -1)
    group = k // scales.shape[1]
    sz = torch.stack([F.pad(t.to(torch.bfloat16), (0, pad // group)).view(
        n, -1, W8A8_GROUP // group) for t in (scales, zeros)], dim=2)
    return packed.contiguous(), sz.reshape(n, -1).contiguous()


def w4a8_pack(packed: torch.Tensor, sz: torch.Tensor, n: int, group_size: int):
    """pack_int4's layout of an int4 weight (its first n rows) in w4a8_layout's, in one pass
    (llama/kernels/cpu_w4a8.cpp): equal to w4a8_layout(*int4_parts(packed, sz, n))."""
    return _ops().w4a8_pack(packed, sz, n, group_size)


def w4a8_parts(packed: torch.Tensor, sz: torch.Tensor):
    """What w4a8_layout laid out: values (N, P) uint8 and each column's scale and zero (N, P)
    bfloat16 (zero past the weight's own columns)."""
    n = packed.shape[0]
    pairs = packed.view(n, -1, W8A8_GROUP // 128, 1, 64)
    steps = torch.cat([pairs & 15, pairs >> 4], dim=3).view(n, -1, W8A8_GROUP // 64, 16, 4)
    values = steps.permute(0, 1, 3, 2, 4).reshape(n, -1)
    group = values.shape[1] * 2 // sz.shape[1]
    scales, zeros = sz.view(n, -1, 2, W8A8_GROUP // group).unbind(2)
    return values, scales.reshape(n, -1).repeat_interleave(group, 1), zeros.reshape(
        n, -1).repeat_interleave(group, 1)


def int4_parts(packed: torch.Tensor, sz: torch.Tensor, n: int):
    """What pack_int4 laid out in `packed` (N16, K / 2) and `sz` (N16, K / G, 2): the first n
    rows' values (n, K) uint8 in 0..15, scales and zeros (n, K / G) bfloat16."""
    n16, half = packed.shape
    k, blocks = 2 * half, n16 // INT4_BLOCK
    words = packed.view(blocks, k // 8, INT4_BLOCK, 2, 2)  # (.., parity, byte)
    nibbles = torch.stack([words & 15, words >> 4], dim=-1)  # nibble p = 2 * byte + high
    # (block, step, output, parity, p) -> (block, output, step, p, parity)
    v = nibbles.view(blocks, k // 8, INT4_BLOCK, 2, 4).permute(0, 2, 1, 4, 3)
    # (block, group, output, 2) -> (block, output, group, 2)
    pairs = sz.view(blocks, -1, INT4_BLOCK, 2).transpose(1, 2).reshape(n16, -1, 2)[:n]
    return v.reshape(n16, k)[:n], pairs[..., 0], pairs[..., 1]


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
            n_out: int) -> torch.Tensor:
    """(rows, n_out) float32 products with an int4 weight in pack_int4's layout, x's rows
    rounded to int16 as int8_mm's are and each group's products summed in integers; then one
    fixed float sum over the groups per output: the same bits for a row alone or in any batch,
    on every instruction set and thread count."""
    return _ops().int4_mm(x, packed, sz, group_size, n_out)


def int4_dequantize(packed: torch.Tensor, sz: torch.Tensor, group_size: int, start: int,
                    end: int, dtype=torch.float32) -> torch.Tensor:
    """Rows start..end of a pack_int4 weight as (end - start, K) floats of `dtype` (float32 or
    bfloat16), computed as Int4Weight.dequantize does."""
    return _ops().int4_dequantize(packed, sz, group_size, start, end, dtype == torch.bfloat16)


def int4_quantize(weight: torch.Tensor, group_size: int):
    """quantize_int4's saved format of a (N, K) float32 or bfloat16 CPU weight, computed in one
    pass (llama/kernels/cpu_quantize.cpp): (values (N, K / 2) uint8, scales, zeros (N, K / G)
    bfloat16), the same bits as the torch version; a group with inf or NaN gets a NaN scale."""
    return _ops().int4_quantize(weight, group_size)


def int4_pack(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """pack_int4 of a saved-format int4 weight (Int4Weight's (N, K / 2) uint8 values, scales,
    zeros), computed in one pass natively: the same tensors as pack_int4(values(), ...)."""
    return _ops().int4_pack(weight, scales, zeros)


def float_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, N) = x (rows, K) @ weight (N, K).T in float32 (llama/kernels/cpu_dense.cpp), each
    row's
    outputs the same bit for bit whatever the other rows and the thread count."""
    return _ops().float_mm(x, weight)


def bf16_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, N) float32 = x (rows, K) float32 @ weight (N, K) bfloat16 .T, the weight widened
    to float32 inside the product (llama/kernels/cpu_dense.cpp): float_mm's function on half the
    bytes, each row's outputs the same bit for bit whatever the other rows and thread count."""
    return _ops().bf16_mm(x, weight)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                     ends: torch.Tensor, scale: float) -> torch.Tensor:
    """A decode step's attention (llama/kernels/cpu_attention.cpp): q (B, G, R, D) float32, R query
    heads per key/value head; k, v (B, G, L, D) views of the cache, both float32 or both
    bfloat16 (widened exactly as they are read); row b attends keys starts[b] .. ends[b] - 1
    (int64 (B,) tensors). Returns (B, G, R, D) float32."""
    return _ops().decode_attention(q, k, v, starts, ends, scale)


def fast_attention() -> bool:
    """Whether decode_attention runs vectorised here (AVX-512 and AVX2 builds; a plain C++
    build's is slower than torch's attention, so there the model keeps torch's)."""
    return isa() in ("avx512", "avx2")


def int4_every_product() -> bool:
    """Whether int4_mm is vectorised here (AVX-512 or AVX2 builds), so it takes prefills as
    well as decode steps; the plain C++ one is left to decode steps."""
    return isa() in ("avx512", "avx2")


def fast_float() -> bool:
    """Whether float_mm runs vectorised here (AVX-512 or AVX2 builds; the plain C++ one sums
    one element at a time, slower than torch's products)."""
    return isa() in ("avx512", "avx2")


def pack_int4(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """The kernels' layout of an int4 weight: values (N, K) uint8 in 0..15, scales and zeros
    (N, K / G) bfloat16 -> (packed (N16, K / 2) uint8, sz (N16, K / G, 2) bfloat16), N16 = N
    rounded up to INT4_BLOCK with zero rows. Outputs go in blocks of 16; per block and per 8
    columns, 64 bytes: 16-bit word j holds output j // 2's columns 2p + (j & 1) in its
    nibbles p = 0..3, so one vector splits into 4 vectors of (output, column pair) int16 lanes
    (llama/kernels/cpu_int4.cpp). sz: per block and group, the 16 outputs' (scale, zero)."""
    n, k = values.shape
    pad = -n % INT4_BLOCK
    v = F.pad(values.to(torch.uint8), (0, 0, 0, pad))
    blocks = (n + pad) // INT4_BLOCK
    # (block, output, step of 8 columns, nibble p, parity) -> (block, step, output, parity, p)
    v = v.view(blocks, INT4_BLOCK, k // 8, 4, 2).permute(0, 2, 1, 4, 3)
    low, high = v[..., 0] | (v[..., 1] << 4), v[..., 2] | (v[..., 3] << 4)  # word's 2 bytes
    packed = torch.stack([low, high], dim=-1).contiguous().view(n + pad, k // 2)
    sz = F.pad(torch.stack([scales, zeros], dim=-1).to(torch.bfloat16), (0, 0, 0, 0, 0, pad))
    sz = sz.view(blocks, INT4_BLOCK, -1, 2).transpose(1, 2).contiguous().view(n + pad, -1, 2)
    return packed, sz


def _ops():
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _load()
                _state["tried"] = True
    return _state["ops"]


def _fingerprint() -> str:
    """What the compiled code depends on: the source, the flags and this CPU."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        cpu += "".join(sorted(set(lines)))
    except OSError:
        cpu += platform.processor()
    text = (b"".join(source.read_bytes() for source in SOURCES + HEADERS)
            + " ".join(_flags()).encode() + cpu.encode() + torch.__version__.encode())
    return hashlib.sha256(text).hexdigest()[:12]


def _flags():
    """-fopenmp: at::parallel_for is an OpenMP pragma in torch's headers (serial without it);
    the library then shares torch's libgomp. No contraction of a * b + c into an FMA, so the
    kernels' dequantised values are those of Int4Weight.dequantize."""
    arch = os.environ.get("LLAMA_KERNEL_ARCH", "native")  # e.g. x86-64-v3: an AVX2-only build
    machine = platform.machine().lower()
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if machine in ("x86_64", "amd64", "i686"):
        return flags + [f"-march={arch}"]
    return flags + [f"-mcpu={arch}"] if machine in ("aarch64", "arm64") else flags


def _load() -> None:
    if os.environ.get("LLAMA_NATIVE_KERNELS", "1") == "0":
        _state["error"] = "disabled by LLAMA_NATIVE_KERNELS=0"
        return
    try:
        from torch.utils import cpp_extension

        name = f"llama_cpu_kernels_{_fingerprint()}"
        root = os.environ.get("LLAMA_KERNEL_CACHE")
        build_dir = Path(root) / name if root else Path(
            cpp_extension._get_build_directory(name, verbose=False))
        library, built = build_dir / f"{name}.so", build_dir / "built"
        if built.exists():  # this source, these flags, this CPU: no ninja needed to load it
            torch.ops.load_library(str(library))
        else:
            _build(cpp_extension, name, build_dir)
        ops = torch.ops.llama_kernels
        kind = ops.isa()
        if kind.startswith("unsupported"):
            raise RuntimeError(f"built for {kind.split(': ')[1]}, which this CPU lacks")
        _register_shapes()
        _state.update(ops=ops, isa=kind)
    except Exception as error:  # no compiler, no ninja, a failed build: torch's kernels
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        _state["error"] = reason
        warnings.warn(f"llama: native CPU kernels unavailable ({reason}); using torch's "
                      f"int8/int4 kernels", RuntimeWarning, stacklevel=3)


def _build(cpp_extension, name: str, build_dir: Path) -> None:
    """Compiles into a directory of this process's own, then renames it into place: a build
    that was interrupted (Ctrl-C, a killed process) leaves no lock behind for the next process
    to wait on, and processes building at once never share a directory (the first rename
    wins; the others' copies are dropped)."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"{name}.building-", dir=build_dir.parent))
    print(f"llama: compiling the native CPU kernels for this machine (once, ~15-60 s) "
          f"into {build_dir}", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name, [str(source) for source in SOURCES], extra_cflags=_flags(),
                           extra_ldflags=["-fopenmp"], build_directory=str(private),
                           is_python_module=False, verbose=False)
        (private / "built").touch()
        if build_dir.exists() and not (build_dir / "built").exists():
            shutil.rmtree(build_dir, ignore_errors=True)  # an older, unfinished build
        try:
            os.rename(private, build_dir)
        except OSError:  # another process finished first: its copy stays
            pass
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _register_shapes() -> None:
    """Shape functions, so torch.compile traces the operators without running them."""
    if getattr(_register_shapes, "done", False):
        return

    @torch.library.register_fake("llama_kernels::int8_mm")
    def _(x, weight, scales):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("llama_kernels::w8a8_mm")
    def _(x, packed, scales, K):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("llama_kernels::w4a8_mm")
    def _(x, packed, sz, K, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("llama_kernels::int4_mm")
    def _(x, packed, sz, group_size, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("llama_kernels::float_mm")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("llama_kernels::bf16_mm")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("llama_kernels::decode_attention")
    def _(q, k, v, starts, ends, scale):
        return torch.empty_like(q)

    @torch.library.register_fake("llama_kernels::int4_dequantize")
    def _(packed, sz, group_size, start, end, bf16):
        return packed.new_empty(end - start, packed.shape[1] * 2,
                                dtype=torch.bfloat16 if bf16 else torch.float32)

    _register_shapes.done = True
