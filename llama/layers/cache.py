"""Where tokens sit in the KV cache: the cache itself, the masks over its slots, and the packing
of a left-padded batch's real tokens.

Prompts of different lengths are left-padded: `pads[i]` cache slots at the start of row i hold
padding that no real token attends to, and rotary positions start after them.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch


class KVCache:
    """Keys and values of every layer for one generation call: per layer, a tensor of
    (bsz, n_local_kv_heads, length, head_dim). Attention reads a prefix of the length axis in
    place, so no copy is made per step.

    One tensor per layer rather than one for all: a compiled step writes a token's keys into
    each in place, whereas writes into slices of one shared tensor are compiled into copies of
    the whole cache every step (measured on an H100: docs/PERFORMANCE.md).
    """

    def __init__(self, n_layers: int, bsz: int, n_kv_heads: int, length: int, head_dim: int,
                 device, dtype):
        shape = (bsz, n_kv_heads, length, head_dim)
        with torch.inference_mode(False):  # ordinary tensors, which a compiled step can take
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def view(self, rows: slice = slice(None), length: Optional[int] = None) -> "KVCache":
        """The same tensors' `rows` and first `length` slots (views: writes go through)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[rows, :, :length] for t in self.k]
        view.v = [t[rows, :, :length] for t in self.v]
        return view

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def mark_static(self) -> None:
        """Tell torch.compile the tensors keep their addresses (a CUDA graph writes them)."""
        for tensor in self.k + self.v:
            torch._dynamo.mark_static_address(tensor)

    @staticmethod
    def bytes_per_token(args, dtype: torch.dtype, model_parallel_size: int = 1) -> int:
        """Cache bytes one token costs on one rank (keys and values of every layer)."""
        element = torch.empty((), dtype=dtype).element_size()
        kv_heads = args.n_kv_heads // model_parallel_size
        return 2 * args.n_layers * kv_heads * args.head_dim * element




class OwnCache:
    """The cache an Attention module keeps for the reference's forward(tokens, start_pos):
    keys and values as in KVCache, at least max_batch_size x max_seq_len, allocated on first
    use, grown (keeping their contents) when a call needs more rows or slots, and following
    the model to another device or dtype, as the reference's does."""

    def __init__(self, rows: int, length: int):
        self.rows, self.length = rows, length
        self.tensors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def get(self, bsz: int, end_pos: int, n_kv_heads: int, head_dim: int, device, dtype
            ) -> Tuple[torch.Tensor, torch.Tensor]:
        own = self.tensors
        if own is None or own[0].shape[0] < bsz or own[0].shape[2] < end_pos:
            rows = max(bsz, self.rows, own[0].shape[0] if own else 0)
            length = max(end_pos, self.length, own[0].shape[2] if own else 0)
            shape = (rows, n_kv_heads, length, head_dim)
            with torch.inference_mode(False):
                grown = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
            if own is not None:
                for new, old in zip(grown, own):
                    new[: old.shape[0], :, : old.shape[2]] = old
            own = self.tensors = grown
        if own[0].device != device or own[0].dtype != dtype:
            own = self.tensors = tuple(t.to(device, dtype) for t in own)
        return own


