// int8 and int4 weight matrix products of few rows (decode steps) on the CPU, in float32.
//
//   int8_mm(x, weight, scales)          y[r, o] = scales[o] * s[r] * sum_k q[r, k] * weight[o, k],
//                                       q, s: x's rows rounded to int16, one scale per row
//   int4_mm(x, packed, sz, G, n_out)    y[r, o] = sum_k x[r, k] * ((q[o, k] - 8) * s + z),
//                                       (s, z) = sz[o, k / G]
//   int4_dequantize(packed, sz, G, start, end, bf16)   rows start..end of the int4 weight
//
// x: (rows, K) float32, contiguous. int8 weight: (N, W) int8, W >= K a multiple of 32, columns
// K..W zero; scales: (N,) bfloat16. int4 weight in this file's layout (llama/cpu_kernels.py,
// pack_int4): (N4, K / 2) uint8, N4 = N rounded up to 4, each 32 columns of a row as 16 bytes,
// byte j = column j (low nibble) | column j + 16 (high nibble); sz: (N4, K / G, 2) bfloat16.
// int8 sums are exact integers; int4 accumulates in float32. Every output is computed by one
// thread in a fixed order, so results do not depend on the thread count.
//
// Threads split the output rows (at::parallel_for, torch's pool), so each core streams its
// own slab of the weight; each weight vector loaded is used for up to ROWS activation rows.
// The instruction set is chosen at compile time (-march=native: AVX-512 F+BW, with VNNI where
// the CPU has it; AVX2+FMA; or plain C++); isa() names it and says whether this CPU runs it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LK_AVX512 1
static constexpr int ROWS = 4;  // activation rows per tile: 4 x 4 accumulators
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LK_AVX2 1
static constexpr int ROWS = 2;  // 16 vector registers: 4 x 2 accumulators
#else
static constexpr int ROWS = 4;
#endif

static constexpr int OUTS = 4;  // output rows per tile (int4 weights are padded to it)
// How far ahead (bytes) each weight stream is prefetched: the hardware prefetcher alone left
// one core at ~6.5 GB/s of int8 reads, against ~13 GB/s for MKL's float32 matrix-vector
// product; with these ~9.5 (int8) and ~11 GB/s (int4), measured on the AVX-512 machine
// (docs/QUANTIZATION.md). A prefetch past the end of a weight does not fault.
#ifndef PREFETCH8
#define PREFETCH8 16384
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#ifndef PREFETCH4
#define PREFETCH4 8192
#endif

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to()
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// ------------------------------------------------------------------------------------ int8
// Activations are rounded to int16 with one scale per row (token), s = max|x| / 32767, and
// multiplied with the int8 weight in integers: y = (sum_k q[r, k] * w[o, k]) * s[r] * scale[o].
// The integer sum is exact, so results are the same bit for bit on every instruction set and
// thread count. Each element's rounding error is at most s / 2, 2^-16 of its row's largest:
// finer than bfloat16 for every element within 128x of that largest. On AVX-512 VNNI one
// instruction (vpdpwssd) does 32 multiply-adds, where the float32 product took a conversion
// of each weight and an FMA per 16: ~2x the speed for 1-16 rows (docs/QUANTIZATION.md).

static constexpr int64_t I16_MAX = 32767;

// Rows of x (R, K) as int16 (R, W), zero past K, and their scales. A row with an infinite or
// NaN value gets a NaN scale, so its outputs are NaN, as a float product's would be.
static void quantize_rows_i16(const float* x, int64_t R, int64_t K, int64_t W, int16_t* q,
                              float* scales) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    int16_t* qr = q + r * W;
    float amax = 0.f, finite = 0.f;  // finite: sum of x - x, NaN if any x is inf or NaN
    int64_t k = 0;
#if defined(LK_AVX512)
    __m512 vmax = _mm512_setzero_ps(), vfin = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      vfin = _mm512_add_ps(vfin, _mm512_sub_ps(v, v));
    }
    amax = _mm512_reduce_max_ps(vmax);
    finite = _mm512_reduce_add_ps(vfin);
