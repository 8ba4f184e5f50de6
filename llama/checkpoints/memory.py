"""Memory per model-parallel rank, computed from the shapes: the weights in each format and
the KV cache. `python -m llama.memory` prints README's table for Llama 2 7B, 13B and 70B;
`python -m llama.memory 8192 llama3` the same for Llama 3.2 1B and 3B, 3.1 8B and 70B (Meta's
layout: the output matrix apart from the embedding, also where the Hub ties them, since the
model holds both; quantized, the 128,256-row output matrix is).

Exact bytes of what a rank holds: quantized weights in their saved format
(llama/quantize/formats.py;
a GPU's packed layouts take the same bytes), the embedding and the norms in the model's dtype,
replicated tensors (norms, int8 scales of row-parallel weights) counted on every rank. Not
counted: activations, the rotary table, CUDA's and torch's own memory.
"""

from math import prod
from typing import Optional, Tuple

import torch

from llama.args import ModelArgs
from llama.checkpoints import meta as checkpoint
from llama.kernels.cpu_kernels import W8A8_GROUP
from llama.layers.cache import KVCache
from llama.layers.fused import fused_names
from llama.quantize.formats import (
    DEFAULT_GROUP_SIZE,
    SAVED_DTYPES,
    Quantization,
    is_quantized,
    split_field,
)

LLAMA2 = {  # Meta's params.json, with the tokenizer's 32000 pieces
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3, vocab_size=32000),
}
LLAMA3 = {  # Meta's params.json (llama-models' sku_list)
    "3.2 1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        ffn_dim_multiplier=1.5, multiple_of=256, rope_theta=500000.0,
                        use_scaled_rope=True),
    "3.2 3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                        ffn_dim_multiplier=1.0, multiple_of=256, rope_theta=500000.0,
                        use_scaled_rope=True),
    "3.1 8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        ffn_dim_multiplier=1.3, multiple_of=1024, rope_theta=500000.0,
                        use_scaled_rope=True),
    "3.1 70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                         ffn_dim_multiplier=1.3, multiple_of=4096, rope_theta=500000.0,
                         use_scaled_rope=True),
}
PROCESSES = (1, 2, 4, 8)
GIB = 1024 ** 3


def weight_bytes(args: ModelArgs, mode: Optional[str] = None,
                 group_size: int = DEFAULT_GROUP_SIZE, world_size: int = 1,
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of weights one rank of `world_size` holds: the projections and the output matrix
    in `mode`'s saved format ("int8", "int4" in groups of `group_size`; None: `dtype`), the
    embedding and the norms in `dtype`."""
    quantization = None
    if mode is not None:
        quantization = Quantization(mode, group_size if mode == "int4" else None)
    total = 0
    for name, shape in checkpoint.full_shapes(args, quantization).items():
        weight, field = split_field(name)
        if quantization is not None and is_quantized(weight):
            element = SAVED_DTYPES[mode][field].itemsize
        else:
            element = dtype.itemsize
        total += prod(checkpoint.shard_shape(name, shape, world_size, mode)) * element
    return total


def int8_activations_extra(args: ModelArgs, world_size: int = 1, mode: str = "int8",
                           group_size: int = DEFAULT_GROUP_SIZE) -> Tuple[int, int]:
    """What int8 activations (`activations="int8"`) add to one rank's int8 or int4 weights:
    (their layout's padding of every weight's columns to W8A8_GROUP, kept; the largest
    product's weight laid out anew at load, beside the old one until it is dropped: wq|wk|wv
    and w1|w3 are one product each, and an int8 weight with padding is first copied padded,
    so it counts twice)."""
    added, products = 0, {}
    shapes = checkpoint.full_shapes(args, Quantization(mode, group_size if mode == "int4"
                                                       else None))
    for name, shape in shapes.items():
        weight, field = split_field(name)
        if field != "weight" or not is_quantized(weight):
            continue
        rows, stored = checkpoint.shard_shape(name, shape, world_size, mode)
        columns = stored * (2 if mode == "int4" else 1)  # int4: two values a byte
        width = -(-columns // W8A8_GROUP) * W8A8_GROUP
        if mode == "int8":
            added += rows * (width - columns)
            new = rows * width * (1 if width == columns else 2)
        else:  # values two a byte, a bfloat16 scale and zero a group
            new = rows * (width // 2 + width // group_size * 4)
            added += new - rows * (columns // 2 + columns // group_size * 4)
        product = tuple(fused_names(weight) or [weight])  # q/k/v and w1/w3: one product
        products[product] = products.get(product, 0) + new
    return added, max(products.values(), default=0)


def markdown_table(tokens: int = 4096, models=None) -> str:
    """README's table: weights and KV cache (bfloat16) per rank, GiB, for `models` (name:
    ModelArgs; Llama 2's by default). Process counts the model cannot split into are left
    out (Llama 3's 8 kv heads)."""
    lines = [f"| model | processes | bf16 weights | int8 weights | int4 weights (g"
             f"{DEFAULT_GROUP_SIZE}) | KV cache per token | KV cache, {tokens} tokens |",
             "|---|---|---|---|---|---|---|"]
    for size, args in (LLAMA2 if models is None else models).items():
        for world in (w for w in PROCESSES if w in checkpoint.valid_world_sizes(args)):
            weights = [weight_bytes(args, mode, world_size=world) / GIB
                       for mode in (None, "int8", "int4")]
            per_token = KVCache.bytes_per_token(args, torch.bfloat16, world)
            lines.append(f"| {size} | {world} | " + " | ".join(f"{w:.2f} GiB" for w in weights)
                         + f" | {per_token / 1024:g} KiB | {per_token * tokens / GIB:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m llama.memory [TOKENS] [llama2|llama3]`: the table, as markdown."""
    from llama.cli.flags import ArgumentParser

    parser = ArgumentParser(
        prog="python -m llama.memory",
        description="Weights (float, int8, int4) and KV cache per process for Meta's models.")
    parser.add_argument("tokens", nargs="?", type=int, default=4096,
                        help="KV cache length for the last column (default 4096)")
    parser.add_argument("family", nargs="?", choices=("llama2", "llama3"), default="llama2",
                        help="which models (default llama2)")
    args = parser.parse_args(argv)
    print(markdown_table(args.tokens, models=LLAMA3 if args.family == "llama3" else LLAMA2))
    return 0
