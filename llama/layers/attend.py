"""How a layer's queries attend to its cached keys and values, by kind of call: a prefill from
slot 0 (causal), a decode step (one query per row; our CPU kernel or torch's attention under a
mask), the general masked case, and a mixed step (decode rows and prompt chunks together,
llama/layers/cache.py's Segments). The step plans of llama/layers/plan.py write the cache and call
these.

Shapes: xq (bsz, seqlen, n_heads, hd); keys and values (bsz, n_kv, cache slots, hd). Query
head h uses kv head h // n_rep, as the reference's repeat_kv does, without repeating keys.
Keys and values are read as the cache holds them: a cache kept in bfloat16 under float32
activations (kv_cache_dtype) is widened for torch's attention (exactly) and read as it is by
our CPU kernel, so every route attends to the same values.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from llama.kernels import cpu_kernels
from llama.layers.cache import RowRanges, Segments, attention_mask


def masked(xq, keys, values, mask, scale: float, n_rep: int, last_only: bool = False):
    """Attention under `mask` (boolean, True = attend, or additive; None for none), over the
    keys given. Returns (bsz, q_len, n_heads * hd); q_len is 1 with last_only."""
    bsz, _, n_heads, hd = xq.shape
    n_kv = n_heads // n_rep
    if mask is not None and mask.dim() == 2:  # the reference's (seqlen, keys)
        mask = mask[None, None]
    if last_only:
        xq, mask = xq[:, -1:], (mask[:, :, -1:] if mask is not None else None)
    q_len = xq.shape[1]
    # The n_rep query heads that share a kv head are stacked along the query axis.
    xq = xq.view(bsz, q_len, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4)
    xq = xq.reshape(bsz, n_kv, n_rep * q_len, hd)  # (bsz, n_kv, n_rep * q_len, hd)
    if mask is not None and n_rep > 1:
        mask = mask.repeat(1, 1, n_rep, 1)  # (bsz, 1, n_rep * q_len, keys)
    out = F.scaled_dot_product_attention(xq, _like(keys, xq), _like(values, xq), attn_mask=mask,
                                         scale=scale)
    out = out.view(bsz, n_kv, n_rep, q_len, hd).permute(0, 3, 1, 2, 4)
    return out.reshape(bsz, q_len, n_heads * hd)


def decode_kernel(xq, keys, values, ranges: RowRanges, scale: float, n_rep: int):
    """One query per row over its own range of slots, by our CPU kernel. Returns
    (bsz, 1, n_heads * hd)."""
    bsz, _, n_heads, hd = xq.shape
    q = xq.reshape(bsz, n_heads // n_rep, n_rep, hd).contiguous()
    out = cpu_kernels.decode_attention(q, keys, values, *ranges, scale)
    return out.view(bsz, 1, n_heads * hd)


def causal_prefill(xq, keys, values, pads: Optional[List[int]], last_only: bool, scale: float,
                   n_rep: int):
    """A prefill from slot 0 as plain causal attention: the kernel skips the blocks above the
    diagonal (half the work on long prompts). A left-padded batch (`pads`: each row's padding
    slots) goes row by row over each row's real slots, so padding is neither computed nor
    attended. Returns (bsz, 1, n_heads * hd) with last_only; else (bsz, seqlen, ...), or with
    `pads` the real tokens only, row by row: (real tokens, n_heads * hd)."""
    parts = [(slice(None), 0)] if pads is None else [
        (slice(row, row + 1), pad) for row, pad in enumerate(pads)]
    outs = []
    for rows, pad in parts:
        q = xq[rows, -1:] if last_only else xq[rows, pad:]
        # is_causal sets the first query against the first key: right here, where the queries
        # sit in the keys' own slots. A lone last query sees every key.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), _like(keys[rows, :, pad:], q),
                                             _like(values[rows, :, pad:], q),
                                             is_causal=q.shape[1] > 1,
                                             enable_gqa=n_rep > 1, scale=scale)
        outs.append(out.transpose(1, 2).flatten(2))  # (rows, queries, heads * hd)
    if pads is None or last_only:
        return torch.cat(outs)
    return torch.cat([out[0] for out in outs])


def segments(xq, xk, xv, cache_k, cache_v, seg: Segments, ranges: Optional[RowRanges],
             mask: Optional[torch.Tensor], scale: float, n_rep: int):
    """A mixed step: xq (tokens, n_heads, hd), xk and xv (tokens, n_kv, hd) in Segments' order
    (a token for each of cache rows 0 .. seg.rows - 1, then each chunk's tokens). Writes their
    keys and values into the whole cache (cache_k, cache_v: every row), the decode rows' first
    and the chunks' after, then attends: the decode rows through our kernel (`ranges`) or
    under `mask`. Returns (tokens, n_heads * hd)."""
    rows, n_heads, hd = seg.rows, xq.shape[1], xq.shape[2]
    if rows:  # (indexed writes do not convert to the cache's dtype)
        at = torch.arange(rows, device=xq.device)
        cache_k[at, :, seg.positions] = xk[:rows].to(cache_k.dtype)
        cache_v[at, :, seg.positions] = xv[:rows].to(cache_v.dtype)
    for (row, start, count), offset in zip(seg.chunks, seg.offsets):
        cache_k[row, :, start: start + count] = xk[offset: offset + count].transpose(0, 1)
        cache_v[row, :, start: start + count] = xv[offset: offset + count].transpose(0, 1)
    outs = []
    if rows:
        keys, values = cache_k[:rows, :, : seg.kv_len], cache_v[:rows, :, : seg.kv_len]
        q = xq[:rows, None]  # (rows, 1, n_heads, hd)
        if ranges is not None:
            outs.append(decode_kernel(q, keys, values, ranges, scale, n_rep)[:, 0])
        else:
            outs.append(masked(q, keys, values, mask, scale, n_rep)[:, 0])
    for (row, start, count), offset in zip(seg.chunks, seg.offsets):
        q = xq[None, offset: offset + count].transpose(1, 2)  # (1, n_heads, count, hd)
        end = start + count
        if start == 0:
            mask, causal = None, count > 1
        else:  # queries at slots start.. see every key up to their own
            mask = attention_mask(torch.arange(start, end, device=xq.device), end, None)
            causal = False
        out = F.scaled_dot_product_attention(q, _like(cache_k[row: row + 1, :, :end], q),
                                             _like(cache_v[row: row + 1, :, :end], q),
                                             attn_mask=mask,
                                             is_causal=causal, enable_gqa=n_rep > 1,
                                             scale=scale)
        outs.append(out[0].transpose(0, 1).reshape(count, n_heads * hd))
    return torch.cat(outs)


def _like(cached: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Cached keys or values in the queries' dtype for torch's attention (a copy only when the
    cache is kept in another dtype)."""
    return cached if cached.dtype == xq.dtype else cached.to(xq.dtype)
