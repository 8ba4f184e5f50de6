// float32 weight products of few rows (decode steps) on the CPU.
//
//   float_mm(x, weight) -> y        y[r, o] = sum_k x[r, k] * weight[o, k]
//
// x: (R, K) float32, contiguous; weight: (N, K) float32, contiguous. y: (R, N) float32.
//
// A decode step reads every weight once; the work per weight is one multiply-add per row. So
// the weight is streamed once for all R rows: a tile of OUTS weight rows is loaded a vector at
// a time and used for ROWS activation rows, then again (from cache) for the next ROWS rows.
// Threads split the output rows (at::parallel_for), so each core streams its own slab.
// Measured against torch's routes: README, Performance ("float32 products of few rows").
//
// Every output is one fixed sequence of operations: lane j of a vector accumulator adds the
// products of columns j, j + V, j + 2V, ... in order (FMA), the lanes are then summed by a fixed
// tree. It does not depend on R, on where a row sits in x, or on the thread count: a row's
// result is the same bit for bit alone or in any batch (a server's request gives the same
// logits alone or joining others).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LF_AVX512 1
static constexpr int V = 16;     // lanes
static constexpr int ROWS = 4;   // 4 x 4 accumulators of 32 registers
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LF_AVX2 1
static constexpr int V = 8;
static constexpr int ROWS = 2;   // 4 x 2 accumulators of 16 registers
#else
static constexpr int V = 1;
static constexpr int ROWS = 4;
#endif

static constexpr int OUTS = 4;  // weight rows per tile
// How far ahead (bytes) each weight row is prefetched: 16 KB measured best of 1, 4, 8, 16, 24 and
// 32 KB on the AVX-512 machine (S's matrices at 1-16 rows; 4 and 8 KB lost ~20% at 4-8 rows).
#ifndef PREFETCH_F32
#define PREFETCH_F32 16384
#endif

#if defined(LF_AVX512)
using fvec = __m512;
static inline fvec zero() { return _mm512_setzero_ps(); }
static inline fvec load(const float* p) { return _mm512_loadu_ps(p); }
static inline fvec load_part(const float* p, int n) {  // the first n < 16 lanes, the rest 0
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float total(fvec v) { return _mm512_reduce_add_ps(v); }
#elif defined(LF_AVX2)
using fvec = __m256;
static inline fvec zero() { return _mm256_setzero_ps(); }
static inline fvec load(const float* p) { return _mm256_loadu_ps(p); }
static inline fvec load_part(const float* p, int n) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                               0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_maskload_ps(p, _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(ones + 8 - n)));
}
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float total(fvec v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#else
using fvec = float;
static inline fvec zero() { return 0.f; }
static inline fvec load(const float* p) { return *p; }
static inline fvec load_part(const float* p, int) { return *p; }
static inline fvec fma(fvec a, fvec b, fvec c) { return a * b + c; }
static inline float total(fvec v) { return v; }
#endif

// Outputs o0..o0+NO of rows r0..r0+NR: x the tile's first row, w its first weight row.
template <int NO, int NR>
static void tile(const float* x, int64_t K, const float* w, float* y, int64_t N) {
  fvec acc[NO][NR];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = zero();
  const int64_t whole = K - K % V;
  for (int64_t k = 0; k < whole; k += V) {
    fvec wv[NO];
    for (int o = 0; o < NO; ++o) {
#if defined(LF_AVX512) || defined(LF_AVX2)
      if ((k * 4) % 64 == 0)  // once per cache line
        _mm_prefetch(reinterpret_cast<const char*>(w + o * K + k) + PREFETCH_F32, _MM_HINT_T0);
#endif
      wv[o] = load(w + o * K + k);
    }
    for (int r = 0; r < NR; ++r) {
      const fvec xv = load(x + r * K + k);
      for (int o = 0; o < NO; ++o) acc[o][r] = fma(wv[o], xv, acc[o][r]);
    }
  }
  if (whole < K) {  // the last K % V columns, zeros in the other lanes
    const int n = static_cast<int>(K - whole);
    for (int o = 0; o < NO; ++o) {
      const fvec wv = load_part(w + o * K + whole, n);
      for (int r = 0; r < NR; ++r)
        acc[o][r] = fma(wv, load_part(x + r * K + whole, n), acc[o][r]);
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) y[r * N + o] = total(acc[o][r]);
}

template <int NO>
static void all_rows(const float* x, int64_t R, int64_t K, const float* w, float* y, int64_t N) {
  // the same few weight rows for every tile of activation rows: read from memory once
  for (int64_t r = 0; r < R; r += ROWS) {
    const float* xr = x + r * K;
    float* yr = y + r * N;
    switch (R - r < ROWS ? R - r : ROWS) {
      case 1: tile<NO, 1>(xr, K, w, yr, N); break;
      case 2: tile<NO, 2>(xr, K, w, yr, N); break;
#if !defined(LF_AVX2)
      case 3: tile<NO, 3>(xr, K, w, yr, N); break;
      case 4: tile<NO, 4>(xr, K, w, yr, N); break;
#endif
    }
  }
}

at::Tensor float_mm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "float_mm: x must be a contiguous (rows, K) float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat &&
              weight.is_contiguous() && weight.size(1) == x.size(1),
              "float_mm: weight must be a contiguous (N, K) float32 tensor, K as x's");
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({R, N}, x.options());
  if (R == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + OUTS - 1) / OUTS;
  // at least ~64 KB of weights per parallel chunk, so tiny products stay on one thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(OUTS * K * 4, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * OUTS;
      if (o + OUTS <= N) {
        all_rows<OUTS>(xp, R, K, wp + o * K, yp + o, N);
      } else {
        for (int64_t i = o; i < N; ++i) all_rows<1>(xp, R, K, wp + i * K, yp + i, N);
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(llama_kernels, m) { m.def("float_mm(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(llama_kernels, CPU, m) { m.impl("float_mm", &float_mm); }
