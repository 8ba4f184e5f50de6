"""Every matrix product of the model, and the route each takes per device and weight format.

`linear(x, weight)` is F.linear with faster routes where measured (README, Performance); this is
the only module that knows about oneDNN, torch's int8/int4 kernels or their packed layouts, so
the model's math stays plain. `weight` is a float tensor, or a quantized weight packed for its
device by `pack` (from llama/quantize.py's saved formats).
"""

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from llama.quantize import Int4Weight, Int8Weight, QuantizationError, QuantizedWeight, concat


def linear(x: torch.Tensor, weight: Union[torch.Tensor, "PackedInt8", "PackedInt4"]
           ) -> torch.Tensor:
    """x @ weight.T. A packed quantized weight takes its own route (PackedInt8, PackedInt4).
    A float weight is F.linear, with faster paths for float32 on the CPU (measured on 2 cores; README):

    - one row (a decode step at batch 1, where reading the weight is the whole cost): the
      weight's rows are split into blocks, each a matrix-vector product of its own, run as
      one batched product so each thread streams its own contiguous slab of the weight.
      MKL's threaded matrix-vector product reads weights about 1.5x slower;
    - 2 to 256 rows: oneDNN's matrix product, about 1.5-2x MKL's (F.linear's) for the 4 to
      16 rows of a batched decode step, and ~10% faster for a 128-token prefill. From about
      512 rows on, MKL is the faster again.

    Only the order of the float32 additions differs from F.linear."""
    if not isinstance(weight, torch.Tensor):
        return weight.product(x)
    rows = row_count(x)
    if x.device.type != "cpu" or x.dtype != torch.float32 or not weight.is_contiguous():
        return F.linear(x, weight)
    n_out, n_in = weight.shape
    if rows == 1:
        blocks = _row_blocks(n_out)
        if blocks == 1:
            return F.linear(x, weight)
        out = torch.bmm(x.reshape(1, 1, n_in).expand(blocks, 1, n_in),
                        weight.view(blocks, n_out // blocks, n_in).transpose(1, 2))
    elif rows <= FEW_ROWS and _ONEDNN and not torch.compiler.is_compiling():  # (not lowerable)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, n_in), weight, None, "none",
                                                 [], "")
    else:
        return F.linear(x, weight)
    return out.view(*x.shape[:-1], n_out)


def row_count(x: torch.Tensor) -> int:
    """The rows a product over x's last dimension has: its tokens, however batched."""
    return x.numel() // x.shape[-1]


# Up to this many rows a product is "small" (a decode step, a short prefill): oneDNN, and
# fused q/k/v and w1/w3 products. Above it MKL, and separate w1 and w3 products (FeedForward).
FEW_ROWS = 256
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _row_blocks(n_out: int) -> int:
    """How many row blocks to split a matrix-vector product into: one or two per thread
    (measured alike on 2 cores); 1 when neither divides the rows into blocks of >= 64."""
    threads = torch.get_num_threads()
    for blocks in (2 * threads, threads):
        if blocks > 1 and n_out % blocks == 0 and n_out // blocks >= 64:
            return blocks
    return 1



# ----------------------------------------------------------------------- quantized weights
# Weight-only quantization: activations are never quantized (Llama's activations have outlier
# channels; per-token int8 activations measured 8-12x the output error of int8 weights alone,
# README "Quantized weights"). torch's CPU int4 kernel is vectorised for bfloat16 activations
# only (float32 ones fall to scalar loops), so activations are cast to bfloat16 for a quantized
# product and its result back to x's dtype. Figures: benchmarks/quant_kernels.py.

# Up to this many rows a quantized CPU product runs torch's int4 kernel (int8 weights too, as
# two 4-bit planes, see PackedInt8); above it (prefills) the weight is dequantised to bfloat16,
# a block of rows at a time, for oneDNN's bfloat16 GEMM, faster then than the kernel and than
# the float32 product.
CPU_KERNEL_ROWS = 32
_CPU_BLOCK = 64  # rows of the CPU int4 layout's blocks: weights are padded to a multiple
_CUDA_TILE = 16  # rows of tinygemm's tiles (8 on NVIDIA, 16 on AMD)
_DEQUANT_ROWS = 1024  # weight rows dequantised at a time for a prefill's product


class _CpuInt4:
    """4-bit values q (rows, cols) with a scale and a zero point per group of columns, laid out
    for torch's CPU int4 kernel, which computes with (q - 8) * scale + zero."""

    def __init__(self, values, scales, zeros, group_size: int):
        self.rows, self.cols = values.shape
        self.group_size = group_size
        pad = -self.rows % _CPU_BLOCK  # padding rows: zero scales and zeros, outputs dropped
        values = F.pad(values.to(torch.int32), (0, 0, 0, pad)).contiguous()
        self.weight = torch._convert_weight_to_int4pack_for_cpu(values, 1)  # (padded, cols/2)
        # (cols / G, padded, 2): each group's scale next to its zero, as the kernel reads them
        self.scales_and_zeros = torch.stack(
            [F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))], dim=-1
        ).transpose(0, 1).to(torch.bfloat16).contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales_and_zeros.numel() * 2

    def mm(self, xb: torch.Tensor) -> torch.Tensor:
        """xb (rows, cols) contiguous bfloat16 -> (rows, self.rows) bfloat16"""
        out = torch._weight_int4pack_mm_for_cpu(xb, self.weight, self.group_size,
                                                self.scales_and_zeros)
        return out if out.shape[1] == self.rows else out[:, :self.rows]

    def values(self, start: int, end: int) -> torch.Tensor:
        """q of rows start..end (start a multiple of 64), (end - start, cols) uint8. In the
        kernel's layout a block of 64 rows is (cols, 32) bytes: byte [c, j] holds row j's value
        of column c in its low nibble and row j + 32's in its high nibble (checked once per
        process against the kernel's own packing: _cpu_layout_known)."""
        blocks = self.weight.view(-1, self.cols, 32)[start // _CPU_BLOCK: -(-end // _CPU_BLOCK)]
        q = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2)  # (blocks, 64, cols)
        return q.reshape(-1, self.cols)[: end - start]

    def group_scales(self, start: int, end: int):
        """Scales and zeros of rows start..end, each (end - start, cols / G) float32."""
        sz = self.scales_and_zeros[:, start:end].to(torch.float32)
        return sz[..., 0].t(), sz[..., 1].t()


