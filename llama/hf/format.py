"""Hugging Face's Llama layout, read onto any number of model-parallel ranks.

A directory holds `config.json` (see hf_config.py) and weights: `model.safetensors`, or shards
`model-0000N-of-0000M.safetensors` listed in `model.safetensors.index.json` (or, from older
uploads, `pytorch_model*.bin`, read as tensors only). Tensor names differ from Meta's
(`model.layers.N.self_attn.q_proj.weight` for `layers.N.attention.wq.weight`), and the query
and key rows of each head are ordered for rotating the two halves of the head, where Meta's
model rotates adjacent pairs (`rotary_rows_to_meta`, `rotary_rows_to_hf`).

Loading follows Meta's format's rules (checkpoint.py): strict names and shapes, checked from
the files' headers before any weight is read; each rank reads only its slices (fairscale's
split dimensions, `checkpoint.split_dim`) from the memory-mapped files, one tensor at a time.
"""

import json
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from llama.args import ModelArgs
from llama.checkpoints import host_memory
from llama.checkpoints import meta as checkpoint
from llama.checkpoints.meta import CheckpointError
from llama.hf import config as hf_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Older transformers saved each layer's rotary table; the model computes its own.
IGNORED_SUFFIX = "rotary_emb.inv_freq"

_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
              "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {  # inside layers.N. (Meta) and model.layers.N. (Hugging Face)
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_name(name: str) -> str:
    """Hugging Face's name for Meta's tensor `name`."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not match or match.group(2) not in _LAYER_NAMES:
        raise KeyError(name)
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def rotary_heads(name: str, args: ModelArgs) -> Optional[int]:
    """How many heads' rows Meta's tensor `name` holds when they need reordering between the
    layouts (queries and keys), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def rotary_rows_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face rotates the two halves
    of each head. Reorder each head's rows from pairs to halves (a contiguous copy)."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    # (n_heads, head_dim // 2, 2, dim) -> (n_heads, 2, head_dim // 2, dim)
    return weight.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def rotary_rows_to_meta(weight: torch.Tensor, n_heads: int, dtype=None, device=None
                        ) -> torch.Tensor:
    """The inverse of rotary_rows_to_hf, into a new tensor of `dtype` on `device` in one copy.
    Reordering is within each head, so a block of whole heads' rows (a rank's slice) is
    reordered on its own."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    out = torch.empty(rows, dim, dtype=dtype or weight.dtype, device=device or weight.device)
    # (n_heads, 2, head_dim // 2, dim) -> (n_heads, head_dim // 2, 2, dim)
    out.view(n_heads, head_dim // 2, 2, dim).copy_(
        weight.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2))
    return out


def is_hf_checkpoint(ckpt_dir: Path) -> bool:
    """A Hugging Face directory: config.json and no params.json (Meta's layout wins when a
    directory holds both)."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / "config.json").is_file() and not (ckpt_dir / "params.json").is_file()


