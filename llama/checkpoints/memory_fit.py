"""Whether a model will fit, decided before any weight is read: what the build will hold (its
weights in the chosen format, the KV cache at max_batch_size x max_seq_len, working memory)
against what this process may use (the host's MemAvailable and the cgroup's limit, whichever
is lower; a GPU's free memory for each rank on a GPU). A build that would not fit is refused
with one line naming the need, what is available and the settings that would fit, instead of
being killed by the kernel midway through loading.

`LLAMA_MEMORY_LIMIT` (bytes, or e.g. "8GiB", "7.5G", "8000MB") caps what a process may use, for
tests and for sharing a machine; it never raises what the machine has.
"""

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from llama.args import ModelArgs, ffn_hidden_dim
from llama.checkpoints import memory
from llama.errors import ArgumentValueError
from llama.layers.cache import KVCache
from llama.quantize.formats import DEFAULT_GROUP_SIZE

GIB = 1024 ** 3
LIMIT_VARIABLE = "LLAMA_MEMORY_LIMIT"
# What a process holds beyond the weights and the cache, whatever the model: a block of
# weight rows widened or dequantized for a prefill's product, a tensor being converted while
# loading, torch's allocator slack.
BASE_WORKING = GIB // 4
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2,
          "mib": 1024 ** 2, "g": GIB, "gb": 1000 ** 3, "gib": GIB, "t": 1024 ** 4,
          "tb": 1000 ** 4, "tib": 1024 ** 4}


class NotEnoughMemoryError(MemoryError):
    """The model would not fit in the memory this process may use (see the message)."""


@dataclass
class Need:
    """Bytes one rank will hold."""
    weights: int
    cache: int
    working: int
    weight_kind: str  # e.g. "bfloat16", "int8 (bfloat16 embedding and norms)"
    cache_kind: str = ""  # the cache's dtype, e.g. "float32"

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.working


