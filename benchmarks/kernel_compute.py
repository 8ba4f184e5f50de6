"""What our CPU kernels cost in computation alone: one thread's CPU time per weight, with the
weight small enough to stay in L2, so memory bandwidth does not enter.

    python -m benchmarks.kernel_compute --rows 1 4 16 64

A kernel whose compute per weight at batch 1 is well under its bytes per weight divided by the
machine's read bandwidth is memory-bound in a decode step; one that is not leaves bandwidth
unused. CPU time (time.thread_time) of a single thread is used rather than wall time, so the
figures hold on a shared, busy machine, where wall-clock timings of whole matrices do not.
Prints ns per weight (the best of --repeats runs of --calls calls) for each kernel and row
count, and the compiled instruction set (LLAMA_KERNEL_ARCH=x86-64-v3 measures the AVX2 build
on an AVX-512 machine). --peak also measures the core's rate of the instruction each kernel
multiplies with (benchmarks/cpu_peak.py: zmm vpdpwssd for int8 and int4, 32 multiply-adds;
zmm FMAs for bf16 and float32, 16) and prints each figure as a share of it: at many rows, how
close a kernel's tiles come to the arithmetic they cannot pass.
"""

import argparse
import time

import torch

from benchmarks import cpu_peak
from llama.kernels import cpu_kernels
from llama.quantize.formats import quantize_int4, quantize_int8


def kernels(out_f: int, in_f: int):
    """name -> (bytes per weight, function of x)"""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    q8 = quantize_int8(w)
    table = {"int8": (1.0, lambda x: cpu_kernels.int8_mm(x, q8.weight, q8.scales))}
    for group in (32, 128):
        q4 = quantize_int4(w, group)
        packed = cpu_kernels.pack_int4(q4.values(), q4.scales, q4.zeros)
        table[f"int4 g{group}"] = (0.5 + 4 / group, lambda x, p=packed, g=group:
                                   cpu_kernels.int4_mm(x, *p, g, out_f))
    wb = w.to(torch.bfloat16)
    table["bf16"] = (2.0, lambda x: cpu_kernels.bf16_mm(x, wb))
    table["float32"] = (4.0, lambda x: cpu_kernels.float_mm(x, w))
    return table


def multiply_adds_per_ns(name: str, fma: float, dot: float) -> float:
    """One core's ceiling for `name`'s products: multiply-adds a ns of its instruction."""
    return dot * 32 if name.startswith("int") else fma * 16


def per_weight_ns(f, x, weights: int, calls: int, repeats: int) -> float:
    for _ in range(calls // 4 + 1):
        f(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            f(x)
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e9 / weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--out", type=int, default=256, help="output rows of the weight")
    parser.add_argument("--in", dest="in_f", type=int, default=4096, help="its columns")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="kernels whose name contains one of these")
    parser.add_argument("--peak", action="store_true",
                        help="also each figure as a share of the core's instruction rate "
                             "(AVX-512 with VNNI, g++)")
    args = parser.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
    torch.set_num_threads(1)
    table = kernels(args.out, args.in_f)
    if args.only:
        table = {k: v for k, v in table.items() if any(o in k for o in args.only)}
    print(f"{cpu_kernels.isa()} build, 1 thread, a {args.out} x {args.in_f} weight (in L2): "
          f"ns of CPU time per weight")
    header = "".join(f"{f'rows {r}':>10}" for r in args.rows)
    print("kernel (bytes/weight)   " + header)
    figures = {}
    for name, (nbytes, f) in table.items():
        cells = []
        for rows in args.rows:
            x = torch.randn(rows, args.in_f, generator=torch.Generator().manual_seed(rows))
            calls = max(4, args.calls // max(1, rows // 4))
            cells.append(per_weight_ns(f, x, args.out * args.in_f, calls, args.repeats))
        figures[name] = cells
        print(f"{f'{name} ({nbytes:g})':<24}" + "".join(f"{c:>10.3f}" for c in cells))
    if args.peak:
        fma, dot = cpu_peak.measure(2_000_000)
        print(f"share of one core's rate (zmm FMAs {fma:.2f}/ns, vpdpwssd {dot:.2f}/ns; "
              "benchmarks.cpu_peak)")
        print("kernel                  " + header)
        for name, cells in figures.items():
            ceiling = multiply_adds_per_ns(name, fma, dot)
            shares = [rows / ns / ceiling if ceiling else float("nan")
                      for rows, ns in zip(args.rows, cells)]  # multiply-adds a ns / ceiling
            print(f"{name:<24}" + "".join(f"{share:>10.0%}" for share in shares))


if __name__ == "__main__":
    main()
