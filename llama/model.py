"""The Llama 2 transformer, model-parallel through fairscale's layers.

Names, signatures and per-rank shapes are those of Meta's `llama/model.py`, so a shard of
`consolidated.NN.pth` loads strictly and code written against the original runs unchanged:
`model.forward(tokens, start_pos)` keeps its keys and values in a cache the model owns
(`Attention.cache_k` / `cache_v`), allocated on first use. Generation passes a `KVCache` of its
own instead, sized to each call. For speed, the q/k/v and w1/w3 weights are used as one matrix
each (fused.FusedRows), and matrix products take the routes of linear.py.
"""

import functools
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

from llama.args import ModelArgs, count_parameters, ffn_hidden_dim  # noqa: F401
from llama.kernels import cpu_kernels
from llama.layers import plan as plans
from llama.layers.cache import KVCache, OwnCache, Segments, attention_mask
from llama.layers.float_linear import FEW_ROWS, native_route, row_count
from llama.layers.fused import Projection, hooked, pack_weights, projections, repack, use_quantized
from llama.layers.linear import linear
from llama.layers.parallel import (
    fairscale_layers_without_init,
    gather_over_ranks,
    keep_uninitialised,
    sum_over_ranks,
    world_size,
)
from llama.layers.rotary import (  # noqa: F401  (Meta's names, importable from here as in the original)
    apply_rotary,
    apply_rotary_emb,
    precompute_freqs_cis,
    reshape_for_broadcast,
)
from llama.layers.w8a8 import check_activations_route


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
        self._qkv = Projection("wq", "wk", "wv")
        self._wo = Projection("wo", reduce=sum_over_ranks)  # RowParallelLinear's sum
        # The reference's cache, for forward(tokens, start_pos): allocated on first use.
        self.own_cache = OwnCache(args.max_batch_size, args.max_seq_len)
        # the dtype keys and values are kept in (None: the activations'): set_kv_cache_dtype
        self.cache_dtype: Optional[torch.dtype] = None

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
            dtype = (own[0].dtype if own is not None else self.cache_dtype or (
                torch.float32 if weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                else weight.dtype))
        return self.own_cache.get(bsz, end_pos, self.n_local_kv_heads, self.head_dim,
                                  weight.device, dtype)

    def forward(self, x, start_pos, freqs_cis, mask, cache=None, plan=None):
        """Meta's (x, start_pos, freqs_cis, mask): x (bsz, seqlen, dim) at cache slots
        start_pos.., under `mask` (None for none). The model passes a step plan instead
        (llama/layers/plan.py), which decides the cache writes and attention, and `cache`: this
        layer's (keys, values), each (rows, n_local_kv_heads, slots, head_dim); None for this
        module's own cache."""
        if plan is None:
            plan = plans.for_layer_call(start_pos, x.shape[1], mask, x.device)
        n_kv, n_rep, hd = self.n_local_kv_heads, self.n_rep, self.head_dim
        n_heads = n_kv * n_rep
        xqkv = plan.rows(self._qkv(self, x))  # (bsz, seqlen, (n_heads + 2 * n_kv) * hd)
        bsz, seqlen, _ = xqkv.shape
        # q and k are adjacent columns: rotate them in one go.
        xqk = xqkv[..., : (n_heads + n_kv) * hd].view(bsz, seqlen, n_heads + n_kv, hd)
        xqk = apply_rotary(xqk, freqs_cis)
        xq, xk = xqk[:, :, :n_heads], xqk[:, :, n_heads:]  # (bsz, seqlen, heads, hd)
        xv = xqkv[..., (n_heads + n_kv) * hd:].view(bsz, seqlen, n_kv, hd)
        keys, values = (cache if cache is not None
                        else self._own_cache(bsz, plan.end, self.cache_dtype or x.dtype))
        out = plan.attend(xq, xk, xv, keys, values, 1.0 / math.sqrt(hd), n_rep)
        return self._wo(self, out)


