"""Products of float weights on the CPU: torch's fastest route for each row count, and our
kernels (llama/kernels/cpu_dense.cpp) for the weights Transformer.use_native_kernels wraps.
Every route computes F.linear's function; only the order of the float32 additions differs
(measured: docs/PERFORMANCE.md). llama/layers/linear.py sends a float weight here.
"""

import torch
import torch.nn.functional as F

from llama.kernels import cpu_kernels


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous float32 tensor, copied only when it is not one already."""
    if x.dtype != torch.float32:
        return x.to(torch.float32, memory_format=torch.contiguous_format)
    return x if x.is_contiguous() else x.contiguous()


def float_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear with torch's faster routes for float32 on the CPU (measured on 2 cores:
    docs/PERFORMANCE.md):

    - one row (a decode step at batch 1, where reading the weight is the whole cost): the
      weight's rows are split into blocks, each a matrix-vector product of its own, run as
      one batched product so each thread streams its own contiguous slab of the weight
      (MKL's threaded matrix-vector product reads weights slower);
    - 2 to FEW_ROWS rows: oneDNN's matrix product, faster than MKL's (F.linear's) for the
      rows of a batched decode step and a short prefill. Longer products: MKL.

    Only the order of the float32 additions differs from F.linear."""
    rows = row_count(x)
    if x.device.type != "cpu" or x.dtype != torch.float32 or not weight.is_contiguous():
        return F.linear(x, weight)
    n_out, n_in = weight.shape
    if rows == 1:
        blocks = _row_blocks(n_out)
        if blocks == 1:
            return F.linear(x, weight)
        out = torch.bmm(x.reshape(1, 1, n_in).expand(blocks, 1, n_in),
                        weight.view(blocks, n_out // blocks, n_in).transpose(1, 2))
    elif rows <= FEW_ROWS and _ONEDNN:
        product = _onednn_op if torch.compiler.is_compiling() else _onednn
        out = product(x.reshape(rows, n_in), weight)
    else:
        return F.linear(x, weight)
    return out.view(*x.shape[:-1], n_out)


def native_route(weight: torch.Tensor, activations: torch.dtype = torch.float32):
    """What Transformer.use_native_kernels makes of a float matrix for its products under
    `activations` of that dtype: a float32 CPU matrix takes our kernel (FloatKernel), a
    bfloat16 one under bfloat16 activations too (Bf16Kernel); any other keeps its own route
    (a bfloat16 matrix under float32 activations: bf16.product, in linear())."""
    if weight.device.type != "cpu" or not weight.is_contiguous():
        return weight
    if weight.dtype == torch.float32:
        return FloatKernel(weight)
    if weight.dtype == torch.bfloat16 and activations == torch.bfloat16:
        return Bf16Kernel(weight)
    return weight


class FloatKernel:
    """A float32 CPU weight whose products of 1 to NATIVE_FLOAT_ROWS rows take our kernel
    (llama/kernels/cpu_dense.cpp: the weight read once for all the rows, each row's result
    independent of the others); other products take float_product. Chosen for a model's
    weights by Transformer.use_native_kernels."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (out, in) float32, contiguous
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        if 0 < rows <= NATIVE_FLOAT_ROWS and x.dtype == torch.float32:
            n_out, n_in = self.weight.shape
            out = cpu_kernels.float_mm(x.reshape(rows, n_in).contiguous(), self.weight)
            return out.view(*x.shape[:-1], n_out)
        return float_product(x, self.weight)


class Bf16Kernel:
    """A bfloat16 CPU weight under bfloat16 activations (dtype=bfloat16: Meta's GPU arithmetic)
    whose products of 1 to NATIVE_BF16_ROWS rows take our bfloat16-weight kernel
    (llama/kernels/cpu_dense.cpp) on the activations widened to float32: every product of two
    bfloat16 values is exact in float32, summed in float32 and rounded to bfloat16 once, as
    oneDNN's bfloat16 GEMM does, in another order. At 7B a decode step runs ~2x torch's
    speed; longer products (prefills) take oneDNN's GEMM (F.linear), ~2.3x the speed of our
    kernel on float32 activations (docs/MEMORY_AND_BF16.md). Chosen by
    Transformer.use_native_kernels."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (out, in) bfloat16, contiguous
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        if 0 < rows <= NATIVE_BF16_ROWS and x.dtype == torch.bfloat16:
            n_out, n_in = self.weight.shape
            wide = x.reshape(rows, n_in).to(torch.float32)
            out = cpu_kernels.bf16_mm(wide, self.weight).to(torch.bfloat16)
            return out.view(*x.shape[:-1], n_out)
        return F.linear(x, self.weight)


def row_count(x: torch.Tensor) -> int:
    """The rows a product over x's last dimension has: its tokens, however batched."""
    return x.numel() // x.shape[-1]


# Up to this many rows a product is "small" (a decode step, a short prefill): oneDNN, and
# fused q/k/v and w1/w3 products. Above it MKL, and separate w1 and w3 products (FeedForward).
FEW_ROWS = 256
# Up to this many rows FloatKernel takes our float32 kernel, and Bf16Kernel our bfloat16 one:
# about their crossovers with oneDNN's float32 and bfloat16 GEMMs since the kernels hold
# their activation vectors in registers (docs/PERFORMANCE.md, "Loads folded into the
# products"; benchmarks/bf16_products.py).
NATIVE_FLOAT_ROWS = 24
NATIVE_BF16_ROWS = 12
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


# The same product as an operator torch.compile keeps as a call of its own: it cannot trace
# mkldnn's op, and without this a compiled step fell back to F.linear (MKL), much slower at
# 2-16 rows. Eager calls skip the wrapper (its dispatch has a cost of its own).
if _ONEDNN:
    @torch.library.custom_op("llama::onednn_linear", mutates_args=())
    def _onednn_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _onednn(x, weight)

    @_onednn_op.register_fake
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])


def _row_blocks(n_out: int) -> int:
    """How many row blocks to split a matrix-vector product into: one or two per thread
    (measured alike); 1 when neither divides the rows into blocks of >= 64."""
    threads = _threads()
    for blocks in (2 * threads, threads):
        if blocks > 1 and n_out % blocks == 0 and n_out // blocks >= 64:
            return blocks
    return 1


def _threads() -> int:
    # A constant to torch.compile (engine/compiled.py marks it so before compiling; marking
    # it here imported torch._dynamo, ~1.2 s, into every `import llama`):
    # torch.get_num_threads() returns no tensor, so tracing it broke the compiled decode
    # step's graph at every product, and the layer loop's frame then ran eagerly. A compiled
    # step keeps the thread count it was traced with.
    return torch.get_num_threads()
