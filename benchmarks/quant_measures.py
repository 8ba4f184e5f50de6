"""What benchmarks/quant_quality.py and quant_outliers.py measure with: the routes the packed
weights' products took, and how far two sets of logits are apart."""

from contextlib import contextmanager
from typing import Dict

import torch

import llama.layers.linear as lin
from llama.kernels import cpu_kernels
from llama.layers.w8a8 import PackedW4A8, PackedW8A8


# ------------------------------------------------------------------------- routes
@contextmanager
def routes():
    """Counts the packed weights' products by the route they took and the dtype of its
    activations, from the kernels and helpers llama/layers/linear.py calls (their names as of this
    writing; a product that reached none of them counts as 'other')."""
    counts: Dict[str, int] = {}

    def spy(original, name):
        def wrapped(x, *rest):
            key = f"{name(*rest) if callable(name) else name}, {str(x.dtype)[6:]} activations"
            counts[key] = counts.get(key, 0) + 1
            return original(x, *rest)
        return wrapped

    def product(original, cls):
        def wrapped(self, x):
            before = sum(counts.values())
            out = original(self, x)
            if sum(counts.values()) == before:
                spy(lambda x: None, f"{cls.__name__}: other")(x)
            return out
        return wrapped

    spies = [(cpu_kernels, "int8_mm", "our int8 kernel (rows rounded to int16)"),
             (cpu_kernels, "w8a8_mm", "our int8-activation kernel (blocks of 32 rounded to "
              "int8)"),
             (cpu_kernels, "int4_mm", "our int4 kernel"),
             (cpu_kernels, "w4a8_mm", "our int4 int8-activation kernel (blocks of 32 rounded "
              "to int8)"),
             (torch, "_weight_int8pack_mm", "int8 kernel _weight_int8pack_mm"),
             (torch, "_weight_int4pack_mm_for_cpu", "int4 kernel _weight_int4pack_mm_for_cpu"),
             (lin, "_by_row_blocks", lambda block_t, n: "dequantised bf16 GEMM ("
              + type(block_t.__self__).__name__ + ")")]
    spies = [(owner, attr, spy(getattr(owner, attr), name)) for owner, attr, name in spies
             if hasattr(owner, attr)] + [(cls, "product", product(cls.product, cls))
                                         for cls in (lin.PackedInt8, lin.PackedInt4,
                                                     PackedW8A8, PackedW4A8)]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in spies]
    for owner, attr, wrapped in spies:
        setattr(owner, attr, wrapped)
    try:
        yield counts
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def routes_line(counts: Dict[str, int]) -> str:
    return "; ".join(f"{name}: {n}" for name, n in sorted(counts.items())) or "none"


# ------------------------------------------------------------------------- metrics
def distributions(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Mean KL(ref || got) of the next-token distributions, top-1 agreement, and the logits'
    relative difference; ref, got: logits (rows, positions, vocab)."""
    lp_ref, lp = ref.log_softmax(-1), got.log_softmax(-1)
    return dict(kl=float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean()),
                top1=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                rel=float((got - ref).norm() / ref.norm()))


def leads(logits: torch.Tensor) -> torch.Tensor:
    """How far each position's first choice leads its second, in logits."""
    top = logits.topk(2, -1).values
    return top[..., 0] - top[..., 1]
