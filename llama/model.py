"""The Llama 2 transformer, model-parallel through fairscale's layers.

Names, signatures and per-rank shapes are those of Meta's `llama/model.py`, so a shard of
`consolidated.NN.pth` loads strictly and code written against the original runs unchanged:
`model.forward(tokens, start_pos)` keeps its keys and values in a cache the model owns
(`Attention.cache_k` / `cache_v`), allocated on first use. Generation passes a `KVCache` of its
own instead, sized to each call. For speed, the q/k/v and w1/w3 weights are used as one matrix
each (fused.FusedRows), and matrix products take the routes of linear.py.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from llama.args import ModelArgs, count_parameters, ffn_hidden_dim  # noqa: F401
from llama import attend, bf16, cpu_kernels
from llama.cache import (CAUSAL, KVCache, OwnCache, PackedTokens, RowRanges, Segments,
                         attention_mask, decode_mask, row_ranges)
from llama.fused import FusedRows, pack_weights, use_quantized
from llama.linear import FEW_ROWS, linear, row_count
from llama.parallel import (
    fairscale_layers_without_init,
    gather_over_ranks,
    keep_uninitialised,
    sum_over_ranks,
    world_size,
)
from llama.quantize import QuantizationError
from llama.rotary import (  # noqa: F401  (Meta's names, importable from here as in the original)
    apply_rotary,
    apply_rotary_emb,
    precompute_freqs_cis,
    reshape_for_broadcast,
)


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module would run forward hooks (its own or global ones): then the
    model calls it rather than taking a faster route around it, so the hooks fire."""
    if not (module._forward_hooks or module._forward_pre_hooks or _global_forward_hooks
            or _global_forward_pre_hooks):
        return False
    if not isinstance(module.weight, torch.Tensor):
        raise QuantizationError(
            "forward hooks on the projections of a quantized model are not supported (their "
            "weights are packed for the device's kernels, q/k/v and w1/w3 as one): hook the "
            "Attention, FeedForward or TransformerBlock modules instead")
    return True


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A hooked projection called as a module; a bfloat16 weight with float32 activations is
    widened for the call (fairscale's forward is F.linear, which needs one dtype)."""
    with bf16.widened_for(module, x):
        return module(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps), in one fused kernel
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 whatever the model dtype, as the reference does
        return self._norm(x.float()).type_as(x) * self.weight


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """The reference's helper: torch.repeat_interleave(x, dim=2, repeats=n_rep) for x of
    (bsz, seqlen, n_kv_heads, head_dim). (Attention here does not need it: it groups the
    query heads instead of repeating keys.)"""
    if n_rep == 1:
        return x
    bs, slen, n_kv_heads, head_dim = x.shape
    # (bsz, seqlen, n_kv_heads, n_rep, head_dim) -> (bsz, seqlen, n_kv_heads * n_rep, head_dim)
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(
        bs, slen, n_kv_heads * n_rep, head_dim)


class Attention(nn.Module):
    native_products = False  # float32 products of few rows: our kernel (use_native_kernels)

    def __init__(self, args: ModelArgs):
        super().__init__()
        world = world_size()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = self.n_kv_heads // world
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=keep_uninitialised)
        self.wk = ColumnParallelLinear(args.dim, self.n_kv_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=keep_uninitialised)
        self.wv = ColumnParallelLinear(args.dim, self.n_kv_heads * self.head_dim, bias=False,
                                       gather_output=False, init_method=keep_uninitialised)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False,
                                    input_is_parallel=True, init_method=keep_uninitialised)
        self._qkv = FusedRows("wq", "wk", "wv")
        # The reference's cache, for forward(tokens, start_pos): allocated on first use.
        self.own_cache = OwnCache(args.max_batch_size, args.max_seq_len)

    @property
    def wqkv(self) -> torch.Tensor:
        """wq, wk and wv as one matrix (their rows, in that order)."""
        return self._qkv.weight(self)

    # The reference's cache_k / cache_v, (max_batch_size, max_seq_len, n_local_kv_heads,
    # head_dim): views of the cache this module keeps for calls without a cache.
    @property
    def cache_k(self) -> torch.Tensor:
        return self._own_cache(1, 1)[0].transpose(1, 2)

    @cache_k.setter
    def cache_k(self, value: torch.Tensor) -> None:
        self.own_cache.tensors = (value.transpose(1, 2), self._own_cache(1, 1)[1])

    @property
    def cache_v(self) -> torch.Tensor:
        return self._own_cache(1, 1)[1].transpose(1, 2)

    @cache_v.setter
    def cache_v(self, value: torch.Tensor) -> None:
        self.own_cache.tensors = (self._own_cache(1, 1)[0], value.transpose(1, 2))

    def _own_cache(self, bsz: int, end_pos: int, dtype: Optional[torch.dtype] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        weight = self.wqkv  # a tensor, or a quantized weight (its device, activations' dtype)
        if dtype is None:  # cache_k / cache_v: as the last forward left it, else as it will
            own = self.own_cache.tensors  # (a CPU model's bfloat16 weights: float32 activations)
            dtype = (own[0].dtype if own is not None else torch.float32
                     if weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                     else weight.dtype)
        return self.own_cache.get(bsz, end_pos, self.n_local_kv_heads, self.head_dim,
                                  weight.device, dtype)

    def forward(self, x, start_pos, freqs_cis, mask, cache=None, packing=None,
                last_only=False):
        """x: (bsz, seqlen, dim), or (real tokens, dim) with `packing`; freqs_cis: see
        apply_rotary; mask: a boolean (True = attend) or additive mask over the keys, None
        for none, or CAUSAL. `cache`: this layer's (keys, values), each (bsz, n_local_kv_heads,
        cache length, head_dim); None for this module's own cache. With last_only, every
        token's keys and values go to the cache but only each row's last position is attended
        from: the output is (bsz, 1, dim)."""
        n_kv, n_rep, hd = self.n_local_kv_heads, self.n_rep, self.head_dim
        n_heads = n_kv * n_rep
        if _hooked(self.wq) or _hooked(self.wk) or _hooked(self.wv):
            xqkv = torch.cat([_call(self.wq, x), _call(self.wk, x), _call(self.wv, x)], dim=-1)
        else:
            # (..., (n_heads + 2 * n_kv) * hd)
            xqkv = linear(x, self.wqkv, self.native_products)
        if packing is not None:
            xqkv = packing.unpack(xqkv)  # zeros in the padding slots
        mixed = isinstance(mask, Segments)
        if mixed:  # (tokens, ...): one row of tokens at their own places
            xqkv = xqkv[None]
        bsz, seqlen, _ = xqkv.shape
        # q and k are adjacent columns: rotate them in one go.
        xqk = xqkv[..., : (n_heads + n_kv) * hd].view(bsz, seqlen, n_heads + n_kv, hd)
        xqk = apply_rotary(xqk, freqs_cis)
        xq, xk = xqk[:, :, :n_heads], xqk[:, :, n_heads:]  # (bsz, seqlen, heads, hd)
        xv = xqkv[..., (n_heads + n_kv) * hd:].view(bsz, seqlen, n_kv, hd)
        scale = 1.0 / math.sqrt(hd)
        if mixed:
            out = attend.segments(xq[0], xk[0], xv[0], cache[0], cache[1], mask, scale, n_rep)
            return self._output(out)

        static = isinstance(start_pos, torch.Tensor)
        if cache is None:
            cache = self._own_cache(bsz, 1 if static else start_pos + seqlen, x.dtype)
        cache_k, cache_v = cache[0][:bsz], cache[1][:bsz]
        if static:
            # The tensor-position step (Transformer.forward): one slot per row written at a
            # position held on the device, the whole cache read under a mask.
            if start_pos.numel() == 1:  # the same slot in every row
                cache_k[:, :, start_pos] = xk.transpose(1, 2)  # compiled as an in-place write
                cache_v[:, :, start_pos] = xv.transpose(1, 2)
            else:  # each row its own slot: (bsz, n_kv, hd) written at (row, :, start_pos[row])
                rows = torch.arange(bsz, device=start_pos.device)
                cache_k[rows, :, start_pos] = xk[:, 0]
                cache_v[rows, :, start_pos] = xv[:, 0]
            keys, values = cache_k, cache_v
        else:
            end_pos = start_pos + seqlen
            cache_k[:, :, start_pos:end_pos] = xk.transpose(1, 2)
            cache_v[:, :, start_pos:end_pos] = xv.transpose(1, 2)
            keys = cache_k[:, :, :end_pos]  # (bsz, n_kv, end_pos, hd), a view
            values = cache_v[:, :, :end_pos]

        if isinstance(mask, RowRanges):  # a CPU decode step: our kernel, each row's own slots
            out = attend.decode_kernel(xq, keys, values, mask, scale, n_rep)
        elif isinstance(mask, str):  # CAUSAL: a prefill from slot 0
            pads = packing.pads if packing is not None else None
            out = attend.causal_prefill(xq, keys, values, pads, last_only, scale, n_rep)
        else:
            out = attend.masked(xq, keys, values, mask, scale, n_rep, last_only)
            if packing is not None and not last_only:
                out = packing.pack(out)
        return self._output(out)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        if _hooked(self.wo):
            return _call(self.wo, out)
        # RowParallelLinear
        return sum_over_ranks(linear(out, self.wo.weight, self.native_products))


class FeedForward(nn.Module):
    native_products = False  # as Attention's

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int,
                 ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = ffn_hidden_dim(dim, hidden_dim, multiple_of, ffn_dim_multiplier)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=keep_uninitialised)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True,
                                    init_method=keep_uninitialised)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=keep_uninitialised)
        self._w13 = FusedRows("w1", "w3")

    @property
    def w13(self) -> torch.Tensor:
        """w1 and w3 as one matrix (their rows, in that order)."""
        return self._w13.weight(self)

    def forward(self, x):
        if _hooked(self.w1) or _hooked(self.w3):
            hidden = F.silu(_call(self.w1, x)) * _call(self.w3, x)
        elif row_count(x) <= FEW_ROWS or self._w13.packed is not None:
            # (.., hidden / mp) each
            gate, up = linear(x, self.w13, self.native_products).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:  # a long prefill: two products give contiguous halves, updated in place
            # (measured ~4% faster prefill on S and M than the fused product's strided halves)
            hidden = F.silu(linear(x, self.w1.weight), inplace=True)
            hidden.mul_(linear(x, self.w3.weight))
        if _hooked(self.w2):
            return _call(self.w2, hidden)
        return sum_over_ranks(linear(hidden, self.w2.weight, self.native_products))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(args)
        self.feed_forward = FeedForward(dim=args.dim, hidden_dim=4 * args.dim,
                                        multiple_of=args.multiple_of,
                                        ffn_dim_multiplier=args.ffn_dim_multiplier)
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, freqs_cis, mask, cache=None, packing=None,
                last_only=False):
        """The reference's (x, start_pos, freqs_cis, mask), and Attention's other arguments.
        With last_only, only each row's last position comes out: (bsz, 1, dim)."""
        attended = self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, cache,
                                  packing, last_only)
        if last_only:
            x = packing.last_rows(x) if packing is not None else x[:, -1:]
        h = x + attended
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    native_products = False  # as Attention's

    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (from the tokenizer) before "
                             "building the model")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        with fairscale_layers_without_init():
            self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim,
                                                    init_method=keep_uninitialised)
            self.layers = nn.ModuleList(
                TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
            self.norm = RMSNorm(params.dim, eps=params.norm_eps)
            self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False,
                                               init_method=keep_uninitialised)
        # Decode steps on the CPU in float32 take our attention kernel (llama/cpu_attention.cpp,
        # 1.4-1.7x torch's there) rather than torch's: set by cpu_kernels.use_native_kernels,
        # for quantized models and the server (which also set the modules' native_products).
        self.native_attention = False
        # Twice max_seq_len as in the reference; a plain attribute, not a checkpoint tensor.
        with torch.device("cpu"):  # also when the model is built on the meta device
            self.freqs_cis = precompute_freqs_cis(params.head_dim, params.max_seq_len * 2,
                                                  params.rope_theta)

    @classmethod
    def from_state_dict(cls, params: ModelArgs, state: dict, after_copy=None) -> "Transformer":
        """The model holding a state dict's tensors themselves (this rank's, on their device
        and in their dtype), with no second copy of the weights. The state dict is rearranged
        in place (see linear.pack_weights, which also explains `after_copy`)."""
        # Fused q/k/v and w1/w3 laid out now, layer by layer, so the model copies nothing.
        pack_weights(state, params.n_layers, after_copy)
        with torch.device("meta"):
            model = cls(params)
        quantized = {name: state.pop(name) for name in list(state)
                     if not isinstance(state[name], torch.Tensor)}
        is_quantized = bool(quantized)
        if is_quantized:
            use_quantized(model, quantized, state["norm.weight"], after_copy)  # (empties it)
        # Strict: every tensor of the model must come from the state dict.
        model.load_state_dict(state, strict=True, assign=True)
        if is_quantized:  # their products load the native kernels anyway
            cpu_kernels.use_native_kernels(model)
        model.freqs_cis = model.freqs_cis.to(state["norm.weight"].device)
        return model

    def new_cache(self, bsz: int, length: int) -> KVCache:
        attention = self.layers[0].attention
        weight = self.norm.weight  # the activations' dtype (matrices may be bfloat16: bf16.py)
        return KVCache(self.n_layers, bsz, attention.n_local_kv_heads, length,
                       attention.head_dim, weight.device, weight.dtype)

    def free_cache(self) -> None:
        """Release the cache forward(tokens, start_pos) keeps (allocated again when needed)."""
        for layer in self.layers:
            layer.attention.own_cache.tensors = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, cache: Optional[KVCache] = None,
                pads: Optional[torch.Tensor] = None, last_logits_only: bool = False):
        """Logits (float32) for `tokens` (bsz, seqlen) placed at cache slots
        start_pos..start_pos+seqlen-1: (bsz, seqlen, vocab), or (bsz, 1, vocab) with
        last_logits_only.

        As in the reference, without `cache` the model's own cache is used, so consecutive
        calls continue one sequence: forward(tokens, 0) scores a whole text, and
        forward(tokens[:, s:e], s) feeds it in chunks. Generation passes a KVCache of its own
        instead. `pads` (bsz,) holds each row's count of left-padding slots (None: no
        padding).

        `start_pos` may also be an integer tensor, for one token per row (seqlen 1): one
        position for every row, or one per row (rows then continue sequences of different
        lengths, as a server's batch does). Attention then reads the whole of `cache` under a
        mask rather than a prefix of it, so every shape stays the same from step to step: the
        form to compile and capture once as a CUDA graph. The logits are the same."""
        bsz, seqlen = tokens.shape
        static = isinstance(start_pos, torch.Tensor)
        if static:
            if seqlen != 1 or cache is None or start_pos.numel() not in (1, bsz):
                raise ValueError("a tensor start_pos takes one token per row, a KVCache, and "
                                 "one position for all rows or one per row")
            slots = start_pos.view(-1, 1)  # (1 or bsz, 1): the slot each row writes
        else:
            if start_pos + seqlen > self.freqs_cis.shape[0]:
                raise ValueError(
                    f"positions up to {start_pos + seqlen} need rotary angles beyond the "
                    f"{self.freqs_cis.shape[0]} (2 x max_seq_len) computed: build with a "
                    f"larger max_seq_len")
            slots = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)[None]
        h = self._embed(tokens)
        # rotary positions count from each row's first real slot
        positions = slots if pads is None else (slots - pads[:, None]).clamp(min=0)
        freqs_cis = self.freqs_cis[positions].expand(bsz, -1, -1)  # (bsz, seqlen, hd // 2)
        # No mask for one query that sees every slot. A prefill from slot 0 is plain causal
        # attention (row by row over the real slots when padded). A CPU decode step may take
        # our attention kernel instead, given each row's range of slots (native_attention).
        if seqlen == 1 and self._kernel_attention(h):
            mask = row_ranges(slots[:, 0], bsz, pads)
        elif static:
            mask = decode_mask(slots[:, 0], cache.length, pads)
        elif start_pos == 0 and seqlen > 1:
            mask = CAUSAL
        elif pads is not None or seqlen > 1:
            mask = attention_mask(slots[0], start_pos + seqlen, pads)
        else:
            mask = None

        # A left-padded prefill computes only the real tokens' rows in every per-token step
        # (projections, feed-forward, norms); attention sees them back in their slots.
        packing = PackedTokens(slots[0], pads) if pads is not None and seqlen > 1 else None
        if packing is not None:
            h = packing.pack(h)
        # When only the last position's logits are wanted, the last layer needs every token's
        # keys and values but nothing else of the positions before it: its attention output,
        # wo and feed-forward run for the last position alone (1/n_layers of a prefill saved).
        last_layer_only_last = last_logits_only and seqlen > 1
        for layer_id, layer in enumerate(self.layers):
            last_only = last_layer_only_last and layer_id == self.n_layers - 1
            layer_cache = (cache.k[layer_id], cache.v[layer_id]) if cache is not None else None
            h = layer(h, start_pos, freqs_cis, mask, layer_cache, packing, last_only)
        if packing is not None and not last_layer_only_last:
            h = packing.unpack(h)
        if last_logits_only:
            h = h[:, -1:]
        return self._logits(h)

    @torch.inference_mode()
    def forward_segments(self, tokens: torch.Tensor, segments: Segments,
                         cache: KVCache) -> torch.Tensor:
        """A mixed step of a server's batch (see Segments): tokens (segments.tokens,) are a
        token for each decode row, then the chunks' prompt tokens. Returns float32 logits
        (segments.rows + len(segments.chunks), vocab): each decode row's, then each chunk's
        last token's. Every product runs once over all the step's tokens."""
        h = self._embed(tokens)  # (tokens, dim)
        freqs_cis = self.freqs_cis[segments.slots][None]  # (1, tokens, hd // 2)
        if segments.rows:
            positions = segments.positions
            if self._kernel_attention(h):
                segments.ranges = row_ranges(positions, segments.rows, None)
            else:
                segments.mask = decode_mask(positions, segments.kv_len, None)
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, 0, freqs_cis, segments, (cache.k[layer_id], cache.v[layer_id]))
        return self._logits(h.index_select(0, segments.last))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.freqs_cis.device != tokens.device:  # the model was moved (.to(), .cuda())
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        # a bfloat16 embedding of a float32 model (bf16.py): its rows widened, exactly
        dtype = self.norm.weight.dtype
        if _hooked(self.tok_embeddings):
            h = self.tok_embeddings(tokens)
            return h if h.dtype == dtype else h.to(dtype)
        # ParallelEmbedding: each rank holds a slice of the embedding dimension
        rows = F.embedding(tokens, self.tok_embeddings.weight)
        return gather_over_ranks(rows if rows.dtype == dtype else rows.to(dtype))

    def _kernel_attention(self, h: torch.Tensor) -> bool:
        """Whether one-query rows take our attention kernel (opted in, CPU, float32)."""
        return self.native_attention and h.device.type == "cpu" and h.dtype == torch.float32

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the output product, float32."""
        h = self.norm(h)
        if _hooked(self.output):
            return _call(self.output, h).float()
        # ColumnParallelLinear with gather_output: each rank's vocabulary slice, gathered
        return gather_over_ranks(linear(h, self.output.weight, self.native_products)).float()


__all__: List[str] = ["ModelArgs", "RMSNorm", "precompute_freqs_cis", "reshape_for_broadcast",
                      "apply_rotary_emb", "repeat_kv", "Attention", "FeedForward",
                      "TransformerBlock", "Transformer", "KVCache", "apply_rotary",
                      "attention_mask", "count_parameters"]
