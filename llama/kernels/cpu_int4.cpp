// int4 weight matrix products on the CPU, in float32, the weight dequantised, and the saved
// format packed into this file's layout.
//
//   int4_mm(x, packed, sz, G, n_out)    y[r, o] = t[r] * sum_g (s * Q + (z - 8 s) * X),
//                                       Q = sum_{k in g} q[o, k] * x16[r, k],
//                                       X = sum_{k in g} x16[r, k],  (s, z) = sz[o, g]
//   int4_dequantize(packed, sz, G, start, end, bf16)   rows start..end as (q - 8) * s + z
//   int4_pack(weight, scales, zeros) -> (packed, sz)   Int4Weight's tensors in this layout
//
// x16, t: x's rows rounded to int16, one scale per row, as int8_mm's (cpu_common.h). So y is
// sum_k x16 * t * ((q - 8) * s + z), the group's sums exact integers. The float sum over the
// groups is one fixed sequence of FMAs per output, the same on AVX-512, AVX2 and plain C++ and
// whatever the number of rows or threads: a prefill and a decode step give a token the same
// bits (chat sessions and the prefix cache rely on it), on every machine.
//
// Layout (pack_int4, llama/kernels/cpu_kernels.py): outputs in blocks of 16, the (N16, K / 2)
// uint8 tensor holding, per block and per 8 columns, 64 bytes: 16-bit word j (bytes 2j, 2j + 1)
// is output j / 2 of the block, its nibble p (bits 4p..4p+3) column 2p + (j & 1) of the 8.
// Masking and shifting a 64-byte vector gives 4 vectors of 32 int16 lanes ("planes"), plane
// p pairing each output's columns 2p, 2p + 1: one vpdpwssd with x16's pair of those columns,
// broadcast, adds both products to the output's int32 lane. 32 multiply-adds an instruction,
// no lookup or float conversion per weight, and the lanes are outputs, so a group's sum is
// scaled by a vector of 16 outputs' scales (no reduction across lanes).
// sz: (N16, K / G, 2) bfloat16 tensor holding, per block and group, the 16 outputs' (scale,
// zero) pairs.

#include "cpu_common.h"

static constexpr int BLOCK = 16;    // outputs per block of the layout
static constexpr int64_t STEP = 8;  // columns per 64 bytes of a block

