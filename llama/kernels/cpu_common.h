// What the CPU kernels (cpu_kernels.cpp, cpu_int4.cpp, cpu_dense.cpp, cpu_quantize.cpp)
// share: the instruction set chosen at compile time, tile sizes, prefetch distances, bfloat16
// conversions, how a product is split (cpu_tiles.h), and activations rounded to int16 per row.
#pragma once

#include "cpu_tensor.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_tiles.h"

static constexpr int OUTS = 4;  // weight rows per tile (int4 weights are padded to it)

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LK_AVX512 1
static constexpr int ROWS = 4;  // activation rows per tile: 4 x 4 accumulators
// A long product's tile (8 rows or more): 3 weight rows x 8 activation rows, 24 accumulators,
// each weight vector loaded serving 8 rows instead of 4: 1.15-1.2x the 4 x 4 tile's speed
// (bf16) and 1.1-1.3x (int8) on the Intel kind, 1.01-1.06x on the AMD one
// (docs/MEMORY_AND_BF16.md, docs/QUANTIZATION.md).
static constexpr int LONG_OUTS = 3;
static constexpr int LONG_ROWS = 8;
// An int32 accumulator: 16 lanes, typed as the instruction's own operand (__v16si), not as
// __m512i. GCC (12) keeps an array of __m512i accumulators that are converted to __v16si for
// each vpdpwssd on the stack, or copies each into a fresh register before the instruction;
// typed so, the array lives in registers (docs/QUANTIZATION.md, "Larger int8 tiles").
using i32acc = __v16si;
// acc + pairwise products of 32 int16 lanes, in 16 int32 lanes (one instruction with VNNI)
static inline i32acc dot_i16x32(i32acc acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return (i32acc)_mm512_dpwssd_epi32((__m512i)acc, a, b);
#else
  return (i32acc)_mm512_add_epi32((__m512i)acc, _mm512_madd_epi16(a, b));
#endif
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LK_AVX2 1
static constexpr int ROWS = 2;  // 16 vector registers: 4 x 2 accumulators
static constexpr int LONG_OUTS = OUTS;
static constexpr int LONG_ROWS = ROWS;
using i32acc = __v8si;  // 8 int32 lanes, typed as above
// acc + pairwise products of 16 int16 lanes, in 8 int32 lanes
static inline i32acc dot_i16x16(i32acc acc, __m256i a, __m256i b) {
  return (i32acc)_mm256_add_epi32((__m256i)acc, _mm256_madd_epi16(a, b));
}
#else
static constexpr int ROWS = 4;
static constexpr int LONG_OUTS = OUTS;
static constexpr int LONG_ROWS = ROWS;
#endif
// Weight streams are prefetched in software (the hardware prefetcher alone read int8 weights
// at half MKL's float32 rate when the int8 kernel was written). The int8, bfloat16 and
// float32 kernels prefetch each weight row's cache line a tile ahead: the same columns of the
// next tile's row (the rows of a thread's slab follow each other), whatever the row's length.
// A fixed distance in bytes (16 KB for int8 and float32, 8 KB for bfloat16) fell inside the
// current tile for long rows, and read 1.1-1.3x slower at 1-4 rows; into L2 (T1), as T0 and
// NTA were slower (docs/MEMORY_AND_BF16.md, "Prefetching a tile ahead"). The int4 layout is one
// stream per block of outputs: 8 KB ahead (PREFETCH4). A prefetch past the end of a weight
// does not fault. GCC's builtin, not _mm_prefetch: with _mm_prefetch in the loop, GCC 12 kept
// an array of int32 sums in memory, storing each after every instruction (the int4 kernel's
// one-row tile, docs/QUANTIZATION.md).
static inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
#ifndef PREFETCH4
#define PREFETCH4 8192
#endif

#if defined(LK_AVX512) || defined(LK_AVX2)
// A loaded vector held in a register. An activation vector is used by each of a tile's NO
// products (a float32 weight vector by each of its NR); GCC otherwise folds its load into
// every one of them as a memory operand, loading it that many times. The AMD kind loads one
// 64-byte vector a cycle, as many as it issues vpdpwssd or FMAs, so those loads held the
// int8 and bfloat16 kernels at 73-81% of their instructions' rate (docs/PERFORMANCE.md, "Loads
// folded into the products"). The empty asm changes no value: the same bits.
template <typename V>
static inline V in_register(V v) {
  __asm__("" : "+v"(v));
  return v;
}
#else
template <typename V>
static inline V in_register(V v) { return v; }
#endif

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(LK_AVX512)
// 16 bfloat16 -> 16 float32: bfloat16 i becomes the upper half of 32-bit lane i, the lower
// half zero. One permutation (vpermw, zero-masked) rather than a widening move and a shift:
// a prefill's FMAs share their ports with it.
static inline __m512 widen_bf16(__m256i h) {
  const __m512i upper = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                         7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(
      0xAAAAAAAAu, upper, _mm512_castsi256_si512(h)));
}
#elif defined(LK_AVX2)
static inline __m256 widen_bf16(__m128i h) {  // 8 bfloat16 -> 8 float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to()
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

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

