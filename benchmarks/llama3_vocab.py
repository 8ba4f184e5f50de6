"""What Llama 3's 128,256-token vocabulary costs a CPU decode step: Llama 3.2 1B's layer shape
(dim 2048, 32 heads, 8 kv heads, feed-forward 8192) with a few layers, under Llama 2's 32,000
tokens and Llama 3's 128,256, batch 1, in turns. The difference is the larger output product
(the embedding is a lookup); a whole 1B model has 16 such layers.

    python -m benchmarks.llama3_vocab --mode native     # float32 on our kernels (the server's)
    python -m benchmarks.llama3_vocab --mode int8

One mode per run keeps the peak near 4 GB (the float32 weights are drawn for both models).
Figures are medians (and 10th percentiles) of ms per step.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.cpu_step import make_step, random_model
from llama.checkpoints.memory import LLAMA3
from llama.engine.distributed import init_process_groups
from llama.model import ModelArgs

REPO = Path(__file__).resolve().parent.parent

VOCABS = {"Llama 2 (32000)": 32000, "Llama 3 (128256)": 128256}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="native", choices=["none", "native", "int8", "int4"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--position", type=int, default=192, help="cache slots before the step")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    init_process_groups(torch.device("cpu"), 1, announce=False)
    shape = LLAMA3["3.2 1B"]
    models = {}
    for name, vocab in VOCABS.items():
        model_args = ModelArgs(dim=shape.dim, n_layers=args.layers, n_heads=shape.n_heads,
                               n_kv_heads=shape.n_kv_heads, vocab_size=vocab,
                               multiple_of=shape.multiple_of,
                               ffn_dim_multiplier=shape.ffn_dim_multiplier,
                               rope_theta=shape.rope_theta, use_scaled_rope=True,
                               max_seq_len=args.position + 8, max_batch_size=1)
        quantized = None if args.mode in ("none", "native") else args.mode
        models[name] = random_model(model_args, quantized, 32)
        if args.mode == "native":
            models[name].use_native_kernels()
    print(f"Llama 3.2 1B layers x{args.layers}, mode {args.mode}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, position {args.position}, load average "
          f"{os.getloadavg()[0]:.1f}")
    steps = {name: make_step(model, 1, args.position, False) for name, model in models.items()}
    times = {name: [] for name in steps}
    with torch.inference_mode():
        for step in steps.values():
            step()
        for _ in range(args.reps):  # in turns
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
    medians = {}
    for name, samples in times.items():
        medians[name] = statistics.median(samples)
        p10 = sorted(samples)[len(samples) // 10]
        print(f"  {name:18s} {medians[name]:7.2f} ms per step (p10 {p10:7.2f})")
    small, large = medians.values()
    print(f"  the larger output product: +{large - small:.2f} ms per step (x{large / small:.2f})")

if __name__ == "__main__":
    main()