def parse_size(text: str) -> int:
    """Bytes from "8GiB", "7.5G" (G, GiB: 2**30), "8000MB" (MB: 10**6) or a plain number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ArgumentValueError(
            LIMIT_VARIABLE, f"{LIMIT_VARIABLE}={text!r} is not a size: write bytes or a number "
                            f"with a unit, e.g. 8GiB, 7.5G or 8000MB")
    return int(float(match.group(1)) * _UNITS[unit])


def estimate(args: ModelArgs, world_size: int, mode: Optional[str], group_size: Optional[int],
             weight_dtype: torch.dtype, dtype: torch.dtype,
             cache_dtype: Optional[torch.dtype] = None,
             activations: Optional[str] = None) -> Need:
    """What one rank of `world_size` holds: the projections and output in `mode` ("int8",
    "int4" or None for `weight_dtype`), the embedding and norms in `weight_dtype`; the KV cache
    in `cache_dtype` (None: the activations' `dtype`) at max_batch_size x max_seq_len; working
    memory for the largest prefill (every row's tokens at once) and the base. `activations=
    "int8"` (quantized weights): what their layout adds, and the largest weight laid out anew
    at load beside its old layout (memory.int8_activations_extra)."""
    weights = memory.weight_bytes(args, mode, group_size or DEFAULT_GROUP_SIZE, world_size,
                                  weight_dtype)
    working = working_bytes(args, world_size, dtype, cache_dtype)
    if activations == "int8" and mode is not None:
        added, relaid = memory.int8_activations_extra(args, world_size, mode,
                                                      group_size or DEFAULT_GROUP_SIZE)
        weights, working = weights + added, max(working, relaid + BASE_WORKING)
    cache_dtype = cache_dtype or dtype
    cache = (KVCache.bytes_per_token(args, cache_dtype, world_size)
             * args.max_batch_size * args.max_seq_len)
    name = str(weight_dtype).replace("torch.", "")
    kind = name if mode is None else f"{mode} ({name} embedding and norms)"
    return Need(weights, cache, working, kind, str(cache_dtype).replace("torch.", ""))


def working_bytes(args: ModelArgs, world_size: int, dtype: torch.dtype,
                  cache_dtype: Optional[torch.dtype] = None) -> int:
    """Activations of a prefill of max_batch_size x max_seq_len tokens: a few residual-width
    tensors, the fused q/k/v and w1/w3 outputs, and one vocabulary row of logits per batch row,
    in `dtype`, plus BASE_WORKING; with a cache in another `cache_dtype`, a layer's keys and
    values widened for torch's attention too."""
    hidden = ffn_hidden_dim(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
    kv_heads = args.n_kv_heads or args.n_heads
    per_token = (4 * args.dim + (args.n_heads + 2 * kv_heads) * args.head_dim // world_size
                 + 3 * hidden // world_size)
    if cache_dtype not in (None, dtype):
        per_token += 2 * kv_heads * args.head_dim // world_size
    element = torch.empty((), dtype=dtype).element_size()
    tokens = args.max_batch_size * args.max_seq_len
    logits = 2 * args.max_batch_size * args.vocab_size * 4
    return tokens * per_token * element + logits + BASE_WORKING


def available(device: torch.device) -> Tuple[int, str]:
    """(bytes this process may still use on `device`, where that figure comes from)."""
    found: List[Tuple[int, str]] = []
    if torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        found.append((free, f"free on {device}"))
    else:
        host = mem_available()
        if host is not None:
            found.append((host, "MemAvailable"))
        group = cgroup_available()
        if group is not None:
            found.append((group, "the cgroup's limit"))
    limit = os.environ.get(LIMIT_VARIABLE)
    if limit:
        found.append((parse_size(limit), LIMIT_VARIABLE))
    if not found:
        return -1, "unknown"
    return min(found)


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    """The kernel's estimate of memory available for new allocations (Linux), None elsewhere."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_available(root: Path = Path("/sys/fs/cgroup"),
                     own: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """What this process's memory cgroup (v2, else v1) still allows: its limit less what it
    uses, page cache that can be dropped not counted as used; the lowest over the cgroup and
    its parents. None without a limit."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _id, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            found += _levels(root, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            found += _levels(root / "memory", path, "memory.limit_in_bytes",
                             "memory.usage_in_bytes", "total_inactive_file")
    return min(found) if found else None


def _levels(root: Path, path: str, limit_file: str, usage_file: str, cache_key: str
            ) -> List[int]:
    """limit - (usage - reclaimable cache) for each level from the process's cgroup up to the
    mount's root (inside a container the mount is the container's own cgroup, which the
    process's path may not name)."""
    out = []
    directory = root / path.lstrip("/")
    candidates = [directory, *directory.parents] if directory.is_dir() else [root]
    for level in candidates:
        if root not in (level, *level.parents):
            break
        try:
            limit_text = (level / limit_file).read_text().strip()
            usage = int((level / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # no limit at this level
            continue
        reclaimable = 0
        try:
            for line in (level / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    reclaimable = int(value)
        except (OSError, ValueError):
            pass
        out.append(max(0, int(limit_text) - max(0, usage - reclaimable)))
    return out


def check_fits(args: ModelArgs, world_size: int, mode: Optional[str],
               group_size: Optional[int], weight_dtype: torch.dtype, dtype: torch.dtype,
               device: torch.device, saved: bool = False,
               bf16_checkpoint: bool = False, reserved: int = 0,
               cache_dtype: Optional[torch.dtype] = None,
               activations: Optional[str] = None) -> Need:
    """The rank's Need, or NotEnoughMemoryError (one line) if it exceeds available(device):
    the need, what is available, and the settings that would fit with their sizes (int8 or
    int4 weights unless the checkpoint is `saved` quantized, with a bfloat16 KV cache or a
    smaller max_seq_len if they need it; bfloat16 weights when float32 was asked for a
    `bf16_checkpoint` on the CPU; a bfloat16 KV cache in place of a float32 one; a smaller
    max_seq_len or max_batch_size; more GPUs). `reserved` bytes, which the caller will
    allocate beside the model (a server's prefix cache), are taken from what is available.
    `activations`: see estimate."""
    need = estimate(args, world_size, mode, group_size, weight_dtype, dtype, cache_dtype,
                    activations)
    free, source = available(device)
    if free < 0:  # not known: nothing to decide
        return need
    # ranks on one host share its memory (each GPU has its own)
    sharing = 1 if torch.device(device).type == "cuda" else int(
        os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if sharing > 1:
        free, source = free // sharing, f"{source}, shared by {sharing} processes"
    if reserved > 0:  # each rank's own (a prefix cache per rank)
        free, source = max(0, free - reserved), (
            f"{source}, less {_gib(reserved)} reserved beside the model (reserve_memory: a "
            f"server's --prefix_cache)")
    if need.total <= free:
        return need
    options = []

    def fitting(label: str, **change) -> bool:
        other = estimate(**{**dict(args=args, world_size=world_size, mode=mode,
                                   group_size=group_size, weight_dtype=weight_dtype,
                                   dtype=dtype, cache_dtype=cache_dtype,
                                   activations=activations), **change})
        if other.total <= free:
            options.append(f"{label}: {_gib(other.total)}")
        return other.total <= free

    float32_cache = (cache_dtype or dtype) == torch.float32
    if not saved:
        for other_mode in ("int8", "int4"):
            embedding = torch.bfloat16 if bf16_checkpoint else weight_dtype
            other = dict(mode=other_mode, weight_dtype=embedding)
            if other_mode == mode or fitting(f"--quantize {other_mode}", **other):
                continue
            if float32_cache and fitting(  # quantized, the whole context in half the cache
                    f"--quantize {other_mode} --kv_cache_dtype bfloat16",
                    cache_dtype=torch.bfloat16, **other):
                continue
            seq = _largest_fitting(args, "max_seq_len", free, world_size, other_mode,
                                   group_size, embedding, dtype, cache_dtype, activations)
            if seq is not None:  # quantized and a shorter context
                fitting(f"--quantize {other_mode} --max_seq_len {seq}",
                        args=_replace(args, max_seq_len=seq), **other)
    if (bf16_checkpoint and torch.device(device).type == "cpu"
            and weight_dtype != torch.bfloat16 and mode is None):
        fitting("no --dtype (bfloat16 weights, float32 activations)",
                weight_dtype=torch.bfloat16, dtype=torch.float32)
    if float32_cache:
        fitting("--kv_cache_dtype bfloat16", cache_dtype=torch.bfloat16)
    for field in ("max_seq_len", "max_batch_size"):
        value = _largest_fitting(args, field, free, world_size, mode, group_size,
                                 weight_dtype, dtype, cache_dtype, activations)
        if value is not None:
            fitting(f"--{field} {value}", args=_replace(args, **{field: value}))
    if torch.device(device).type == "cuda":
        for world in (2, 4, 8):
            if world > world_size and args.n_heads % world == 0 and (
                    (args.n_kv_heads or args.n_heads) % world == 0):
                per_gpu = estimate(args, world, mode, group_size, weight_dtype, dtype,
                                   cache_dtype, activations).total
                if per_gpu <= free:
                    options.append(f"torchrun --nproc_per_node {world} (one GPU each): "
                                   f"{_gib(per_gpu)} per GPU")
                    break
    raise NotEnoughMemoryError(
        f"this model needs about {_gib(need.total)} on {_where(device, world_size)} (weights "
        f"{_gib(need.weights)} {need.weight_kind}, KV cache {_gib(need.cache)} {need.cache_kind} "
        f"for max_batch_size {args.max_batch_size} x max_seq_len {args.max_seq_len}, working "
        f"memory {_gib(need.working)}) but {_gib(free)} is available ({source}); "
        + ("settings that fit: " + "; ".join(options) if options else
           "no setting of this build fits: use a machine with more memory or a smaller model")
        + f" (nothing was loaded; {LIMIT_VARIABLE} caps the figure used)")


def _largest_fitting(args: ModelArgs, field: str, free: int, world_size: int, *rest
                     ) -> Optional[int]:
    """The largest value of `field` below its current one, a power of two for max_seq_len,
    with which the build fits; None if none does (the weights alone are too much)."""
    current = getattr(args, field)
    step = 1 if field == "max_batch_size" else None
    value = current - 1 if step else 1 << max(0, (current - 1).bit_length() - 1)
    while value >= (1 if step else 64):
        if estimate(_replace(args, **{field: value}), world_size, *rest).total <= free:
            return value
        value = value - 1 if step else value // 2
    return None


def _replace(args: ModelArgs, **change) -> ModelArgs:
    return dataclasses.replace(args, **change)


def _where(device, world_size: int) -> str:
    device = torch.device(device)
    place = "this process" if device.type == "cpu" else str(device)
    return place if world_size == 1 else f"{place} (each of {world_size} ranks)"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"
