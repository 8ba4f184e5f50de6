"""bfloat16 weights with float32 activations (llama/layers/bf16.py) against float32 weights:
per-matrix
product times, and decode tok/s of a whole model, in one run.

    python -m benchmarks.bf16_products                       # both parts, shape M
    python -m benchmarks.bf16_products --skip-model --rows 1 4 16 128
    python -m benchmarks.bf16_products --skip-matrices --batch 1 4

Matrices: one (out, in) product (default 5632 x 2048, M's w1), cycling over 8 distinct copies per
candidate so no weight sits in the L3, candidates interleaved call by call; the median ms of a
product, and GB/s of the weight's own bytes. Candidates (x float32 unless named bf16):
  f32 ours         llama.layers.linear.linear on a float32 weight (torch's routes)
  f32 kernel       our float32 kernel (cpu_kernels.float_mm), up to 64 rows
  bf16 kernel      our bfloat16-weight kernel (cpu_kernels.bf16_mm), up to 64 rows
  bf16 lib         llama.layers.linear.linear on a bfloat16 weight (the kernel where it is
  vectorised)
  bf16 widen/N     blocks of N weight rows widened for the float32 GEMM (the route without
                   a vectorised kernel), from 17 rows
  F.linear bf16    torch with bfloat16 weights AND activations (oneDNN's bf16 GEMM: the
                   activations rounded to bfloat16, a different function)
Model: a random checkpoint of the shape (benchmarks/shapes.py's), loaded by default (bfloat16
weights) and with dtype=float32, one at a time (both at once would double the memory), taking
turns run by run; prefill tok/s, and decode tok/s from the median one-token step, at each batch
size, with the GB/s of weights a step reads.
"""

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import bench
from benchmarks.shapes import SHAPES, VOCAB, prompts
from llama.kernels import cpu_kernels
from llama.layers import bf16
from llama.layers.linear import linear

COPIES = 8


def matrix_times(out_f, in_f, rows_list, repeats, blocks):
    g = torch.Generator().manual_seed(0)
    f32 = [torch.randn(out_f, in_f, generator=g) * 0.02 for _ in range(COPIES)]
    b16 = [w.to(torch.bfloat16) for w in f32]
    print(f"\n{out_f} x {in_f} products, ms (median of {repeats} x {COPIES} matrices) and GB/s "
          f"of weights; {torch.get_num_threads()} threads; kernels: {cpu_kernels.isa()}")
    print("| rows | " + " | ".join(["f32 ours", "f32 kernel", "bf16 kernel", "bf16 lib",
                                    "F.linear bf16"] + [f"bf16 widen/{b}" for b in blocks])
          + " |")
    print("|---" * (6 + len(blocks)) + "|")
    for rows in rows_list:
        x = torch.randn(rows, in_f, generator=g)
        xb = x.to(torch.bfloat16)
        candidates = {
            "f32 ours": (lambda w, i: linear(x, f32[i]), 4),
            "f32 kernel": (lambda w, i: cpu_kernels.float_mm(x, f32[i]), 4) if rows <= 64
            else None,
            "bf16 kernel": (lambda w, i: cpu_kernels.bf16_mm(x, b16[i]), 2) if rows <= 64
            else None,
            "bf16 lib": (lambda w, i: linear(x, b16[i]), 2),
            "F.linear bf16": (lambda w, i: F.linear(xb, b16[i]), 2),
        }
        for b in blocks:
            candidates[f"bf16 widen/{b}"] = (
                (lambda w, i, b=b: bf16.widened_product(x, b16[i], b), 2) if rows > 16
                else None)
        samples = {name: [] for name in candidates}
        for name, c in candidates.items():  # warm-up
            if c is not None:
                c[0](None, 0)
        for _ in range(repeats):
            for i in range(COPIES):
                for name, c in candidates.items():
                    if c is None:
                        continue
                    start = time.perf_counter()
                    c[0](None, i)
                    samples[name].append(time.perf_counter() - start)
        cells = []
        for name, c in candidates.items():
            if c is None:
                cells.append("-")
                continue
            ms = statistics.median(samples[name]) * 1e3
            cells.append(f"{ms:.2f} ({out_f * in_f * c[1] / ms / 1e6:.1f} GB/s)")
        print(f"| {rows} | " + " | ".join(cells) + " |")