#endif
    for (; k < K; ++k) {
      amax = std::max(amax, std::fabs(xr[k]));
      finite += xr[k] - xr[k];
    }
    if (finite != 0.f || !(amax <= 3.4e38f)) {  // NaN compares unequal; inf > max float
      std::memset(qr, 0, W * sizeof(int16_t));
      scales[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = amax > 0.f ? static_cast<float>(I16_MAX) / amax : 0.f;
    scales[r] = amax / static_cast<float>(I16_MAX);
    k = 0;
#if defined(LK_AVX512)
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16)  // nearest, ties to even (the default rounding mode)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), _mm512_cvtsepi32_epi16(
          _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), vinv))));
#endif
    for (; k < K; ++k) qr[k] = static_cast<int16_t>(std::nearbyint(xr[k] * inv));
    for (; k < W; ++k) qr[k] = 0;
  }
}

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
static inline i16vec dot_i16(i16vec acc, i16vec w, i16vec x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
static inline i16vec zero_i32() { return _mm512_setzero_si512(); }
static inline int64_t sum_i32(i16vec v) {
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
static inline i16vec dot_i16(i16vec acc, i16vec w, i16vec x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
}
static inline i16vec zero_i32() { return _mm256_setzero_si256(); }
static inline int64_t sum_i32(i16vec v) {
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
    i16vec acc[NO][NR];
    for (int o = 0; o < NO; ++o)
      for (int r = 0; r < NR; ++r) acc[o][r] = zero_i32();
    for (int64_t k = c; k < end; k += STEP8) {
      i16vec wv[NO];
      for (int o = 0; o < NO; ++o) {
        if ((k & 63) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(w + o * W + k + PREFETCH8), PF_HINT);
        wv[o] = load_w(w + o * W + k);
      }
      for (int r = 0; r < NR; ++r) {
        const i16vec xv = load_x(q + r * W + k);
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

template <int NO>
static void int8_rows(const int16_t* q, const float* xs, int64_t R, int64_t W, const int8_t* w,
                      const uint16_t* scales, float* y, int64_t N) {
  // the same few weight rows for every tile of activation rows: read from memory once
  for (int64_t r = 0; r < R; r += ROWS) {
    const int16_t* qr = q + r * W;
    float* yr = y + r * N;
    switch (R - r < ROWS ? R - r : ROWS) {
      case 1: int8_tile<NO, 1>(qr, xs + r, W, w, scales, yr, N); break;
      case 2: int8_tile<NO, 2>(qr, xs + r, W, w, scales, yr, N); break;
#if !defined(LK_AVX2)
      case 3: int8_tile<NO, 3>(qr, xs + r, W, w, scales, yr, N); break;
      case 4: int8_tile<NO, 4>(qr, xs + r, W, w, scales, yr, N); break;
#endif
    }
  }
}

// Output-row tiles per parallel chunk: at least ~64 KB of weights, so tiny products stay on
// one thread.
static int64_t grain(int64_t bytes_per_tile) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(bytes_per_tile, 1));
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
  at::Tensor q = at::empty({R, W}, x.options().dtype(at::kShort));
  at::Tensor xs = at::empty({R}, x.options());
  quantize_rows_i16(x.data_ptr<float>(), R, K, W, q.data_ptr<int16_t>(), xs.data_ptr<float>());
  at::Tensor y = at::empty({R, N}, x.options());
  const int16_t* qp = q.data_ptr<int16_t>();
  const float* sx = xs.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + OUTS - 1) / OUTS;
  // Long products (prefills) go a block of activation rows at a time, ~512 KB of int16, so the
  // block stays in the core's L2 while the thread's slab of weight tiles passes by (then once
  // more per block). The sums are exact integers: blocking changes no result.
  const int64_t block = std::max<int64_t>(ROWS, (512 << 10) / (W * 2) / ROWS * ROWS);
  at::parallel_for(0, tiles, grain(OUTS * W), [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t rows = std::min(block, R - r0);
      const int16_t* qr = qp + r0 * W;
      float* yr = yp + r0 * N;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t o = t * OUTS;
        if (o + OUTS <= N) {
          int8_rows<OUTS>(qr, sx + r0, rows, W, wp + o * W, sp + o, yr + o, N);
        } else {
          for (int64_t i = o; i < N; ++i)
            int8_rows<1>(qr, sx + r0, rows, W, wp + i * W, sp + i, yr + i, N);
        }
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------ int4

static constexpr int64_t MAX_GROUPS = 1024;  // K / G per row: K up to 32768 at G = 32

#if defined(LK_AVX512)
// (scale, zero) bfloat16 pairs -> float32 scales and zeros, 16 groups at a time.
static inline void widen_pairs(const uint16_t* src, float* scales, float* zeros, int64_t n) {
  int64_t g = 0;
  for (; g + 16 <= n; g += 16) {
    const __m512i v = _mm512_loadu_si512(src + 2 * g);  // 16 x (scale | zero << 16)
    _mm512_store_ps(scales + g, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    _mm512_store_ps(zeros + g, _mm512_castsi512_ps(
        _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))));
  }
  for (; g < n; ++g) {
    scales[g] = bf16_to_float(src[2 * g]);
    zeros[g] = bf16_to_float(src[2 * g + 1]);
  }
}
#endif

// Outputs o0..o0+OUTS (of which `valid` are stored) of rows r0..r0+NR. w: the tile's first
// row (K / 2 bytes a row); sz: its (scale, zero) pairs, K / G a row.
template <int NR, int BPG>  // BPG: 32-column blocks per group, G / 32
static void int4_tile(const float* x, int64_t K, const uint8_t* w, const uint16_t* sz,
                      int64_t G, float* y, int64_t N, int valid) {
  const int64_t B = K / 2, groups = K / G;
#if defined(LK_AVX512)
  // A group's 16 possible values (q - 8) * s + z as one register, indexed by the nibbles
  // (vpermps reads the low 4 bits of each lane): a multiply and an add per group, not per
  // weight, and the same float32 values as dequantizing first. The tile's scales and zeros
  // are widened to float32 first, so each table takes two broadcast operands from L1.
  alignas(64) float sf[OUTS][MAX_GROUPS], zf[OUTS][MAX_GROUPS];
  for (int o = 0; o < OUTS; ++o) widen_pairs(sz + o * 2 * groups, sf[o], zf[o], groups);
  const __m512 minus8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[OUTS][NR], table[OUTS];
  for (int o = 0; o < OUTS; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = _mm512_setzero_ps();
  for (int64_t b = 0, g = 0; b < K / 32; ++b) {
    if (b % BPG == 0) {  // a constant: no division in the loop
      for (int o = 0; o < OUTS; ++o)
        table[o] = _mm512_add_ps(_mm512_mul_ps(minus8, _mm512_set1_ps(sf[o][g])),
                                 _mm512_set1_ps(zf[o][g]));
      ++g;
    }
    __m512 lo[OUTS], hi[OUTS];
    for (int o = 0; o < OUTS; ++o) {
      if (b % 4 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + o * B + 16 * b + PREFETCH4), PF_HINT);
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + o * B + 16 * b)));
      lo[o] = _mm512_permutexvar_ps(v, table[o]);
      hi[o] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[o]);
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 x0 = _mm512_loadu_ps(x + r * K + 32 * b);
      const __m512 x1 = _mm512_loadu_ps(x + r * K + 32 * b + 16);
      for (int o = 0; o < OUTS; ++o) {
        acc[o][r] = _mm512_fmadd_ps(lo[o], x0, acc[o][r]);
        acc[o][r] = _mm512_fmadd_ps(hi[o], x1, acc[o][r]);
      }
    }
  }
  for (int o = 0; o < valid; ++o)
    for (int r = 0; r < NR; ++r) y[r * N + o] = _mm512_reduce_add_ps(acc[o][r]);
#elif defined(LK_AVX2)
  const __m256i low4 = _mm256_set1_epi32(15);
  const __m256 eight = _mm256_set1_ps(8.f);
  __m256 acc[OUTS][NR];
  for (int o = 0; o < OUTS; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int o = 0; o < OUTS; ++o) {
      const uint16_t* p = sz + o * 2 * groups + 2 * g;
      const __m256 s = _mm256_set1_ps(bf16_to_float(p[0]));
      const __m256 z = _mm256_set1_ps(bf16_to_float(p[1]));
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        for (int half = 0; half < 2; ++half) {  // columns k + 8 half .. and k + 16 + 8 half ..
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
              reinterpret_cast<const __m128i*>(w + o * B + k / 2 + 8 * half)));
          const __m256 ql = _mm256_cvtepi32_ps(_mm256_and_si256(v, low4));
          const __m256 qh = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
          const __m256 wl = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(ql, eight), s), z);
          const __m256 wh = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(qh, eight), s), z);
          for (int r = 0; r < NR; ++r) {
            acc[o][r] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x + r * K + k + 8 * half), acc[o][r]);
            acc[o][r] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x + r * K + k + 16 + 8 * half),
                                        acc[o][r]);
          }
        }
      }
    }
  }
  for (int o = 0; o < valid; ++o)
    for (int r = 0; r < NR; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[o][r]), _mm256_extractf128_ps(acc[o][r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[r * N + o] = _mm_cvtss_f32(s);
    }
#else
  for (int o = 0; o < valid; ++o)
    for (int r = 0; r < NR; ++r) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = w[o * B + (k / 32) * 16 + (k % 16)];
        const int q = (k % 32) < 16 ? (byte & 15) : (byte >> 4);
        const uint16_t* p = sz + o * 2 * groups + 2 * (k / G);
        sum += x[r * K + k] * (static_cast<float>(q - 8) * bf16_to_float(p[0]) + bf16_to_float(p[1]));
      }
      y[r * N + o] = sum;
    }