def find_weights(ckpt_dir: Path) -> Dict[str, Path]:
    """Each tensor's file: from the index when there is one, else from the files themselves.
    safetensors is preferred over .bin when a directory has both (as transformers does)."""
    ckpt_dir = Path(ckpt_dir)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (ckpt_dir / index_name).is_file():
            return _read_index(ckpt_dir / index_name)
    files = sorted(ckpt_dir.glob("*.safetensors")) or sorted(ckpt_dir.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(
            f"no weights in {ckpt_dir}: a Hugging Face directory holds model.safetensors, or "
            f"model-0000N-of-0000M.safetensors with {SAFETENSORS_INDEX} (or pytorch_model*.bin)")
    weight_map: Dict[str, Path] = {}
    for path in files:
        for name in _open(path).keys():
            if name in weight_map:
                raise CheckpointError(f"tensor {name} is in both {weight_map[name]} and {path}; "
                                      f"keep one copy of the weights in {ckpt_dir}")
            weight_map[name] = path
    return weight_map


def _read_index(path: Path) -> Dict[str, Path]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a weight index (a JSON object with a weight_map: "
                              f"{error!r}); re-download it") from None
    files = {name: path.parent / file for name, file in weight_map.items()}
    missing = sorted({str(file) for file in files.values() if not file.is_file()})
    if missing:
        raise CheckpointError(f"{path} lists files that are not there: {missing}; the download "
                              f"is incomplete")
    return files


def _open(path: Path):
    """A memory-mapped weight file: a safetensors handle, or a .bin's tensors (tensors only,
    memory-mapped where the file allows, as Meta's shards are read)."""
    if path.suffix == ".bin":
        return checkpoint.load_shard(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is truncated or is not a safetensors file ({error}); "
                              f"re-download it") from None


def _mapped_ranges(paths: List[Path]) -> List[Tuple[int, int]]:
    """Address ranges where these files are memory-mapped in this process (from Linux's
    /proc/self/maps; none elsewhere): the tensors whose pages may be dropped once copied."""
    names = {str(Path(path).resolve()) for path in paths}
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            low, high = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


class HFCheckpoint:
    """A Hugging Face Llama directory, checked and read slice by slice."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir)
        self.config_path = self.dir / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path} not found: a Hugging Face directory "
                                  f"holds config.json and its weights")
        self.config = hf_config.read_config(self.config_path)
        hf_config.check_supported(self.config, self.config_path)
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.weight_map = find_weights(self.dir)
        self._files: Dict[Path, object] = {}

    def model_args(self, max_seq_len: int = 2048, max_batch_size: int = 32,
                   vocab_size: Optional[int] = None) -> ModelArgs:
        return hf_config.model_args(self.config, self.config_path, max_seq_len, max_batch_size,
                                    vocab_size)

    def shape_args(self) -> ModelArgs:
        """The model's shapes for reading or converting its files: no model is built, so no
        context length applies (a dynamic rope scaling limits the one a model is built for)."""
        return self.model_args(max_seq_len=1)

    def source_name(self, name: str) -> str:
        """The Hugging Face tensor Meta's tensor `name` is read from."""
        if name == "output.weight" and self.tied:
            return _TOP_NAMES["tok_embeddings.weight"]
        return hf_name(name)

    def _file(self, hf: str):
        path = self.weight_map[hf]
        if path not in self._files:
            self._files[path] = _open(path)
        return self._files[path]

    def _header(self, hf: str) -> Tuple[Tuple[int, ...], str]:
        """(shape, dtype name) from the file's header, reading no weights."""
        handle, path = self._file(hf), self.weight_map[hf]
        if isinstance(handle, dict):
            if hf not in handle:
                raise CheckpointError(f"the index says {hf} is in {path}, but it is not there")
            tensor = handle[hf]
            name = next((k for k, v in _FLOAT_TYPES.items() if v == tensor.dtype), tensor.dtype)
            return tuple(tensor.shape), str(name)
        try:
            piece = handle.get_slice(hf)
        except SafetensorError:
            raise CheckpointError(f"the index says {hf} is in {path}, but it is not "
                                  f"there") from None
        return tuple(piece.get_shape()), piece.get_dtype()

    def stored_dtype(self, name: str) -> Optional[torch.dtype]:
        """The dtype Meta's tensor `name` is stored in (from the file's header), None if not
        a float type."""
        return _FLOAT_TYPES.get(self._header(self.source_name(name))[1])

    def _read(self, hf: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        """Tensor `hf`, or its [start, stop) slice along `dim`: a view into the mapped file, so
        only the slice's pages are ever read."""
        handle = self._file(hf)
        if isinstance(handle, dict):
            tensor = handle[hf]
            return tensor if dim is None else tensor.narrow(dim, start, stop - start)
        piece = handle.get_slice(hf)
        if dim is None:
            return piece[:]
        index = [slice(None)] * len(piece.get_shape())
        index[dim] = slice(start, stop)
        return piece[tuple(index)]

    def check(self, args: ModelArgs) -> None:
        """Strict names, shapes and types against config.json, from the headers alone."""
        sources = {self.source_name(name): name for name in checkpoint.full_shapes(args)}
        present = {name for name in self.weight_map if not name.endswith(IGNORED_SUFFIX)}
        missing, unexpected = sorted(set(sources) - present), sorted(present - set(sources))
        if missing or unexpected:
            hint = ("config.json says tie_word_embeddings: true, so lm_head.weight should not "
                    "be there; " if self.tied and "lm_head.weight" in unexpected else "")
            raise CheckpointError(
                f"the weights in {self.dir} do not match config.json ({args.n_layers} layers, "
                f"a LlamaForCausalLM): "
                + (f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                   if missing else "")
                + (f"unexpected tensors {unexpected[:8]}"
                   f"{' ...' if len(unexpected) > 8 else ''}; " if unexpected else "")
                + hint + "is this the right directory?")
        shapes = checkpoint.full_shapes(args)
        for hf, name in sources.items():
            shape, dtype = self._header(hf)
            if dtype not in _FLOAT_TYPES:
                raise CheckpointError(
                    f"{self.weight_map[hf]}: tensor {hf} is stored as {dtype}; only float32, "
                    f"float16 and bfloat16 weights can be read (quantized checkpoints cannot)")
            if shape != shapes[name]:
                extra = ""
                if hf == _TOP_NAMES["tok_embeddings.weight"] and shape[:1] != shapes[name][:1]:
                    extra = f" (vocab_size {args.vocab_size} in config.json)"
                raise CheckpointError(
                    f"{self.weight_map[hf]}: tensor {hf} has shape {shape}, expected "
                    f"{shapes[name]} from config.json{extra}")

    def rank_state_dict(self, args: ModelArgs, rank: int, world_size: int,
                        dtype: Optional[torch.dtype] = None, device=None, copy: bool = False,
                        convert=None, names=None
                        ) -> Tuple[Dict[str, torch.Tensor], Callable[[torch.Tensor], bool]]:
        """Meta's names and per-rank shapes for rank `rank` of `world_size`, cut from the
        checked files tensor by tensor, with query/key rows in Meta's order. Slices that need
        no conversion stay views of the mapped files unless `copy`; the file pages behind
        each copied slice are dropped as it is copied. Also returns whether a tensor lies in
        a mapped file (its pages may be dropped once copied elsewhere). `convert(name,
        tensor)` (given each tensor as stored, in Meta's row order) and `names`: see
        checkpoint.rank_state_dict."""
        self.check(args)
        files = {self.weight_map[self.source_name(name)] for name in checkpoint.full_shapes(args)}
        for path in files:
            if path not in self._files:
                self._files[path] = _open(path)
        ranges = _mapped_ranges(list(files))

        def is_mapped(tensor: torch.Tensor) -> bool:
            return any(low <= tensor.data_ptr() < high for low, high in ranges)

        state = {}
        for name, shape in checkpoint.full_shapes(args).items():
            if names is not None and name not in names:
                continue
            dim = checkpoint.split_dim(name)
            start, stop = 0, 0
            if dim is not None:
                [(_, start, stop)] = checkpoint.slice_plan(shape[dim], 1, world_size, rank)
            piece = self._read(self.source_name(name), dim, start, stop)
            heads = rotary_heads(name, args)
            heads = None if heads is None else heads // world_size  # a rank's are whole heads
            if convert is not None:
                stored = piece if heads is None else rotary_rows_to_meta(piece, heads)
                kept = convert(name, stored)
                if kept is not stored:
                    if is_mapped(piece):
                        host_memory.release_file_pages(piece)
                    state[name] = kept
                    continue
                if heads is not None:
                    piece, heads = stored, None  # in Meta's order already
            if heads is not None:
                tensor = rotary_rows_to_meta(piece, heads, dtype, device)
            else:
                tensor = piece.to(device=device, dtype=dtype or piece.dtype, copy=copy)
                tensor = tensor.contiguous()
            copied = tensor.untyped_storage().data_ptr() != piece.untyped_storage().data_ptr()
            if copied and is_mapped(piece):
                host_memory.release_file_pages(piece)
            state[name] = tensor
        return state, is_mapped
