"""Decode steps over a long KV cache kept in float32 against one kept in bfloat16
(kv_cache_dtype), taking turns.

    python -m benchmarks.kv_cache_decode --ckpt ~/rs/7B --quantize int8 \\
        --positions 128 1000 2000 --batch 1 4

The checkpoint is built once. For each batch size and position, the two cache dtypes take
turns, `--rounds` times: a cache of that many slots per row (zeros: a step's time does not
depend on the values) and `--steps` one-token steps at that position, every row attending
all the slots before it, timed after one untimed step. Per cell: ms a step and tok/s (median
over the rounds) for each dtype, bfloat16's speed-up (the median of the rounds' ratios), and
the bytes of keys and values a step reads. Then one layer's decode-step attention alone at the
model's layer shape (eight layers' caches in turn, so none is read from cache memory), our
kernel and torch's attention under a mask (what a plain C++ build's model takes, a bfloat16
cache widened first), for each dtype: ms and GB/s of keys and values (the best of the rounds).
`LLAMA_KERNEL_ARCH=x86-64-v3` times an AVX2-only build's kernel.

With `--gguf FILE --llama-cpp DIR` (llama.cpp built outside the repository, see
benchmarks/vs_llamacpp.py), each round's one-row cells also run llama-bench at that depth
(`-d POSITION -p 0 -n STEPS`: it prefills the depth untimed, then times the decode steps; its
cache is float16, its default), in turn with ours.
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from llama.layers.cache import KVCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def step_seconds(model, batch: int, position: int, steps: int, dtype: torch.dtype) -> float:
    """Seconds per one-token step at `position` for `batch` rows, the cache kept in `dtype`."""
    model.set_kv_cache_dtype(dtype)
    cache = model.new_cache(batch, position + steps + 1)
    tokens = torch.randint(3, model.vocab_size, (batch, 1))
    model.forward(tokens, position, cache)  # untimed: first touches of this cache's pages
    start = time.perf_counter()
    for i in range(steps):
        model.forward(tokens, position + 1 + i, cache)
    return (time.perf_counter() - start) / steps


def attention_seconds(model, batch: int, position: int, dtype: torch.dtype, rounds: int,
                      ours: bool) -> float:
    """Seconds of one layer's decode-step attention at `position`: our kernel, or torch's
    attention under a mask (what plain builds and compiled steps take, a bfloat16 cache
    widened for it first)."""
    from llama.kernels import cpu_kernels
    from llama.layers import attend
    from llama.layers.cache import decode_mask

    attention = model.layers[0].attention
    n_kv, n_rep, hd = attention.n_local_kv_heads, attention.n_rep, attention.head_dim
    q = torch.randn(batch, n_kv, n_rep, hd)
    xq = q.view(batch, 1, n_kv * n_rep, hd)  # the model's form for torch's route
    caches = [(torch.randn(batch, n_kv, position + 1, hd).to(dtype),
               torch.randn(batch, n_kv, position + 1, hd).to(dtype)) for _ in range(8)]
    starts, ends = torch.zeros(batch, dtype=torch.long), torch.full((batch,), position + 1)
    mask = decode_mask(torch.tensor([position]), position + 1, None)
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        for k, v in caches:
            if ours:
                cpu_kernels.decode_attention(q, k, v, starts, ends, hd ** -0.5)
            else:
                attend.masked(xq, k, v, mask, hd ** -0.5, n_rep)
        times.append((time.perf_counter() - start) / len(caches))
    return min(times[1:])  # the first round untimed: it touched the caches' pages first


def llama_cpp_tok_s(llama_cpp: Path, gguf: Path, position: int, steps: int, threads: int
                    ) -> float:
    """llama-bench's decode rate at one sequence, `steps` tokens after `position` of context."""
    bench = subprocess.run([str(llama_cpp / "llama-bench"), "-m", str(gguf), "-t", str(threads),
                            "-p", "0", "-n", str(steps), "-d", str(position), "-r", "1", "-o",
                            "json"], capture_output=True, text=True, check=True)
    return next(t["avg_ts"] for t in json.loads(bench.stdout) if t["n_gen"])


