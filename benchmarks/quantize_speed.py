"""What quantizing at load costs per matrix: int4's native quantizer and repacking against
the torch operations they replace (the same bits), and int8's quantizer, wall time on all
threads.

    python -m benchmarks.quantize_speed --out 11008 --in 4096

Loading with `quantize="int4"` runs, per weight matrix, quantize_int4 (the saved format) and
then the repacking into the CPU kernel's layout (PackedInt4). Prints the best of --repeats
ms of each step, both ways, for one bfloat16 matrix of the given shape.
"""

import argparse
import time

import torch

from llama.kernels import cpu_kernels
from llama.quantize import formats
from llama.quantize.formats import quantize_int4, quantize_int8


def best_seconds(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_quantize_int4(w, group):
    native, formats._native_int4 = formats._native_int4, lambda weight: False
    try:
        return quantize_int4(w, group)
    finally:
        formats._native_int4 = native


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=11008)
    parser.add_argument("--in", dest="in_f", type=int, default=4096)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
    w = (torch.randn(args.out, args.in_f, generator=torch.Generator().manual_seed(0))
         * 0.02).to(torch.bfloat16)
    q = quantize_int4(w, args.group)
    steps = [
        ("int4 quantize, native", lambda: quantize_int4(w, args.group)),
        ("int4 quantize, torch", lambda: torch_quantize_int4(w, args.group)),
        ("int4 repack, native", lambda: cpu_kernels.int4_pack(q.weight, q.scales, q.zeros)),
        ("int4 repack, torch", lambda: cpu_kernels.pack_int4(q.values(), q.scales, q.zeros)),
        ("int8 quantize", lambda: quantize_int8(w)),
    ]
    print(f"a {args.out} x {args.in_f} bfloat16 matrix, g{args.group}, "
          f"{torch.get_num_threads()} threads: best of {args.repeats}, ms")
    for name, f in steps:
        f()  # warm: the kernels' load, the allocator
        print(f"{name:<24} {best_seconds(f, args.repeats) * 1e3:.3f}")


if __name__ == "__main__":
    main()
