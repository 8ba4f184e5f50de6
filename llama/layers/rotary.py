"""Rotary position embedding as the reference computes it: each adjacent pair of a head's
values rotated by its position's angle, as complex multiplication in float32. The names and
signatures are Meta's (llama/model.py re-exports them)."""

from typing import Optional, Tuple

import torch

from llama.rope_scaling import META_SCALING, RopeScaling, scale_frequencies


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False,
                         scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Meta's table of rotations, (end, dim // 2) complex64; `use_scaled` (Meta's Llama 3.1
    argument) applies Meta's llama3 scaling with its constants, `scaling` any other (see
    llama/rope_scaling.py)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if scaling is None and use_scaled:
        scaling = META_SCALING
    freqs = scale_frequencies(freqs, scaling)
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # (end, dim // 2) complex64


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reference's helper: (seqlen, head_dim // 2) -> (1, seqlen, 1, head_dim // 2) for x of
    (bsz, seqlen, n_heads, head_dim // 2)."""
    if freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"freqs_cis has shape {tuple(freqs_cis.shape)}, expected "
                         f"{(x.shape[1], x.shape[-1])} (seqlen, head_dim // 2)")
    return freqs_cis.view(*[d if i in (1, x.ndim - 1) else 1 for i, d in enumerate(x.shape)])


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x0, x1), (x2, x3), ... of every head by its position's angle,
    as complex multiplication in float32 (the reference's arithmetic).
    x: (bsz, seqlen, n_heads, head_dim); freqs_cis: (bsz, seqlen, head_dim // 2), one row of
    positions per batch row, or the reference's (seqlen, head_dim // 2) shared by all rows."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    if freqs_cis.dim() == 2:
        freqs_cis = freqs_cis[None]  # (1, seqlen, head_dim // 2)
    out = torch.view_as_real(x_ * freqs_cis.unsqueeze(2)).flatten(3)
    return out.type_as(x)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor,
                     freqs_cis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's two-tensor form of apply_rotary."""
    return apply_rotary(xq, freqs_cis), apply_rotary(xk, freqs_cis)
