"""Tensors that already lie one after another in memory, used as one tensor without a copy:
the fused q/k/v and w1/w3 weights (llama/layers/fused.py) and the fields of quantized weights joined
by rows (llama/quantize/formats.py)."""

from typing import Optional, Sequence

import torch


def consecutive_rows(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensors' rows as one tensor viewing their memory, if they lie that way already:
    each contiguous, of one dtype, device and row shape, one right after another in one
    storage. None otherwise (the caller copies)."""
    first = tensors[0]
    storage, address = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device
                or t.shape[1:] != first.shape[1:] or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or t.data_ptr() != address):
            return None
        address += t.numel() * t.element_size()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    strides, step = [], 1
    for size in reversed(shape):  # row-major strides (a one-row tensor's own may be any)
        strides.insert(0, step)
        step *= size
    return first.as_strided(shape, strides)
