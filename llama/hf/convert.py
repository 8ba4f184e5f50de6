"""Convert a checkpoint between Meta's layout and Hugging Face's.

    python -m llama.convert llama-2-7b/ llama-2-7b-hf/ --to hf
    python -m llama.convert llama-2-13b-hf/ llama-2-13b/ --to meta --shards 2

--to hf writes what transformers' from_pretrained loads: config.json, generation_config.json,
model-0000N-of-0000M.safetensors files of at most --max_shard_size bytes with
model.safetensors.index.json (a single model.safetensors when the weights fit in one), and
tokenizer.model with tokenizer_config.json and special_tokens_map.json (Llama 3's tiktoken
tokenizer.model goes to original/ as on the Hub, with tokenizer.json, tokenizer_config.json and
its chat template where transformers is installed). --to meta writes
consolidated.NN.pth shards, params.json and checklist.chk as Meta's download has them, and
tokenizer.model. Tensors keep their dtype and bits: a round trip gives identical tensors.

Sources are memory-mapped. --to hf writes one tensor at a time (safetensors files are written
here piece by piece, so no file's worth of tensors is held in memory); --to meta builds one
output shard at a time, as llama.checkpoints.reshard does.
"""

import argparse
import json
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from llama.args import ModelArgs
from llama.checkpoints import host_memory, saving
from llama.checkpoints import meta as checkpoint
from llama.checkpoints.meta import CheckpointError
from llama.checkpoints.saving import params_json
from llama.cli.flags import ArgumentParser
from llama.errors import ArgumentError
from llama.hf import config as hf_config
from llama.hf import llama3_tokenizer
from llama.hf.format import (
    SAFETENSORS_INDEX,
    HFCheckpoint,
    hf_name,
    is_hf_checkpoint,
    rotary_heads,
    rotary_rows_to_hf,
)
from llama.rope_scaling import scale_frequencies

MAX_SHARD_BYTES = 5 * 10 ** 9  # transformers' "5GB"
_SAFETENSORS_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: Path, entries: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
                      tensor_of: Callable[[str], torch.Tensor],
                      written: Callable[[str], None] = lambda name: None) -> None:
    """A safetensors file holding `entries` (name, shape, dtype), in that order, the data of
    each asked of `tensor_of` only when it is written (the format: an 8-byte little-endian
    header length, a JSON header of dtypes, shapes and byte ranges padded to 8 bytes, then
    the raw bytes). `written(name)` is called after each tensor's bytes are out."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; convert on a little-endian "
                              "machine")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_TYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in entries:
            tensor = tensor_of(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned "
                                   f"{tuple(shape)} {dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor
            written(name)
    part.replace(path)


def plan_files(sizes: Sequence[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Names in order, cut into files of at most `max_bytes` each (a larger tensor alone)."""
    files: List[List[str]] = [[]]
    used = 0
    for name, size in sizes:
        if files[-1] and used + size > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files


def check_destination(src: Path, dst: Path, patterns: Sequence[str]) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory")
    if dst.exists() and src.resolve() == dst.resolve():
        raise CheckpointError("the destination must be a different directory")
    taken = [p.name for pattern in patterns for p in dst.glob(pattern)] if dst.exists() else []
    if taken:
        raise CheckpointError(f"{dst} already holds {sorted(taken)}; choose an empty directory")


def find_tokenizer(src: Path, tokenizer: Optional[Path]) -> Optional[Path]:
    """The given tokenizer, else tokenizer.model in SRC or beside it (Meta's downloads)."""
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise CheckpointError(f"--tokenizer {tokenizer} is not a file")
        return Path(tokenizer)
    found = [p for p in (src / "tokenizer.model", src.resolve().parent / "tokenizer.model")
             if p.is_file()]
    return found[0] if found else None


# Llama 3's tokenizer.model is tiktoken's text format (one "base64 rank" line per token),
# with Meta's 256 special tokens after the ranks; Llama 2's is a SentencePiece protobuf.
_BPE_LINE = re.compile(rb"[A-Za-z0-9+/]+=*[ \t]+[0-9]+\r?\n?")
LLAMA3_SPECIAL_TOKENS = 256


