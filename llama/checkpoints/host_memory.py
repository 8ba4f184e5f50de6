"""Memory handed back to the OS while loading: the resident pages of memory-mapped checkpoint
tensors once they have been copied, and the heap's free pages after a tensor's temporaries.
Both keep a load's peak near what the model keeps (README, Performance)."""

import ctypes
import functools
import mmap
import sys

import torch


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped checkpoint tensor from this process (they
    are clean file pages; touching them again would re-read the file). Keeps peak memory near
    the converted weights' size instead of converted + original. Only for tensors of
    load_shard's memory maps: on ordinary memory this would zero the data. Linux only; a
    no-op elsewhere or if the kernel refuses."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start, end = tensor.data_ptr(), tensor.data_ptr() + span * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the range
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps freed memory in its heap, and
    the temporaries of converting one tensor (quantizing it, a block of rows at a time) leave
    holes between the weights being kept, which count in the process's memory: trimmed after
    each tensor, peak memory stays near what is kept. glibc only; a no-op elsewhere."""
    if sys.platform.startswith("linux") and hasattr(_libc(), "malloc_trim"):
        _libc().malloc_trim(0)


_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
