// int8 weights times int8 activations (W8A8), opt-in: the route of `activations="int8"`
// (llama/layers/w8a8.py). The int8 kernel (cpu_kernels.cpp) rounds activations to int16, one
// scale per row, and multiplies with vpdpwssd: 32 multiply-adds an instruction, which caps a
// 7B prefill on 2 cores near 35 tok/s. Here activations are rounded to int8 in blocks of 32
// columns, one float scale per block (as llama.cpp's q8_0 dot product does), and multiplied
// with vpdpbusd: 64 multiply-adds an instruction, at the same rate on the CPUs measured
// (docs/QUANTIZATION.md, "int8 activations"). The rounding (round_blocks_i8) is shared with
// int4 weights (cpu_w4a8.cpp, through cpu_blocks.h).
//
//   w8a8_mm(x, packed, scales, K)   y[r, o] = scales[o] * sum_b d[r, b] * sum_{k in b} q[r, k] * w[o, k]
//                                   q, d: x's row r rounded to int8 in blocks b of 32 columns,
//                                   d = max|x over b| / 127
//
// The packed weight (w8a8_layout in cpu_kernels.py): (N, P) uint8, P = K rounded up to GROUP
// (512) columns, each value w + 128 (vpdpbusd multiplies unsigned by signed bytes). Per group
// of 16 blocks, 8 steps of 64 bytes: byte 4j + t of step s is column 32j + 4s + t, so after the
// 8 steps int32 lane j holds block j's sum, and one vector of the 16 blocks' scales applies
// them. Each block's integer sum is exact; the float sums over blocks go in a fixed order (lane
// j takes blocks j, j + 16, ... in turn; then the 16 lanes in a fixed tree), so every
// instruction set and thread count gives the same bits, and a row alone or in any batch too.

#include "cpu_blocks.h"

static constexpr float I8_MAX = 127.f;

// One row of round_blocks_i8 (cpu_blocks.h).
static void quantize_row_i8(const float* x, int64_t K, int64_t P, int8_t* q, float* d,
                            int32_t* offset) {
  for (int64_t b = 0; b < P / BLOCK; ++b) {
    const int64_t g = b / LANES, j = b % LANES;
    int8_t* out = q + g * GROUP + 4 * j;  // column 4s + t of the block: out[64 s + t]
    const int64_t k0 = b * BLOCK, n = std::max<int64_t>(0, std::min(BLOCK, K - k0));
    const float* xb = x + k0;
    float amax = 0.f, finite = 0.f;  // finite: sum of x - x, NaN if any x is inf or NaN
#if defined(LK_AVX512)
    if (n == BLOCK) {
      __m512 vmax = _mm512_setzero_ps(), vfin = _mm512_setzero_ps();
      for (int64_t c = 0; c < BLOCK; c += 16) {
        const __m512 v = _mm512_loadu_ps(xb + c);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        vfin = _mm512_add_ps(vfin, _mm512_sub_ps(v, v));
      }
      amax = _mm512_reduce_max_ps(vmax);
      finite = _mm512_reduce_add_ps(vfin);
    } else
#endif
      for (int64_t c = 0; c < n; ++c) {
        amax = std::max(amax, std::fabs(xb[c]));
        finite += xb[c] - xb[c];
      }
    const bool bad = finite != 0.f || !(amax <= 3.4e38f);  // NaN compares unequal
    const float inv = amax > 0.f && !bad ? I8_MAX / amax : 0.f;
    d[b] = bad ? std::numeric_limits<float>::quiet_NaN() : amax / I8_MAX;
    int32_t sum = 0;
#if defined(LK_AVX512)
    if (n == BLOCK && !bad) {  // nearest, ties to even (the default rounding mode)
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t c = 0; c < BLOCK; c += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + c), vinv));
        vsum = _mm512_add_epi32(vsum, v);
        alignas(16) int32_t words[4];  // columns c + 4m .. c + 4m + 3
        _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm512_cvtepi32_epi8(v));
        for (int m = 0; m < 4; ++m) std::memcpy(out + 64 * (c / 4 + m), &words[m], 4);
      }
      offset[b] = -128 * _mm512_reduce_add_epi32(vsum);
      continue;
    }
#endif
    for (int64_t c = 0; c < BLOCK; ++c) {
      const int8_t v = c < n && !bad ? static_cast<int8_t>(std::nearbyint(xb[c] * inv)) : 0;
      out[64 * (c / 4) + c % 4] = v;
      sum += v;
    }
    offset[b] = -128 * sum;
  }
}

