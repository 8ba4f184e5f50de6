"""The candidate CPU routes that benchmarks/quant_kernels.py times for quantized weights (its
docstring lists them by name), and the plain quantizers it and its quality table use."""

import torch
import torch.nn.functional as F

from llama.kernels import cpu_kernels
from llama.layers import linear as products
from llama.layers.linear import linear, pack
from llama.quantize.formats import quantize_int4, quantize_int8


def int8_rows(w):
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_groups(w, group):
    """Unsigned 4-bit values (out, in) int32 and (in/G, out, 2) scale/zero in bf16, the layout
    torch's int4 kernels take: w ~ (q - 8) * scale + zero."""
    g = w.view(w.shape[0], -1, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = lo + 8 * scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return q.view_as(w).to(torch.int32), sz


def per_row_int8(x):
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).to(torch.int8), scale


# Each candidate: name -> (make(w float32) -> state, call(state, x float32, x bf16), rows ok?)
def candidates(with_lib: bool, only=None):
    def fbgemm_packed(w):
        q, s = int8_rows(w)
        qw = torch._make_per_channel_quantized_tensor(
            q, s.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)

    def int_mm_call(st, x, xb):
        xq, sx = per_row_int8(x)
        return torch._int_mm(xq, st[0]).float() * sx * st[1]

    def deq_ours(st, x, xb):
        return linear(x, st[0].float() * st[1][:, None])

    def deq_bf16(st, x, xb):
        w = st[0].to(torch.bfloat16) * st[1][:, None].to(torch.bfloat16)
        return F.linear(xb, w).float()

    every = lambda rows: True  # noqa: E731
    few = lambda rows: rows <= 16  # noqa: E731
    many = lambda rows: rows >= 128  # noqa: E731
    mid = lambda rows: rows >= 32  # noqa: E731
    deq = lambda rows: rows >= 8  # noqa: E731
    table = {
        "f32 F.linear": (lambda w: w, lambda w, x, xb: F.linear(x, w), every),
        "f32 ours": (lambda w: w, lambda w, x, xb: linear(x, w), every),
        "bf16 F.linear": (lambda w: w.to(torch.bfloat16),
                          lambda w, x, xb: F.linear(xb, w), every),
        "i8pack bf16": (lambda w: (lambda q, s: (q, s.to(torch.bfloat16)))(*int8_rows(w)),
                        lambda st, x, xb: torch._weight_int8pack_mm(xb, *st), every),
        "i8pack f32io": (lambda w: (lambda q, s: (q, s.to(torch.bfloat16)))(*int8_rows(w)),
                         lambda st, x, xb: torch._weight_int8pack_mm(
                             x.to(torch.bfloat16), *st).float(), every),
    }
    for group in (32, 64, 128):
        table[f"i4 g{group} bf16"] = (
            lambda w, g=group: (lambda q, sz: (torch._convert_weight_to_int4pack_for_cpu(q, 1),
                                               g, sz))(*int4_groups(w, g)),
            lambda st, x, xb: torch._weight_int4pack_mm_for_cpu(xb, *st), every)
    table["i4 g128 f32io"] = (
        table["i4 g128 bf16"][0],
        lambda st, x, xb: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), *st).float(),
        every)
    table.update({
        "fbgemm dyn": (fbgemm_packed,
                       lambda p, x, xb: torch.ops.quantized.linear_dynamic(x, p, False), every),
        "fbgemm dyn/row": (fbgemm_packed, lambda p, x, xb: torch.cat(
            [torch.ops.quantized.linear_dynamic(r, p, False) for r in x.split(1)]), few),
        "w8a8 int_mm/row": (lambda w: (lambda q, s: (q.t(), s))(*int8_rows(w)),
                            int_mm_call, every),
        "deq f32 ours": (int8_rows, deq_ours, many),
        "deq bf16": (int8_rows, deq_bf16, many),
    })
    if with_lib:
        def kernel_route(p, x, xb):  # the library's packed weight through its kernel, any rows
            if isinstance(p, products.PackedInt8):
                return torch._weight_int8pack_mm(xb, p.weight, p.scales).float()
            return torch._weight_int4pack_mm_for_cpu(xb, p.weight, p.group_size,
                                                     p.scales_and_zeros)[:, :p.out_features]

        def dequantised_route(p, x, xb):  # its dequantised bfloat16 product, any rows
            out = products._by_row_blocks(xb, p._block_t, p.out_features).float()
            return out * p.scales.float() if isinstance(p, products.PackedInt8) else out

        def native_route(p, x, xb):  # our kernel alone (llama/kernels/cpu_kernels.cpp), any rows
            if isinstance(p, products.PackedInt8):
                return cpu_kernels.int8_mm(x, p.weight, p.scales)
            return cpu_kernels.int4_mm(x, p.weight, p.scales_and_zeros, p.group_size,
                                       p.out_features)

        upto64 = lambda rows: rows <= 64  # noqa: E731
        if cpu_kernels.available():
            table["f32 native"] = (lambda w: w, lambda w, x, xb: cpu_kernels.float_mm(x, w),
                                   upto64)
            table["native i8"] = (lambda w: pack(quantize_int8(w), "cpu"), native_route, upto64)
            for group in (32, 128):
                table[f"native i4 g{group}"] = (
                    lambda w, g=group: pack(quantize_int4(w, g), "cpu"), native_route, upto64)
        table["lib int8 torch"] = (lambda w: products.PackedInt8(quantize_int8(w),
                                                                  our_kernels=False),
                                   lambda q, x, xb: linear(x, q), every)
        table["lib int4 g32 torch"] = (
            lambda w: products.PackedInt4(quantize_int4(w, 32), our_kernels=False),
            lambda q, x, xb: linear(x, q), every)
        table["lib int8"] = (lambda w: pack(quantize_int8(w), "cpu"),
                             lambda q, x, xb: linear(x, q), every)
        table["lib int8 deq"] = (lambda w: pack(quantize_int8(w), "cpu"), dequantised_route, deq)
        for group in (32, 128):
            table[f"lib int4 g{group}"] = (lambda w, g=group: pack(quantize_int4(w, g), "cpu"),
                                           lambda q, x, xb: linear(x, q), every)
        table["lib int4 g32 deq"] = (lambda w: pack(quantize_int4(w, 32), "cpu"),
                                     dequantised_route, deq)
        if cpu_kernels.available():  # int8 activations (opt-in): the same weights' new form
            table["lib w8a8"] = (
                lambda w: pack(quantize_int8(w), "cpu").with_int8_activations(),
                lambda q, x, xb: linear(x, q), every)
            table["lib w4a8 g32"] = (
                lambda w: pack(quantize_int4(w, 32), "cpu").with_int8_activations(),
                lambda q, x, xb: linear(x, q), every)
        table["lib int4 g32 kern"] = (
            lambda w: products.PackedInt4(quantize_int4(w, 32), our_kernels=False),
            kernel_route, mid)
    if only:
        table = {name: c for name, c in table.items() if any(o in name for o in only)}
    return table


def compiled_candidates(only=None):
    """torch.compile of dequantise-then-product, freezing off and on. The whole cycle of copies
    is one compiled module (each copy a constant under freezing), so one call is many products."""
    from torch._inductor import config as inductor_config

    class Products(torch.nn.Module):
        def __init__(self, pieces, dtype):
            super().__init__()
            self.dtype = dtype
            for i, (q, s) in enumerate(pieces):
                self.register_buffer(f"q{i}", q)
                self.register_buffer(f"s{i}", s.to(dtype))
            self.n = len(pieces)

        def forward(self, x):
            x = x.to(self.dtype)
            return [F.linear(x, getattr(self, f"q{i}").to(self.dtype)) * getattr(self, f"s{i}")
                    for i in range(self.n)]

    table = {}
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        for freezing in (False, True):
            name = f"compiled i8 {dtype_name} freeze={int(freezing)}"
            if only and not any(o in name for o in only):
                continue

            def make(pieces, dtype=dtype, freezing=freezing):
                module = Products(pieces, dtype)
                inductor_config.freezing = freezing
                compiled = torch.compile(module, dynamic=False)
                return compiled, freezing
            table[name] = make
    return table