#if defined(LK_AVX512)
static constexpr int HALVES = 1;  // vectors per 64 bytes: one of 16 outputs
static constexpr int MANY = 8;    // rows per tile: 8 int32 and 8 float accumulators
using ivec = __m512i;
using fvec = __m512;
static inline ivec load_raw(const uint8_t* p) { return _mm512_loadu_si512(p); }
static inline ivec low4(ivec v) { return _mm512_and_si512(v, _mm512_set1_epi16(15)); }
static inline ivec shifted(ivec v, int bits) { return _mm512_srli_epi16(v, bits); }
static inline ivec pair_of(const int16_t* x) {
  int32_t two;
  std::memcpy(&two, x, 4);
  return _mm512_set1_epi32(two);
}
static inline i32acc dot(i32acc acc, ivec w, ivec x) { return dot_i16x32(acc, w, x); }
static inline i32acc izero() { return (i32acc)_mm512_setzero_si512(); }
static inline fvec fzero() { return _mm512_setzero_ps(); }
static inline ivec load_pairs(const uint16_t* p) { return _mm512_loadu_si512(p); }
static inline fvec high_half(ivec v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
static inline fvec low_half(ivec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline fvec to_float(i32acc v) { return _mm512_cvtepi32_ps((__m512i)v); }
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline fvec fnma(fvec a, fvec b, fvec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline fvec splat(float f) { return _mm512_set1_ps(f); }
static inline fvec mul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
static inline void store(float* y, fvec v, int n) {
  _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << n) - 1), v);
}
#elif defined(LK_AVX2)
static constexpr int HALVES = 2;  // two vectors of 8 outputs per 64 bytes
static constexpr int MANY = 2;    // 16 registers: 2 x 2 int32 and float accumulators
using ivec = __m256i;
using fvec = __m256;
static inline ivec load_raw(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
static inline ivec low4(ivec v) { return _mm256_and_si256(v, _mm256_set1_epi16(15)); }
static inline ivec shifted(ivec v, int bits) { return _mm256_srli_epi16(v, bits); }
static inline ivec pair_of(const int16_t* x) {
  int32_t two;
  std::memcpy(&two, x, 4);
  return _mm256_set1_epi32(two);
}
static inline i32acc dot(i32acc acc, ivec w, ivec x) { return dot_i16x16(acc, w, x); }
static inline i32acc izero() { return (i32acc)_mm256_setzero_si256(); }
static inline fvec fzero() { return _mm256_setzero_ps(); }
static inline ivec load_pairs(const uint16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
static inline fvec high_half(ivec v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
static inline fvec low_half(ivec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline fvec to_float(i32acc v) { return _mm256_cvtepi32_ps((__m256i)v); }
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline fvec fnma(fvec a, fvec b, fvec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline fvec splat(float f) { return _mm256_set1_ps(f); }
static inline fvec mul(fvec a, fvec b) { return _mm256_mul_ps(a, b); }
static inline void store(float* y, fvec v, int n) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int i = 0; i < n; ++i) y[i] = lanes[i];
}
#endif

#if defined(LK_AVX512) || defined(LK_AVX2)
static constexpr int LANES = BLOCK / HALVES;

static inline ivec plane(ivec raw, int p) {
  return p == 3 ? shifted(raw, 12) : low4(p == 0 ? raw : shifted(raw, 4 * p));
}

// One block's outputs (`valid` of them stored) for rows 0..NR. q: int16 rows, K a row; sums:
// their group sums, `groups` a row; w, sz: the block's weight bytes and (scale, zero) pairs.
template <int NR>
static void int4_tile(const int16_t* q, const float* sums, const float* t, int64_t K,
                      int64_t G, const uint8_t* w, const uint16_t* sz, float* y, int64_t N,
                      int valid) {
  const int64_t groups = K / G, steps = G / STEP;
  const fvec eight = splat(8.f);
  // With one integer sum a row, the dot products of a one- or two-row tile waited on each
  // other's latency (docs/QUANTIZATION.md): a step's planes then go to separate sums, added
  // at the group's end (exact integers: the same result). (Four sums at two rows made GCC 12
  // keep them in memory.)
  constexpr int CHAINS = NR == 1 ? 4 : NR == 2 ? 2 : 1;
  fvec acc[HALVES][NR];
  for (int h = 0; h < HALVES; ++h)
    for (int r = 0; r < NR; ++r) acc[h][r] = fzero();
  for (int64_t g = 0; g < groups; ++g) {
    i32acc isum[CHAINS][HALVES][NR];
    for (int c = 0; c < CHAINS; ++c)
      for (int h = 0; h < HALVES; ++h)
        for (int r = 0; r < NR; ++r) isum[c][h][r] = izero();
    // The group's prefetches come first: inside the loop below they made GCC 12 store every
    // sum to memory after each instruction (dead stores, 1.6x the time of a one-row tile).
    for (int64_t s = g * steps; s < (g + 1) * steps; ++s) prefetch_l2(w + 64 * s + PREFETCH4);
    for (int64_t s = g * steps; s < (g + 1) * steps; ++s) {
      ivec raw[HALVES];
      for (int h = 0; h < HALVES; ++h)
        raw[h] = in_register(load_raw(w + 64 * s + 64 / HALVES * h));  // not reloaded a plane
      for (int c = 0; c < CHAINS; ++c)
        for (int p = c; p < 4; p += CHAINS) {
          ivec xs[NR];
          for (int r = 0; r < NR; ++r) xs[r] = pair_of(q + r * K + STEP * s + 2 * p);
          for (int h = 0; h < HALVES; ++h) {
            const ivec wv = plane(raw[h], p);
            for (int r = 0; r < NR; ++r) isum[c][h][r] = dot(isum[c][h][r], wv, xs[r]);
          }
        }
    }
    for (int h = 0; h < HALVES; ++h) {
      const ivec pairs = load_pairs(sz + 2 * (BLOCK * g + LANES * h));
      const fvec scale = low_half(pairs);
      const fvec shift = fnma(eight, scale, high_half(pairs));  // z - 8 s
      for (int r = 0; r < NR; ++r) {
        i32acc total = isum[0][h][r];
        for (int c = 1; c < CHAINS; ++c) total = total + isum[c][h][r];
        acc[h][r] = fma(to_float(total), scale, acc[h][r]);
        acc[h][r] = fma(shift, splat(sums[r * groups + g]), acc[h][r]);
      }
    }
  }
  for (int h = 0; h < HALVES; ++h) {
    const int n = std::max(0, std::min(LANES, valid - LANES * h));
    for (int r = 0; r < NR; ++r) store(y + r * N + LANES * h, mul(acc[h][r], splat(t[r])), n);
  }
}

template <int NR>
static void int4_tiles(int64_t rows, const int16_t* q, const float* sums, const float* t,
                       int64_t K, int64_t G, const uint8_t* w, const uint16_t* sz, float* y,
                       int64_t N, int valid) {
  int64_t r = 0;
  for (; r + NR <= rows; r += NR)
    int4_tile<NR>(q + r * K, sums + r * (K / G), t + r, K, G, w, sz, y + r * N, N, valid);
  if constexpr (NR > 1)
    if (r < rows) int4_tiles<NR - 1>(rows - r, q + r * K, sums + r * (K / G), t + r, K, G, w,
                                      sz, y + r * N, N, valid);
}
#else
// Plain C++: the same operations, one output at a time.
static void int4_tile_scalar(const int16_t* q, const float* sums, float t, int64_t K, int64_t G,
                             const uint8_t* w, const uint16_t* sz, int lane, float* y) {
  const int64_t groups = K / G, steps = G / STEP;
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t isum = 0;
    for (int64_t s = g * steps; s < (g + 1) * steps; ++s)
      for (int parity = 0; parity < 2; ++parity) {
        const uint8_t* word = w + 64 * s + 2 * (2 * lane + parity);
        const uint32_t bits = word[0] | (static_cast<uint32_t>(word[1]) << 8);
        for (int p = 0; p < 4; ++p)
          isum += static_cast<int32_t>((bits >> (4 * p)) & 15) * q[STEP * s + 2 * p + parity];
      }
    const float scale = bf16_to_float(sz[2 * (BLOCK * g + lane)]);
    const float shift = std::fma(-8.f, scale, bf16_to_float(sz[2 * (BLOCK * g + lane) + 1]));
    acc = std::fma(static_cast<float>(isum), scale, acc);
    acc = std::fma(shift, sums[g], acc);
  }
  *y = acc * t;
}
#endif

// Rows of x (R, K) as int16 (R, K), their scales t (R,), and each group's sum of the int16
// values (R, K / G) float32 (exact: at most 128 * 32767).
static void int16_rows_and_sums(const float* x, int64_t R, int64_t K, int64_t G, int16_t* q,
                                float* t, float* sums) {
  quantize_rows_i16(x, R, K, K, q, t);
  const int64_t groups = K / G;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t total = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) total += q[r * K + k];
      sums[r * groups + g] = static_cast<float>(total);
    }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz,
                   int64_t group_size, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "int4_mm: x must be a contiguous (rows, K) float32 tensor");
  const int64_t R = x.size(0), K = x.size(1), G = group_size, groups = K / G;
  TORCH_CHECK((G == 32 || G == 64 || G == 128) && K % G == 0,
              "int4_mm: the group size must be 32, 64 or 128 and divide K");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(1) == K / 2 && packed.size(0) % BLOCK == 0 && packed.size(0) >= n_out,
              "int4_mm: packed must be (N rounded up to 16, K / 2) uint8 (pack_int4)");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
              sz.numel() == packed.size(0) * groups * 2, "int4_mm: sz must be (N16, K / G, 2) "
              "bfloat16 (pack_int4)");
  at::Tensor q = new_tensor({R, K}, at::kShort);
  at::Tensor t = new_tensor({R}, at::kFloat);
  at::Tensor sums = new_tensor({R, groups}, at::kFloat);
  int16_rows_and_sums(x.data_ptr<float>(), R, K, G, q.data_ptr<int16_t>(), t.data_ptr<float>(),
                      sums.data_ptr<float>());
  at::Tensor y = new_tensor({R, n_out}, at::kFloat);
  const int16_t* qp = q.data_ptr<int16_t>();
  const float* tp = t.data_ptr<float>();
  const float* sp = sums.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n_out + BLOCK - 1) / BLOCK, block_bytes = BLOCK * K / 2;
  // As int8_mm: a prefill goes a block of rows at a time (~512 KB of int16, kept in L2) past
  // the thread's slab of weight blocks.
  const int64_t rows_per_pass = std::max<int64_t>(1, (512 << 10) / (K * 2));
  at::parallel_for(0, blocks, grain(block_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < R; r0 += rows_per_pass) {
      const int64_t rows = std::min(rows_per_pass, R - r0);
      for (int64_t b = begin; b < end; ++b) {
        const int valid = static_cast<int>(std::min<int64_t>(BLOCK, n_out - b * BLOCK));
        const uint8_t* w = wp + b * block_bytes;
        const uint16_t* z = zp + b * BLOCK * groups * 2;
#if defined(LK_AVX512) || defined(LK_AVX2)
        int4_tiles<MANY>(rows, qp + r0 * K, sp + r0 * groups, tp + r0, K, G, w, z,
                         yp + r0 * n_out + b * BLOCK, n_out, valid);
#else
        for (int64_t r = r0; r < r0 + rows; ++r)
          for (int lane = 0; lane < valid; ++lane)
            int4_tile_scalar(qp + r * K, sp + r * groups, tp[r], K, G, w, z, lane,
                             yp + r * n_out + b * BLOCK + lane);
#endif
      }
    }
  });
  return y;
}

