"""Where a decode step's time goes on a GPU: the weight-read rate of each matrix product of a
layer by row count (the batch size of a decode step), the busiest kernels of one eager step,
and the time of one step, eager and compiled, by batch size.

    python -m benchmarks.profile_step --shape 7B --batch 1 8

Random weights are drawn on the device (no checkpoint is written). Compare the rates with the
card's copy bandwidth (an H100's is about 3 TB/s): a step at batch b reads every weight once.
"""

import argparse
import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.shapes import SHAPES, VOCAB, NoEosTokenizer
from llama.checkpoints.fixtures import random_weights
from llama.checkpoints.meta import IGNORED_KEYS
from llama.engine.distributed import choose_device, choose_dtype, init_process_groups
from llama.generation import Llama
from llama.model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parent.parent


def random_model(args: ModelArgs, device, dtype) -> Transformer:
    init_process_groups(device, 1)
    state = random_weights(args, 0, dtype, device)
    state = {name: tensor.to(device) for name, tensor in state.items()
             if name not in IGNORED_KEYS}
    return Transformer.from_state_dict(args, state)


def median_ms(fn, reps=50) -> float:
    """Median milliseconds of fn after a warm-up (the device synchronized around each)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def product_rates(model: Transformer, batches):
    layer = model.layers[0]
    weights = {"wqkv": layer.attention.wqkv, "wo": layer.attention.wo.weight,
               "w13": layer.feed_forward.w13, "w2": layer.feed_forward.w2.weight,
               "output": model.output.weight}
    print("weight-read rate of x @ W.T (GB/s): F.linear | torch.mm(W, x.T)")
    for rows in batches:
        line = f"  {rows:3d} rows:"
        for name, w in weights.items():
            x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
            gb = w.numel() * w.element_size() / 1e9
            line += (f" {name} {gb / median_ms(lambda: F.linear(x, w)) * 1e3:5.0f}"
                     f" | {gb / median_ms(lambda: torch.mm(w, x.t())) * 1e3:5.0f};")
        print(line)


def make_step(model: Transformer, bsz: int, position: int, compiled: bool,
              backend: str = "inductor"):
    """One decode step at batch bsz after `position` cache slots, as generation runs it."""
    llama = Llama(model, NoEosTokenizer())
    cache = llama._cache_for(bsz, position + 8)
    device = model.output.weight.device
    with torch.inference_mode(False):
        tokens = torch.ones((bsz, 1), dtype=torch.long, device=device)
        where = torch.tensor([position], device=device)
    if not compiled:
        return lambda: model.forward(tokens, position, cache, last_logits_only=True)
    llama.compile_decode(**({} if backend == "inductor" else {"backend": backend}))
    cache.mark_static()
    return lambda: llama._compiled_step(tokens, where, cache, None)


def busiest_kernels(step, top=6) -> str:
    """GPU kernel time of one call of step, and its busiest kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    lines = [f"    {sum(e.device_time_total for e in events) / 1e3:.2f} ms of GPU kernels"]
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        lines.append(f"    {e.device_time_total / 1e3:7.3f} ms  {e.count:4d} x  {e.key[:80]}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7B", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--position", type=int, default=200, help="cache slots before the step")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers: faster compiles")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile's backend for the compiled step: aot_eager or eager "
                             "trace the same graph without inductor's code generation (to tell "
                             "tracing from generated code, or a quick dry run)")
    parser.add_argument("--sdpa", nargs="+", default=["default"],
                        help="attention kernel sets to time the steps with, e.g. default "
                             "flash_attention,efficient_attention (torch's SDPBackend names)")
    args = parser.parse_args()
    device = choose_device(args.device)
    dtype = choose_dtype(device, args.dtype)
    shape = {**SHAPES[args.shape], **({"n_layers": args.layers} if args.layers else {})}
    model_args = ModelArgs(vocab_size=VOCAB, max_seq_len=args.position + 8,
                           max_batch_size=max(args.batch), **shape)
    model = random_model(model_args, device, dtype)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"shape {args.shape} ({model_args.n_layers} layers), {device}, {dtype}, torch "
          f"{torch.__version__}; weights {weights / 1e9:.2f} GB")
    product_rates(model, sorted(set(args.batch) | {1, 2, 4, 8, 16}))
    for backends in args.sdpa:
        # which kernels scaled_dot_product_attention may use (a compiled step fixes its choice
        # when it is traced, hence the reset)
        context = (contextlib.nullcontext() if backends == "default" else
                   sdpa_kernel([getattr(SDPBackend, name.upper())
                                for name in backends.split(",")]))
        torch._dynamo.reset()
        with context:
            for compiled in (False, True):
                for bsz in args.batch:
                    start = time.perf_counter()
                    step = make_step(model, bsz, args.position, compiled, args.backend)
                    step()
                    first = time.perf_counter() - start
                    print(f"{'compiled' if compiled else 'eager'} step at batch {bsz}, "
                          f"attention {backends}: {median_ms(step, reps=30):.2f} ms (first "
                          f"call {first:.1f} s)")
                    if device.type == "cuda":
                        print(busiest_kernels(step))
    from torch._dynamo.utils import counters

    print("inductor counters:", dict(counters["inductor"]))


if __name__ == "__main__":
    main()