#endif
}

template <int BPG>
static void int4_rows(int64_t nr, const float* x, int64_t K, const uint8_t* w,
                      const uint16_t* sz, int64_t G, float* y, int64_t N, int valid) {
  switch (nr) {
    case 1: int4_tile<1, BPG>(x, K, w, sz, G, y, N, valid); break;
    case 2: int4_tile<2, BPG>(x, K, w, sz, G, y, N, valid); break;
#if !defined(LK_AVX2)
    case 3: int4_tile<3, BPG>(x, K, w, sz, G, y, N, valid); break;
    case 4: int4_tile<4, BPG>(x, K, w, sz, G, y, N, valid); break;
#endif
  }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz,
                   int64_t group_size, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "int4_mm: x must be a contiguous (rows, K) float32 tensor");
  const int64_t R = x.size(0), K = x.size(1), G = group_size;
  TORCH_CHECK((G == 32 || G == 64 || G == 128) && K % G == 0 && K / G <= MAX_GROUPS,
              "int4_mm: the group size must be 32, 64 or 128 and divide K, with at most 1024 "
              "groups");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(1) == K / 2 && packed.size(0) % OUTS == 0 && packed.size(0) >= n_out,
              "int4_mm: packed must be (N rounded up to 4, K / 2) uint8 (pack_int4)");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
              sz.numel() == packed.size(0) * (K / G) * 2, "int4_mm: sz must be (N4, K / G, 2) "
              "bfloat16");
  at::Tensor y = at::empty({R, n_out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (n_out + OUTS - 1) / OUTS, B = K / 2, S = 2 * (K / G);
  at::parallel_for(0, tiles, grain(OUTS * (B + 2 * S)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * OUTS;
      const int valid = static_cast<int>(std::min<int64_t>(OUTS, n_out - o));
      for (int64_t r = 0; r < R; r += ROWS) {
        const float* xr = xp + r * K;
        float* yr = yp + r * n_out + o;
        const uint8_t* w = wp + o * B;
        const uint16_t* s = sp + o * S;
        const int64_t nr = R - r < ROWS ? R - r : ROWS;
        if (G == 32) int4_rows<1>(nr, xr, K, w, s, G, yr, n_out, valid);
        else if (G == 64) int4_rows<2>(nr, xr, K, w, s, G, yr, n_out, valid);
        else int4_rows<4>(nr, xr, K, w, s, G, yr, n_out, valid);
      }
    }
  });
  return y;
}

