"""Every matrix product of the model, and the route each takes per device and weight format.

`linear(x, weight)` is F.linear with faster routes where measured (README, Performance); this is
the only module that knows about oneDNN or other kernels, so the model's math stays plain.
"""

import torch
import torch.nn.functional as F


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
