"""The Llama 2 transformer, model-parallel through fairscale's layers.

Parameter names and per-rank shapes are exactly those of Meta's `consolidated.NN.pth` shards,
so a shard loads strictly. For speed the q/k/v and w1/w3 weights are fused into one matrix
each after loading (`Transformer.fuse_projections`); the modules keep views into the fused
matrix, so `state_dict()` still has Meta's names and no byte is stored twice.

The KV cache is not part of the model: generation allocates a `KVCache` sized to each call.
Prompts of different lengths are left-padded: `pads[i]` cache slots at the start of row i hold
padding that no real token attends to, and rotary positions start after them.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from torch import nn

from llama.linear import FEW_ROWS, linear, row_count


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1 in Meta's params.json: taken from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                     "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for rotary "
                f"embeddings")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # The reference's rule: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """RowParallelLinear's all-reduce of the partial products (fairscale's mapping). Skipped
    on a single rank, where it does nothing but costs an autograd Function call per layer."""
    if fs_init.get_model_parallel_world_size() == 1:
        return x
    return reduce_from_model_parallel_region(x)


def _gather_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """ColumnParallelLinear's gather of each rank's output slice (fairscale's mapping)."""
    if fs_init.get_model_parallel_world_size() == 1:
        return x
    return gather_from_model_parallel_region(x)


def _keep_uninitialised(weight: torch.Tensor) -> torch.Tensor:
    return weight  # every weight is loaded from a checkpoint


@contextmanager
def _without_fairscale_init():
    """fairscale builds and scatters a full-size master weight per layer when the model-parallel
    size is above 1, and creates its weights on the CPU whatever the default device; loading
    replaces every weight anyway. Inside this context its layers get empty weights on the
    default device (the meta device when loading), with no master weight."""
    original_init, original_parameter = fs_layers._initialize_affine_weight, fs_layers.Parameter
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    fs_layers.Parameter = lambda tensor: nn.Parameter(torch.empty(tensor.shape),
                                                      requires_grad=False)
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original_init
        fs_layers.Parameter = original_parameter


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32 whatever the model dtype, as the reference
        # does, in one fused kernel.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # (end, dim // 2) complex64


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x0, x1), (x2, x3), ... of every head by its position's angle,
    as complex multiplication in float32 (the reference's arithmetic).
    x: (bsz, seqlen, n_heads, head_dim); freqs_cis: (bsz, seqlen, head_dim // 2)."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(x_ * freqs_cis.unsqueeze(2)).flatten(3)
    return out.type_as(x)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """The reference's two-tensor form of apply_rotary."""
    return apply_rotary(xq, freqs_cis), apply_rotary(xk, freqs_cis)


class KVCache:
    """Keys and values of every layer for one generation call: per layer, a tensor of
    (bsz, n_local_kv_heads, length, head_dim). Attention reads a prefix of the length axis in
    place, so no copy is made per step.

    One tensor per layer rather than one for all: a compiled step writes a token's keys into
    each in place, whereas writes into slices of one shared tensor are compiled into copies of
    the whole cache every step (measured on an H100, 7B at batch 8: a 23 ms step instead of
    ~8 ms; README).
    """

    def __init__(self, n_layers: int, bsz: int, n_kv_heads: int, length: int, head_dim: int,
                 device, dtype):
        shape = (bsz, n_kv_heads, length, head_dim)
        with torch.inference_mode(False):  # ordinary tensors, which a compiled step can take
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

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
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype, model_parallel_size: int = 1) -> int:
        """Cache bytes one token costs on one rank (keys and values of every layer)."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * args.n_layers * (args.n_kv_heads // model_parallel_size) * args.head_dim * element


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = args.n_kv_heads // world
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=_keep_uninitialised)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=_keep_uninitialised)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=_keep_uninitialised)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False,
                                    input_is_parallel=True, init_method=_keep_uninitialised)
        self.wqkv: Optional[torch.Tensor] = None  # set by fuse(): rows of wq, wk, wv

    def fuse(self):
        self.wqkv = _fuse_rows(self.wq, self.wk, self.wv)

    def forward(self, x, freqs_cis, cache_k, cache_v, start_pos: int, mask, packing=None,
                last_only=False):
        # x: (bsz, seqlen, dim), or (real tokens, dim) with `packing`;
        # cache_k/v: (bsz, n_kv, cache_len, head_dim). With last_only, every token's keys and
        # values go to the cache but only each row's last position is attended from: the
        # output is (bsz, 1, dim).
        n_kv, n_rep, hd = self.n_local_kv_heads, self.n_rep, self.head_dim
        n_heads = n_kv * n_rep
        xqkv = linear(x, self.wqkv)  # (bsz, seqlen, (n_heads + 2 * n_kv) * hd)
        if packing is not None:
            xqkv = packing.unpack(xqkv)  # zeros in the padding slots
        bsz, seqlen, _ = xqkv.shape
        # q and k are adjacent columns: rotate them in one go.
        xqk = xqkv[..., : (n_heads + n_kv) * hd].view(bsz, seqlen, n_heads + n_kv, hd)
        xqk = apply_rotary(xqk, freqs_cis)
        xq, xk = xqk[:, :, :n_heads], xqk[:, :, n_heads:]  # (bsz, seqlen, heads, hd)
        xv = xqkv[..., (n_heads + n_kv) * hd:].view(bsz, seqlen, n_kv, hd)

        if isinstance(start_pos, torch.Tensor):
            # The static-shape step (Transformer.forward): one slot written at a position held
            # on the device, the whole cache read; the mask hides the slots not yet written.
            cache_k[:, :, start_pos] = xk.transpose(1, 2)  # compiled as an in-place write
            cache_v[:, :, start_pos] = xv.transpose(1, 2)
            keys, values = cache_k, cache_v
        else:
            end_pos = start_pos + seqlen
            cache_k[:, :, start_pos:end_pos] = xk.transpose(1, 2)
            cache_v[:, :, start_pos:end_pos] = xv.transpose(1, 2)
            keys = cache_k[:, :, :end_pos]  # (bsz, n_kv, end_pos, hd), a view
            values = cache_v[:, :, :end_pos]

        scale = 1.0 / math.sqrt(hd)
        if mask is None and seqlen > 1:  # a prefill from slot 0 (see Transformer.forward)
            out = self._causal_prefill(xq, keys, values, packing, last_only, scale)
        else:
            if last_only:
                xq, mask = xq[:, -1:], mask[:, :, -1:]
            q_len = xq.shape[1]
            # Grouped-query attention without repeating keys: the n_rep query heads that
            # share a kv head are stacked along the query axis. Head h uses kv head
            # h // n_rep, as the reference's repeat_kv does.
            xq = xq.view(bsz, q_len, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4)
            xq = xq.reshape(bsz, n_kv, n_rep * q_len, hd)  # (bsz, n_kv, n_rep * q_len, hd)
            if mask is not None and n_rep > 1:
                mask = mask.repeat(1, 1, n_rep, 1)  # (bsz, 1, n_rep * q_len, end_pos)
            out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, scale=scale)
            out = out.view(bsz, n_kv, n_rep, q_len, hd).permute(0, 3, 1, 2, 4)
            out = out.reshape(bsz, q_len, n_heads * hd)  # (bsz, q_len, n_local_heads * hd)
            if packing is not None and not last_only:
                out = packing.pack(out)
        return _sum_over_ranks(linear(out, self.wo.weight))  # RowParallelLinear

    def _causal_prefill(self, xq, keys, values, packing, last_only, scale):
        """Attention of a prefill from slot 0, as plain causal attention: the kernel skips the
        blocks above the diagonal (half the work on long prompts). A left-padded batch goes
        row by row over each row's real slots, so padding is neither computed nor attended.
        xq: (bsz, seqlen, heads, hd). Returns (bsz, 1, heads * hd) with last_only, else one
        row per token as x came in: (bsz, seqlen, heads * hd), or packed (real tokens, ...)."""
        if packing is None:
            parts = [(slice(None), 0)]
        else:
            parts = [(slice(row, row + 1), pad) for row, pad in enumerate(packing.pads)]
        outs = []
        for rows, pad in parts:
            q = xq[rows, -1:] if last_only else xq[rows, pad:]
            # is_causal sets the first query against the first key: right here, where the
            # queries sit in the keys' own slots. A lone last query sees every key. Head h
            # uses kv head h // n_rep, as the reference's repeat_kv does.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[rows, :, pad:],
                                                 values[rows, :, pad:],
                                                 is_causal=q.shape[1] > 1,
                                                 enable_gqa=self.n_rep > 1, scale=scale)
            outs.append(out.transpose(1, 2).flatten(2))  # (rows, queries, heads * hd)
        if packing is None or last_only:
            return torch.cat(outs)
        return torch.cat([out[0] for out in outs])  # the packed order: row by row


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden_dim = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=_keep_uninitialised)
        self.w2 = RowParallelLinear(hidden_dim, args.dim, bias=False, input_is_parallel=True,
                                    init_method=_keep_uninitialised)
        self.w3 = ColumnParallelLinear(args.dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=_keep_uninitialised)
        self.w13: Optional[torch.Tensor] = None  # set by fuse(): rows of w1 then w3

    def fuse(self):
        self.w13 = _fuse_rows(self.w1, self.w3)

    def forward(self, x):
        if row_count(x) <= FEW_ROWS:
            gate, up = linear(x, self.w13).chunk(2, dim=-1)  # each (bsz, seqlen, hidden / mp)
            hidden = F.silu(gate) * up
        else:  # a long prefill: two products give contiguous halves, updated in place
            # (measured ~4% faster prefill on S and M than the fused product's strided halves)
            hidden = F.silu(linear(x, self.w1.weight), inplace=True)
            hidden.mul_(linear(x, self.w3.weight))
        return _sum_over_ranks(linear(hidden, self.w2.weight))


FUSED_WEIGHTS = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}


def _packed(weights: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """The one matrix the weights are consecutive row blocks of, if they already lie that way
    in memory (each contiguous, one right after another); None otherwise."""
    first, rows = weights[0], sum(w.shape[0] for w in weights)
    cols = first.shape[1]
    address = first.data_ptr()
    for w in weights:
        if (w.dtype != first.dtype or w.device != first.device or w.shape[1] != cols
                or not w.is_contiguous() or w.data_ptr() != address):
            return None
        address += w.numel() * w.element_size()
    return first.as_strided((rows, cols), (cols, 1))


def pack_weights(state: dict, n_layers: int, after_copy=None) -> None:
    """Lay each layer's wq/wk/wv and w1/w3 out as consecutive row blocks of one matrix, in
    place, one group at a time (so loading needs no second copy of the weights). Entries stay
    views under Meta's names. `after_copy(tensor)` is called on each original once it has
    been copied."""
    for layer in range(n_layers):
        for module, names in FUSED_WEIGHTS.items():
            keys = [f"layers.{layer}.{module}.{name}.weight" for name in names]
            originals = [state.pop(key) for key in keys]
            pieces = torch.cat(originals, dim=0).split([w.shape[0] for w in originals], dim=0)
            state.update(zip(keys, pieces))
            for original in originals if after_copy else ():
                after_copy(original)


def _fuse_rows(*modules: nn.Module) -> torch.Tensor:
    """One matrix holding the weights of column-parallel layers, each layer's weight a view of
    its rows, so one matrix product serves all of them. No copy when the weights already lie
    that way (pack_weights)."""
    weights = [module.weight.detach() for module in modules]
    packed = _packed(weights)
    if packed is not None:
        return packed
    fused = torch.cat(weights, dim=0)
    row = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = nn.Parameter(fused[row: row + rows], requires_grad=False)
        row += rows
    return fused


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, cache_k, cache_v, start_pos: int, mask, packing=None,
                last_only=False):
        """With last_only, only each row's last position comes out: (bsz, 1, dim)."""
        attended = self.attention(self.attention_norm(x), freqs_cis, cache_k, cache_v,
                                  start_pos, mask, packing, last_only)
        if last_only:
            x = packing.last_rows(x) if packing is not None else x[:, -1:]
        h = x + attended
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (from the tokenizer) before "
                             "building the model")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        with _without_fairscale_init():
            self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim,
                                                    init_method=_keep_uninitialised)
            self.layers = nn.ModuleList(
                TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
            self.norm = RMSNorm(params.dim, eps=params.norm_eps)
            self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False,
                                               init_method=_keep_uninitialised)
        # Twice max_seq_len as in the reference; a plain attribute, not a checkpoint tensor.
        with torch.device("cpu"):  # also when the model is built on the meta device
            self.freqs_cis = precompute_freqs_cis(params.head_dim, params.max_seq_len * 2,
                                                  params.rope_theta)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.fuse_projections())

    @classmethod
    def from_state_dict(cls, params: ModelArgs, state: dict, after_copy=None) -> "Transformer":
        """The model holding a state dict's tensors themselves (this rank's, on their device
        and in their dtype), with no second copy of the weights. The state dict is rearranged
        in place (see pack_weights, which also explains `after_copy`)."""
        # Fused q/k/v and w1/w3 laid out now, layer by layer, so the model copies nothing.
        pack_weights(state, params.n_layers, after_copy)
        with torch.device("meta"):
            model = cls(params)
        # Strict: every tensor of the model must come from the state dict.
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def fuse_projections(self):
        """Build the fused q/k/v and w1/w3 matrices; call again after replacing weights."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        self.freqs_cis = self.freqs_cis.to(self.output.weight.device)

    def new_cache(self, bsz: int, length: int) -> KVCache:
        attention = self.layers[0].attention
        weight = self.output.weight
        return KVCache(self.n_layers, bsz, attention.n_local_kv_heads, length,
                       attention.head_dim, weight.device, weight.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, cache: KVCache,
                pads: Optional[torch.Tensor] = None, last_logits_only: bool = False):
        """Logits (float32) for `tokens` (bsz, seqlen) placed at cache slots
        start_pos..start_pos+seqlen-1. `pads` (bsz,) holds each row's count of left-padding
        slots (None: no padding). With last_logits_only, returns (bsz, 1, vocab).

        `start_pos` may also be a 1-element integer tensor, for one token per row (seqlen 1):
        then attention reads the whole cache under a mask rather than its first start_pos + 1
        slots, so every shape stays the same from step to step. That is the form to compile
        and capture once as a CUDA graph; the logits are the same."""
        bsz, seqlen = tokens.shape
        # ParallelEmbedding: each rank holds a slice of the embedding dimension
        h = _gather_over_ranks(F.embedding(tokens, self.tok_embeddings.weight))
        static = isinstance(start_pos, torch.Tensor)
        if static:
            if seqlen != 1:
                raise ValueError("a tensor start_pos takes one token per row")
            slots, kv_len = start_pos, cache.length
        else:
            slots = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
            kv_len = start_pos + seqlen
        if pads is None:
            freqs_cis = self.freqs_cis[slots].expand(bsz, -1, -1)
        else:
            positions = (slots[None, :] - pads[:, None]).clamp(min=0)  # (bsz, seqlen)
            freqs_cis = self.freqs_cis[positions]  # (bsz, seqlen, head_dim // 2)
        # No mask for one query that sees every slot, nor for a prefill from slot 0: Attention
        # then applies plain causal attention (row by row over the real slots when padded).
        from_slot_0 = not static and start_pos == 0
        needs_mask = static or (pads is not None if seqlen == 1 else not from_slot_0)
        mask = attention_mask(slots, kv_len, pads) if needs_mask else None

        # A left-padded prefill computes only the real tokens' rows in every per-token step
        # (projections, feed-forward, norms); attention sees them back in their slots.
        packing = PackedTokens(slots, pads) if pads is not None and seqlen > 1 else None
        if packing is not None:
            h = packing.pack(h)
        # When only the last position's logits are wanted, the last layer needs every token's
        # keys and values but nothing else of the positions before it: its attention output,
        # wo and feed-forward run for the last position alone (1/n_layers of a prefill saved).
        last_layer_only_last = last_logits_only and seqlen > 1
        for layer_id, layer in enumerate(self.layers):
            last_only = last_layer_only_last and layer_id == self.n_layers - 1
            h = layer(h, freqs_cis, cache.k[layer_id][:bsz], cache.v[layer_id][:bsz],
                      start_pos, mask, packing, last_only)
        if packing is not None and not last_layer_only_last:
            h = packing.unpack(h)
        if last_logits_only:
            h = h[:, -1:]
        # ColumnParallelLinear with gather_output: each rank's vocabulary slice, gathered
        return _gather_over_ranks(linear(self.norm(h), self.output.weight)).float()


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


def count_parameters(params: ModelArgs) -> int:
    """Parameters of the full (unsharded) model, without building it."""
    hd, dim = params.head_dim, params.dim
    attention = dim * params.n_heads * hd * 2 + dim * params.n_kv_heads * hd * 2
    ffn = 3 * dim * params.ffn_hidden_dim
    per_layer = attention + ffn + 2 * dim
    return params.n_layers * per_layer + 2 * params.vocab_size * dim + dim


__all__: List[str] = ["ModelArgs", "Transformer", "KVCache", "RMSNorm", "precompute_freqs_cis",
                      "apply_rotary", "apply_rotary_emb", "attention_mask", "count_parameters"]