// Outputs o0..o0+NO of rows r0..r0+NR.
template <int NO, int NR>
static void w8a8_tile(const int8_t* q, const float* d, const int32_t* offset, int64_t P,
                      const uint8_t* w, const uint16_t* scales, float* y, int64_t N) {
  const int64_t nb = P / BLOCK;
#if defined(LK_AVX512) && defined(__AVX512VNNI__)
  // The float sums live in memory (L1) between groups: held in registers beside the integer
  // ones, they made GCC (12) spill the weight vectors inside the loop.
  alignas(64) float facc[NO][NR][LANES] = {};
  for (int64_t g = 0; g < P; g += GROUP) {
    __asm__ volatile("" : : : "memory");
    i32acc acc[NO][NR];
    for (int r = 0; r < NR; ++r) {
      const __m512i start = _mm512_loadu_si512(offset + r * nb + g / BLOCK);
      for (int o = 0; o < NO; ++o) acc[o][r] = (i32acc)start;
    }
    for (int64_t s = g; s < g + GROUP; s += 64) {
      __m512i wv[NO];
      for (int o = 0; o < NO; ++o) {
        prefetch_l2(w + (o + NO) * P + s);
        wv[o] = in_register(_mm512_loadu_si512(w + o * P + s));
      }
      for (int r = 0; r < NR; ++r) {
        const __m512i xv = in_register(_mm512_loadu_si512(q + r * P + s));
        for (int o = 0; o < NO; ++o)
          acc[o][r] = (i32acc)_mm512_dpbusd_epi32((__m512i)acc[o][r], wv[o], xv);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 dv = _mm512_loadu_ps(d + r * nb + g / BLOCK);
      for (int o = 0; o < NO; ++o)
        _mm512_store_ps(facc[o][r], _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)acc[o][r]), dv,
                                                     _mm512_load_ps(facc[o][r])));
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {  // lanes_total's order, in vectors
      y[r * N + o] = lanes_total(_mm512_load_ps(facc[o][r])) * bf16_to_float(scales[o]);
    }
#else
  float lane[NO][NR][LANES];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {
      for (int j = 0; j < LANES; ++j) lane[o][r][j] = 0.f;
      const uint8_t* wo = w + o * P;
      const int8_t* qr = q + r * P;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = b / LANES * GROUP, j = b % LANES;
        int32_t sum = offset[r * nb + b];
        for (int64_t s = 0; s < GROUP; s += 64)
          for (int t = 0; t < 4; ++t)
            sum += static_cast<int32_t>(wo[g + s + 4 * j + t]) * qr[g + s + 4 * j + t];
        lane[o][r][j] = std::fma(static_cast<float>(sum), d[r * nb + b], lane[o][r][j]);
      }
    }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r)
      y[r * N + o] = lanes_total(lane[o][r]) * bf16_to_float(scales[o]);
#endif
}

#if defined(LK_AVX512) && defined(__AVX512VNNI__)
// 24 int32 accumulators, 6 weight vectors and the row's: 31 of 32 registers. 4 x 4, 5 x 4,
// 3 x 6 and 4 x 5 ran as fast at 64-128 rows (within the machine's noise); 6 x 4 was the
// fastest at 4 rows (1.1x the int16 route, against 0.8x for 4 x 4, on 7B's w2).
static constexpr int W8A8_OUTS = 6, W8A8_ROWS = 4;
#else
static constexpr int W8A8_OUTS = 2, W8A8_ROWS = 2;
#endif

// Whether w8a8_mm and w4a8_mm multiply with vpdpbusd here: a build for AVX-512 VNNI on a CPU
// that runs it. Otherwise (AVX2 builds, AVX-VNNI included; plain C++) they compute the same
// bits in plain C++ loops, slower than the int16 route of the same weights.
bool int8_dot_products() {
#if defined(LK_AVX512) && defined(__AVX512VNNI__)
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

Int8Blocks round_blocks_i8(const at::Tensor& x, int64_t P) {
  const int64_t R = x.size(0), K = x.size(1), nb = P / BLOCK;
  Int8Blocks out{new_tensor({R, P}, at::kChar), new_tensor({R, nb}, at::kFloat),
                 new_tensor({R, nb}, at::kInt)};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = out.q.data_ptr<int8_t>();
  float* dp = out.d.data_ptr<float>();
  int32_t* op = out.offset.data_ptr<int32_t>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_row_i8(xp + r * K, K, P, qp + r * P, dp + r * nb, op + r * nb);
  });
  return out;
}

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   int64_t K) {
  check_block_rows(x, K, "w8a8_mm");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w8a8_mm: packed must be a contiguous (N, P) uint8 tensor");
  const int64_t R = x.size(0), N = packed.size(0), P = packed.size(1);
  check_block_width(P, K, "w8a8_mm", "");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == N &&
              scales.is_contiguous(), "w8a8_mm: scales must be (N,) bfloat16");
  const int64_t nb = P / BLOCK;
  const Int8Blocks rounded = round_blocks_i8(x, P);
  const int8_t* qp = rounded.q.data_ptr<int8_t>();
  const float* dp = rounded.d.data_ptr<float>();
  const int32_t* op = rounded.offset.data_ptr<int32_t>();
  at::Tensor y = new_tensor({R, N}, at::kFloat);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t budget = (512 << 10) / P;  // ~512 KB of int8 rows a block, as int8_mm
  tiled_product<W8A8_OUTS, W8A8_ROWS>(
      R, N, W8A8_OUTS * P, budget, [&](auto no, auto nr, int64_t r, int64_t o) {
        w8a8_tile<decltype(no)::value, decltype(nr)::value>(
            qp + r * P, dp + r * nb, op + r * nb, P, wp + o * P, sp + o, yp + r * N + o, N);
      });
  return y;
}