// Rows start..end of the int4 weight as (end - start, K) float32 or bfloat16: (q - 8) * s + z
// in float32 (then rounded to nearest even for bfloat16), as Int4Weight.dequantize computes.
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& sz, int64_t group_size,
                           int64_t start, int64_t end, bool bf16) {
  const int64_t K = packed.size(1) * 2, G = group_size, groups = K / G;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && K % G == 0 &&
              G % 32 == 0 && packed.size(0) % BLOCK == 0 && 0 <= start && start <= end &&
              end <= packed.size(0), "int4_dequantize: bad arguments");
  at::Tensor out = new_tensor({end - start, K}, bf16 ? at::kBFloat16 : at::kFloat);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(start, end, grain(K / 2), [&](int64_t begin, int64_t stop) {
    std::vector<float> row(K);
    for (int64_t o = begin; o < stop; ++o) {
      const int64_t b = o / BLOCK, lane = o % BLOCK;
      const uint8_t* w = wp + b * BLOCK * K / 2;
      const uint16_t* z = zp + b * BLOCK * groups * 2;
      for (int64_t s = 0; s < K / STEP; ++s) {
        const int64_t g = STEP * s / G;
        const float scale = bf16_to_float(z[2 * (BLOCK * g + lane)]);
        const float zero = bf16_to_float(z[2 * (BLOCK * g + lane) + 1]);
        for (int parity = 0; parity < 2; ++parity) {
          const uint8_t* word = w + 64 * s + 2 * (2 * lane + parity);
          const uint32_t bits = word[0] | (static_cast<uint32_t>(word[1]) << 8);
          for (int p = 0; p < 4; ++p)
            row[STEP * s + 2 * p + parity] =
                static_cast<float>(static_cast<int>((bits >> (4 * p)) & 15) - 8) * scale + zero;
        }
      }
      if (bf16) {
        for (int64_t k = 0; k < K; ++k) ob[(o - start) * K + k] = float_to_bf16(row[k]);
      } else {
        std::memcpy(of + (o - start) * K, row.data(), K * sizeof(float));
      }
    }
  });
  return out;
}

