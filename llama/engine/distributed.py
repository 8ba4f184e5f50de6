"""Process group, model-parallel group and device choice: the one place that decides them."""

import atexit
import contextlib
import io
import os
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from llama.engine.validation import ArgumentValueError, check_device, check_dtype


def choose_device(device: Optional[str] = None) -> torch.device:
    """The requested device, else this process's GPU when CUDA is available, else the CPU."""
    if device is not None:
        chosen = check_device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ArgumentValueError(
                "device", f"device {str(device)!r} was asked for, but CUDA is not available here "
                          f"(no GPU, or a CPU-only build of torch): use 'cpu', or leave device "
                          f"unset to use a GPU when there is one")
    elif torch.cuda.is_available():
        chosen = torch.device("cuda")
    else:
        chosen = torch.device("cpu")
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return chosen


def choose_dtype(device: torch.device, dtype=None) -> torch.dtype:
    """The activations' dtype: half precision on GPUs (bfloat16 where supported, the
    checkpoints' own type), float32 on the CPU (where bfloat16 weights are kept as they are
    unless a dtype is asked for: llama/layers/bf16.py), unless asked otherwise."""
    if dtype is not None:
        return check_dtype(dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def init_process_groups(device: torch.device, model_parallel_size: Optional[int] = None,
                        announce: bool = True) -> Tuple[int, int]:
    """Join (or create) the process group and fairscale's model-parallel group.

    Under torchrun the environment names the rendezvous; as a plain `python` process we form a
    group of one. fairscale's "> initializing ..." lines go to stderr, or nowhere unless
    `announce`. Returns (model-parallel rank, model-parallel size)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # a plain python process: a group of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # Scripts written for the original end without destroying the group; exiting with
        # gloo's threads alive can abort the process ("terminate called without an active
        # exception"). Leave the group at exit unless the script did (shutdown()).
        atexit.register(_leave_group_at_exit)
    world_size = dist.get_world_size()
    if not fs_init.model_parallel_is_initialized():
        if model_parallel_size is None:
            model_parallel_size = world_size
        if model_parallel_size != world_size:
            raise ArgumentValueError(
                "model_parallel_size",
                f"model_parallel_size={model_parallel_size} but {world_size} processes were "
                f"started: run one process per model-parallel rank (torchrun "
                f"--nproc_per_node {model_parallel_size}), or leave model_parallel_size unset")
        # fairscale announces its groups with print(); keep stdout for the generations.
        with contextlib.redirect_stdout(sys.stderr if announce else io.StringIO()):
            fs_init.initialize_model_parallel(model_parallel_size)
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


def _leave_group_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj, src: int = 0):
    """Send a picklable value from rank `src` to every rank (e.g. a line typed on rank 0)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shutdown() -> None:
    """Leave the process group cleanly at the end of a script: every rank waits for the others,
    then the group is destroyed (exiting with live gloo threads can abort the process)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