class FeedForward(nn.Module):
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
        self._w13 = Projection("w1", "w3")
        self._w2 = Projection("w2", reduce=sum_over_ranks)  # RowParallelLinear's sum

    @property
    def w13(self) -> torch.Tensor:
        """w1 and w3 as one matrix (their rows, in that order)."""
        return self._w13.weight(self)

    def forward(self, x):
        if row_count(x) > FEW_ROWS and self._w13.packed is None and not self._w13.hooked(self):
            # a long prefill: two products give contiguous halves, updated in place (faster
            # than the fused product's strided halves: docs/PERFORMANCE.md)
            hidden = F.silu(linear(x, self.w1.weight), inplace=True)
            hidden.mul_(linear(x, self.w3.weight))
        else:
            gate, up = self._w13(self, x).chunk(2, dim=-1)  # (.., hidden / mp) each
            hidden = F.silu(gate) * up
        return self._w2(self, hidden)


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

    def forward(self, x, start_pos, freqs_cis, mask, cache=None, plan=None):
        """The reference's (x, start_pos, freqs_cis, mask), or the model's step plan and this
        layer's cache (see Attention). A plan with last_only gives each row's last position
        only: (bsz, 1, dim)."""
        if plan is None:
            plan = plans.for_layer_call(start_pos, x.shape[1], mask, x.device)
        attended = self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, cache,
                                  plan)
        h = plan.residual(x) + attended
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
        with fairscale_layers_without_init():
            self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim,
                                                    init_method=keep_uninitialised)
            self.layers = nn.ModuleList(
                TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
            self.norm = RMSNorm(params.dim, eps=params.norm_eps)
            self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False,
                                               init_method=keep_uninitialised)
        # ColumnParallelLinear with gather_output: each rank's vocabulary slice, gathered
        self._output = Projection("output", reduce=gather_over_ranks)
        # Decode steps on the CPU in float32 take our attention kernel
        # (llama/kernels/cpu_attention.cpp)
        # rather than torch's: chosen by use_native_kernels.
        self.native_attention = False
        # Twice max_seq_len as in the reference; a plain attribute, not a checkpoint tensor.
        with torch.device("cpu"):  # also when the model is built on the meta device
            self.freqs_cis = precompute_freqs_cis(params.head_dim, params.max_seq_len * 2,
                                                  params.rope_theta,
                                                  scaling=params.rope_scaling)

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
        weight = model.norm.weight
        if is_quantized or (weight.device.type == "cpu" and weight.dtype == torch.bfloat16):
            # their products load the native kernels anyway; a bfloat16 one's decode steps
            # run ~2x faster through them (float_linear.Bf16Kernel)
            model.use_native_kernels()
        model.freqs_cis = model.freqs_cis.to(weight.device)
        return model

    def use_native_kernels(self) -> bool:
        """Take our kernels where they pay, on the CPU: float weights' products of few rows
        (float_linear.FloatKernel under float32 activations, Bf16Kernel under bfloat16 ones;
        vector builds) and, in float32, decode steps' attention (AVX-512 and AVX2 builds).
        Builds them on first use (~15-60 s, once per machine). Returns whether the model takes
        either. The server, quantized CPU models and bfloat16 ones (dtype=bfloat16) call this;
        a float32 model built otherwise keeps torch's routes, so a first run never waits for a
        compiler."""
        weight = self.norm.weight  # the activations' dtype
        cpu = weight.device.type == "cpu"
        self.native_attention = cpu and weight.dtype == torch.float32 and \
            cpu_kernels.fast_attention()
        products = cpu and weight.dtype in (torch.float32, torch.bfloat16) and \
            cpu_kernels.fast_float()
        route = None
        if products:  # (float32 activations: native_route itself, its default)
            route = native_route if weight.dtype == torch.float32 else \
                functools.partial(native_route, activations=torch.bfloat16)
        for _, _, projection in projections(self):
            projection.set_route(route)
        return self.native_attention or products

    def use_int8_activations(self) -> None:
        """Multiply the int8 or int4 weights with activations rounded to int8 in blocks of 32
        columns (llama/layers/w8a8.py: faster prefills on AVX-512 VNNI CPUs, a coarser rounding
        than the default's int16 rows). CPU models with quantized weights only
        (ArgumentValueError otherwise); every product from now on, prefills and decode steps
        alike. Calling it again changes nothing."""
        # each packed weight knows its format and its form with int8 activations
        formats = {p.packed.quantize for _, _, p in projections(self) if p.packed is not None}
        check_activations_route(", ".join(sorted(formats)) or None, self.norm.weight.device)
        repack(self, lambda packed: packed.with_int8_activations())

    def new_cache(self, bsz: int, length: int) -> KVCache:
        attention = self.layers[0].attention
        weight = self.norm.weight  # the activations' dtype (matrices may be bfloat16: bf16.py)
        return KVCache(self.n_layers, bsz, attention.n_local_kv_heads, length,
                       attention.head_dim, weight.device, self.kv_cache_dtype or weight.dtype)

    @property
    def kv_cache_dtype(self) -> Optional[torch.dtype]:
        """The dtype keys and values are kept in; None: the activations' (see
        set_kv_cache_dtype)."""
        return self.layers[0].attention.cache_dtype

    def set_kv_cache_dtype(self, dtype: Optional[torch.dtype]) -> None:
        """Keep keys and values in `dtype` (None: the activations' dtype, as the reference
        does): bfloat16 under a CPU model's float32 activations halves the cache, and the
        decode steps that read it, at the cost of rounding each key and value once, as it is
        written. Every query then attends to the rounded values, in float32, so a prefill and
        decode steps, with or without a prefix cache, still agree. For caches made from now
        on (new_cache, and the module's own at its next call)."""
        for layer in self.layers:
            layer.attention.cache_dtype = dtype

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
        plan = plans.for_tokens(bsz, seqlen, start_pos, cache, pads, self.freqs_cis.shape[0],
                                self._kernel_attention(tokens.device), tokens.device)
        return self.run(tokens, plan, cache, last_logits_only)

    @torch.inference_mode()
    def forward_segments(self, tokens: torch.Tensor, segments: Segments,
                         cache: KVCache) -> torch.Tensor:
        """A mixed step of a server's batch (see Segments): tokens (segments.tokens,) are a
        token for each decode row, then the chunks' prompt tokens. Returns float32 logits
        (segments.rows + len(segments.chunks), vocab): each decode row's, then each chunk's
        last token's. Every product runs once over all the step's tokens."""
        plan = plans.mixed(segments, self._kernel_attention(tokens.device))
        return self.run(tokens, plan, cache, rows=segments.last)

    def run(self, tokens: torch.Tensor, plan: plans.StepPlan, cache: Optional[KVCache],
            last_logits_only: bool = False, rows: Optional[torch.Tensor] = None):
        """The layers over `tokens` as `plan` says (llama/layers/plan.py): float32 logits for every
        position, each row's last (last_logits_only), or the flat positions `rows` of a
        mixed step."""
        h = plan.pack(self._embed(tokens))
        freqs_cis = self.freqs_cis[plan.positions]  # (bsz or 1, seqlen, hd // 2)
        if rows is None:
            freqs_cis = freqs_cis.expand(tokens.shape[0], -1, -1)
        last_plan = plan.last_layer(last_logits_only and tokens.shape[-1] > 1)
        for layer_id, layer in enumerate(self.layers):
            layer_plan = last_plan if layer_id == self.n_layers - 1 else plan
            layer_cache = (cache.k[layer_id], cache.v[layer_id]) if cache is not None else None
            h = layer(h, None, freqs_cis, None, layer_cache, layer_plan)
        if rows is not None:
            return self._logits(h.index_select(0, rows))
        return self._logits(last_plan.logits_rows(h, last_logits_only))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.freqs_cis.device != tokens.device:  # the model was moved (.to(), .cuda())
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        # a bfloat16 embedding of a float32 model (bf16.py): its rows widened, exactly
        dtype = self.norm.weight.dtype
        if hooked(self.tok_embeddings):
            h = self.tok_embeddings(tokens)
            return h if h.dtype == dtype else h.to(dtype)
        # ParallelEmbedding: each rank holds a slice of the embedding dimension
        rows = F.embedding(tokens, self.tok_embeddings.weight)
        return gather_over_ranks(rows if rows.dtype == dtype else rows.to(dtype))

    def _kernel_attention(self, device: torch.device) -> bool:
        """Whether one-query rows take our attention kernel (CPU, float32 activations): opted
        in (use_native_kernels), or over a bfloat16 cache, which torch's attention would need
        widened every step (a plain C++ build of ours is then 7x faster at 4 rows:
        docs/MEMORY_AND_BF16.md)."""
        if device.type != "cpu" or self.norm.weight.dtype != torch.float32:
            return False
        return self.native_attention or (self.kv_cache_dtype == torch.bfloat16
                                         and cpu_kernels.available())

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the output product, float32."""
        return self._output(self, self.norm(h)).float()


__all__: List[str] = ["ModelArgs", "RMSNorm", "precompute_freqs_cis", "reshape_for_broadcast",
                      "apply_rotary_emb", "repeat_kv", "Attention", "FeedForward",
                      "TransformerBlock", "Transformer", "KVCache", "apply_rotary",
                      "attention_mask", "count_parameters"]
