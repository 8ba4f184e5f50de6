"""Meta's checkpoint layout, and reading it safely onto any number of model-parallel ranks.

A checkpoint directory holds `params.json` and `consolidated.NN.pth`, one shard per
model-parallel rank it was saved with. Each tensor is split across shards along the dimension
fairscale splits it (`split_dim`), or replicated. A run on W processes may use a checkpoint of
N shards for any W that divides the heads: each rank memory-maps the shards and copies out only
its own slice of every tensor.

A quantized checkpoint (`python -m llama.quantize`) has the same layout: params.json gains
`"quantization": {"mode": "int8"}` (or `"int4"` with its `"group_size"`), each quantized weight
keeps its name for its int8/uint8 values and gains `<layer>.scales` (and `<layer>.zeros`),
split as llama/quantize/formats.py's formats split (`split_dim(name, mode)`).
"""

import json
import pickle
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from llama.args import ModelArgs
from llama.checkpoints import host_memory
from llama.checkpoints.params import (  # noqa: F401  (re-exported: the layout's one face)
    QUANTIZATION_FIELD,
    CheckpointError,
    model_args,
    read_params,
    read_quantization,
)
from llama.quantize.formats import (
    SAVED_DTYPES,
    Quantization,
    QuantizationError,
    is_quantized,
    saved_key,
    split_field,
)

# The one extra tensor real shards carry; the model computes its own rotary table.
IGNORED_KEYS = ("rope.freqs",)

def split_dim(name: str, mode: Optional[str] = None) -> Optional[int]:
    """The dimension along which fairscale splits tensor `name` across ranks (None: every rank
    holds all of it). Column-parallel weights split their rows (dim 0), row-parallel weights
    and the embedding (ParallelEmbedding splits the embedding dim) their columns (dim 1).
    A quantized checkpoint's (`mode` "int8" or "int4"): int4 scales and zeros (out, in / G)
    split with their weight; int8 scales (out,) split with the rows of column-parallel
    weights and are replicated for row-parallel ones (whole-row scales, the same on every
    rank)."""
    if name.endswith((".scales", ".zeros")):
        if mode is None:
            raise KeyError(f"{name} (only in a quantized checkpoint: give the mode)")
        dim = split_dim(split_field(name)[0])
        return None if mode == "int8" and dim == 1 else dim
    if name == "tok_embeddings.weight":
        return 1
    if name == "output.weight":
        return 0
    if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                      "feed_forward.w1.weight", "feed_forward.w3.weight")):
        return 0
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if name.endswith("norm.weight"):
        return None
    raise KeyError(name)


