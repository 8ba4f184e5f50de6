"""The step plan: what one forward of the model computes, decided once by its caller.

A plan says where each token's keys and values go in the cache, which slots each query
attends, whether a left-padded batch runs packed (its real tokens only) and whether the last
layer keeps only each row's last position. Attention (llama/model.py) computes its projections
and rotary, then hands them to `plan.attend`; nothing below the caller inspects argument
types. The kinds:

- Prefill: tokens at slots 0.. of each row, plain causal attention (left padding skipped);
- Span: tokens at slots start.. under an explicit mask (or none): Meta's forward(tokens,
  start_pos) from a later slot, and its layers called with (x, start_pos, freqs_cis, mask);
- Decode: one token per row, each at its own slot (a tensor on the device), attending its
  row's slots through our CPU kernel (row ranges) or torch's attention under a mask;
- Mixed: a server's decode rows and prompt chunks in one flat batch (cache.Segments).

Shapes: x (bsz, seqlen, dim); xq (bsz, seqlen, n_heads, hd); xk, xv (bsz, seqlen, n_kv, hd);
a layer's cache keys and values (rows, n_kv, slots, hd), in the activations' dtype or the one
the model keeps its cache in (Transformer.set_kv_cache_dtype): keys and values are rounded to
it as they are written, and every query, prefilled or decoded, attends to what the cache holds.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

from llama.layers import attend
from llama.layers.cache import (
    PackedTokens,
    RowRanges,
    Segments,
    attention_mask,
    decode_mask,
    row_ranges,
)


@dataclass(frozen=True)
class StepPlan:
    """The common part of every plan. `positions`: each token's rotary position, (bsz or 1,
    seqlen). `end`: the cache slots a row needs (sizes the module's own cache in Meta's
    calls). `last_only`: this layer attends from each row's last position only."""
    positions: torch.Tensor
    end: int
    packing: Optional[PackedTokens] = None
    last_only: bool = False

    def last_layer(self, last_logits_only: bool) -> "StepPlan":
        """The plan of the model's last layer: when only the last logits are wanted, it needs
        every token's keys and values but nothing else of the positions before the last."""
        return replace(self, last_only=True) if last_logits_only else self

    def pack(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden states the layers run on: the real tokens only of a padded batch."""
        return self.packing.pack(h) if self.packing is not None else h

    def rows(self, xqkv: torch.Tensor) -> torch.Tensor:
        """Projections back in (bsz, seqlen, ...) form for rotary and attention."""
        return self.packing.unpack(xqkv) if self.packing is not None else xqkv

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's residual stream matching the attention output's positions."""
        if not self.last_only:
            return x
        return self.packing.last_rows(x) if self.packing is not None else x[:, -1:]

    def logits_rows(self, h: torch.Tensor, last_logits_only: bool) -> torch.Tensor:
        """The final hidden states in (bsz, seqlen or 1, dim) form."""
        if self.packing is not None and not self.last_only:
            h = self.packing.unpack(h)
        return h[:, -1:] if last_logits_only else h

    def attend(self, xq, xk, xv, cache_k, cache_v, scale: float, n_rep: int) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Prefill(StepPlan):
    """Tokens at slots 0..seqlen-1 of rows 0..bsz-1 (left-padded by `packing.pads`)."""

    def attend(self, xq, xk, xv, cache_k, cache_v, scale, n_rep):
        bsz, seqlen = xq.shape[:2]
        cache_k[:bsz, :, :seqlen] = xk.transpose(1, 2)
        cache_v[:bsz, :, :seqlen] = xv.transpose(1, 2)
        pads = self.packing.pads if self.packing is not None else None
        return attend.causal_prefill(xq, cache_k[:bsz, :, :seqlen], cache_v[:bsz, :, :seqlen],
                                     pads, self.last_only, scale, n_rep)


@dataclass(frozen=True)
class Span(StepPlan):
    """Tokens at slots start..end-1 of rows 0..bsz-1, attending slots 0..end-1 under `mask`
    (boolean, True = attend, or additive; None: every slot)."""
    start: int = 0
    mask: Optional[torch.Tensor] = None

    def attend(self, xq, xk, xv, cache_k, cache_v, scale, n_rep):
        bsz = xq.shape[0]
        cache_k[:bsz, :, self.start: self.end] = xk.transpose(1, 2)
        cache_v[:bsz, :, self.start: self.end] = xv.transpose(1, 2)
        out = attend.masked(xq, cache_k[:bsz, :, : self.end], cache_v[:bsz, :, : self.end],
                            self.mask, scale, n_rep, self.last_only)
        if self.packing is not None and not self.last_only:
            out = self.packing.pack(out)
        return out


@dataclass(frozen=True)
class Decode(StepPlan):
    """One token per row, written at slot `slots[i]` of row i (one slot for all rows, or one
    per row), attending that row's slots through `ranges` (our CPU kernel) or `mask` (torch's
    attention over the whole cache given)."""
    slots: Optional[torch.Tensor] = None  # (1 or bsz,)
    ranges: Optional[RowRanges] = None
    mask: Optional[torch.Tensor] = None

    def attend(self, xq, xk, xv, cache_k, cache_v, scale, n_rep):
        bsz = xq.shape[0]
        cache_k, cache_v = cache_k[:bsz], cache_v[:bsz]
        # (indexed writes do not convert: a cache may be kept in another dtype, kv_cache_dtype)
        xk, xv = xk.to(cache_k.dtype), xv.to(cache_v.dtype)
        if self.slots.numel() == 1:  # the same slot in every row: compiled as an in-place write
            cache_k[:, :, self.slots] = xk.transpose(1, 2)
            cache_v[:, :, self.slots] = xv.transpose(1, 2)
        else:  # (bsz, n_kv, hd) written at (row, :, slots[row])
            rows = torch.arange(bsz, device=self.slots.device)
            cache_k[rows, :, self.slots] = xk[:, 0]
            cache_v[rows, :, self.slots] = xv[:, 0]
        if self.ranges is not None:
            return attend.decode_kernel(xq, cache_k, cache_v, self.ranges, scale, n_rep)
        return attend.masked(xq, cache_k, cache_v, self.mask, scale, n_rep)


@dataclass(frozen=True)
class Mixed(StepPlan):
    """A mixed step (cache.Segments): x is (tokens, dim), decode rows' tokens then chunks'.
    The decode rows attend through `ranges` (our kernel) or `mask`."""
    segments: Optional[Segments] = None
    ranges: Optional[RowRanges] = None
    mask: Optional[torch.Tensor] = None

    def rows(self, xqkv):
        return xqkv[None]  # (1, tokens, ...): one row of tokens at their own places

    def attend(self, xq, xk, xv, cache_k, cache_v, scale, n_rep):
        return attend.segments(xq[0], xk[0], xv[0], cache_k, cache_v, self.segments,
                               self.ranges, self.mask, scale, n_rep)


# ------------------------------------------------------------------------- building plans
def for_tokens(bsz: int, seqlen: int, start_pos, cache, pads: Optional[torch.Tensor],
               rotary_length: int, kernel: bool, device) -> StepPlan:
    """The plan of Transformer.forward(tokens, start_pos, cache, pads): `start_pos` an int
    (tokens at slots start_pos..), or an integer tensor of one slot for all rows or one per
    row with one token each (the compiled step's form: shapes fixed from step to step).
    `rotary_length`: the positions the model has rotary angles for. `kernel`: one-query rows
    take our CPU attention kernel."""
    cache_length = cache.length if cache is not None else None
    if isinstance(start_pos, torch.Tensor):
        if seqlen != 1 or cache is None or start_pos.numel() not in (1, bsz):
            raise ValueError("a tensor start_pos takes one token per row, a KVCache, and one "
                             "position for all rows or one per row")
        return decode(start_pos.view(-1), bsz, cache_length, pads, kernel)
    end = start_pos + seqlen
    if end > rotary_length:
        raise ValueError(f"positions up to {end} need rotary angles beyond the {rotary_length} "
                         f"(2 x max_seq_len) computed: build with a larger max_seq_len")
    if seqlen == 1 and kernel:
        return decode(torch.tensor([start_pos], device=device), bsz, cache_length, pads, kernel,
                      end=end)
    slots = torch.arange(start_pos, end, device=device)[None]  # (1, seqlen)
    positions = _rotary_positions(slots, pads)
    packing = PackedTokens(slots[0], pads) if pads is not None and seqlen > 1 else None
    if start_pos == 0 and seqlen > 1:
        return Prefill(positions, end, packing)
    mask = attention_mask(slots[0], end, pads) if pads is not None or seqlen > 1 else None
    return Span(positions, end, packing, start=start_pos, mask=mask)


def decode(slots: torch.Tensor, bsz: int, cache_length: Optional[int],
           starts: Optional[torch.Tensor], kernel: bool, end: int = 1) -> Decode:
    """One token per row at `slots` (one for all rows or one per row), each row attending
    from starts[i] (its padding skipped; None: 0) to its own slot, over the `cache_length`
    slots of the cache given (None: `end` slots of the module's own cache)."""
    positions = _rotary_positions(slots[:, None], starts)  # (1 or bsz, 1)
    if kernel:
        return Decode(positions, end, slots=slots, ranges=row_ranges(slots, bsz, starts))
    length = cache_length if cache_length is not None else end
    return Decode(positions, end, slots=slots, mask=decode_mask(slots, length, starts))


def mixed(segments: Segments, kernel: bool) -> Mixed:
    """The plan of a mixed step (see cache.Segments)."""
    ranges = mask = None
    if segments.rows and kernel:
        ranges = row_ranges(segments.positions, segments.rows, None)
    elif segments.rows:
        mask = decode_mask(segments.positions, segments.kv_len, None)
    return Mixed(segments.slots[None], 1, segments=segments, ranges=ranges, mask=mask)


def for_layer_call(start_pos: int, seqlen: int, mask: Optional[torch.Tensor],
                   device) -> Span:
    """The plan of a layer called as Meta's are, (x, start_pos, freqs_cis, mask)."""
    slots = torch.arange(start_pos, start_pos + seqlen, device=device)[None]
    return Span(slots, start_pos + seqlen, start=start_pos, mask=mask)


def _rotary_positions(slots: torch.Tensor, pads: Optional[torch.Tensor]) -> torch.Tensor:
    # rotary positions count from each row's first real slot
    return slots if pads is None else (slots - pads[:, None]).clamp(min=0)
