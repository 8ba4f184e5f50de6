"""Scaled rotary frequencies: which scalings exist, how each changes the frequencies, and how
they are written in Meta's params.json and in Hugging Face's config.json.

- "llama3" (Llama 3.1 and later): Meta's `apply_scaling`. Frequencies whose wavelength is
  longer than the original context / low_freq_factor are divided by `factor`, those shorter
  than original / high_freq_factor are kept, and those between are blended. Meta's params.json
  says only `"use_scaled_rope": true`; the numbers are Meta's constants (factor 8, 1, 4, 8192),
  except that Llama 3.2 1B and 3B were trained with factor 32 (Meta's fix on the Hub's
  config.json; Meta's reference code still says 8), recognised here by their shapes.
- "linear" (Hub fine-tunes of Llama 2): every frequency divided by `factor`, as transformers
  computes it.
- "dynamic" (transformers' dynamic NTK): the base grows with the longest sequence a forward has
  seen once it passes `original_max_position_embeddings` (transformers' max_position_embeddings).
  Below that, the frequencies are the plain ones; past it they depend on the batch and the
  step, which a per-position table cannot reproduce, so a model is only built with max_seq_len
  within it (ModelArgs refuses more).

Anything else (yarn, longrope, ...) is refused by name.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("llama3", "linear", "dynamic")
# Meta's apply_scaling constants (llama-models' llama3 model.py).
META_FACTOR, META_LOW, META_HIGH, META_CONTEXT = 8.0, 1.0, 4.0, 8192
# Llama 3.2 1B and 3B (dim, n_layers, n_heads, n_kv_heads): scaled by 32, not 8.
LLAMA32_SHAPES = {(2048, 16, 32, 8), (3072, 28, 24, 8)}
LLAMA32_FACTOR = 32.0
_FIELDS = {"llama3": {"factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings"},
           "linear": {"factor"},
           "dynamic": {"factor", "original_max_position_embeddings"}}


class RopeScalingError(ValueError):
    """A rotary scaling this library does not implement, or one with impossible numbers."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str
    factor: float
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None

    def __post_init__(self):
        if self.rope_type not in KINDS:
            raise RopeScalingError(
                f"rope scaling {self.rope_type!r} is not implemented (only {', '.join(KINDS)}); "
                f"a model run without it would give wrong outputs, so it is refused")
        _positive("factor", self.factor)
        if self.rope_type == "dynamic" and self.factor < 1:
            raise RopeScalingError(f"dynamic rope scaling needs factor >= 1, got {self.factor}")
        if self.rope_type in ("llama3", "dynamic"):
            context = self.original_max_position_embeddings
            if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
                raise RopeScalingError(
                    f"{self.rope_type} rope scaling needs original_max_position_embeddings, a "
                    f"positive integer, got {context!r}")
        if self.rope_type == "llama3":
            _positive("low_freq_factor", self.low_freq_factor)
            _positive("high_freq_factor", self.high_freq_factor)
            if not self.low_freq_factor < self.high_freq_factor:
                raise RopeScalingError(
                    f"llama3 rope scaling needs low_freq_factor < high_freq_factor, got "
                    f"{self.low_freq_factor} and {self.high_freq_factor}")

    def to_json(self) -> dict:
        """Hugging Face's `rope_scaling` entry (also what params.json carries for a scaling
        `use_scaled_rope` cannot say)."""
        out = {"rope_type": self.rope_type, "factor": self.factor}
        for name in sorted(_FIELDS[self.rope_type] - {"factor"}):
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, entry, where: str = "rope_scaling") -> Optional["RopeScaling"]:
        """A `rope_scaling` (or transformers 5 `rope_parameters`) entry; None for plain
        rotary embeddings ("default", or no entry). `where` names it in errors."""
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise RopeScalingError(f"{where}={entry!r} must be an object such as "
                                   f'{{"rope_type": "linear", "factor": 2.0}}')
        kind = entry.get("rope_type", entry.get("type", "default"))
        if "rope_type" in entry and "type" in entry and entry["type"] != entry["rope_type"]:
            raise RopeScalingError(f"{where}={entry!r} gives two kinds, type and rope_type")
        numbers = {k: v for k, v in entry.items() if k not in ("rope_type", "type", "rope_theta")}
        if kind == "default":
            if numbers:
                raise RopeScalingError(f"{where}={entry!r}: rope_type \"default\" takes no "
                                       f"scaling numbers ({sorted(numbers)})")
            return None
        if kind not in KINDS:
            raise RopeScalingError(
                f"{where}={entry!r} is not supported: rope_type {kind!r} is not implemented "
                f"(only {', '.join(KINDS)}); a model run without it would give wrong outputs")
        unknown = sorted(set(numbers) - _FIELDS[kind])
        missing = sorted(_FIELDS[kind] - set(numbers))
        if unknown or missing:
            raise RopeScalingError(
                f"{where}={entry!r}: {kind} scaling takes exactly {sorted(_FIELDS[kind])}"
                + (f"; unknown {unknown}" if unknown else "")
                + (f"; missing {missing}" if missing else ""))
        try:
            return cls(kind, **numbers)
        except RopeScalingError as error:
            raise RopeScalingError(f"{where}={entry!r}: {error}") from None


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise RopeScalingError(f"rope scaling's {name} must be a positive number, got {value!r}")


def meta_llama3(dim: int, n_layers: int, n_heads: int, n_kv_heads: int) -> RopeScaling:
    """The scaling Meta's `"use_scaled_rope": true` means for a model of this shape."""
    if (dim, n_layers, n_heads, n_kv_heads) in LLAMA32_SHAPES:
        return RopeScaling("llama3", LLAMA32_FACTOR, META_LOW, META_HIGH, META_CONTEXT)
    return META_SCALING


META_SCALING = RopeScaling("llama3", META_FACTOR, META_LOW, META_HIGH, META_CONTEXT)


def scale_frequencies(freqs: torch.Tensor, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """Each rotary pair's frequency (radians per position, float32) under `scaling`."""
    if scaling is None or scaling.rope_type == "dynamic":
        return freqs  # dynamic: plain within the context a model may be built for
    if scaling.rope_type == "linear":
        return freqs / scaling.factor
    # llama3, in the order of Meta's apply_scaling (and transformers'), so the floats agree
    factor, context = scaling.factor, scaling.original_max_position_embeddings
    long_wavelen = context / scaling.low_freq_factor  # longer: slowed by `factor`
    short_wavelen = context / scaling.high_freq_factor  # shorter: kept
    wavelen = 2 * math.pi / freqs
    slowed = torch.where(wavelen > long_wavelen, freqs / factor, freqs)
    smooth = (context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    between = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(between, (1 - smooth) * slowed / factor + smooth * slowed, slowed)


def check_context(scaling: Optional[RopeScaling], max_seq_len: int) -> None:
    """Dynamic scaling is exact only within its original context (see the module's note)."""
    if scaling is not None and scaling.rope_type == "dynamic" \
            and max_seq_len > scaling.original_max_position_embeddings:
        raise RopeScalingError(
            f"max_seq_len={max_seq_len} is past this model's "
            f"{scaling.original_max_position_embeddings} positions, where dynamic rope scaling "
            f"would change the rotation with each batch and step as transformers runs it: build "
            f"with max_seq_len <= {scaling.original_max_position_embeddings}")