def bpe_vocab_size(path: Path) -> Optional[int]:
    """The vocabulary of a Llama 3 (tiktoken) tokenizer.model, or None for another format."""
    with open(path, "rb") as f:
        if not _BPE_LINE.fullmatch(f.readline()):
            return None
        f.seek(0)
        return sum(1 for line in f if line.strip()) + LLAMA3_SPECIAL_TOKENS


def check_tokenizer(path: Path, vocab_size: int):
    """The SentencePiece tokenizer in `path` (None for a Llama 3 tokenizer), checked against
    the weights' vocabulary."""
    from llama.tokenizer import Tokenizer

    bpe = bpe_vocab_size(path)
    tokenizer = None if bpe is not None else Tokenizer(str(path))
    n_words = bpe if bpe is not None else tokenizer.n_words
    if n_words != vocab_size:
        raise CheckpointError(f"{path} has {n_words} pieces but the weights have "
                              f"{vocab_size} vocabulary rows: pass the tokenizer.model that came "
                              f"with these weights (--tokenizer)")
    return tokenizer


def is_llama3(args: ModelArgs) -> bool:
    """Llama 3.x, from its shape rules: the 128,256-token vocabulary, rotary base 500000 or
    Meta's scaling (a Llama 2 derivative keeps 32000-ish pieces and base 1e4 or 1e6)."""
    return args.use_scaled_rope or args.rope_theta == 500000.0 or args.vocab_size == 128256


def default_context(args: ModelArgs) -> int:
    """The context config.json declares when not told: 131072 for Llama 3.1 and later (scaled
    rotary), 8192 for Llama 3, 4096 for Llama 2."""
    if args.use_scaled_rope:
        return hf_config.LLAMA31_CONTEXT
    return hf_config.LLAMA3_CONTEXT if is_llama3(args) else hf_config.LLAMA2_CONTEXT


