"""Quantized weights in their saved, device-independent format, and the rules that make them.

Two formats, for the projections of attention and feed-forward and for the output matrix:

- `Int8Weight`: symmetric int8, one scale per output row: w[r, c] ~ weight[r, c] * scales[r].
- `Int4Weight`: 4-bit values in groups of G consecutive input columns (G in 32, 64, 128), each
  group with its scale and zero point: w[r, c] ~ (q[r, c] - 8) * scales[r, g] + zeros[r, g],
  g = c // G, q in 0..15 (the form torch's CPU and CUDA int4 kernels compute). Two values per
  byte, row-major: column 2j in the low nibble of byte j, column 2j + 1 in the high nibble.

Scales and zero points are bfloat16 numbers: the CPU kernels take them in bfloat16 (with bfloat16
activations), so every value is chosen as a bfloat16 number *before* the weights are rounded
against it. Every route (CPU kernel, dequantised float product, CUDA) then computes with exactly
the saved values, and the round-trip bound |w - dequantised| <= scale / 2 holds for the saved
scale. Device-specific packing happens when a weight is loaded (llama/layers/linear.py `pack`).

Both formats split and join like the float weights they replace, so checkpoints reshard:
rows freely (column-parallel layers); columns (row-parallel wo and w2) only at group
boundaries for int4, and for int8 with each row's scale taken over the WHOLE row, so that every
rank holds the same scales and 2 processes compute what 1 does (`quantize_int8(absmax=...)`).
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from llama.kernels import cpu_kernels

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# 32: 22% less output error than 128 for 5-15% slower products (docs/QUANTIZATION.md)
DEFAULT_GROUP_SIZE = 32
# The checkpoint tensors that are quantized (Meta's names end with one of these); the
# embedding (a gather) and the norms stay as they are.
QUANTIZED_NAMES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                   "feed_forward.w3.weight", "output.weight")

_ROWS_PER_CHUNK = 1 << 22  # elements quantized at a time: bounds the temporaries' memory


class QuantizationError(ValueError):
    """A weight, mode or group size that cannot be quantized, with what would work."""


def check_mode(mode: Optional[str]) -> Optional[str]:
    """`mode` itself if it is None (no quantization) or one of MODES; else QuantizationError."""
    if mode is None or mode in MODES:
        return mode
    raise QuantizationError(f"unknown quantization {mode!r}; choose one of: None, "
                            + ", ".join(repr(m) for m in MODES))


def is_quantized(name: str) -> bool:
    """Whether checkpoint tensor `name` is one a quantized model holds quantized."""
    return name == "output.weight" or name.endswith(QUANTIZED_NAMES)


def group_sizes_for(in_features: int) -> Tuple[int, ...]:
    """The int4 group sizes that divide `in_features` (the width one rank holds of a
    row-parallel weight, or a whole row): groups then never straddle a split."""
    return tuple(g for g in GROUP_SIZES if in_features % g == 0)


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group size {group_size!r} is not one of {GROUP_SIZES}")
    if in_features % group_size:
        working = group_sizes_for(in_features)
        hint = (f"group sizes that divide it: {', '.join(map(str, working))}" if working
                else f"no group size of {GROUP_SIZES} divides it; use int8")
        raise QuantizationError(f"{name}: {in_features} input columns are not a multiple of "
                                f"the int4 group size {group_size}; {hint}")


@dataclass(frozen=True)
class Int8Weight:
    weight: torch.Tensor  # int8 (out, in), values in -127..127
    scales: torch.Tensor  # bfloat16 (out,)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return _bytes(self.weight, self.scales)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scales.to(torch.float32)[:, None]).to(dtype)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weight, "scales": self.scales}

    def to(self, device) -> "Int8Weight":
        return Int8Weight(*(t.to(device) for t in self.tensors().values()))


@dataclass(frozen=True)
class Int4Weight:
    weight: torch.Tensor  # uint8 (out, in / 2): two 4-bit values per byte, low nibble first
    scales: torch.Tensor  # bfloat16 (out, in / G)
    zeros: torch.Tensor  # bfloat16 (out, in / G): w = (q - 8) * scale + zero

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 2

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return _bytes(self.weight, self.scales, self.zeros)

    def values(self) -> torch.Tensor:
        """The 4-bit values q, (out, in) uint8 in 0..15."""
        low, high = self.weight & 15, self.weight >> 4
        return torch.stack([low, high], dim=-1).view(self.out_features, self.in_features)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out, groups = self.scales.shape
        q = self.values().view(out, groups, -1).to(torch.float32) - 8
        w = q * self.scales.to(torch.float32)[..., None] + self.zeros.to(torch.float32)[..., None]
        return w.view(out, self.in_features).to(dtype)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weight, "scales": self.scales, "zeros": self.zeros}

    def to(self, device) -> "Int4Weight":
        return Int4Weight(*(t.to(device) for t in self.tensors().values()))


QuantizedWeight = Union[Int8Weight, Int4Weight]


@dataclass(frozen=True)
class Quantization:
    """How a saved checkpoint's weights are quantized: params.json's "quantization" entry,
    {"mode": "int8"} or {"mode": "int4", "group_size": G}."""
    mode: str
    group_size: Optional[int] = None  # int4 only

    def __post_init__(self):
        if self.mode not in MODES:
            raise QuantizationError(f"unknown quantization mode {self.mode!r}; choose one of: "
                                    + ", ".join(MODES))
        if self.mode == "int8" and self.group_size is not None:
            raise QuantizationError("int8 has one scale per row: no group_size")
        if self.mode == "int4" and (type(self.group_size) is not int
                                    or self.group_size not in GROUP_SIZES):
            raise QuantizationError(f"int4 group_size must be one of {GROUP_SIZES}, got "
                                    f"{self.group_size!r}")

    def to_json(self) -> dict:
        return {"mode": self.mode, **({"group_size": self.group_size} if self.group_size else {})}

    def __str__(self) -> str:
        return self.mode + (f" (groups of {self.group_size})" if self.group_size else "")

    def saved_shapes(self, shape: Tuple[int, int]) -> Dict[str, Tuple[int, ...]]:
        """The saved format's tensors for a float weight of `shape` (out, in): field -> shape,
        as `tensors()` gives them."""
        n_out, n_in = shape
        if self.mode == "int8":
            return {"weight": (n_out, n_in), "scales": (n_out,)}
        groups = (n_out, n_in // self.group_size)
        return {"weight": (n_out, n_in // 2), "scales": groups, "zeros": groups}


# The saved format's tensor types, per field (`tensors()`'s keys).
SAVED_DTYPES = {"int8": {"weight": torch.int8, "scales": torch.bfloat16},
                "int4": {"weight": torch.uint8, "scales": torch.bfloat16,
                         "zeros": torch.bfloat16}}


def saved_key(name: str, field: str) -> str:
    """The checkpoint key of a quantized weight's field: the values keep the float weight's
    name ("layers.0.attention.wq.weight"), the others sit beside it ("...wq.scales")."""
    return name[: -len("weight")] + field


def split_field(key: str) -> Tuple[str, str]:
    """(weight name, field) of a checkpoint key written by saved_key."""
    base, _, field = key.rpartition(".")
    return base + ".weight", field


def saved_tensors(name: str, q: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """Quantized weight `name` as checkpoint tensors (saved_key's names)."""
    return {saved_key(name, field): tensor for field, tensor in q.tensors().items()}


def gather_saved(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """A quantized checkpoint's tensors with each quantized weight's fields joined back into
    its saved format under the weight's name (the inverse of saved_tensors), in order; the
    other tensors as they are. Errors name the weight whose fields do not fit together."""
    out: Dict[str, object] = {}
    fields: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, field = split_field(key)
        if is_quantized(name):
            out.setdefault(name, None)
            fields.setdefault(name, {})[field] = tensor
        else:
            out[key] = tensor
    for name, tensors in fields.items():
        out[name] = from_tensors(tensors, name)
    return out


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_float(weight: torch.Tensor, name: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(f"{name}: expected a 2-D floating-point weight, got "
                                f"{tuple(weight.shape)} {weight.dtype}")


def _check_finite(extremes: torch.Tensor, name: str) -> None:
    # rows' or groups' largest and smallest values: NaN and inf show up there (max and min
    # propagate NaN), so the weight itself needs no full-size temporary to be checked
    if not bool(torch.isfinite(extremes).all()):
        raise QuantizationError(f"{name}: holds inf or NaN values, which cannot be quantized")


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _ROWS_PER_CHUNK // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 numbers >= x (x positive and finite), as float32."""
    rounded = x.to(torch.bfloat16)
    low = rounded.to(torch.float32) < x
    bumped = (rounded.view(torch.int16) + 1).view(torch.bfloat16)  # next number up, x > 0
    return torch.where(low, bumped, rounded).to(torch.float32)


_TINY = torch.finfo(torch.bfloat16).tiny


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """Each row's largest |w|, (out,) float32: what int8's scales are made of. For a weight
    split by columns across ranks (wo, w2), take the max over ranks before quantize_int8.
    Read a block of rows at a time (the weight may be a memory-mapped bfloat16 file)."""
    return torch.cat([weight[start:end].abs().amax(dim=1).to(torch.float32)
                      for start, end in _row_chunks(*weight.shape)])


def _float_rows(weight: torch.Tensor):
    """(start, end, rows) a block of rows at a time, as float32 in one buffer reused from block
    to block (the weight may be a memory-mapped bfloat16 file): temporaries stay small and
    the heap does not fill with holes between the weights being kept."""
    buffer = None
    for start, end in _row_chunks(*weight.shape):
        if buffer is None:
            buffer = torch.empty((end - start, weight.shape[1]), dtype=torch.float32,
                                 device=weight.device)
        rows = buffer[: end - start]
        rows.copy_(weight[start:end])
        yield start, end, rows


def _outputs(out, cls, shapes, device):
    """The tensors to write a quantized weight into: `out`'s (a weight of views into larger
    buffers, e.g. the rows of a fused q/k/v matrix), else new ones."""
    if out is None:
        dtypes = SAVED_DTYPES["int8" if cls is Int8Weight else "int4"]
        return cls(**{field: torch.empty(shape, dtype=dtypes[field], device=device)
                      for field, shape in shapes.items()})
    for field, tensor in out.tensors().items():
        if not isinstance(out, cls) or tuple(tensor.shape) != shapes[field]:
            raise QuantizationError(f"out: expected a {cls.__name__} of shapes {shapes}")
    return out


def quantize_int8(weight: torch.Tensor, absmax: Optional[torch.Tensor] = None,
                  name: str = "weight", out: Optional[Int8Weight] = None) -> Int8Weight:
    """Symmetric int8 with one scale per output row, scale = absmax / 127 (rounded up to a
    bfloat16 number). `absmax` (out,) overrides each row's own largest |w|: pass the whole
    row's when `weight` is one rank's column slice, so every rank gets the same scales. It must
    be >= the slice's own (values beyond 127 * scale would be clipped). `out`: an Int8Weight
    to write into (and return)."""
    _check_float(weight, name)
    own = row_absmax(weight)
    _check_finite(own, name)
    if absmax is None:
        absmax = own
    else:
        absmax = absmax.to(torch.float32, copy=False).to(weight.device)
        if absmax.shape != own.shape:
            raise QuantizationError(f"{name}: absmax has shape {tuple(absmax.shape)}, expected "
                                    f"({weight.shape[0]},)")
        if bool((absmax < own).any()):
            raise QuantizationError(f"{name}: absmax is below the weight's own largest |w| in "
                                    f"some rows; pass the max over every rank's slice")
    # Rounded up, so that absmax / scale <= 127 and no value is clipped.
    scales = _bf16_at_least((absmax / 127).clamp(min=_TINY))
    out = _outputs(out, Int8Weight, Quantization("int8").saved_shapes(weight.shape),
                   weight.device)
    for start, end, rows in _float_rows(weight):
        out.weight[start:end] = rows.div_(scales[start:end, None]).round_().clamp_(-127, 127)
    out.scales.copy_(scales)
    return out


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                  name: str = "weight", out: Optional[Int4Weight] = None) -> Int4Weight:
    """Asymmetric 4-bit groups of `group_size` input columns: each group's smallest and largest
    values land on the grid's ends (q = 0 and 15). Scale and zero are bfloat16 numbers; the
    scale is rounded up where needed so that the whole group stays within the grid. `out`: an
    Int4Weight to write into (and return)."""
    _check_float(weight, name)
    n_out, n_in = weight.shape
    check_group_size(group_size, n_in, name)
    groups = n_in // group_size
    out = _outputs(out, Int4Weight, Quantization("int4", group_size).saved_shapes(weight.shape),
                   weight.device)
    if _native_int4(weight):
        for start, end in _row_chunks(n_out, n_in):
            values, scales, zeros = cpu_kernels.int4_quantize(weight[start:end], group_size)
            _check_finite(scales, name)  # NaN where a group holds inf or NaN
            out.weight[start:end], out.scales[start:end] = values, scales
            out.zeros[start:end] = zeros
        return out
    for start, end, rows in _float_rows(weight):
        g = rows.view(end - start, groups, group_size)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        _check_finite(torch.stack([lo, hi]), name)
        zero = (lo + 8 * (hi - lo) / 15).to(torch.bfloat16).to(torch.float32)
        # The grid (q - 8) * scale + zero, q in 0..15, must reach down to lo and up to hi.
        scale = _bf16_at_least(torch.maximum((zero - lo) / 8, (hi - zero) / 7).clamp(min=_TINY))
        g.sub_(zero[..., None]).div_(scale[..., None]).round_().add_(8).clamp_(0, 15)
        q = g.to(torch.uint8).view(end - start, n_in // 2, 2)
        torch.bitwise_or(q[..., 0], q[..., 1] << 4, out=out.weight[start:end])
        out.scales[start:end] = scale
        out.zeros[start:end] = zero
    return out


def _native_int4(weight: torch.Tensor) -> bool:
    """Whether our CPU kernels quantize this weight to int4 (the same bits as the torch
    operations below, in one pass: tests/test_quantize.py)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.is_contiguous() and cpu_kernels.available())


def quantize(weight: torch.Tensor, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
             absmax: Optional[torch.Tensor] = None, name: str = "weight",
             out: Optional[QuantizedWeight] = None) -> QuantizedWeight:
    """One float weight (out, in) in the saved format of `mode` ("int8" or "int4").
    `absmax`: int8 only (see quantize_int8). `name` appears in error messages. `out`: a
    weight of that format and shape to write into (views of a larger buffer)."""
    if check_mode(mode) is None:
        raise QuantizationError("quantize() needs a mode: " + ", ".join(map(repr, MODES)))
    if mode == "int8":
        return quantize_int8(weight, absmax, name, out)
    if absmax is not None:
        raise QuantizationError(f"{name}: absmax applies to int8 only (int4 groups never "
                                f"straddle a split)")
    return quantize_int4(weight, group_size, name, out)


def from_tensors(tensors: Dict[str, torch.Tensor], name: str = "weight") -> QuantizedWeight:
    """The saved format back from its tensors (`tensors()`'s dict), checked for consistency."""
    keys = set(tensors)
    if keys == {"weight", "scales"}:
        w, s = tensors["weight"], tensors["scales"]
        if w.dtype != torch.int8 or w.dim() != 2 or s.shape != (w.shape[0],):
            raise QuantizationError(f"{name}: not an int8 weight: weight {w.dtype} "
                                    f"{tuple(w.shape)}, scales {tuple(s.shape)}")
        return Int8Weight(w, s)
    if keys == {"weight", "scales", "zeros"}:
        w, s, z = tensors["weight"], tensors["scales"], tensors["zeros"]
        ok = (w.dtype == torch.uint8 and w.dim() == 2 and s.dim() == 2 and s.shape == z.shape
              and s.shape[0] == w.shape[0] and s.shape[1] > 0
              and (2 * w.shape[1]) % s.shape[1] == 0
              and (2 * w.shape[1]) // s.shape[1] in GROUP_SIZES)
        if not ok:
            raise QuantizationError(f"{name}: not an int4 weight: weight {w.dtype} "
                                    f"{tuple(w.shape)}, scales {tuple(s.shape)}, zeros "
                                    f"{tuple(z.shape)}")
        return Int4Weight(w, s, z)
    raise QuantizationError(f"{name}: expected tensors weight+scales (int8) or "
                            f"weight+scales+zeros (int4), got {sorted(keys)}")