// The saved format's int4 weight (column 2j in the low nibble of byte j) in this file's layout,
// as cpu_kernels.pack_int4's torch operations (the reference) lay it out: per block of BLOCK
// outputs and STEP columns, 64 bytes, 16-bit word j holding output j / 2's columns
// 2p + (j & 1) in its nibbles p = 0..3; sz per block and group the BLOCK outputs' (scale,
// zero). Rows past N are zeros.
std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& saved, const at::Tensor& scales,
                                             const at::Tensor& zeros) {
  TORCH_CHECK(saved.dim() == 2 && saved.scalar_type() == at::kByte && saved.is_contiguous() &&
              saved.size(1) % 4 == 0, "int4_pack: the values must be (N, K / 2) uint8, K a "
              "multiple of 8");
  const int64_t N = saved.size(0), half = saved.size(1), groups = scales.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
              scales.is_contiguous() && zeros.is_contiguous() && scales.size(0) == N &&
              zeros.sizes() == scales.sizes(), "int4_pack: scales and zeros must be (N, "
              "groups) bfloat16");
  const int64_t N16 = (N + BLOCK - 1) / BLOCK * BLOCK, steps = 2 * half / STEP;
  at::Tensor packed = new_tensor({N16, half}, at::kByte);
  at::Tensor sz = new_tensor({N16, groups, 2}, at::kBFloat16);
  const uint8_t* in = saved.data_ptr<uint8_t>();
  const auto* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const auto* ze = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  uint8_t* out = packed.data_ptr<uint8_t>();
  auto* szp = reinterpret_cast<uint16_t*>(sz.data_ptr<at::BFloat16>());
  at::parallel_for(0, N16 / BLOCK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      uint16_t* words = reinterpret_cast<uint16_t*>(out + b * BLOCK * half);
      for (int64_t s = 0; s < steps; ++s)
        for (int64_t i = 0; i < BLOCK; ++i) {
          const int64_t o = b * BLOCK + i;
          uint32_t x = 0;  // columns 8s .. 8s + 7 of output o, two to a byte, low first
          if (o < N) std::memcpy(&x, in + o * half + 4 * s, 4);
          for (int parity = 0; parity < 2; ++parity) {
            const uint32_t t = (x >> (4 * parity)) & 0x0F0F0F0Fu;  // nibble p in byte p
            const uint32_t v = (t | (t >> 4)) & 0x00FF00FFu;
            words[2 * BLOCK * s + 2 * i + parity] =
                static_cast<uint16_t>((v & 0xFFu) | ((v >> 8) & 0xFF00u));
          }
        }
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < BLOCK; ++i) {
          const int64_t o = b * BLOCK + i;
          uint16_t* pair = szp + 2 * ((b * groups + g) * BLOCK + i);
          pair[0] = o < N ? sc[o * groups + g] : 0;
          pair[1] = o < N ? ze[o * groups + g] : 0;
        }
    }
  });
  return {packed, sz};
}