def meta_to_hf(src: Path, dst: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
               max_position_embeddings: Optional[int] = None,
               tokenizer: Optional[Path] = None, say: Callable[[str], None] = print) -> None:
    """Meta's checkpoint directory SRC as a Hugging Face directory DST. The output layer is
    written as lm_head.weight unless it equals the embedding bit for bit (then config.json
    says tie_word_embeddings, as the Hub's Llama 3.2 1B and 3B do). A Llama 3.x model gets
    Meta's llama3 rope_scaling and Llama 3's special token ids."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, ("*.safetensors", "config.json"))
    if is_hf_checkpoint(src):
        raise CheckpointError(f"{src} is in Hugging Face's layout already (config.json); --to "
                              f"hf converts Meta's (params.json, consolidated.NN.pth)")
    quantization = checkpoint.read_quantization(src)
    if quantization is not None:
        raise CheckpointError(f"{src} holds {quantization} weights (params.json's "
                              f"\"quantization\"); --to hf writes float weights: convert the "
                              f"float checkpoint it was quantized from")
    paths = checkpoint.find_shards(src)
    shards = {i: checkpoint.load_shard(path) for i, path in enumerate(paths)}
    params = checkpoint.read_params(src)
    declared = params.pop("vocab_size", None)
    vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    if declared not in (None, -1, vocab_size):
        raise CheckpointError(f"{src / 'params.json'} says vocab_size={declared} but the "
                              f"embedding has {vocab_size} rows")
    try:
        args = ModelArgs(**params, vocab_size=vocab_size)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{src / 'params.json'}: {error}") from None
    for index, path in enumerate(paths):
        checkpoint.check_shard(path, shards[index], args, len(paths))
    if max_position_embeddings is None:
        max_position_embeddings = default_context(args)
    tokenizer_path = find_tokenizer(src, tokenizer)
    sp = check_tokenizer(tokenizer_path, vocab_size) if tokenizer_path else None

    def full(name: str) -> torch.Tensor:  # the whole tensor, in Meta's row order
        dim = checkpoint.split_dim(name)
        pieces = [shards[i][name] for i in range(len(paths))]
        return pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def release(name: str) -> None:  # once read: drop the shards' pages behind it
        for index in range(len(paths)):
            host_memory.release_file_pages(shards[index][name])

    tied = torch.equal(full("output.weight"), full("tok_embeddings.weight"))
    release("output.weight")
    release("tok_embeddings.weight")
    meta_names = {hf_name(name): name for name in _hf_order(args)
                  if not (tied and name == "output.weight")}
    dtype = shards[0]["tok_embeddings.weight"].dtype
    entries = [(hf, checkpoint.full_shapes(args)[name], shards[0][name].dtype)
               for hf, name in meta_names.items()]
    sizes = [(hf, torch.Size(shape).numel() * torch.empty((), dtype=d).element_size())
             for hf, shape, d in entries]
    groups = plan_files(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])

    def tensor_of(hf: str) -> torch.Tensor:
        name = meta_names[hf]
        heads = rotary_heads(name, args)
        return rotary_rows_to_hf(full(name), heads) if heads else full(name)

    dst.mkdir(parents=True, exist_ok=True)
    by_name = dict((hf, (hf, shape, d)) for hf, shape, d in entries)
    for file, group in zip(files, groups):
        start = time.time()
        write_safetensors(dst / file, [by_name[hf] for hf in group], tensor_of,
                          lambda hf: release(meta_names[hf]))
        say(f"wrote {dst / file} ({len(group)} tensors, {time.time() - start:.1f} s)")
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                 "weight_map": {hf: file for file, group in zip(files, groups) for hf in group}}
        (dst / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = str(dtype).replace("torch.", "")
    ids = {}
    if args.vocab_size == hf_config.LLAMA3_VOCAB:  # Llama 3's special tokens exist
        ids = dict(bos_token_id=hf_config.LLAMA3_BOS_ID, eos_token_id=hf_config.LLAMA3_EOS_IDS)
    _write_json(dst / "config.json", hf_config.hf_config(args, dtype_name, tied,
                                                         max_position_embeddings, **ids))
    _write_json(dst / "generation_config.json",
                hf_config.generation_config(max_position_embeddings, **ids,
                                            **({"pad_token_id": None} if ids else {})))
    if tokenizer_path is not None and sp is None:  # Llama 3's: this library reads it as it is
        # where the Hub's Llama 3 repositories keep it (Llama.build looks there too): at the
        # top, llama.cpp's convert_hf_to_gguf.py takes it for SentencePiece's and fails
        (dst / "original").mkdir(exist_ok=True)
        shutil.copyfile(tokenizer_path, dst / "original" / "tokenizer.model")
        try:  # and transformers reads tokenizer.json
            llama3_tokenizer.write_tokenizer_files(Path(tokenizer_path), dst,
                                                   max_position_embeddings)
            say(f"wrote {dst / 'tokenizer.json'} (Llama 3's tokenizer for transformers)")
        except ImportError:
            say(f"note: copied Llama 3's tokenizer.model (tiktoken) to {dst / 'original'}; "
                f"transformers reads tokenizer.json, written only where transformers is "
                f"installed (pip install -e \".[hf]\", then convert again)")
    elif sp is not None:
        shutil.copyfile(tokenizer_path, dst / "tokenizer.model")
        piece = sp.sp_model.id_to_piece
        config, special = hf_config.tokenizer_configs(piece(sp.bos_id), piece(sp.eos_id),
                                                      piece(sp.sp_model.unk_id()),
                                                      max_position_embeddings)
        _write_json(dst / "tokenizer_config.json", config)
        _write_json(dst / "special_tokens_map.json", special)
    else:
        say(f"note: no tokenizer.model in {src} or beside it: {dst} has no tokenizer files "
            f"(pass --tokenizer)")
    say(f"{len(paths)} Meta shard(s) -> {len(files)} safetensors file(s)"
        f"{' (output layer tied to the embedding: they are equal)' if tied else ''}; wrote "
        f"{dst / 'config.json'}")


def _hf_order(args: ModelArgs) -> List[str]:
    """Meta's names in the order transformers saves them: embedding, layers, norm, head."""
    names = list(checkpoint.full_shapes(args))
    top = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    return [top[0]] + [n for n in names if n not in top] + top[1:]


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def rope_freqs(args: ModelArgs, dtype: torch.dtype) -> torch.Tensor:
    """The rope.freqs extra of Meta's shards: each rotary pair's inverse frequency, scaled as
    the model scales it (the model computes its own; Meta's files carry it and the reference
    ignores it)."""
    exponents = torch.arange(0, args.head_dim, 2)[: args.head_dim // 2].float() / args.head_dim
    freqs = scale_frequencies(1.0 / (args.rope_theta ** exponents), args.rope_scaling)
    return freqs.to(dtype)


def hf_to_meta(src: Path, dst: Path, n_shards: int = 1,
               say: Callable[[str], None] = print) -> None:
    """Hugging Face's directory SRC as Meta's checkpoint directory DST of `n_shards` shards."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, ("*.pth", "params.json"))
    source = HFCheckpoint(src)
    args = source.shape_args()
    # The Hub's Llama 3.x repositories keep Meta's tokenizer.model under original/.
    tokenizer_path = next((p for p in (src / "tokenizer.model", src / "original" /
                                       "tokenizer.model") if p.is_file()), src / "tokenizer.model")
    if tokenizer_path.is_file():
        check_tokenizer(tokenizer_path, args.vocab_size)
    checkpoint.check_world_size(args, n_shards, flag="--shards", parts="shards")
    source.check(args)

    def shard(rank):
        state, _ = source.rank_state_dict(args, rank, n_shards, copy=True)
        state[checkpoint.IGNORED_KEYS[0]] = rope_freqs(args, state["tok_embeddings.weight"].dtype)
        return state

    saving.save_checkpoint(dst, (shard(rank) for rank in range(n_shards)), params_json(args),
                           say=say)
    if tokenizer_path.is_file():
        shutil.copyfile(tokenizer_path, dst / "tokenizer.model")
    else:
        say(f"note: {src} has no tokenizer.model; {dst} has none either (pass tokenizer_path "
            f"when loading it)")
    say(f"{len(set(source.weight_map.values()))} Hugging Face file(s) -> {n_shards} shard(s); "
        f"wrote {dst / 'checklist.chk'}")


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '100KB' (powers of 1000, as transformers counts) or a plain
    number."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?B?)\s*", text.upper())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 100000")
    unit = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "M": 10 ** 6, "MB": 10 ** 6,
            "G": 10 ** 9, "GB": 10 ** 9}[match.group(2)]
    return int(match.group(1)) * unit


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m llama.convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory to read (either layout)")
    parser.add_argument("dst", help="new directory to write")
    parser.add_argument("--to", required=True, choices=["hf", "meta"],
                        help="layout to write: Hugging Face's or Meta's")
    parser.add_argument("--shards", type=int, default=1,
                        help="--to meta: number of consolidated.NN.pth shards (model-parallel "
                             "size) to write (default 1)")
    parser.add_argument("--max_shard_size", type=parse_size, default=MAX_SHARD_BYTES,
                        help="--to hf: largest safetensors file (default 5GB)")
    parser.add_argument("--max_position_embeddings", type=int, default=None,
                        help="--to hf: the context length config.json declares (default 131072 "
                             "for Llama 3.1+, 8192 for Llama 3, 4096 for Llama 2; Code Llama's "
                             "is 16384)")
    parser.add_argument("--tokenizer", default=None,
                        help="--to hf: tokenizer.model to copy (default: the one in SRC or "
                             "beside it)")
    # the dashed spellings of the first releases, before the tools took the scripts' (Meta's)
    for flag in ("--max_shard_size", "--max_position_embeddings"):
        parser.add_alias(flag.replace("_", "-"), flag)
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.to == "hf":
            meta_to_hf(Path(args.src), Path(args.dst), args.max_shard_size,
                       args.max_position_embeddings,
                       Path(args.tokenizer) if args.tokenizer else None, say)
        else:
            if args.shards < 1:
                parser.error("--shards must be at least 1")
            hf_to_meta(Path(args.src), Path(args.dst), args.shards, say)
    except (CheckpointError, ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
