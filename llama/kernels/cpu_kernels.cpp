// int8 weight matrix products on the CPU, in float32, and the build's instruction set (the
// operators are registered in cpu_ops.cpp).
//
//   int8_mm(x, weight, scales)          y[r, o] = scales[o] * s[r] * sum_k q[r, k] * weight[o, k],
//                                       q, s: x's rows rounded to int16, one scale per row
//
// x: (rows, K) float32, contiguous. int8 weight: (N, W) int8, W >= K a multiple of 32, columns
// K..W zero; scales: (N,) bfloat16. The sums are exact integers. Every output is computed by
// one thread in a fixed order, so results do not depend on the thread count.
//
// Threads split the output rows (at::parallel_for, torch's pool), so each core streams its
// own slab of the weight; each weight vector loaded is used for up to ROWS activation rows.
// The instruction set is chosen at compile time (-march=native: AVX-512 F+BW, with VNNI where
// the CPU has it; AVX2+FMA; or plain C++); isa() names it and says whether this CPU runs it.

#include "cpu_common.h"

#include <string>

// ------------------------------------------------------------------------------------ int8
// Activations are rounded to int16 with one scale per row (token), s = max|x| / 32767, and
// multiplied with the int8 weight in integers: y = (sum_k q[r, k] * w[o, k]) * s[r] * scale[o].
// The integer sum is exact, so results are the same bit for bit on every instruction set and
// thread count. Each element's rounding error is at most s / 2, 2^-16 of its row's largest:
// finer than bfloat16 for every element within 128x of that largest. On AVX-512 VNNI one
// instruction (vpdpwssd) does 32 multiply-adds, where the float32 product took a conversion
// of each weight and an FMA per 16: ~2x the speed for 1-16 rows (docs/QUANTIZATION.md).

#if defined(LK_AVX512)
static constexpr int64_t STEP8 = 32;  // columns per step: 32 int16 lanes
// Columns summed in int32 before the sum moves to int64: each int32 lane adds two products
// of at most 128 * 32767 per step, and 4096 columns are 128 steps: < 2^30.
static constexpr int64_t CHUNK8 = 4096;
using i16vec = __m512i;
static inline i16vec load_w(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline i16vec load_x(const int16_t* p) { return _mm512_loadu_si512(p); }
static inline i32acc dot_i16(i32acc acc, i16vec w, i16vec x) { return dot_i16x32(acc, w, x); }
static inline i32acc zero_i32() { return (i32acc)_mm512_setzero_si512(); }
static inline int64_t sum_i32(i32acc acc) {
  const __m512i v = (__m512i)acc;
  return _mm512_reduce_add_epi64(_mm512_add_epi64(
      _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
      _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}
#elif defined(LK_AVX2)
static constexpr int64_t STEP8 = 16;
static constexpr int64_t CHUNK8 = 2048;  // 128 steps of 16 columns, as above
using i16vec = __m256i;
static inline i16vec load_w(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline i16vec load_x(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
static inline i32acc dot_i16(i32acc acc, i16vec w, i16vec x) { return dot_i16x16(acc, w, x); }
static inline i32acc zero_i32() { return (i32acc)_mm256_setzero_si256(); }
static inline int64_t sum_i32(i32acc acc) {
  const __m256i v = (__m256i)acc;
  const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide),
                                     _mm256_extracti128_si256(wide, 1));
  return _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
}
#endif

// Outputs o0..o0+NO of rows r0..r0+NR: q (rows, W) int16, W a multiple of 32.
template <int NO, int NR>
static void int8_tile(const int16_t* q, const float* xs, int64_t W, const int8_t* w,
                      const uint16_t* scales, float* y, int64_t N) {
  int64_t total[NO][NR] = {};
#if defined(LK_AVX512) || defined(LK_AVX2)
  for (int64_t c = 0; c < W; c += CHUNK8) {
    const int64_t end = std::min(c + CHUNK8, W);
    i32acc acc[NO][NR];
    for (int o = 0; o < NO; ++o)
      for (int r = 0; r < NR; ++r) acc[o][r] = zero_i32();
    for (int64_t k = c; k < end; k += STEP8) {
      i16vec wv[NO];
      for (int o = 0; o < NO; ++o) {
        if ((k & 63) == 0)
          prefetch_l2(w + (o + NO) * W + k);
        wv[o] = load_w(w + o * W + k);
      }
      for (int r = 0; r < NR; ++r) {
        const i16vec xv = in_register(load_x(q + r * W + k));
        for (int o = 0; o < NO; ++o) acc[o][r] = dot_i16(acc[o][r], wv[o], xv);
      }
    }
    for (int o = 0; o < NO; ++o)
      for (int r = 0; r < NR; ++r) total[o][r] += sum_i32(acc[o][r]);
  }
#else
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r)
      for (int64_t k = 0; k < W; ++k)
        total[o][r] += static_cast<int64_t>(w[o * W + k]) * q[r * W + k];
#endif
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r)
      y[r * N + o] = static_cast<float>(total[o][r]) * xs[r] * bf16_to_float(scales[o]);
}

// y in tiles of NO weight rows x NR activation rows (cpu_tiles.h), about `budget` rows at a
// time.
template <int NO, int NR>
static void int8_products(const int16_t* q, const float* xs, int64_t R, int64_t W,
                          const int8_t* w, const uint16_t* scales, float* y, int64_t N,
                          int64_t budget) {
  tiled_product<NO, NR>(R, N, NO * W, budget, [&](auto no, auto nr, int64_t r, int64_t o) {
    int8_tile<decltype(no)::value, decltype(nr)::value>(q + r * W, xs + r, W, w + o * W,
                                                        scales + o, y + r * N + o, N);
  });
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "int8_mm: x must be a contiguous (rows, K) float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int8_mm: weight must be a contiguous (N, W) int8 tensor");
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0), W = weight.size(1);
  TORCH_CHECK(W >= K && W % 32 == 0, "int8_mm: the weight's width must be >= K and a multiple "
              "of 32 (zero-padded)");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == N &&
              scales.is_contiguous(), "int8_mm: scales must be (N,) bfloat16");
  at::Tensor q = new_tensor({R, W}, at::kShort);
  at::Tensor xs = new_tensor({R}, at::kFloat);
  quantize_rows_i16(x.data_ptr<float>(), R, K, W, q.data_ptr<int16_t>(), xs.data_ptr<float>());
  at::Tensor y = new_tensor({R, N}, at::kFloat);
  const int16_t* qp = q.data_ptr<int16_t>();
  const float* sx = xs.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  // Long products (prefills) go a block of activation rows at a time, ~512 KB of int16, so the
  // block stays in the core's L2 while the thread's slab of weight tiles passes by (then once
  // more per block), in tiles of LONG_OUTS x LONG_ROWS. The sums are exact integers: blocking
  // and tiling change no result.
  const int64_t budget = (512 << 10) / (W * 2);
  if (R >= LONG_ROWS)
    int8_products<LONG_OUTS, LONG_ROWS>(qp, sx, R, W, wp, sp, yp, N, budget);
  else
    int8_products<OUTS, ROWS>(qp, sx, R, W, wp, sp, yp, N, budget);
  return y;
}

// The compiled instruction set, and whether this CPU runs it ("avx512", "avx2", "generic";
// "unsupported: avx512" when a build was copied to a CPU without it).
std::string isa() {
#if defined(LK_AVX512)
  return __builtin_cpu_supports("avx512f") ? "avx512" : "unsupported: avx512";
#elif defined(LK_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "avx2"
                                                                          : "unsupported: avx2";
#else
  return "generic";
#endif
}