def model_runs(shape, batches, prompt_len, steps, runs, root):
    """Prefill and decode-step times of the model loaded by default and with float32 weights,
    one at a time, taking turns run by run: the median of `steps` one-token steps (robust to a
    busy machine's spikes), each through Transformer.forward with a KVCache as generation
    calls it."""
    from llama.loading import LoadOptions, load_model

    ckpt = bench.checkpoint_dir(shape, root, torch.device("cpu"))
    kinds = {"bf16 weights (default)": None, "float32 weights": torch.float32}
    figures = {kind: {bsz: {"prefill": [], "step": []} for bsz in batches} for kind in kinds}
    step_bytes = {}
    for run in range(runs):
        for kind, dtype in kinds.items():
            model = load_model(str(ckpt), VOCAB, prompt_len + steps + 1, max(batches),
                               LoadOptions(device="cpu", dtype=dtype, verbose=False))
            weights = [model.output.weight] + [w for layer in model.layers for w in (
                layer.attention.wqkv, layer.attention.wo.weight, layer.feed_forward.w13,
                layer.feed_forward.w2.weight)]
            step_bytes[kind] = sum(w.numel() * w.element_size() for w in weights)
            for bsz in batches:
                tokens = torch.tensor(prompts([prompt_len] * bsz, seed=run))
                cache = model.new_cache(bsz, prompt_len + steps + 1)
                start = time.perf_counter()
                logits = model.forward(tokens, 0, cache, last_logits_only=True)
                figures[kind][bsz]["prefill"].append(
                    bsz * prompt_len / (time.perf_counter() - start))
                times = []
                for i in range(steps):
                    next_tokens = logits[:, -1].argmax(-1, keepdim=True)
                    start = time.perf_counter()
                    logits = model.forward(next_tokens, prompt_len + i, cache,
                                           last_logits_only=True)
                    times.append(time.perf_counter() - start)
                figures[kind][bsz]["step"].append(statistics.median(times))
            del model, weights
            gc.collect()
    bandwidth = bench.read_bandwidth()
    print(f"\n{shape}: prompt {prompt_len}, median of {steps} decode steps, {runs} runs "
          f"taking turns, {torch.get_num_threads()} threads; x.sum() reads "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("| weights | batch | prefill tok/s | decode tok/s | weights read per s (decode) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        for bsz in batches:
            prefill = statistics.median(figures[kind][bsz]["prefill"])
            step = statistics.median(figures[kind][bsz]["step"])
            print(f"| {kind} | {bsz} | {prefill:.1f} | {bsz / step:.2f} | "
                  f"{step_bytes[kind] / step / 1e9:.1f} GB/s |")
    for bsz in batches:
        ratio = [f / b for b, f in zip(figures["bf16 weights (default)"][bsz]["step"],
                                       figures["float32 weights"][bsz]["step"])]
        print(f"batch {bsz}: bf16 decode / float32 decode, run by run: "
              + ", ".join(f"{r:.2f}x" for r in ratio))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=int, default=5632)
    parser.add_argument("--in", dest="in_f", type=int, default=2048)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    parser.add_argument("--blocks", type=int, nargs="*", default=[1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="M", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--root", default="/tmp/llama-bench", help="where checkpoints go")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-matrices", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(bench.cpu_description())
    if not cpu_kernels.available():
        print(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
    with torch.inference_mode():
        if not args.skip_matrices:
            matrix_times(args.out, args.in_f, args.rows, args.repeats, args.blocks)
    if not args.skip_model:
        with torch.inference_mode():
            model_runs(args.shape, args.batch, args.prompt_len, args.steps, args.runs,
                       Path(args.root))


if __name__ == "__main__":
    main()
