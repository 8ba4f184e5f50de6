"""Where a CPU decode step's time goes, float32 against quantized weights: the time of one step
(eager and, with --compile, compiled) per batch size, and torch.profiler's split of an eager
step into the matrix products, attention, every other op, and time in no op (Python, module
calls, dispatch). "native": float32 weights on our kernels (Transformer.use_native_kernels, as
the server runs them), "none": on torch's routes.

    python -m benchmarks.cpu_step --shape S --quantize none int8 int4 --batch 1 4
    python -m benchmarks.cpu_step --shape S --quantize none native --batch 1 4 6 8
    taskset -c 0 python -m benchmarks.cpu_step --threads 1 --compile   # pinned, compiled too

Random weights are drawn in memory (no checkpoint); models take turns step by step, so a busy
spell of a shared machine hits them alike. Figures are medians (and 10th percentiles) of ms
per step.
"""

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.shapes import SHAPES, VOCAB, NoEosTokenizer
from llama.checkpoints.fixtures import random_weights
from llama.checkpoints.meta import IGNORED_KEYS
from llama.engine.distributed import init_process_groups
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.quantize.formats import is_quantized, quantize

REPO = Path(__file__).resolve().parent.parent

PRODUCT_OPS = ("llama_kernels::", "aten::bmm", "aten::mm", "aten::addmm", "aten::linear",
               "mkldnn::_linear_pointwise", "aten::_weight_int", "aten::matmul")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::scaled_dot_product")


def random_model(args: ModelArgs, mode, group_size) -> Transformer:
    state = {name: tensor for name, tensor in random_weights(args, 0, torch.float32, "cpu").items()
             if name not in IGNORED_KEYS}
    if mode:
        state = {name: quantize(t, mode, group_size, name=name) if is_quantized(name) else t
                 for name, t in state.items()}
    return Transformer.from_state_dict(args, state)


def make_step(model, bsz, position, compiled):
    """One decode step at batch bsz after `position` cache slots, as generation runs it."""
    llama = Llama(model, NoEosTokenizer())
    cache = llama._cache_for(bsz, position + 8)
    with torch.inference_mode(False):
        tokens = torch.ones((bsz, 1), dtype=torch.long)
        where = torch.tensor([position])
    if not compiled:
        return lambda: model.forward(tokens, position, cache, last_logits_only=True)
    llama.compile_decode()
    cache.mark_static()
    return lambda: llama._compiled_step(tokens, where, cache, None)


def split(step, reps=10):
    """ms per step in products, attention, other ops (self time) and outside any op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            step()
        wall = (time.perf_counter() - start) * 1e3 / reps
    parts, calls, other = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in prof.key_averages():
        kind = ("products" if e.key.startswith(PRODUCT_OPS) else
                "attention" if e.key.startswith(ATTENTION_OPS) else "other ops")
        parts[kind] += e.self_cpu_time_total / 1e3 / reps
        calls[kind] += e.count // reps
        if kind == "other ops":
            other[e.key] += e.self_cpu_time_total / 1e3 / reps
    parts["outside ops"] = wall - sum(parts.values())
    top = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    return wall, parts, calls, top


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="S", choices=sorted(SHAPES))
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"],
                        choices=["none", "native", "int8", "int4"])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--position", type=int, default=192, help="cache slots before the step")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also the compiled step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    init_process_groups(torch.device("cpu"), 1)
    model_args = ModelArgs(vocab_size=VOCAB, max_seq_len=args.position + 8,
                           max_batch_size=max(args.batch), **SHAPES[args.shape])
    models = {mode: random_model(model_args, None if mode in ("none", "native") else mode,
                                 args.group_size) for mode in args.quantize}
    if "native" in models and not models["native"].use_native_kernels():
        print("native: our kernels do not run vectorised here; the model keeps torch's routes")
    print(f"shape {args.shape}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"position {args.position}, load average {os.getloadavg()[0]:.1f}")
    for compiled in (False, True) if args.compile else (False,):
        for bsz in args.batch:
            steps = {}
            for mode, model in models.items():
                start = time.perf_counter()
                steps[mode] = make_step(model, bsz, args.position, compiled)
                with torch.inference_mode(not compiled):
                    steps[mode]()
                if compiled:
                    print(f"  compiled {mode} batch {bsz}: first call "
                          f"{time.perf_counter() - start:.0f} s")
            times = defaultdict(list)
            with torch.inference_mode(not compiled):
                for _ in range(args.reps):  # in turns
                    for mode, step in steps.items():
                        start = time.perf_counter()
                        step()
                        times[mode].append((time.perf_counter() - start) * 1e3)
            base = statistics.median(times[next(iter(steps))])
            for mode, step in steps.items():
                median = statistics.median(times[mode])
                line = (f"{'compiled' if compiled else 'eager'} {mode:5s} batch {bsz}: "
                        f"{median:6.2f} ms per step "
                        f"(p10 {sorted(times[mode])[len(times[mode]) // 10]:6.2f}), "
                        f"x{base / median:.2f} the first")
                if not compiled:
                    with torch.inference_mode():
                        wall, parts, calls, top = split(step)
                    line += "\n    profiled {:.2f} ms: ".format(wall) + ", ".join(
                        f"{k} {v:.2f}" + (f" ({calls[k]} calls)" if k in calls else "")
                        for k, v in parts.items())
                    line += "\n    busiest other ops: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in top)
                print(line, flush=True)


if __name__ == "__main__":
    main()
