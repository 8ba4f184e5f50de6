"""int8 and int4 weights times int8 activations (W8A8, W4A8): the opt-in product route of
`Llama.build(..., quantize="int8" or "int4", activations="int8")` on the CPU.

The default int8 route (linear.PackedInt8) rounds each activation row to int16, finer than
bfloat16, and multiplies in integers 32 pairs an instruction. This one rounds activations to
int8 in blocks of 32 columns, one float scale per block, as llama.cpp's q8_0 dot product does,
and multiplies 64 pairs an instruction (vpdpbusd, AVX-512 VNNI): prefills run ~1.5x faster, at
the cost of a coarser rounding of the activations (docs/QUANTIZATION.md, "int8 activations":
both measured). Decode steps take the same route, so a token prefilled and the same token
decoded still get the same keys and values (chat sessions, the prefix cache).

The integer sums are exact and the float sums over blocks go in a fixed order: the same bits
on every instruction set, thread count and batch (llama/kernels/cpu_w8a8.cpp). Builds without
AVX-512 VNNI compute the same function with plain C++ loops, slower than the default route;
Llama.build warns there before loading (slow_here).

int4 weights (PackedW4A8, llama/kernels/cpu_w4a8.cpp) take the same activations: their values,
0..15, are the instruction's unsigned operand as they are, and each block of 32 adds
d * (scale * sum(q * v) + (zero - 8 * scale) * sum(q)): the int4 format's (v - 8) * scale +
zero. At 7B: prefills 1.24-1.61x the int4 route's, four-row decode steps 1.24-1.47x, one-row
ones level (docs/QUANTIZATION.md, "int4 weights").
"""

from typing import Optional

import torch

from llama.errors import ArgumentValueError
from llama.kernels import cpu_kernels
from llama.layers.float_linear import as_float32
from llama.quantize.formats import QuantizationError


def check_activations_route(quantize: Optional[str], device) -> None:
    """ArgumentValueError unless int8 activations can be had here: int8 or int4 weights, on
    the CPU, with the native kernels built."""
    if quantize not in ("int8", "int4"):
        weights = "full precision" if quantize is None else quantize
        raise ArgumentValueError("activations", f"activations='int8' multiplies quantized "
                                                f"weights: pass quantize='int8' or 'int4' too "
                                                f"(or load a quantized checkpoint); the weights "
                                                f"here are {weights}")
    if torch.device(device).type != "cpu":
        raise ArgumentValueError("activations", f"activations='int8' is a CPU route (device "
                                                f"{device}); on a GPU, leave it out")
    if not cpu_kernels.available():
        raise ArgumentValueError("activations", f"activations='int8' needs the native CPU "
                                                f"kernels, which are unavailable here "
                                                f"({cpu_kernels.unavailable_reason()})")


def slow_here() -> Optional[str]:
    """Why int8 activations would run slower here than the weights' own route (kernels built
    without AVX-512 VNNI: plain C++ loops, the same bits), or None."""
    if cpu_kernels.int8_dot_products():
        return None
    return (f"activations='int8': the CPU kernels here ({cpu_kernels.isa()}) have no AVX-512 "
            f"VNNI, so its products run as plain C++ loops, slower than without it (the same "
            f"results as on a VNNI CPU); leave activations out for speed")


class PackedW8A8:
    """An int8 weight with one scale per output row, in w8a8_mm's layout (its columns grouped
    so that one vector instruction sums 16 blocks of 32 at once, each value + 128). Made from
    the default route's weight (linear.PackedInt8, CPU): the same int8 values and scales."""

    quantize = "int8"  # Llama.build's name of the weights' format

    def __init__(self, int8):
        if int8.device.type != "cpu":
            raise QuantizationError("PackedW8A8: int8 activations run on the CPU only")
        self.device, self.dtype = int8.device, int8.dtype  # dtype: the activations'
        self.shape = int8.shape
        self.out_features, self.in_features = int8.out_features, int8.in_features
        self.weight = cpu_kernels.w8a8_layout(int8.weight)  # (out, P) uint8
        self.scales = int8.scales  # (out,) bfloat16

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def int8_values(self) -> torch.Tensor:
        """The int8 values, (out, in), in their own order."""
        return cpu_kernels.w8a8_values(self.weight)[:, : self.in_features]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        q = self.int8_values().to(torch.float32)
        return (q * self.scales.to(torch.float32)[:, None]).to(dtype)

    def with_int8_activations(self) -> "PackedW8A8":
        """This weight: its activations are rounded to int8 already."""
        return self

    def product(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.w8a8_mm(as_float32(x.reshape(-1, self.in_features)), self.weight,
                                  self.scales)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


class PackedW4A8:
    """An int4 weight (scales and zeros per group of 32, 64 or 128 columns) in w4a8_mm's
    layout: the values two to a byte in w8a8's column order, each 512 columns' groups' scales
    and zeros on one line (llama/kernels/cpu_w4a8.cpp). Made from the default route's weight
    (linear.PackedInt4 in our kernels' layout): the same values, scales and zeros."""

    quantize = "int4"  # Llama.build's name of the weights' format

    def __init__(self, int4):
        if int4.device.type != "cpu" or not int4.our_kernels:
            raise QuantizationError("PackedW4A8: int8 activations run on the CPU's native "
                                    "kernels only")
        self.device, self.dtype = int4.device, int4.dtype  # dtype: the activations'
        self.shape = int4.shape
        self.out_features, self.in_features = int4.out_features, int4.in_features
        self.group_size = int4.group_size
        # in one pass (w4a8_layout's torch form took ~4x as long and ~4 bytes a value)
        self.weight, self.scales_and_zeros = cpu_kernels.w4a8_pack(
            int4.weight, int4.scales_and_zeros, self.out_features, self.group_size)

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() + self.scales_and_zeros.numel()
                * self.scales_and_zeros.element_size())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight as floats, (v - 8) * scale + zero, as the int4 format computes it."""
        values, scales, zeros = cpu_kernels.w4a8_parts(self.weight, self.scales_and_zeros)
        k = self.in_features
        w = (values[:, :k].float() - 8) * scales[:, :k].float() + zeros[:, :k].float()
        return w.to(dtype)

    def with_int8_activations(self) -> "PackedW4A8":
        """This weight: its activations are rounded to int8 already."""
        return self

    def product(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.w4a8_mm(as_float32(x.reshape(-1, self.in_features)), self.weight,
                                  self.scales_and_zeros, self.group_size)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)
