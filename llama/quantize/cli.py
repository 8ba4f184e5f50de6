"""Quantize a checkpoint once, into Meta's layout, for Llama.build to load directly.

    python -m llama.quantize llama-2-7b/ llama-2-7b-int8/ --mode int8
    python -m llama.quantize llama-2-70b/ llama-2-70b-int4/ --mode int4 --group_size 32 --shards 4
    python -m llama.quantize Llama-2-13b-hf/ llama-2-13b-int8/ --mode int8

SRC is Meta's layout (params.json, consolidated.NN.pth) or a Hugging Face directory
(config.json, *.safetensors). DST gets consolidated.NN.pth (--shards of them: by default as
many as SRC has, 1 for a Hugging Face directory), params.json with a "quantization" entry,
checklist.chk, and tokenizer.model when it is in SRC or beside it. The projections and the
output matrix are quantized (llama/quantize/formats.py's formats: each keeps its name for its int8
or
packed 4-bit values and gains <layer>.scales, and <layer>.zeros for int4); the embedding and
the norms keep their dtype; rope.freqs is written as Meta's files have it. Loading it on any
number of processes gives what quantizing the float checkpoint at load gives: rows are
quantized whole, so a row-parallel weight's int8 scales are its whole rows' on every shard.

Sources are memory-mapped and read one tensor at a time; one output shard is built at a time.
"""

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from llama.args import ModelArgs
from llama.checkpoints import host_memory, saving
from llama.checkpoints import meta as checkpoint
from llama.checkpoints.meta import CheckpointError
from llama.checkpoints.saving import params_json
from llama.cli.flags import ArgumentParser
from llama.errors import ArgumentError
from llama.hf.convert import check_destination, check_tokenizer, find_tokenizer, rope_freqs
from llama.hf.format import HFCheckpoint, is_hf_checkpoint
from llama.quantize.formats import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    MODES,
    Quantization,
    QuantizationError,
    is_quantized,
    quantize,
    row_absmax,
    saved_tensors,
)


class _Source:
    """A float checkpoint of either layout: its shape, shard count, rank_state_dict (as the
    loader reads it: checked, memory-mapped, one tensor at a time), params and rope.freqs."""

    def __init__(self, src: Path):
        if is_hf_checkpoint(src):
            hub = HFCheckpoint(src)
            self.args = hub.shape_args()
            hub.check(self.args)
            self.n_shards = 1
            self.params = params_json(self.args)
            self.rope_freqs = None

            def read(rank, world_size, convert, names=None):
                return hub.rank_state_dict(self.args, rank, world_size, convert=convert,
                                           names=names)[0]
        else:
            saved = checkpoint.read_quantization(src)
            if saved is not None:
                raise CheckpointError(f"{src} holds {saved} weights already (params.json's "
                                      f"\"quantization\"): quantize the float checkpoint")
            paths = checkpoint.find_shards(src)
            shards = {i: checkpoint.load_shard(path) for i, path in enumerate(paths)}
            self.params = checkpoint.read_params(src)
            vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
            try:
                self.args = ModelArgs(**{**self.params, "vocab_size": vocab_size})
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"{src / 'params.json'}: {error}") from None
            for index, path in enumerate(paths):
                checkpoint.check_shard(path, shards[index], self.args, len(paths))
            self.n_shards = len(paths)
            self.rope_freqs = shards[0].get(checkpoint.IGNORED_KEYS[0])
            # pages are dropped once read only where they can be read again from the file
            mapped = all(checkpoint.is_mapped_shard(path) for path in paths)

            def read(rank, world_size, convert, names=None):
                return checkpoint.rank_state_dict(shards, len(paths), self.args, rank,
                                                  world_size, release_copied=mapped,
                                                  convert=convert, names=names)
        self.read = read