#if defined(LK_AVX512)
static inline __m256i to_bf16(__m512 f) {  // round to nearest even, as float_to_bf16 (no NaNs)
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
#endif

// One row of the int4 weight (K / 2 bytes, K / G scale-zero pairs) as K floats at dst.
static void dequantize_row(const uint8_t* w, const uint16_t* sz, int64_t K, int64_t G, bool bf16,
                           char* dst) {
#if defined(LK_AVX512)
  const __m512 minus8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k = 0; k < K; k += G) {
    const __m512 table = _mm512_add_ps(
        _mm512_mul_ps(minus8, _mm512_set1_ps(bf16_to_float(sz[2 * (k / G)]))),
        _mm512_set1_ps(bf16_to_float(sz[2 * (k / G) + 1])));
    for (int64_t c = k; c < k + G; c += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
      const __m512 lo = _mm512_permutexvar_ps(v, table);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      if (bf16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * c), to_bf16(lo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * c + 32), to_bf16(hi));
      } else {
        _mm512_storeu_ps(reinterpret_cast<float*>(dst) + c, lo);
        _mm512_storeu_ps(reinterpret_cast<float*>(dst) + c + 16, hi);
      }
    }
  }
#else
  float row[32];
  for (int64_t k = 0; k < K; k += 32) {
    const uint8_t* b = w + k / 2;
    const float s = bf16_to_float(sz[2 * (k / G)]), z = bf16_to_float(sz[2 * (k / G) + 1]);
    for (int j = 0; j < 16; ++j) {
      row[j] = static_cast<float>((b[j] & 15) - 8) * s + z;
      row[j + 16] = static_cast<float>((b[j] >> 4) - 8) * s + z;
    }
    if (bf16) {
      uint16_t* out = reinterpret_cast<uint16_t*>(dst) + k;
      for (int j = 0; j < 32; ++j) out[j] = float_to_bf16(row[j]);
    } else {
      std::memcpy(reinterpret_cast<float*>(dst) + k, row, sizeof(row));
    }
  }
#endif
}

// Rows start..end of the int4 weight as (end - start, K) float32 or bfloat16: (q - 8) * s + z
// in float32 (then rounded to nearest even for bfloat16), as Int4Weight.dequantize computes.
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& sz, int64_t group_size,
                           int64_t start, int64_t end, bool bf16) {
  const int64_t K = packed.size(1) * 2, G = group_size, groups = K / G;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && K % G == 0 &&
              G % 32 == 0 && 0 <= start && start <= end && end <= packed.size(0),
              "int4_dequantize: bad arguments");
  at::Tensor out = at::empty({end - start, K}, packed.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  void* op = out.data_ptr();
  at::parallel_for(start, end, grain(K / 2), [&](int64_t begin, int64_t stop) {
    for (int64_t o = begin; o < stop; ++o)
      dequantize_row(wp + o * (K / 2), sp + o * 2 * groups, K, G, bf16,
                     static_cast<char*>(op) + (o - start) * K * (bf16 ? 2 : 4));
  });
  return out;
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

TORCH_LIBRARY(llama_kernels, m) {
  m.def("int8_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor sz, int group_size, int n_out) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor sz, int group_size, int start, int end, "
        "bool bf16) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(llama_kernels, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_dequantize", &int4_dequantize);
}
