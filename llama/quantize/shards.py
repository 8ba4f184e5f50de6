"""Quantized weights split and joined: a rank's slice of a saved weight (by rows or input
columns), pieces joined into one (fused products, shards), and buffers that quantized pieces
fill so they join without a copy. Rows and int4 groups carry their own scales, so both are
exact; int8 slices by columns keep each whole row's scale."""

from typing import List, Sequence, Tuple

import torch

from llama.quantize.formats import (
    Int4Weight,
    Int8Weight,
    Quantization,
    QuantizationError,
    QuantizedWeight,
    _outputs,
    group_sizes_for,
)
from llama.views import consecutive_rows


def narrow(q: QuantizedWeight, dim: int, start: int, length: int,
           name: str = "weight") -> QuantizedWeight:
    """Rows (dim 0) or input columns (dim 1) start..start+length of a quantized weight, as a
    rank's slice of it. int8 columns keep every row's scale (the whole row's); int4 columns
    must fall on group boundaries."""
    if dim == 0:
        return type(q)(*(t[start:start + length] for t in q.tensors().values()))
    if dim != 1:
        raise QuantizationError(f"{name}: a weight splits along dim 0 or 1, not {dim}")
    if isinstance(q, Int8Weight):
        return Int8Weight(q.weight[:, start:start + length], q.scales)
    g = q.group_size
    if start % g or length % g:
        raise QuantizationError(
            f"{name}: columns {start}..{start + length} do not fall on int4 group boundaries "
            f"(group size {g}); group sizes that fit this split: "
            f"{', '.join(map(str, group_sizes_for(_gcd(start, length)))) or 'none, use int8'}")
    return Int4Weight(q.weight[:, start // 2:(start + length) // 2],
                      q.scales[:, start // g:(start + length) // g],
                      q.zeros[:, start // g:(start + length) // g])


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def concat(pieces: Sequence[QuantizedWeight], dim: int = 0,
           name: str = "weight") -> QuantizedWeight:
    """One quantized weight of pieces joined by rows (dim 0: the fused q/k/v and w1/w3 matrices,
    or column-parallel shards) or by input columns (dim 1: row-parallel shards). Exact: rows
    and groups carry their own scales; int8 pieces joined by columns must share their scales."""
    kinds = {type(p) for p in pieces}
    if not pieces or len(kinds) != 1:
        raise QuantizationError(f"{name}: concat needs pieces of one format, got "
                                f"{[type(p).__name__ for p in pieces]}")
    if len({p.group_size for p in pieces if isinstance(p, Int4Weight)}) > 1:
        raise QuantizationError(f"{name}: int4 pieces of different group sizes cannot be "
                                f"joined")
    if dim == 0:
        fields = zip(*(p.tensors().values() for p in pieces))
        # a view where they lie one after another (quantized so while loading:
        # empty_like_rows), else a copy
        return type(pieces[0])(*(_rows_of(ts) for ts in fields))
    if dim != 1:
        raise QuantizationError(f"{name}: a weight joins along dim 0 or 1, not {dim}")
    if isinstance(pieces[0], Int8Weight):
        if any(not torch.equal(p.scales, pieces[0].scales) for p in pieces[1:]):
            raise QuantizationError(f"{name}: int8 slices joined by columns must share their "
                                    f"rows' scales (quantized with the whole row's absmax)")
        return Int8Weight(torch.cat([p.weight for p in pieces], dim=1), pieces[0].scales)
    fields = zip(*(p.tensors().values() for p in pieces))
    return Int4Weight(*(torch.cat(ts, dim=1) for ts in fields))


def _rows_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    view = consecutive_rows(tensors)
    return torch.cat(list(tensors), dim=0) if view is None else view


def empty_like_rows(mode: str, group_size: int, shapes: Sequence[Tuple[int, int]],
                    device="cpu") -> List[QuantizedWeight]:
    """Uninitialised weights of `mode` for float weights of `shapes` (out, in), each the next
    rows of one buffer per field: quantized into with quantize(out=...), they join by rows
    (concat, a fused product's weight) without a copy."""
    quantization = Quantization(mode, group_size if mode == "int4" else None)
    rows = [shape[0] for shape in shapes]
    whole = _outputs(None, Int8Weight if mode == "int8" else Int4Weight,
                     quantization.saved_shapes((sum(rows), shapes[0][1])), device)
    pieces, start = [], 0
    for count in rows:
        pieces.append(narrow(whole, 0, start, count))
        start += count
    return pieces