def full_shapes(args: ModelArgs, quantization: Optional[Quantization] = None
                ) -> Dict[str, Tuple[int, ...]]:
    """Every checkpoint tensor's unsharded shape, in Meta's names; with `quantization`, those
    of a quantized checkpoint (each quantized weight's fields, llama/quantize/formats.py)."""
    if quantization is not None:
        shapes = {}
        for name, shape in full_shapes(args).items():
            if not is_quantized(name):
                shapes[name] = shape
                continue
            for field, field_shape in quantization.saved_shapes(shape).items():
                shapes[saved_key(name, field)] = field_shape
        return shapes
    hd, dim, hidden = args.head_dim, args.dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim), "norm.weight": (dim,),
              "output.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * hd, dim)
        shapes[p + "attention.wk.weight"] = (args.n_kv_heads * hd, dim)
        shapes[p + "attention.wv.weight"] = (args.n_kv_heads * hd, dim)
        shapes[p + "attention.wo.weight"] = (dim, args.n_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    return shapes


def shard_shape(name: str, shape: Tuple[int, ...], n_shards: int,
                mode: Optional[str] = None) -> Tuple[int, ...]:
    dim = split_dim(name, mode)
    if dim is None:
        return tuple(shape)
    out = list(shape)
    out[dim] //= n_shards
    return tuple(out)


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> List[int]:
    """Process counts a model of this shape can be split across."""
    sizes = (args.n_heads, args.n_kv_heads, args.dim, args.ffn_hidden_dim, args.vocab_size)
    return [w for w in range(1, limit + 1) if all(size % w == 0 for size in sizes)]


def check_world_size(args: ModelArgs, world_size: int,
                     flag: str = "torchrun --nproc_per_node", parts: str = "processes") -> None:
    """`flag` is what sets the count (reshard: "--mp"); `parts` what is counted."""
    if world_size not in valid_world_sizes(args, limit=max(world_size, 64)):
        raise CheckpointError(
            f"this model (n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, dim={args.dim}, "
            f"ffn hidden={args.ffn_hidden_dim}, vocab={args.vocab_size}) cannot be split across "
            f"{world_size} {parts}; use one of {valid_world_sizes(args)} for {flag}")


def check_group_split(args: ModelArgs, group_size: int, count: int,
                      parts: str = "processes", saved: bool = False) -> None:
    """int4 groups never straddle a split: each of `count` parts' share of every quantized
    weight's input columns (the whole row, or a row-parallel weight's columns / count) must
    be a multiple of `group_size`. The error names the tensor, the group sizes that would fit
    and the counts that keep whole groups of this size (`saved`: a quantized checkpoint's
    groups, fixed)."""
    from llama.quantize.formats import check_group_size, group_sizes_for

    def width(name: str, shape, n: int) -> int:
        return shape[1] // n if split_dim(name) == 1 else shape[1]

    shapes = {name: shape for name, shape in full_shapes(args).items() if is_quantized(name)}
    for name, shape in shapes.items():
        columns = width(name, shape, count)
        if columns % group_size == 0:
            continue
        fits = [n for n in valid_world_sizes(args)
                if all(width(k, s, n) % group_size == 0 for k, s in shapes.items())]
        split = columns != shape[1]
        where = f" (split by columns over {count} {parts})" if split else ""
        counts = (f"; numbers of {parts} that keep whole groups of {group_size}: {fits}"
                  if split and fits else "")
        if saved:
            raise CheckpointError(
                f"{name}{where}: {columns} input columns are not a multiple of the "
                f"checkpoint's int4 group size {group_size}, so its groups cannot be split "
                f"so{counts}; or quantize the float checkpoint with a group size that fits: "
                f"{', '.join(map(str, group_sizes_for(columns))) or 'none, use int8'}")
        try:
            check_group_size(group_size, columns, f"{name}{where}")
        except QuantizationError as error:
            raise QuantizationError(f"{error}{counts}") from None


def slice_plan(full_size: int, n_src: int, n_dst: int, dst_rank: int
               ) -> List[Tuple[int, int, int]]:
    """Where destination rank `dst_rank` of `n_dst` finds its part of an axis of `full_size`
    stored as `n_src` equal shards: [(source shard, start, stop)] in that shard's coordinates."""
    src_size, dst_size = full_size // n_src, full_size // n_dst
    begin, end = dst_rank * dst_size, (dst_rank + 1) * dst_size
    plan = []
    for src in range(n_src):
        lo, hi = max(begin, src * src_size), min(end, (src + 1) * src_size)
        if lo < hi:
            plan.append((src, lo - src * src_size, hi - src * src_size))
    return plan


def find_shards(ckpt_dir: Path) -> List[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {str(ckpt_dir)!r} does not exist; it "
                              f"should be a directory such as llama-2-7b/")
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise CheckpointError(f"no *.pth checkpoint files in {ckpt_dir}")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if [p.name for p in shards] != expected:
        raise CheckpointError(f"{ckpt_dir} holds {[p.name for p in shards]}; expected shards "
                              f"named {expected} (one per model-parallel rank, none missing)")
    return shards


_ZIP_MAGIC = b"PK\x03\x04"


def is_mapped_shard(path: Path) -> bool:
    """Whether load_shard memory-maps this file (torch.save's zip format) rather than reading
    it into memory (the legacy format): only a mapped shard's pages may be released."""
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map a shard. Only tensors are unpickled (weights_only): a file that would run
    code or build other objects is refused, never loaded another way."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path} is empty: its download did not complete; re-download it "
                              f"(download.sh resumes)")
    if head.lstrip()[:1] == b"<":
        raise CheckpointError(
            f"{path} is a web page, not a checkpoint: the download saved an error page (often "
            f"HTTP 403 from an expired link); request a new link and re-download it")
    # Meta's shards are zip archives (torch.save's format since 1.6), which can be mapped;
    # the older format is read into memory instead, still as tensors only.
    mmap = head[:4] == _ZIP_MAGIC
    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        # The tensors-only unpickler names what it refused; say which kind of problem it is.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's own line first (some versions put advice about weights_only before it)
        detail = next((line for line in lines if "WeightsUnpickler error:" in line), None) or \
            next((line for line in lines[1:] if not line.startswith(
                ("Please file", "Check the documentation"))), lines[0] if lines else "")
        detail = detail.replace("WeightsUnpickler error:", "").strip()
        if "global" in detail.lower() or "reduce" in detail.lower():
            raise CheckpointError(
                f"{path} was refused: it is not a plain tensor checkpoint and loading it could "
                f"run arbitrary code ({detail}). Use the files from Meta's download, verified "
                f"with --verify") from None
        raise CheckpointError(
            f"{path} is truncated or corrupted (unreadable pickle: {detail}); re-download it "
            f"(download.sh resumes) and check it with verify=True / --verify") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupted ({str(error).splitlines()[0]}); re-download it "
            f"(download.sh resumes) and check it with verify=True / --verify") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return state


