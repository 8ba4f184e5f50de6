"""Every matrix product of the model, and the route each takes per device and weight format.

`linear(x, weight)` is F.linear with faster routes where measured (docs/PERFORMANCE.md). This
module and the two it sends float weights to (llama/layers/float_linear.py: torch's routes and
our kernels; bf16.py: bfloat16 weights under float32 activations) are the only ones that know
about oneDNN, torch's int8/int4 kernels or their packed layouts, so the model's math stays
plain. `weight` is a float tensor, or a quantized weight packed for its device by `pack`
(from llama/quantize/formats.py's saved formats).
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from llama.kernels import cpu_kernels
from llama.layers import bf16
from llama.layers.float_linear import Bf16Kernel, FloatKernel, as_float32, float_product
from llama.layers.w8a8 import PackedW4A8, PackedW8A8
from llama.quantize.formats import Int4Weight, Int8Weight, QuantizationError, QuantizedWeight
from llama.quantize.shards import concat, narrow


def linear(x: torch.Tensor, weight: Union[torch.Tensor, FloatKernel, Bf16Kernel, "PackedInt8",
                                           "PackedInt4"]) -> torch.Tensor:
    """x @ weight.T by the weight's own route: a plain float tensor takes torch's fastest
    (float_product), or, stored in bfloat16 under float32 activations, llama/layers/bf16.py's
    product; a wrapped weight (FloatKernel, Bf16Kernel, PackedInt8, PackedInt4) its `product`."""
    if isinstance(weight, torch.Tensor):
        if bf16.is_mixed(x, weight):
            return bf16.product(x, weight)
        return float_product(x, weight)
    return weight.product(x)


# ----------------------------------------------------------------------- quantized weights
# These routes never round activations to int8 (Llama's activations have outlier channels;
# per-token int8 activations multiplied the output error of int8 weights alone,
# docs/QUANTIZATION.md); llama/layers/w8a8.py's opt-in route rounds them in blocks of 32.
#
# CPU: our native kernels (llama/kernels/cpu_kernels.cpp), which take float32 activations and
# return float32. The int8 one rounds each row to int16 (one scale per token: finer than
# bfloat16 for values within 128x of the row's largest) and sums in integers, exactly: so it
# takes every product, decode steps and prefills alike, and a token's keys and values are the
# same bit for bit whether it was prefilled or decoded (chat sessions and the prefix cache
# keep a conversation's tokens from either). The int4 one does the same (int16 rows, integer
# sums per group, then one fixed float sum over the groups per output), so on AVX-512 and AVX2
# it takes every product too; a plain C++ build takes decode steps (up to NATIVE_INT4_ROWS
# rows) and above that the weight is dequantised to bfloat16, a block of rows at a time, for
# oneDNN's bfloat16 GEMM. Where our kernels cannot be built, torch's
# kernels, vectorised for bfloat16 activations only: activations are then cast to bfloat16
# and the result back to x's dtype. Measured: docs/QUANTIZATION.md, benchmarks/quant_kernels.py.
NATIVE_INT4_ROWS = 12  # plain C++ builds: above, the dequantised product is faster
CPU_INT8_KERNEL_ROWS = 8  # torch's kernels (no native kernels)
CPU_INT4_KERNEL_ROWS = 128
_CPU_BLOCK = 64  # rows of the CPU int4 layout's blocks: weights are padded to a multiple
_CUDA_TILE = 16  # rows of tinygemm's tiles (8 on NVIDIA, 16 on AMD)
_DEQUANT_ROWS = 1024  # weight rows dequantised at a time for a prefill's product


def _by_row_blocks(xb: torch.Tensor, block_t, n_out: int) -> torch.Tensor:
    """xb @ W.T in bfloat16, with block_t(start, end) -> W[start:end].T (in, end - start) in
    bfloat16: each block is used while it is still in cache."""
    return torch.cat([xb @ block_t(start, min(start + _DEQUANT_ROWS, n_out))
                      for start in range(0, n_out, _DEQUANT_ROWS)], dim=1)


class PackedInt8:
    """An int8 weight with one scale per output row, laid out for products on one device.

    CPU: our native kernel for every row count (int16 activations per row, exact integer sums),
    or where it is unavailable aten._weight_int8pack_mm up to CPU_INT8_KERNEL_ROWS (bfloat16
    activations) and above, the int8 values as bfloat16 (exact) in oneDNN's GEMM, scales
    applied to its output.
    CUDA (and other devices): F.linear(x, weight.to(x.dtype)) * scales, gpt-fast's form, which
    torch.compile fuses into one kernel (the int8 weight dequantised inside the product);
    eager, it dequantises a copy per call. (torch's CUDA _weight_int8pack_mm is a naive loop.)"""

    quantize = "int8"  # Llama.build's name of the format

    def __init__(self, q: Int8Weight, device="cpu", dtype=torch.float32,
                 our_kernels: Optional[bool] = None):
        self.device, self.dtype = torch.device(device), dtype  # dtype: the activations'
        self.shape = (q.out_features, q.in_features)
        self.out_features, self.in_features = q.out_features, q.in_features
        self.weight = q.weight.to(self.device).contiguous()  # int8 (out, in)
        # the CPU kernels read whole blocks of columns (torch's crashed past the end of a row):
        # weights whose width is not a multiple of 32 get zero columns
        on_cpu = self.device.type == "cpu"
        # our kernels (None: where they are available; False: torch's)
        self.our_kernels = on_cpu and our_kernels is not False and cpu_kernels.available()
        align = cpu_kernels.INT8_WIDTH_ALIGN
        self.width = -(-self.in_features // align) * align if on_cpu else self.in_features
        if self.width != self.in_features:
            self.weight = F.pad(self.weight, (0, self.width - self.in_features))
        # the CPU kernel takes scales in its activations' dtype, bfloat16 (exact: saved so)
        self.scales = q.scales.to(self.device, torch.bfloat16 if self.device.type == "cpu"
                                  else dtype)  # (out,)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        q = self.weight[:, : self.in_features].to(torch.float32)
        return (q * self.scales.to(torch.float32)[:, None]).to(dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if self.device.type != "cpu":
            out = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        elif self.our_kernels:
            out = cpu_kernels.int8_mm(as_float32(x2), self.weight, self.scales)
        elif not self.our_kernels and x2.shape[0] <= CPU_INT8_KERNEL_ROWS:
            xb = _bfloat16(x2)
            if self.width != self.in_features:
                xb = F.pad(xb, (0, self.width - self.in_features))
            out = torch._weight_int8pack_mm(xb, self.weight, self.scales)
        else:
            out = _by_row_blocks(x2.to(torch.bfloat16), self._block_t, self.out_features)
            out = out.to(torch.float32) * self.scales.to(torch.float32)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def with_int8_activations(self) -> PackedW8A8:
        """The same weight multiplied with activations rounded to int8 (llama/layers/w8a8.py;
        the CPU's native kernels only)."""
        return PackedW8A8(self)

    def _block_t(self, start: int, end: int) -> torch.Tensor:
        # (in, rows): q itself, unscaled
        return self.weight[start:end, : self.in_features].to(torch.bfloat16).t()


class PackedInt4:
    """A group-wise int4 weight laid out for one device's kernel. CPU: our native kernel, in
    its own layout (cpu_kernels.pack_int4), float32 activations rounded to int16 per row, for
    every product on AVX-512 and AVX2 (up to NATIVE_INT4_ROWS rows in a plain C++ build);
    where it is unavailable, aten._weight_int4pack_mm_for_cpu in torch's layout up to
    CPU_INT4_KERNEL_ROWS rows (bfloat16 activations). Above those, the weight dequantised to
    bfloat16 a block of rows at a time for oneDNN's GEMM. CUDA (compute capability 8.0+):
    aten._weight_int4pack_mm (tinygemm). All compute (q - 8) * scale + zero per group; the
    layouts differ, so a weight is packed for its device here, at load time."""

    quantize = "int4"  # Llama.build's name of the format

    def __init__(self, q: Int4Weight, device="cpu", dtype=torch.float32,
                 our_kernels: Optional[bool] = None):
        self.device, self.dtype = torch.device(device), dtype  # dtype: the activations'
        self.shape = (q.out_features, q.in_features)
        check_int4_device(self.device)
        self.out_features, self.in_features = q.out_features, q.in_features
        self.group_size = q.group_size
        q = q.to(self.device)
        self.our_kernels = (self.device.type == "cpu" and our_kernels is not False
                            and cpu_kernels.available())
        if self.our_kernels:  # (rows rounded up to 16, in / 2) uint8, (rows, in / G, 2) bf16
            self.weight, self.scales_and_zeros = cpu_kernels.int4_pack(
                q.weight.contiguous(), q.scales.contiguous(), q.zeros.contiguous())
            return
        tile = _CPU_BLOCK if self.device.type == "cpu" else _CUDA_TILE
        pad = -self.out_features % tile  # padding rows: zero scales and zeros, outputs dropped
        # (in / G, padded, 2) bfloat16: each group's scale next to its zero, as both kernels
        # read them
        self.scales_and_zeros = torch.stack(
            [F.pad(q.scales, (0, 0, 0, pad)), F.pad(q.zeros, (0, 0, 0, pad))], dim=-1
        ).transpose(0, 1).contiguous()
        if self.device.type == "cpu":
            self.weight = _cpu_int4_layout(q, self.out_features + pad)  # (padded, in / 2)
        else:
            values = F.pad(q.values(), (0, 0, 0, pad))  # (padded, in) uint8 in 0..15
            # tinygemm's input: (padded, in / 2) uint8 with column 2j in the HIGH nibble
            nibbles = ((values[:, ::2] << 4) | values[:, 1::2]).contiguous()
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            self.weight = torch._convert_weight_to_int4pack(nibbles, inner_k_tiles)

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() * self.weight.element_size()
                + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight as floats (CPU only: the CUDA layout is read by its kernel alone)."""
        if self.device.type != "cpu":
            raise QuantizationError("dequantize() of an int4 weight packed for CUDA is not "
                                    "supported; dequantize its saved format (Int4Weight)")
        return self._block_t(0, self.out_features, torch.float32).t().to(dtype)

    def with_int8_activations(self) -> PackedW4A8:
        """The same weight multiplied with activations rounded to int8 (llama/layers/w8a8.py;
        the CPU's native kernels only)."""
        return PackedW4A8(self)

    def _block_t(self, start: int, end: int, dtype=torch.bfloat16) -> torch.Tensor:
        """Rows start..end dequantised and transposed, (in, rows) (start a multiple of 64 in
        torch's layout)."""
        if self.our_kernels:
            return cpu_kernels.int4_dequantize(self.weight, self.scales_and_zeros,
                                               self.group_size, start, end, dtype).t()
        return self._torch_block_t(start, end, dtype)

    def _torch_block_t(self, start: int, end: int, dtype=torch.bfloat16) -> torch.Tensor:
        """_block_t from torch's CPU layout.
        In the CPU kernel's layout a block of 64 rows is (in, 32) bytes: byte [c, j] holds row
        j's value of column c in its low nibble and row j + 32's in its high nibble (checked
        once per process against the kernel's own packing: _cpu_layout_known)."""
        n_in, g = self.in_features, self.group_size
        blocks = self.weight.view(-1, n_in, 32)[start // _CPU_BLOCK: -(-end // _CPU_BLOCK)]
        nb = blocks.shape[0]
        # float32 arithmetic: exact, and bfloat16's broadcast multiply is far slower on the CPU
        w = torch.empty(n_in, nb, 2, 32)  # (in, blocks, 2 halves, 32 rows)
        w[:, :, 0].copy_((blocks & 15).transpose(0, 1))
        w[:, :, 1].copy_((blocks >> 4).transpose(0, 1))
        sz = self.scales_and_zeros[:, start: start + nb * _CPU_BLOCK].to(torch.float32)
        scales = sz[..., 0].unsqueeze(1)  # (in / G, 1, rows)
        zeros = (sz[..., 1] - 8 * sz[..., 0]).unsqueeze(1)  # exact: 8 * scale is
        w = w.view(n_in // g, g, nb * _CPU_BLOCK)  # (groups, G, rows)
        w.mul_(scales).add_(zeros)  # (q - 8) * scale + zero
        return w.view(n_in, -1)[:, : end - start].to(dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if self.our_kernels and (x2.shape[0] <= NATIVE_INT4_ROWS
                                 or cpu_kernels.int4_every_product()):
            out = cpu_kernels.int4_mm(as_float32(x2), self.weight, self.scales_and_zeros,
                                      self.group_size, self.out_features)
            return (out if out.dtype == x.dtype else out.to(x.dtype)).view(
                *x.shape[:-1], self.out_features)
        xb = _bfloat16(x2)
        if self.our_kernels:
            out = _by_row_blocks(xb, self._block_t, self.out_features)
        elif self.device.type != "cpu":
            out = torch._weight_int4pack_mm(xb, self.weight, self.group_size,
                                            self.scales_and_zeros)
        elif xb.shape[0] > CPU_INT4_KERNEL_ROWS and _cpu_layout_known():
            out = _by_row_blocks(xb, self._block_t, self.out_features)
        else:
            out = torch._weight_int4pack_mm_for_cpu(xb, self.weight, self.group_size,
                                                    self.scales_and_zeros)
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]  # padding rows dropped
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def _cpu_int4_layout(q: Int4Weight, rows: int) -> torch.Tensor:
    """q's values in torch's CPU int4 layout, (rows, in / 2) uint8, rows past q's zero. The
    layout is made of blocks of 64 rows, so it is converted a few blocks at a time: the
    conversion takes an int32 per value, 8x the packed bytes, which for a whole output matrix
    would be a large temporary while loading."""
    out = torch.empty((rows, q.in_features // 2), dtype=torch.uint8)
    step = max(1, (1 << 22) // q.in_features // _CPU_BLOCK) * _CPU_BLOCK  # ~4 M values
    for start in range(0, rows, step):
        end = min(start + step, rows)
        real = max(0, min(end, q.out_features) - start)
        values = narrow(q, 0, start, real).values().to(torch.int32)  # (real, in)
        if real < end - start:  # padding rows, zero
            values = F.pad(values, (0, 0, 0, end - start - real))
        out[start:end] = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    return out


def _bfloat16(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous bfloat16 tensor, copied only when it is not one already."""
    if x.dtype != torch.bfloat16:
        return x.to(torch.bfloat16, memory_format=torch.contiguous_format)
    return x if x.is_contiguous() else x.contiguous()


def _cpu_layout_known() -> bool:
    """Whether this torch's CPU int4 layout is the one PackedInt4._block_t reads (if not,
    prefills use the kernel too)."""
    global _LAYOUT_KNOWN
    if _LAYOUT_KNOWN is None:
        rows, cols = 2 * _CPU_BLOCK, 64
        values = torch.arange(rows * cols).view(rows, cols) % 16
        probe = Int4Weight(((values[:, 1::2] << 4) | values[:, ::2]).to(torch.uint8),
                           torch.ones(rows, 2, dtype=torch.bfloat16),
                           torch.full((rows, 2), 8.0, dtype=torch.bfloat16))
        _LAYOUT_KNOWN = torch.equal(PackedInt4(probe, our_kernels=False).dequantize(),
                                    values.float())
    return _LAYOUT_KNOWN


_LAYOUT_KNOWN = None


def check_int4_device(device: torch.device) -> None:
    """QuantizationError unless `device` has an int4 kernel: every CPU, and CUDA GPUs of
    compute capability 8.0 or newer (A100, H100, L4, RTX 30xx and later)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda" and torch.version.cuda is not None:
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return
        found = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    else:
        found = f"device {device}"
    raise QuantizationError(f"int4 products run on the CPU and on CUDA GPUs of compute "
                            f"capability 8.0 or newer (A100, H100, ...); {found} has no int4 "
                            f"kernel: use quantize='int8'")


def pack(pieces: Union[QuantizedWeight, Sequence[QuantizedWeight]], device="cpu",
         dtype=torch.float32) -> Union[PackedInt8, PackedInt4]:
    """One packed weight for products on `device` with activations of `dtype` (the model's),
    from a saved-format weight (llama/quantize/formats.py) or several joined by rows, in order, for
    a
    fused product (wq|wk|wv, w1|w3): exact, every row keeps its own scales."""
    q = pieces if isinstance(pieces, (Int8Weight, Int4Weight)) else concat(list(pieces), dim=0)
    if isinstance(q, Int8Weight):
        return PackedInt8(q, device, dtype)
    return PackedInt4(q, device, dtype)
