"""fairscale's model parallelism as the model uses it: its layers built without their
initialisation, and its communication calls skipped on a single rank.

Column-parallel layers (wq, wk, wv, w1, w3, output) hold a slice of the output rows on each
rank; row-parallel ones (wo, w2) a slice of the input columns, their partial products summed
over the ranks; the embedding a slice of the embedding dimension.
"""

from contextlib import contextmanager

import torch
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn


def world_size() -> int:
    return fs_init.get_model_parallel_world_size()


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """RowParallelLinear's all-reduce of the partial products (fairscale's mapping). Skipped
    on a single rank, where it does nothing but costs an autograd Function call per layer."""
    if world_size() == 1:
        return x
    return reduce_from_model_parallel_region(x)


def gather_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """ColumnParallelLinear's gather of each rank's output slice (fairscale's mapping)."""
    if world_size() == 1:
        return x
    return gather_from_model_parallel_region(x)


def keep_uninitialised(weight: torch.Tensor) -> torch.Tensor:
    """The reference's init_method (`lambda x: x`): weights come from a checkpoint."""
    return weight


@contextmanager
def fairscale_layers_without_init():
    """fairscale builds and scatters a full-size master weight per layer when the model-parallel
    size is above 1, and creates its weights on the CPU whatever the default device; loading
    replaces every weight anyway. Inside this context its layers get empty weights on the
    default device (the meta device when loading), with no master weight. Parameters require
    gradients, as fairscale's (and so the reference's) do."""
    original_init, original_parameter = fs_layers._initialize_affine_weight, fs_layers.Parameter
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    fs_layers.Parameter = lambda tensor: nn.Parameter(torch.empty(tensor.shape))
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original_init
        fs_layers.Parameter = original_parameter