def _held_format(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """What a shard's output matrix says its weights are ("float", "int8", "int4 (groups of
    G"), as params.json's entry would say it; None when it cannot tell (the key checks then
    say what is wrong)."""
    weight, scales = state.get("output.weight"), state.get("output.scales")
    if weight is None or weight.dim() != 2:
        return None
    if weight.is_floating_point():
        return "float"
    if weight.dtype == torch.int8:
        return "int8"
    if weight.dtype == torch.uint8 and scales is not None and scales.dim() == 2 \
            and scales.shape[1] and 2 * weight.shape[1] % scales.shape[1] == 0:
        return f"int4 (groups of {2 * weight.shape[1] // scales.shape[1]})"
    return None


def check_shard(path: Path, state: Dict[str, torch.Tensor], args: ModelArgs,
                n_shards: int, quantization: Optional[Quantization] = None) -> None:
    """Strict key, shape and type check of one shard against params.json (`quantization`:
    its "quantization" entry, which the shard's tensors must agree with)."""
    params = Path(path).parent / "params.json"
    declared = "float" if quantization is None else str(quantization)
    held = _held_format(state)
    if held is not None and held != declared:
        entry = (f'says "quantization": {json.dumps(quantization.to_json())}'
                 if quantization is not None else 'has no "quantization" entry')
        raise CheckpointError(
            f"{path} holds {held} weights but {params} {entry}: they do not belong together "
            f"(a quantized checkpoint is written whole by python -m llama.quantize)")
    expected = full_shapes(args, quantization)
    mode = quantization.mode if quantization is not None else None
    keys = set(state) - set(IGNORED_KEYS)
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match params.json ({args.n_layers} layers): "
            + (f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
               if missing else "")
            + (f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
               if unexpected else "")
            + "is this the right checkpoint directory?")
    for name, shape in expected.items():
        want = shard_shape(name, shape, n_shards, mode)
        if tuple(state[name].shape) != want:
            extra = ""
            if name == "tok_embeddings.weight" and state[name].shape[0] != want[0]:
                extra = (f": the checkpoint has {state[name].shape[0]} vocabulary rows but the "
                         f"tokenizer has {want[0]} pieces; use the tokenizer.model that came "
                         f"with these weights")
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(state[name].shape)}, expected {want} "
                f"for a {n_shards}-shard checkpoint of params.json's shape{extra}")
        dtype = state[name].dtype
        if mode is not None and is_quantized(split_field(name)[0]):
            want_dtype = SAVED_DTYPES[mode][split_field(name)[1]]
            if dtype != want_dtype:
                raise CheckpointError(
                    f"{path}: tensor {name} is {str(dtype).replace('torch.', '')}, expected "
                    f"{str(want_dtype).replace('torch.', '')} for {declared} weights (params.json)")
        elif not state[name].is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} is {str(dtype).replace('torch.', '')}, "
                                  f"expected floating-point values")


