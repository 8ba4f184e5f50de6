// Weight-only int8 and int4 matrix products of few rows (decode steps) on the CPU, in float32.
//
//   int8_mm(x, weight, scales)          y[r, o] = scales[o] * sum_k x[r, k] * weight[o, k]
//   int4_mm(x, packed, sz, G, n_out)    y[r, o] = sum_k x[r, k] * ((q[o, k] - 8) * s + z),
//                                       (s, z) = sz[o, k / G]
//   int4_dequantize(packed, sz, G, start, end, bf16)   rows start..end of the int4 weight
//
// x: (rows, K) float32, contiguous. int8 weight: (N, W) int8, W >= K a multiple of 16, columns
// K..W zero; scales: (N,) bfloat16. int4 weight in this file's layout (llama/cpu_kernels.py,
// pack_int4): (N4, K / 2) uint8, N4 = N rounded up to 4, each 32 columns of a row as 16 bytes,
// byte j = column j (low nibble) | column j + 16 (high nibble); sz: (N4, K / G, 2) bfloat16.
// Accumulation and output are float32; every output is computed by one thread in a fixed
// order, so results do not depend on the thread count.
//
// Threads split the output rows (at::parallel_for, torch's pool), so each core streams its
// own slab of the weight; each weight vector loaded is used for up to ROWS activation rows.
// The instruction set is chosen at compile time (-march=native: AVX-512, AVX2+FMA, or plain
// C++); isa() names it and says whether this CPU can run it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LK_AVX512 1
static constexpr int ROWS = 4;  // activation rows per tile: 4 x 4 float accumulators
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

// Outputs o0..o0+NO of rows r0..r0+NR.
template <int NO, int NR>
static void int8_tile(const float* x, int64_t K, const int8_t* w, int64_t W,
                      const uint16_t* scales, float* y, int64_t N) {
#if defined(LK_AVX512)
  __m512 acc[NO][NR];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NO];
    if ((k & 63) == 0)
      for (int o = 0; o < NO; ++o)
        _mm_prefetch(reinterpret_cast<const char*>(w + o * W + k + PREFETCH8), PF_HINT);
    for (int o = 0; o < NO; ++o)
      wv[o] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + o * W + k))));
    for (int r = 0; r < NR; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int o = 0; o < NO; ++o) acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
    }
  }
  if (k < K) {  // the weight's zero padding is read; x is masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NO];
    for (int o = 0; o < NO; ++o)
      wv[o] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + o * W + k))));
    for (int r = 0; r < NR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * K + k);
      for (int o = 0; o < NO; ++o) acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r)
      y[r * N + o] = _mm512_reduce_add_ps(acc[o][r]) * bf16_to_float(scales[o]);
#elif defined(LK_AVX2)
  __m256 acc[NO][NR];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NO];
    for (int o = 0; o < NO; ++o)
      wv[o] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + o * W + k))));
    for (int r = 0; r < NR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int o = 0; o < NO; ++o) acc[o][r] = _mm256_fmadd_ps(wv[o], xv, acc[o][r]);
    }
  }
  float tail[NO][NR] = {};
  for (; k < K; ++k)
    for (int o = 0; o < NO; ++o)
      for (int r = 0; r < NR; ++r) tail[o][r] += static_cast<float>(w[o * W + k]) * x[r * K + k];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[o][r]), _mm256_extractf128_ps(acc[o][r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[r * N + o] = (_mm_cvtss_f32(s) + tail[o][r]) * bf16_to_float(scales[o]);
    }
#else
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += static_cast<float>(w[o * W + k]) * x[r * K + k];
      y[r * N + o] = sum * bf16_to_float(scales[o]);
    }
#endif
}

template <int NO>
static void int8_rows(const float* x, int64_t R, int64_t K, const int8_t* w, int64_t W,
                      const uint16_t* scales, float* y, int64_t N) {
  // the same few weight rows for every tile of activation rows: read from memory once
  for (int64_t r = 0; r < R; r += ROWS) {
    const float* xr = x + r * K;
    float* yr = y + r * N;
    switch (R - r < ROWS ? R - r : ROWS) {
      case 1: int8_tile<NO, 1>(xr, K, w, W, scales, yr, N); break;
      case 2: int8_tile<NO, 2>(xr, K, w, W, scales, yr, N); break;
#if !defined(LK_AVX2)
      case 3: int8_tile<NO, 3>(xr, K, w, W, scales, yr, N); break;
      case 4: int8_tile<NO, 4>(xr, K, w, W, scales, yr, N); break;
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
  TORCH_CHECK(W >= K && W % 16 == 0, "int8_mm: the weight's width must be >= K and a multiple "
              "of 16 (zero-padded)");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == N &&
              scales.is_contiguous(), "int8_mm: scales must be (N,) bfloat16");
  at::Tensor y = at::empty({R, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + OUTS - 1) / OUTS;
  at::parallel_for(0, tiles, grain(OUTS * W), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * OUTS;
      if (o + OUTS <= N) {
        int8_rows<OUTS>(xp, R, K, wp + o * W, W, sp + o, yp + o, N);
      } else {
        for (int64_t i = o; i < N; ++i) int8_rows<1>(xp, R, K, wp + i * W, W, sp + i, yp + i, N);
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