class PackedTokens:
    """Moves a left-padded batch between its padded form (bsz, seqlen, d) and its real tokens
    only (n_real, d), so per-token work skips the padding slots."""

    def __init__(self, slots: torch.Tensor, pads: torch.Tensor):
        real = slots[None, :] >= pads[:, None]  # (bsz, seqlen)
        self.shape = real.shape
        self.index = real.flatten().nonzero().squeeze(1)  # flat slots of the real tokens
        self.pads = pads.tolist()  # each row's padding slots, on the host
        # Each row's last slot is real (left-padding): its place among the packed tokens.
        self.last_index = real.sum(dim=1).cumsum(dim=0) - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(bsz, seqlen, d) -> (n_real, d)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def last_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n_real, d) -> (bsz, 1, d): each row's last token"""
        return x.index_select(0, self.last_index)[:, None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(n_real, d) -> (bsz, seqlen, d), zeros in the padding slots"""
        out = x.new_zeros(self.shape.numel(), x.shape[-1])
        return out.index_copy_(0, self.index, x).view(*self.shape, x.shape[-1])


class RowRanges(NamedTuple):
    """A decode step's mask as each row's attended slots, starts[i] .. ends[i] - 1 (int64 (bsz,)
    tensors): what the native CPU attention kernel takes (llama/kernels/cpu_attention.cpp)."""
    starts: torch.Tensor
    ends: torch.Tensor


class Segments:
    """Where the tokens of a mixed step go (a server's batch: prompts prefilled in chunks that
    ride with the decode rows, so the weights are read once for both). In the flat order of
    the step's tokens:

    - one token for each of cache rows 0 .. rows - 1, written at slot positions[i] (a device
      tensor) and attending the row's slots 0 .. positions[i]. Rows without a decoding
      sequence among them (free, or still prefilling) compute a token nobody reads, written
      where nothing is kept: slot 0 of a free row, or the slot the row's next chunk writes over;
    - then each chunk (row, start, count): `count` prompt tokens of cache row `row`, written
      at slots start .., each attending the row's slots 0 .. its own.

    Every row starts at slot 0 (no left padding), so a token's rotary position is its slot.
    `kv_len`: the slots the decode rows read (their largest position + 1)."""

    def __init__(self, positions: torch.Tensor, chunks: List[Tuple[int, int, int]],
                 kv_len: int):
        self.positions, self.chunks, self.kv_len = positions, chunks, kv_len
        self.rows = positions.numel()
        self.offsets, offset = [], self.rows
        for _, _, count in chunks:
            self.offsets.append(offset)
            offset += count
        self.tokens = offset
        device = positions.device
        self.slots = torch.cat([positions] + [torch.arange(start, start + count, device=device)
                                              for _, start, count in chunks])
        # rows of the step's output that have logits: every decode row, each chunk's last token
        self.last = torch.tensor(list(range(self.rows)) + [offset + count - 1 for offset, (
            _, _, count) in zip(self.offsets, chunks)], device=device)


def row_ranges(positions: torch.Tensor, bsz: int, starts: Optional[torch.Tensor]) -> RowRanges:
    """The RowRanges of one query per row written at slot positions[i] (one position for all
    rows, or one per row), attending from starts[i] (0 when None) to it, as decode_mask."""
    ends = (positions + 1).expand(bsz).contiguous()
    return RowRanges(starts.contiguous() if starts is not None else torch.zeros_like(ends), ends)


def decode_mask(positions: torch.Tensor, kv_len: int, starts: Optional[torch.Tensor]):
    """Boolean mask (True = attend), (bsz or 1, 1, 1, kv_len), for one query per row written
    at slot positions[i] of its row: the slots from starts[i] (0 when None) to it."""
    keys = torch.arange(kv_len, device=positions.device)
    allowed = keys[None, :] <= positions[:, None]  # (bsz or 1, kv_len)
    if starts is not None:
        allowed = allowed & (keys[None, :] >= starts[:, None])
    return allowed[:, None, None, :]


def attention_mask(slots: torch.Tensor, kv_len: int, pads: Optional[torch.Tensor]):
    """Boolean mask (True = attend), (bsz or 1, 1, len(slots), kv_len). A padding slot attends
    to itself only, so its (unused) hidden state stays finite and cannot poison real rows with
    NaN."""
    keys = torch.arange(kv_len, device=slots.device)
    allowed = keys[None, :] <= slots[:, None]  # causal: (seqlen, kv_len)
    if pads is None:
        return allowed[None, None]
    real_key = keys[None, None, :] >= pads[:, None, None]  # (bsz, 1, kv_len)
    itself = keys[None, :] == slots[:, None]  # (seqlen, kv_len)
    return ((allowed[None] & real_key) | itself[None])[:, None]