def _cpu_layout_known() -> bool:
    """Whether this torch's CPU int4 layout is the one _CpuInt4.values reads (if not, prefills
    use the kernel too)."""
    if _LAYOUT_KNOWN is None:
        probe = torch.arange(2 * _CPU_BLOCK * 64, dtype=torch.int32).view(2 * _CPU_BLOCK, 64) % 13
        core = _CpuInt4(probe, torch.ones(2 * _CPU_BLOCK, 2), torch.zeros(2 * _CPU_BLOCK, 2), 32)
        globals()["_LAYOUT_KNOWN"] = torch.equal(core.values(0, 2 * _CPU_BLOCK).to(torch.int32),
                                                 probe)
    return _LAYOUT_KNOWN


_LAYOUT_KNOWN = None


def _dequantized_product(xb: torch.Tensor, rows_of, n_out: int) -> torch.Tensor:
    """xb @ W.T in bfloat16, W dequantised by blocks of rows (rows_of(start, end) -> float32),
    each block used while it is still in cache."""
    return torch.cat([F.linear(xb, rows_of(start, min(start + _DEQUANT_ROWS, n_out))
                               .to(torch.bfloat16))
                      for start in range(0, n_out, _DEQUANT_ROWS)], dim=1)


class PackedInt8:
    """An int8 weight with one scale per output row, laid out for products on one device.

    CPU: as two 4-bit planes through torch's int4 kernel, q = 16 * h + l with h in -8..7 and
    l in 0..15: the planes [h + 8 | l] side by side (rows, 2 * in) with group scales 16 * s and
    s and zeros 0 and 8 * s, times [x | x], is exactly x @ (q * s).T, and faster than torch's
    int8 kernel (README). Widths not a multiple of 32 are padded with zero columns. Above
    CPU_KERNEL_ROWS rows, a dequantised bfloat16 product.
    CUDA (and other devices): F.linear(x, weight.to(x.dtype)) * scales, gpt-fast's form, which
    torch.compile fuses into one kernel (the int8 weight dequantised inside the product);
    eager, it dequantises a copy per call. (torch's CUDA _weight_int8pack_mm is a naive loop.)"""

    def __init__(self, q: Int8Weight, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        self.out_features, self.in_features = q.out_features, q.in_features
        if self.device.type != "cpu":
            self.weight = q.weight.to(self.device).contiguous()  # int8 (out, in)
            self.scales = q.scales.to(self.device, dtype)  # (out,)
            return
        self.scales = q.scales.to(torch.bfloat16)  # exact: saved as bfloat16 numbers
        self.width = -(-self.in_features // 32) * 32  # each plane's, padded
        weight = F.pad(q.weight, (0, self.width - self.in_features))
        h = torch.div(weight, 16, rounding_mode="floor")  # -8..7
        values = torch.cat([h + 8, weight - 16 * h], dim=1)  # (out, 2 * width) in 0..15
        group = next(g for g in (128, 64, 32) if self.width % g == 0)  # fewest scale reads
        s = q.scales.to(torch.float32)[:, None].expand(-1, self.width // group)
        self.planes = _CpuInt4(values, torch.cat([16 * s, s], dim=1),
                               torch.cat([torch.zeros_like(s), 8 * s], dim=1), group)

    @property
    def nbytes(self) -> int:
        held = self.planes.nbytes if self.device.type == "cpu" else self.weight.numel()
        return held + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.device.type != "cpu":
            return self.weight.to(dtype) * self.scales.to(dtype)[:, None]
        return self._rows(0, self.out_features).to(dtype)

    def _rows(self, start: int, end: int) -> torch.Tensor:
        v = self.planes.values(start, end).to(torch.int16)  # (end - start, 2 * width)
        h, l = v[:, : self.in_features], v[:, self.width: self.width + self.in_features]
        return ((h - 8) * 16 + l).to(torch.float32) * self.scales[start:end, None].float()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        x2 = x.reshape(rows, self.in_features)  # (rows, in)
        if self.device.type != "cpu":
            out = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
            return out.view(*x.shape[:-1], self.out_features)
        xb = x2.to(torch.bfloat16)
        if rows > CPU_KERNEL_ROWS and _cpu_layout_known():
            out = _dequantized_product(xb.contiguous(), self._rows, self.out_features)
        else:
            xb = F.pad(xb, (0, self.width - self.in_features))
            out = self.planes.mm(torch.cat([xb, xb], dim=1))  # (rows, out)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class PackedInt4:
    """A group-wise int4 weight laid out for one device's kernel: on the CPU
    aten._weight_int4pack_mm_for_cpu (above CPU_KERNEL_ROWS rows, a dequantised bfloat16
    product), on CUDA of compute capability 8.0+ aten._weight_int4pack_mm (tinygemm). Both
    take bfloat16 activations and compute (q - 8) * scale + zero per group; their packed
    layouts differ, so a weight is packed for its device here, at load time."""

    def __init__(self, q: Int4Weight, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        check_int4_device(self.device)
        self.out_features, self.in_features = q.out_features, q.in_features
        self.group_size = q.group_size
        q = q.to(self.device)
        if self.device.type == "cpu":
            self.core = _CpuInt4(q.values(), q.scales, q.zeros, q.group_size)
            return
        pad = -self.out_features % _CUDA_TILE
        values = F.pad(q.values(), (0, 0, 0, pad))  # (padded, in) uint8
        # tinygemm's input: (padded, in / 2) uint8 with column 2j in the HIGH nibble
        nibbles = ((values[:, ::2] << 4) | values[:, 1::2]).contiguous()
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
        self.weight = torch._convert_weight_to_int4pack(nibbles, inner_k_tiles)
        self.scales_and_zeros = torch.stack(  # (in / G, padded, 2) bfloat16
            [F.pad(q.scales, (0, 0, 0, pad)), F.pad(q.zeros, (0, 0, 0, pad))], dim=-1
        ).transpose(0, 1).contiguous()

    @property
    def nbytes(self) -> int:
        if self.device.type == "cpu":
            return self.core.nbytes
        return self.weight.numel() * self.weight.element_size() + self.scales_and_zeros.numel() * 2

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight as floats (CPU only: the CUDA layout is read by its kernel alone)."""
        if self.device.type != "cpu":
            raise QuantizationError("dequantize() of an int4 weight packed for CUDA is not "
                                    "supported; dequantize its saved format (Int4Weight)")
        return self._rows(0, self.out_features).to(dtype)

    def _rows(self, start: int, end: int) -> torch.Tensor:
        g = self.group_size
        q = self.core.values(start, end).to(torch.float32).view(end - start, -1, g)
        scales, zeros = self.core.group_scales(start, end)
        return ((q - 8) * scales[..., None] + zeros[..., None]).view(end - start, -1)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        xb = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()  # (rows, in)
        if self.device.type != "cpu":
            out = torch._weight_int4pack_mm(xb, self.weight, self.group_size,
                                            self.scales_and_zeros)[:, :self.out_features]
        elif rows > CPU_KERNEL_ROWS and _cpu_layout_known():
            out = _dequantized_product(xb, self._rows, self.out_features)
        else:
            out = self.core.mm(xb)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


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
    from a saved-format weight (llama/quantize.py) or several joined by rows, in order, for a
    fused product (wq|wk|wv, w1|w3): exact, every row keeps its own scales."""
    q = pieces if isinstance(pieces, (Int8Weight, Int4Weight)) else concat(list(pieces), dim=0)
    if isinstance(q, Int8Weight):
        return PackedInt8(q, device, dtype)
    return PackedInt4(q, device, dtype)