def cache_bytes(model, batch: int, position: int, dtype: torch.dtype) -> int:
    """Keys and values one step reads: every layer's, for each row's position + 1 slots (one
    process)."""
    return KVCache.bytes_per_token(model.params, dtype) * batch * (position + 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--tokenizer", type=Path, help="default: the directory's tokenizer.model")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="int8")
    parser.add_argument("--positions", type=int, nargs="+", default=[128, 1000, 2000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gguf", type=Path, help="llama.cpp's file of the same checkpoint")
    parser.add_argument("--llama-cpp", type=Path, help="the folder of llama-bench")
    args = parser.parse_args(argv)
    if (args.gguf is None) != (args.llama_cpp is None):
        parser.error("--gguf and --llama-cpp go together")

    from llama import Llama

    tokenizer = args.tokenizer or args.ckpt / "tokenizer.model"
    quantize = None if args.quantize == "none" else args.quantize
    longest = max(args.positions) + args.steps + 2
    model = Llama.build(str(args.ckpt), str(tokenizer), longest, max(args.batch),
                        device="cpu", quantize=quantize, verbose=False).model
    print(f"{args.ckpt.name}, {args.quantize} weights, {torch.get_num_threads()} threads, "
          f"{args.steps} steps a sample, {args.rounds} rounds")
    print("batch  position  ms a step (tok/s): float32 cache | bfloat16 cache | bfloat16's "
          "speed-up | cache read a step, float32 | bfloat16"
          + (f" | llama.cpp {args.gguf.name} tok/s (one row)" if args.gguf else ""))
    with torch.inference_mode():
        for batch in args.batch:
            for position in args.positions:
                times = {name: [] for name in DTYPES}
                theirs = []  # llama.cpp's tok/s, one row
                for _ in range(args.rounds):
                    for name, dtype in DTYPES.items():
                        times[name].append(step_seconds(model, batch, position, args.steps,
                                                        dtype))
                    if args.gguf and batch == 1:
                        theirs.append(llama_cpp_tok_s(args.llama_cpp, args.gguf, position,
                                                      args.steps, torch.get_num_threads()))
                ratio = statistics.median(f / b for f, b in zip(times["float32"],
                                                                 times["bfloat16"]))
                cells = []
                for name in DTYPES:
                    seconds = statistics.median(times[name])
                    cells.append(f"{seconds * 1e3:8.1f} ({batch / seconds:6.2f})")
                read = [cache_bytes(model, batch, position, dtype) / 1e6
                        for dtype in DTYPES.values()]
                extra = (" | " + " / ".join(f"{t:.2f}" for t in theirs)) if theirs else ""
                print(f"{batch:5d}  {position:8d}  {cells[0]} | {cells[1]} | {ratio:5.2f}x | "
                      f"{read[0]:.3f} MB | {read[1]:.3f} MB{extra}", flush=True)
    model.set_kv_cache_dtype(None)
    from llama.kernels import cpu_kernels

    print(f"decode attention alone, one layer ({cpu_kernels.isa() or 'no'} build): ms (GB/s of "
          f"keys and values), float32 cache: ours | torch's; bfloat16 cache: ours | torch's; "
          f"ours over torch's, float32 | bfloat16; ours, bfloat16's speed-up")
    for batch in args.batch:
        for position in args.positions:
            cells, seconds = [], []
            for dtype in DTYPES.values():
                read = cache_bytes(model, batch, position, dtype) / model.n_layers
                for ours in (True, False):
                    seconds.append(attention_seconds(model, batch, position, dtype,
                                                     args.rounds, ours))
                    cells.append(f"{seconds[-1] * 1e3:7.3f} ({read / seconds[-1] / 1e9:5.1f})")
            print(f"{batch:5d}  {position:8d}  {cells[0]} | {cells[1]} ; {cells[2]} | "
                  f"{cells[3]} ; {seconds[1] / seconds[0]:5.2f}x | "
                  f"{seconds[3] / seconds[2]:5.2f}x ; {seconds[0] / seconds[2]:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
