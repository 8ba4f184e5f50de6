// float32 and bfloat16 weight products on the CPU, in float32.
//
//   float_mm(x, weight) -> y        y[r, o] = sum_k x[r, k] * weight[o, k]          (few rows)
//   bf16_mm(x, weight) -> y         y[r, o] = sum_k x[r, k] * float(weight[o, k])   (any rows)
//
// x: (R, K) float32, contiguous; weight: (N, K) float32 or bfloat16, contiguous. y: (R, N)
// float32.
//
// A decode step reads every weight once; the work per weight is one multiply-add per row. So
// the weight is streamed once for all R rows: a tile of OUTS weight rows is loaded a vector at
// a time and used for ROWS activation rows, then again (from cache) for the next ROWS rows
// (a long product: tiles of LONG_OUTS x LONG_ROWS).
// Threads split the output rows (at::parallel_for), so each core streams its own slab.
//
// Meta ships its checkpoints in bfloat16, and float32 represents every bfloat16 value exactly:
// widening a weight inside the product (its 16 bits shifted into a float32's upper half) and
// multiplying in float32 computes the float32 model's function while reading half the bytes.
// Activations and sums stay float32: nothing is rounded to bfloat16 (the avx512_bf16
// dot-product instruction would round the activations, so it is not used here).
//
// Every output is one fixed sequence of operations: lane j of a vector accumulator adds the
// products of columns j, j + V, j + 2V, ... in order (FMA), the lanes are then summed by a
// fixed tree. It does not depend on R, on where a row sits in x, on the thread count or on
// the weight's storage: a row's result is the same bit for bit alone or in any batch (a
// server's request gives the same logits alone or joining others), and bf16_mm's equals
// float_mm's on the widened weight.

#include "cpu_common.h"

#if defined(LK_AVX512)
static constexpr int V = 16;  // float32 lanes: tiles of 4 x 4 or 3 x 8 accumulators of 32
#elif defined(LK_AVX2)
static constexpr int V = 8;   // 4 x 2 accumulators of 16 registers
#else
static constexpr int V = 1;
#endif

#if defined(LK_AVX512)
using fvec = __m512;
static inline fvec zero() { return _mm512_setzero_ps(); }
static inline fvec load(const float* p) { return _mm512_loadu_ps(p); }
static inline fvec load_part(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
static inline fvec load_w(const uint16_t* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline fvec load_w_part(const uint16_t* p, int n) {
  return widen_bf16(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
}
static inline fvec load_w(const float* p) { return load(p); }
static inline fvec load_w_part(const float* p, int n) { return load_part(p, n); }
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float total(fvec v) { return _mm512_reduce_add_ps(v); }
#elif defined(LK_AVX2)
using fvec = __m256;
static inline fvec zero() { return _mm256_setzero_ps(); }
static inline fvec load(const float* p) { return _mm256_loadu_ps(p); }
static inline fvec load_part(const float* p, int n) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                               0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_maskload_ps(p, _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(ones + 8 - n)));
}
static inline fvec load_w(const uint16_t* p) {
  return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline fvec load_w_part(const uint16_t* p, int n) {
  uint16_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // no read past the row's end
  std::memcpy(part, p, n * sizeof(uint16_t));
  return load_w(part);
}
static inline fvec load_w(const float* p) { return load(p); }
static inline fvec load_w_part(const float* p, int n) { return load_part(p, n); }
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
static inline fvec load_w(const uint16_t* p) { return bf16_to_float(*p); }
static inline fvec load_w_part(const uint16_t* p, int) { return load_w(p); }
static inline fvec load_w(const float* p) { return *p; }
static inline fvec load_w_part(const float* p, int) { return *p; }
static inline fvec fma(fvec a, fvec b, fvec c) { return a * b + c; }
static inline float total(fvec v) { return v; }
#endif

// Outputs o0..o0+NO of rows r0..r0+NR: x the tile's first row, w its first weight row, in
// bfloat16 (uint16_t, widened as it is loaded) or float32.
template <int NO, int NR, typename W>
static void tile(const float* x, int64_t K, const W* w, float* y, int64_t N) {
  fvec acc[NO][NR];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = zero();
  const int64_t whole = K - K % V;
  for (int64_t k = 0; k < whole; k += V) {
    fvec wv[NO];
    for (int o = 0; o < NO; ++o) {
#if defined(LK_AVX512) || defined(LK_AVX2)
      if ((k * sizeof(W)) % 64 == 0)  // once per cache line, a tile ahead (cpu_common.h)
        prefetch_l2(w + (o + NO) * K + k);
#endif
      wv[o] = in_register(load_w(w + o * K + k));
    }
    for (int r = 0; r < NR; ++r) {
      const fvec xv = in_register(load(x + r * K + k));
      for (int o = 0; o < NO; ++o) acc[o][r] = fma(wv[o], xv, acc[o][r]);
    }
  }
  if (whole < K) {  // the last K % V columns, zeros in the other lanes
    const int n = static_cast<int>(K - whole);
    for (int o = 0; o < NO; ++o) {
      const fvec wv = load_w_part(w + o * K + whole, n);
      for (int r = 0; r < NR; ++r)
        acc[o][r] = fma(wv, load_part(x + r * K + whole, n), acc[o][r]);
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) y[r * N + o] = total(acc[o][r]);
}

// y = x w^T in tiles of NO weight rows x NR activation rows (cpu_tiles.h), about `budget`
// rows at a time.
template <int NO, int NR, typename W>
static void products(const float* x, int64_t R, int64_t K, const W* w, float* y, int64_t N,
                     int64_t budget) {
  tiled_product<NO, NR>(R, N, NO * K * sizeof(W), budget, [&](auto no, auto nr, int64_t r,
                                                               int64_t o) {
    tile<decltype(no)::value, decltype(nr)::value>(x + r * K, K, w + o * K,
                                                             y + r * N + o, N);
  });
}

at::Tensor float_mm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "float_mm: x must be a contiguous (rows, K) float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat &&
              weight.is_contiguous() && weight.size(1) == x.size(1),
              "float_mm: weight must be a contiguous (N, K) float32 tensor, K as x's");
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = new_tensor({R, N}, at::kFloat);
  if (R == 0 || N == 0) return y;
  // every row in one pass: each weight tile read once whatever R
  products<OUTS, ROWS>(x.data_ptr<float>(), R, K, weight.data_ptr<float>(), y.data_ptr<float>(),
                       N, R + ROWS);
  return y;
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "bf16_mm: x must be a contiguous (rows, K) float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
              weight.is_contiguous() && weight.size(1) == x.size(1),
              "bf16_mm: weight must be a contiguous (N, K) bfloat16 tensor, K as x's");
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = new_tensor({R, N}, at::kFloat);
  if (R == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  // Long products (prefills) go a block of activation rows at a time, ~512 KB of them, so the
  // block stays in the core's L2 while every weight tile of the thread's slab passes by; the
  // slab is then read once per block. No output's operations change. Each group of rows
  // widens the tile's weights again as it loads them (beside the FMAs): widening a tile once
  // into a float32 buffer for all groups was 1.6-2x slower at 16-128 rows
  // (docs/MEMORY_AND_BF16.md).
  const int64_t budget = (512 << 10) / (K * 4);
  if (R >= LONG_ROWS)
    products<LONG_OUTS, LONG_ROWS>(xp, R, K, wp, yp, N, budget);
  else
    products<OUTS, ROWS>(xp, R, K, wp, yp, N, budget);
  return y;
}