def rank_state_dict(shards: Dict[int, Dict[str, torch.Tensor]], n_shards: int,
                    args: ModelArgs, rank: int, world_size: int,
                    dtype: Optional[torch.dtype] = None, device=None,
                    release_copied: bool = False, convert=None,
                    quantization: Optional[Quantization] = None,
                    names=None) -> Dict[str, torch.Tensor]:
    """The tensors model-parallel rank `rank` of `world_size` needs, cut from checked shards.
    `shards` maps shard index to its tensors and must hold every shard the rank's slices touch
    (`shards_for_rank`). A slice of a single shard is not copied unless the dtype or device
    changes; slices spanning shards are concatenated once. With `release_copied` (only for
    memory-mapped shards, as load_shard gives), the file pages behind each copied slice are
    dropped from memory once copied.

    `convert(name, tensor)`, if given, gets each tensor as stored (a view of its shard when it
    lies in one) and returns what to keep in its place (e.g. a quantized weight), or the tensor
    itself to have it cast to `dtype` and `device` as usual; one tensor at a time. Of a
    quantized checkpoint (`quantization`), the quantized weights' fields are kept as stored
    (only `device` applies): llama.quantize.from_tensors makes them weights again. `names`:
    only these tensors (default: all)."""
    any_shard = next(iter(shards.values()))
    mode = quantization.mode if quantization is not None else None
    out = {}
    for name, shape in full_shapes(args, quantization).items():
        if names is not None and name not in names:
            continue
        dim = split_dim(name, mode)
        if dim is None:
            pieces = [any_shard[name]]
            if mode is not None and name.endswith(".scales"):
                _check_replicated(shards, name)
        elif n_shards == world_size:
            pieces = [shards[rank][name]]
        else:
            pieces = [shards[src][name].narrow(dim, start, stop - start)
                      for src, start, stop in slice_plan(shape[dim], n_shards, world_size, rank)]
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        kept = convert(name, tensor) if convert is not None else tensor
        if kept is not tensor:
            out[name] = kept
            copied = True
        else:
            saved = mode is not None and is_quantized(split_field(name)[0])
            tensor = tensor.to(device=device, dtype=None if saved else dtype).contiguous()
            copied = tensor.untyped_storage().data_ptr() != pieces[0].untyped_storage().data_ptr()
            out[name] = tensor
        if release_copied and copied:
            for piece in pieces:  # copied out: the file's pages behind it are not needed again
                host_memory.release_file_pages(piece)
    return out


def _check_replicated(shards: Dict[int, Dict[str, torch.Tensor]], name: str) -> None:
    """int8 scales of a row-parallel weight are whole-row scales, the same in every shard: a
    rank joining several shards' columns uses one shard's, so they must be equal."""
    indices = sorted(shards)
    for index in indices[1:]:
        if not torch.equal(shards[index][name], shards[indices[0]][name]):
            raise CheckpointError(
                f"{name} differs between consolidated.{indices[0]:02d}.pth and "
                f"consolidated.{index:02d}.pth: a row-parallel int8 weight's scales must be "
                f"the whole rows' (python -m llama.quantize writes them so), or the shards' "
                f"columns cannot be joined")


def shards_for_rank(n_shards: int, world_size: int, rank: int) -> List[int]:
    """Indices of the shards whose slices rank `rank` of `world_size` needs."""
    first = rank * n_shards // world_size
    last = ((rank + 1) * n_shards - 1) // world_size
    return list(range(first, last + 1))


def verify_files(ckpt_dir: Path) -> None:
    """Check every file named in ckpt_dir/checklist.chk against its md5."""
    from llama.checkpoints.checklist import ChecklistError, verify_checklist

    checklist = Path(ckpt_dir) / "checklist.chk"
    if not checklist.is_file():
        raise CheckpointError(f"verify was requested but {checklist} does not exist")
    try:
        verify_checklist(str(checklist))
    except ChecklistError as error:
        raise CheckpointError(str(error)) from None
