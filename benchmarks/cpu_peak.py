"""The ceilings a CPU product cannot pass on this machine: one core's rate of AVX-512 float32
FMAs and of VNNI int16 dot products (vpdpwssd), from a loop of independent chains, and what
those rates allow a 7B prefill on every core.

    python -m benchmarks.cpu_peak

Set against `benchmarks.kernel_compute`'s ns per weight at many rows: the default route
(bfloat16 weights, float32 activations) does one FMA lane per weight and row, int8 and int4
one vpdpwssd lane pair. Needs g++ and an AVX-512 CPU (VNNI for the dot products).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
// 16 independent accumulators in named registers (an array may live on the stack), so the
// loop is bound by the instructions' throughput, not their latency or by loads.
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) \
                X(14) X(15)
constexpr int CHAINS = 16;
template <typename F> double per_ns(F f, long iters) {
  auto t0 = std::chrono::steady_clock::now();
  f(iters);
  return double(iters) * CHAINS /
         std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
}
int main(int argc, char** argv) {
  const long iters = std::atol(argv[1]);
  volatile float fsink; volatile int isink;
  auto fmas = [&](long n) {
    const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-9f);
#define DECLARE_F(i) __m512 a##i = _mm512_set1_ps(float(i));
#define STEP_F(i) a##i = _mm512_fmadd_ps(a##i, b, c);
#define SUM_F(i) s = _mm512_add_ps(s, a##i);
    EACH(DECLARE_F)
    for (long k = 0; k < n; ++k) { EACH(STEP_F) }
    __m512 s = _mm512_setzero_ps();
    EACH(SUM_F)
    fsink = _mm512_reduce_add_ps(s);
  };
#if defined(__AVX512VNNI__)
  auto dots = [&](long n) {
    const __m512i b = _mm512_set1_epi16(3), c = _mm512_set1_epi16(5);
#define DECLARE_D(i) __m512i d##i = _mm512_set1_epi32(i);
#define STEP_D(i) d##i = _mm512_dpwssd_epi32(d##i, b, c);
#define SUM_D(i) s = _mm512_add_epi32(s, d##i);
    EACH(DECLARE_D)
    for (long k = 0; k < n; ++k) { EACH(STEP_D) }
    __m512i s = _mm512_setzero_si512();
    EACH(SUM_D)
    isink = _mm512_reduce_add_epi32(s);
  };
#endif
  double best_f = 0, best_d = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double f = per_ns(fmas, iters);
    best_f = f > best_f ? f : best_f;
#if defined(__AVX512VNNI__)
    double d = per_ns(dots, iters);
    best_d = d > best_d ? d : best_d;
#endif
  }
  std::printf("%.4f %.4f\n", best_f, best_d);  // instructions per ns; 0: no VNNI
}
"""

MACS_7B = 6.74e9  # multiply-adds of 7B's matrix products per token (weights less the embedding)


def measure(iters: int) -> tuple:
    """(zmm FMAs per ns, zmm vpdpwssd per ns or 0) of one core, compiled here with g++."""
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        source.write_text(SOURCE)
        subprocess.run(["g++", "-O2", "-march=native", "-o", str(binary), str(source)],
                       check=True, capture_output=True, text=True)
        out = subprocess.run([str(binary), str(iters)], check=True, capture_output=True,
                             text=True).stdout.split()
    return float(out[0]), float(out[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5_000_000, help="loop trips per try")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        sys.exit("cpu_peak needs an AVX-512 CPU")
    fma, dot = measure(args.iters)
    print(f"one core: {fma:.2f} zmm FMAs per ns = {fma * 16:.1f} G float32 multiply-adds/s")
    if dot:
        print(f"one core: {dot:.2f} zmm vpdpwssd per ns = {dot * 32:.1f} G int16 "
              f"multiply-adds/s")
    print(f"7B prefill ceiling on {args.cores} cores: float32 FMAs "
          f"{fma * 16e9 * args.cores / MACS_7B:.1f} tok/s"
          + (f", vpdpwssd {dot * 32e9 * args.cores / MACS_7B:.1f} tok/s" if dot else ""))


if __name__ == "__main__":
    main()
