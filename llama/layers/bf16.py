"""bfloat16 weights with float32 activations on the CPU: the default for checkpoints stored in
bfloat16 (Meta's are), so a model holds half the bytes of float32 and computes the same
function. float32 represents every bfloat16 value exactly; the weights are widened inside the
products (llama/kernels/cpu_dense.cpp), and activations, norms, softmax and the KV cache stay
float32.

Products take the native kernel where it is vectorised (AVX-512, AVX2): it streams each weight
once for all the rows of a decode step, and widens each tile of weight rows once for all the
rows of a prefill; a row's result is the same bit for bit whatever the other rows. Elsewhere
(no compiler, a plain C++ build) the weight is widened a block of rows at a time into float32
for torch's float32 product: the same function, slower. (oneDNN's bfloat16 GEMM, 2-3x faster
for prefills, rounds the activations to bfloat16, so it is not used: docs/MEMORY_AND_BF16.md.)
An explicit float32 or bfloat16 dtype keeps its old meaning: float32 weights, or bfloat16
weights and activations alike.
"""

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.kernels import cpu_kernels

# Weight rows widened to float32 at a time where the kernel is not used: no float32 copy of a
# whole matrix is ever made.
WIDEN_ROWS = 1024


def stores_bf16(device: torch.device, requested_dtype) -> bool:
    """Whether a model loaded onto `device` keeps bfloat16 weights as bfloat16 (with float32
    activations): on the CPU unless a dtype was asked for. GPUs compute in half precision
    already (distributed.choose_dtype)."""
    return torch.device(device).type == "cpu" and requested_dtype is None


def keeps_bf16(name: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor stays bfloat16 in a model of bfloat16 storage: the matrices
    (embedding, projections, output). Norms are cast to the activations' float32 (their
    dtype is the model's activation dtype: Transformer.new_cache)."""
    return (tensor.dtype == torch.bfloat16 and tensor.dim() == 2
            and name.endswith(".weight") and not name.endswith("norm.weight"))


def keeping_bf16(device, convert: Optional[Callable] = None) -> Callable:
    """A `convert(name, tensor)` for checkpoint.rank_state_dict / HFCheckpoint.rank_state_dict
    that keeps keeps_bf16's tensors as bfloat16 on `device` (an owned, contiguous copy: the
    file's pages are then dropped as for any copied tensor), after `convert` (quantizing
    ones) had its turn; everything else it returns as given, cast to the model's dtype by
    the loader."""
    def keep(name: str, tensor: torch.Tensor):
        if convert is not None:
            kept = convert(name, tensor)
            if kept is not tensor:
                return kept
        if not keeps_bf16(name, tensor):
            return tensor
        return tensor.to(device).clone(memory_format=torch.contiguous_format)

    return keep


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a bfloat16 `weight` (out, in) and float32 `x` (..., in), in float32:
    the weight widened (exactly) inside the product. CPU: the native kernel where it is
    vectorised, else widened blocks of rows for the float32 GEMM. Other devices: F.linear
    with the weight widened."""
    n_out, n_in = weight.shape
    if x.device.type != "cpu":
        return F.linear(x, weight.to(x.dtype))
    x2 = x.reshape(-1, n_in)  # (rows, in)
    if x2.shape[0] > 0 and weight.is_contiguous() and cpu_kernels.fast_float():
        out = cpu_kernels.bf16_mm(x2.contiguous(), weight)
    else:
        out = widened_product(x2, weight)
    return out.view(*x.shape[:-1], n_out)


def widened_product(x2: torch.Tensor, weight: torch.Tensor,
                    block_rows: int = WIDEN_ROWS) -> torch.Tensor:
    """x2 (rows, in) float32 @ weight.T, widening `block_rows` weight rows at a time to float32
    for torch's float32 product (oneDNN or MKL): each block is used while it is in cache."""
    n_out = weight.shape[0]
    out = x2.new_empty(x2.shape[0], n_out)
    for start in range(0, n_out, block_rows):
        end = min(start + block_rows, n_out)
        out[:, start:end] = F.linear(x2, weight[start:end].to(torch.float32))
    return out


class Bf16Weight:
    """A bfloat16 weight computing with float32 activations, as the quantized weights of
    llama/layers/linear.py do (PackedInt8, PackedInt4): `product(x)` is x @ weight.T in float32;
    `dtype` is the activations' (float32), `weight` the bfloat16 tensor itself."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32):
        if weight.dtype != torch.bfloat16 or weight.dim() != 2:
            raise ValueError(f"Bf16Weight holds a 2-D bfloat16 matrix, got a {weight.dim()}-D "
                             f"{str(weight.dtype).replace('torch.', '')} tensor")
        self.weight = weight.contiguous()
        self.dtype = dtype

    @property
    def shape(self):
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        out = product(x if x.dtype == self.dtype else x.to(self.dtype), self.weight)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def is_mixed(x: torch.Tensor, weight) -> bool:
    """Whether a product of `x` with `weight` is a bfloat16 weight's with wider activations."""
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
            and x.dtype == torch.float32)


@contextlib.contextmanager
def widened_for(module: nn.Module, x: torch.Tensor):
    """While calling a hooked projection module (whose own forward is F.linear, which needs
    one dtype) with float32 activations: its bfloat16 weight is presented widened to float32,
    then put back. Forward hooks run as usual; the call copies the weight (hooks only)."""
    weight = module._parameters.get("weight")
    if weight is None or not is_mixed(x, weight):
        yield
        return
    module._parameters["weight"] = nn.Parameter(weight.detach().to(x.dtype),
                                                requires_grad=False)
    try:
        yield
    finally:
        module._parameters["weight"] = weight
