"""Rewrite a checkpoint for another model-parallel size, in Meta's layout.

    python -m llama.reshard llama-2-13b/ llama-2-13b-mp1/ --mp 1

Writes consolidated.00.pth ... consolidated.{W-1}.pth, params.json and a fresh checklist.chk,
and copies tokenizer.model when the source directory holds one.
Quantized checkpoints (python -m llama.quantize) reshard too, int4 ones where each shard keeps
whole groups. Source shards are memory-mapped and one output shard is built at a time, so peak
memory stays near the size of one output shard.
"""

import argparse
import shutil
import sys
from pathlib import Path

from llama.args import ModelArgs
from llama.checkpoints import meta as checkpoint
from llama.checkpoints import saving
from llama.cli.flags import ArgumentParser


def reshard(src: Path, dst: Path, world_size: int, verbose: bool = True) -> None:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise checkpoint.CheckpointError("the destination must be a different directory")
    if dst.exists() and any(dst.glob("*.pth")):
        raise checkpoint.CheckpointError(f"{dst} already holds .pth files; choose an empty "
                                         f"directory")
    paths = checkpoint.find_shards(src)
    shards = {i: checkpoint.load_shard(path) for i, path in enumerate(paths)}
    vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    params = checkpoint.read_params(src)
    quantization = checkpoint.read_quantization(src)  # None, or a quantized checkpoint's
    args = ModelArgs(**{**params, "vocab_size": vocab_size})
    checkpoint.check_world_size(args, world_size, flag="--mp", parts="shards")
    if quantization is not None and quantization.group_size:
        checkpoint.check_group_split(args, quantization.group_size, world_size, "shards",
                                     saved=True)
    for i, path in enumerate(paths):
        checkpoint.check_shard(path, shards[i], args, len(paths), quantization)

    def shard(rank):
        state = checkpoint.rank_state_dict(shards, len(paths), args, rank, world_size,
                                           quantization=quantization)
        # clone: a slice of a memory-mapped shard would otherwise save that whole shard
        state = {name: tensor.clone() for name, tensor in state.items()}
        for extra in checkpoint.IGNORED_KEYS:
            if extra in shards[0]:
                state[extra] = shards[0][extra].clone()
        return state

    say = (lambda line: print(line, file=sys.stderr)) if verbose else None
    saving.save_checkpoint(dst, (shard(rank) for rank in range(world_size)), src / "params.json",
                           say=say)
    tokenizer = src / "tokenizer.model"  # the scripts look for it in or beside ckpt_dir
    if tokenizer.is_file() and not (dst / tokenizer.name).exists():
        shutil.copy2(tokenizer, dst / tokenizer.name)
    if verbose:
        print(f"{len(paths)} shards -> {world_size}; wrote {dst / 'checklist.chk'}",
              file=sys.stderr)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m llama.reshard", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory (params.json, consolidated.NN.pth)")
    parser.add_argument("dst", help="new directory to write")
    parser.add_argument("--mp", type=int, required=True,
                        help="model-parallel size (number of shards) to write")
    args = parser.parse_args(argv)
    try:
        reshard(Path(args.src), Path(args.dst), args.mp)
    except checkpoint.CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
