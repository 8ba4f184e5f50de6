"""Every matrix product of the model, and the route each takes per device and weight format.

`linear(x, weight)` is F.linear with faster routes where measured (README, Performance); this is
the only module that knows about oneDNN or other kernels, so the model's math stays plain.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear, with faster paths for float32 on the CPU (measured on 2 cores; README):

    - one row (a decode step at batch 1, where reading the weight is the whole cost): the
      weight's rows are split into blocks, each a matrix-vector product of its own, run as
      one batched product so each thread streams its own contiguous slab of the weight.
      MKL's threaded matrix-vector product reads weights about 1.5x slower;
    - 2 to 256 rows: oneDNN's matrix product, about 1.5-2x MKL's (F.linear's) for the 4 to
      16 rows of a batched decode step, and ~10% faster for a 128-token prefill. From about
      512 rows on, MKL is the faster again.

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
    elif rows <= FEW_ROWS and _ONEDNN and not torch.compiler.is_compiling():  # (not lowerable)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, n_in), weight, None, "none",
                                                 [], "")
    else:
        return F.linear(x, weight)
    return out.view(*x.shape[:-1], n_out)


def row_count(x: torch.Tensor) -> int:
    """The rows a product over x's last dimension has: its tokens, however batched."""
    return x.numel() // x.shape[-1]


# Up to this many rows a product is "small" (a decode step, a short prefill): oneDNN, and
# fused q/k/v and w1/w3 products. Above it MKL, and separate w1 and w3 products (FeedForward).
FEW_ROWS = 256
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _row_blocks(n_out: int) -> int:
    """How many row blocks to split a matrix-vector product into: one or two per thread
    (measured alike on 2 cores); 1 when neither divides the rows into blocks of >= 64."""
    threads = torch.get_num_threads()
    for blocks in (2 * threads, threads):
        if blocks > 1 and n_out % blocks == 0 and n_out // blocks >= 64:
            return blocks
    return 1


# Layers whose weights are used as one matrix: their products share the same input.
FUSED_WEIGHTS = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}


def packed_rows(weights: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
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


def pack_weights(state: Dict[str, torch.Tensor], n_layers: int, after_copy=None) -> None:
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


class FusedRows:
    """The weights of some column-parallel layers of a module (`names`) as one matrix of
    consecutive row blocks, so that one product serves them all.

    The layers keep their own Parameters, which are views of the matrix's rows: state_dict,
    hooks and in-place edits see them as usual, and no byte is stored twice. Whatever replaces
    a weight (`.half()`, `.to()`, `w.data = ...`, a new Parameter, `load_state_dict(assign=
    True)`, a deep copy) is noticed by the weights' addresses on the next call, and the matrix
    is laid out again from what the layers then hold."""

    def __init__(self, *names: str):
        self.names = names
        self.matrix: Optional[torch.Tensor] = None
        self.addresses: Tuple[int, ...] = ()

    def weight(self, owner: nn.Module) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.matrix is not None:  # laid out by eager calls
            return self.matrix
        params = [owner._modules[name]._parameters["weight"] for name in self.names]
        if tuple(p.data_ptr() for p in params) != self.addresses:
            self.matrix = _lay_out(params)
            self.addresses = tuple(p.data_ptr() for p in params)
        return self.matrix

    def __deepcopy__(self, memo):
        return FusedRows(*self.names)  # a copy's layers are laid out afresh on first use


def _lay_out(params: List[nn.Parameter]) -> torch.Tensor:
    """One matrix whose row blocks are `params`, each Parameter made a view of its rows (the
    same Parameter objects, so optimisers and hooks keep them). No copy when they already lie
    that way (pack_weights does that while loading)."""
    weights = [p.detach() for p in params]
    matrix = packed_rows(weights)
    if matrix is not None:
        return matrix
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as parameters are
        matrix = torch.cat(weights, dim=0)
        row = 0
        for param in params:
            rows = param.shape[0]
            param.data = matrix[row: row + rows]
            row += rows
    return matrix