def quantize_checkpoint(src: Path, dst: Path, mode: str, group_size: Optional[int] = None,
                        n_shards: Optional[int] = None, tokenizer: Optional[Path] = None,
                        say: Callable[[str], None] = print) -> None:
    """Checkpoint directory SRC (either layout, float weights) quantized into DST, Meta's
    layout with `n_shards` shards (default: SRC's count, 1 for Hugging Face's layout)."""
    if mode not in MODES:
        raise QuantizationError(f"unknown --mode {mode!r}; choose one of: {', '.join(MODES)}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise QuantizationError(f"--group_size must be one of {GROUP_SIZES}, got {group_size}")
    if mode == "int8" and group_size is not None:
        raise QuantizationError("--group_size applies to --mode int4 only (int8 has one scale "
                                "per row)")
    if mode == "int4":
        quantization = Quantization(mode, group_size or DEFAULT_GROUP_SIZE)
    else:
        quantization = Quantization(mode)
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, ("*.pth", "params.json"))
    source = _Source(src)
    args = source.args
    n_shards = n_shards or source.n_shards
    checkpoint.check_world_size(args, n_shards, flag="--shards", parts="shards")
    if mode == "int4":
        checkpoint.check_group_split(args, quantization.group_size, n_shards, "shards")
    tokenizer_path = find_tokenizer(src, tokenizer)
    if tokenizer_path is not None:
        check_tokenizer(tokenizer_path, args.vocab_size)

    # int8 scales of a weight split by columns (wo, w2) are its whole rows': every shard
    # then holds the same scales, as loading the float checkpoint on several processes does.
    absmax = {}
    if mode == "int8" and n_shards > 1:
        row_parallel = [name for name in checkpoint.full_shapes(args)
                        if is_quantized(name) and checkpoint.split_dim(name) == 1]
        absmax = source.read(0, 1, lambda name, tensor: row_absmax(tensor), row_parallel)

    def convert(name: str, tensor: torch.Tensor):
        if not is_quantized(name):
            return tensor
        quantized = quantize(tensor, mode, quantization.group_size or DEFAULT_GROUP_SIZE,
                             absmax.get(name), name)
        host_memory.trim_heap()  # the temporaries' pages (see trim_heap)
        return quantized

    def shard(rank):
        state = {}
        for name, value in source.read(rank, n_shards, convert).items():
            if isinstance(value, torch.Tensor):  # a view of the source: saved on its own
                state[name] = value.clone()
            else:
                state.update(saved_tensors(name, value))
        freqs = source.rope_freqs
        if freqs is None:
            freqs = rope_freqs(args, state["tok_embeddings.weight"].dtype)
        state[checkpoint.IGNORED_KEYS[0]] = freqs.clone()
        return state

    params = {**source.params, checkpoint.QUANTIZATION_FIELD: quantization.to_json()}
    saving.save_checkpoint(dst, (shard(rank) for rank in range(n_shards)), params, say=say)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, dst / "tokenizer.model")
    else:
        say(f"note: no tokenizer.model in {src} or beside it: {dst} has none (pass "
            f"tokenizer_path when loading it)")
    say(f"{source.n_shards} shard(s) -> {n_shards} shard(s) of {quantization} weights; wrote "
        f"{dst / 'checklist.chk'}")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m llama.quantize", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory to read (Meta's or Hugging Face's "
                                    "layout, float weights)")
    parser.add_argument("dst", help="new directory to write")
    parser.add_argument("--mode", required=True, help="int8 (one scale per row) or int4 "
                                                      "(groups of --group_size columns)")
    parser.add_argument("--group_size", type=int, default=None,
                        help=f"int4: input columns per group, 32, 64 or 128 (default "
                             f"{DEFAULT_GROUP_SIZE})")
    parser.add_argument("--shards", type=int, default=None,
                        help="consolidated.NN.pth shards to write (default: as many as SRC "
                             "has; 1 for a Hugging Face directory)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model to copy (default: the one in SRC or beside it)")
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be at least 1")
    try:
        quantize_checkpoint(Path(args.src), Path(args.dst), args.mode, args.group_size,
                            args.shards, Path(args.tokenizer) if args.tokenizer else None,
                            say=lambda line: print(line, file=sys.stderr, flush=True))
    except (CheckpointError, QuantizationError, ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
