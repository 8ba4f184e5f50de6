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


# Quantized weights. On the CPU torch's int8 and int4 kernels are vectorised only for bfloat16
# activations (float32 ones fall to scalar loops, ~10x slower), so activations are cast to
# bfloat16 for the product and the result back to x's dtype: weight-only quantization, every
# token's activations kept as they are (no activation scales, so no trouble with outlier
# channels). Figures: README, "Quantized weights"; benchmarks/quant_kernels.py.

# Above this many rows an int8 product dequantises its weight to x's dtype and takes the float
# route: torch's int8 kernel is a matrix-vector kernel, slower than float GEMM from here on.
INT8_KERNEL_ROWS = 16
# Rows of packed int4 weights come in tiles of 16 on both devices; others are padded with zero
# rows (zero scales and zeros), whose outputs are dropped.
_INT4_ROW_TILE = 16


class PackedInt8:
    """An int8 weight with one scale per output row, laid out for products on one device.

    CPU: aten._weight_int8pack_mm with bfloat16 activations up to INT8_KERNEL_ROWS rows, above
    them the weight dequantised per call and our float route. CUDA (and any other device):
    F.linear(x, weight.to(x.dtype)) * scales, gpt-fast's form, which torch.compile fuses into
    one kernel (the dequantisation read from int8 inside the product); eager, it dequantises
    a copy per call. torch's CUDA _weight_int8pack_mm is a naive loop per output, not used."""

    def __init__(self, q: Int8Weight, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        self.weight = q.weight.to(self.device).contiguous()  # int8 (out, in)
        # the CPU kernel takes scales in the activations' dtype: bfloat16 (exact: saved so)
        scales_dtype = torch.bfloat16 if self.device.type == "cpu" else dtype
        self.scales = q.scales.to(self.device, scales_dtype)  # (out,)
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        x2 = x.reshape(rows, self.in_features)  # (rows, in)
        if self.device.type != "cpu":
            out = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        elif rows <= INT8_KERNEL_ROWS:
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight,
                                            self.scales).to(x.dtype)
        else:
            out = linear(x2, self.dequantize(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)


class PackedInt4:
    """A group-wise int4 weight laid out for one device's kernel: on the CPU
    aten._weight_int4pack_mm_for_cpu, on CUDA (compute capability 8.0+) aten._weight_int4pack_mm
    (tinygemm). Both take bfloat16 activations and compute (q - 8) * scale + zero per group;
    their packed layouts differ, so a weight is packed for its device here, at load time."""

    def __init__(self, q: Int4Weight, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)
        check_int4_device(self.device)
        self.out_features, self.in_features = q.out_features, q.in_features
        self.group_size = q.group_size
        padded = math.ceil(q.out_features / _INT4_ROW_TILE) * _INT4_ROW_TILE
        pad = padded - q.out_features
        values = F.pad(q.to(self.device).values(), (0, 0, 0, pad))  # (padded, in)
        scales = F.pad(q.scales.to(self.device), (0, 0, 0, pad))
        zeros = F.pad(q.zeros.to(self.device), (0, 0, 0, pad))
        # (in / G, padded, 2) bfloat16: each group's scale next to its zero, as both kernels want
        self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        if self.device.type == "cpu":
            self.weight = torch._convert_weight_to_int4pack_for_cpu(
                values.to(torch.int32).contiguous(), 1)  # (padded, in / 2) uint8, blocked
        else:
            # tinygemm's input: (padded, in / 2) uint8, column 2j in the HIGH nibble
            nibbles = ((values[:, ::2] << 4) | values[:, 1::2]).contiguous()
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            self.weight = torch._convert_weight_to_int4pack(nibbles, inner_k_tiles)

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() * self.weight.element_size()
                + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size())

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        x2 = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()  # (rows, in)
        if self.device.type == "cpu":
            out = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                    self.scales_and_zeros)
        else:
            out = torch._weight_int4pack_mm(x2, self.weight, self.group_size,
                                            self.scales_and_zeros)
        if out.shape[1] != self.out_features:  # padding rows
            out = out[:, :self.out_features]
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
