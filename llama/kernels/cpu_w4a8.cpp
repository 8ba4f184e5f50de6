// int4 weights times int8 activations (W4A8), opt-in: the route of `activations="int8"` for
// int4 weights (llama/layers/w8a8.py). The int4 kernel (cpu_int4.cpp) rounds activations to
// int16, one scale per row, and multiplies with vpdpwssd, 32 multiply-adds an instruction, after
// unpacking nibbles to int16 lanes. Here activations are rounded as for int8 weights
// (cpu_w8a8.cpp: int8 in blocks of 32 columns, one float scale per block) and the weight's
// values, 0..15, are vpdpbusd's unsigned operand as they are: 64 multiply-adds an instruction.
//
//   w4a8_mm(x, packed, sm, K)   y[r, o] = sum_b d[r, b] * (s[o, b] * S + m[o, b] * A)
//                               S = sum_{k in b} q[r, k] * v[o, k],  A = sum_{k in b} q[r, k]
//                               q, d: x's row r in blocks b of 32 (round_blocks_i8)
//                               v in 0..15; s, m: the block's scale and zero - 8 * scale
//
// so that s * v + m is the int4 format's (v - 8) * scale + zero (m is computed in float32 as
// the kernel goes: z - 8 s, one rounding). Each block's S and A are exact
// integers; the float work per block is one fixed sequence (t = d * s; f = fma(t, S, f);
// f = fma(d * A, m, f)), lane j taking blocks j, j + 16, ..., then lanes_total: the same bits on
// every instruction set and thread count, and for a row alone or in any batch.
//
// Layout (w4a8_layout in cpu_kernels.py): packed (N, P / 2) uint8, P = K rounded up to GROUP:
// per group, 4 vectors of 64 bytes, vector p holding step 2p's byte i in the low nibble of its
// byte i and step 2p + 1's in the high one (steps as in round_blocks_i8: byte 4j + t of step s
// is column 32j + 4s + t). sz (N, P / G * 2) bfloat16: per group of 512 columns, the S = 512 / G
// weight groups' scales, then their zeros (zero past K): the saved format's bytes. A block's
// lane takes its weight group's scale and zero by one permutation (vpermt2ps) a group.

#include "cpu_blocks.h"

template <int NO, int NR>
static void w4a8_tile(const int8_t* q, const float* d, const float* da, int64_t P, int64_t G,
                      const uint8_t* w, const uint16_t* sz, float* y, int64_t N) {
  const int64_t nb = P / BLOCK, half = P / 2, S = GROUP / G, row = 2 * (P / G);
#if defined(LK_AVX512) && defined(__AVX512VNNI__)
  alignas(64) float facc[NO][NR][LANES] = {};  // in memory between groups, as w8a8_tile's
  const __m512i nibble = _mm512_set1_epi8(15);
  // lane j: weight group j / (G / 32) of the line's S scales (then S zeros)
  const __m512i pick_s = _mm512_srlv_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(__builtin_ctzll(G / BLOCK)));
  const __m512i pick_z = _mm512_add_epi32(pick_s, _mm512_set1_epi32(static_cast<int>(S)));
  const __mmask32 line = static_cast<__mmask32>((1ull << (2 * S)) - 1);
  for (int64_t g = 0; g < P; g += GROUP) {
    __asm__ volatile("" : : : "memory");
    i32acc acc[NO][NR];
    for (int o = 0; o < NO; ++o)
      for (int r = 0; r < NR; ++r) acc[o][r] = (i32acc)_mm512_setzero_si512();
    for (int64_t s = g; s < g + GROUP; s += 128) {  // two steps of 64 columns
      __m512i lo[NO], hi[NO];
      for (int o = 0; o < NO; ++o) {
        prefetch_l2(w + (o + NO) * half + s / 2);
        const __m512i raw = _mm512_loadu_si512(w + o * half + s / 2);
        lo[o] = in_register(_mm512_and_si512(raw, nibble));
        hi[o] = in_register(_mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble));
      }
      for (int r = 0; r < NR; ++r) {
        const __m512i x0 = in_register(_mm512_loadu_si512(q + r * P + s));
        const __m512i x1 = in_register(_mm512_loadu_si512(q + r * P + s + 64));
        for (int o = 0; o < NO; ++o) {
          acc[o][r] = (i32acc)_mm512_dpbusd_epi32((__m512i)acc[o][r], lo[o], x0);
          acc[o][r] = (i32acc)_mm512_dpbusd_epi32((__m512i)acc[o][r], hi[o], x1);
        }
      }
    }
    const int64_t b = g / BLOCK;
    __m512 sv[NO], mv[NO];
    for (int o = 0; o < NO; ++o) {
      const uint16_t* at = sz + o * row + 2 * S * (g / GROUP);  // S scales, S zeros
      prefetch_l2(at + NO * row);  // the next tile's, as its values
      const __m512i both = _mm512_maskz_loadu_epi16(line, at);
      const __m512 low = widen_bf16(_mm512_castsi512_si256(both));
      const __m512 high = widen_bf16(_mm512_extracti64x4_epi64(both, 1));
      sv[o] = _mm512_permutex2var_ps(low, pick_s, high);
      mv[o] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv[o],  // z - 8 s
                               _mm512_permutex2var_ps(low, pick_z, high));
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 dv = _mm512_loadu_ps(d + r * nb + b);
      const __m512 dav = _mm512_loadu_ps(da + r * nb + b);
      for (int o = 0; o < NO; ++o) {
        __m512 f = _mm512_load_ps(facc[o][r]);
        f = _mm512_fmadd_ps(_mm512_mul_ps(dv, sv[o]), _mm512_cvtepi32_ps((__m512i)acc[o][r]), f);
        f = _mm512_fmadd_ps(dav, mv[o], f);
        _mm512_store_ps(facc[o][r], f);
      }
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) y[r * N + o] = lanes_total(_mm512_load_ps(facc[o][r]));
#else
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {
      float lane[LANES] = {};
      const uint8_t* wo = w + o * half;
      const int8_t* qr = q + r * P;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = b / LANES * GROUP, j = b % LANES;
        int32_t sum = 0;
        for (int64_t s = 0; s < GROUP; s += 64)
          for (int t = 0; t < 4; ++t) {
            const int64_t i = 4 * j + t;  // byte i of step s
            const uint8_t byte = wo[(g + s / 128 * 128) / 2 + i];
            const int32_t v = (s / 64) % 2 ? byte >> 4 : byte & 15;
            sum += v * qr[g + s + i];
          }
        const uint16_t* so = sz + o * row + 2 * S * (b / LANES) + j / (G / BLOCK);
        const float s = bf16_to_float(so[0]), m = std::fma(-8.f, s, bf16_to_float(so[S]));
        lane[j] = std::fma(d[r * nb + b] * s, static_cast<float>(sum), lane[j]);
        lane[j] = std::fma(da[r * nb + b], m, lane[j]);
      }
      y[r * N + o] = lanes_total(lane);
    }
#endif
}

#if defined(LK_AVX512) && defined(__AVX512VNNI__)
// 16 int32 accumulators, 8 unpacked weight vectors, a row's two activation vectors and the
// nibble mask: 27 of 32 registers.
static constexpr int W4A8_OUTS = 4, W4A8_ROWS = 4;
#else
static constexpr int W4A8_OUTS = 2, W4A8_ROWS = 2;
#endif

at::Tensor w4a8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz,
                   int64_t K, int64_t G) {
  check_block_rows(x, K, "w4a8_mm");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w4a8_mm: packed must be a contiguous (N, P / 2) uint8 tensor");
  const int64_t R = x.size(0), N = packed.size(0), P = packed.size(1) * 2;
  check_block_width(P, K, "w4a8_mm", ", halved");
  const int64_t nb = P / BLOCK;
  TORCH_CHECK((G == 32 || G == 64 || G == 128) && sz.scalar_type() == at::kBFloat16 &&
              sz.is_contiguous() && sz.numel() == N * 2 * (P / G),
              "w4a8_mm: sz must be (N, P / G * 2) bfloat16, G 32, 64 or 128");
  const Int8Blocks rounded = round_blocks_i8(x, P);
  const int8_t* qp = rounded.q.data_ptr<int8_t>();
  const float* dp = rounded.d.data_ptr<float>();
  const int32_t* op = rounded.offset.data_ptr<int32_t>();
  at::Tensor da = new_tensor({R, nb}, at::kFloat);  // d x A, A = offset / -128 (exact)
  float* dap = da.data_ptr<float>();
  for (int64_t i = 0; i < R * nb; ++i) dap[i] = dp[i] * static_cast<float>(op[i] / -128);
  at::Tensor y = new_tensor({R, N}, at::kFloat);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t budget = (512 << 10) / P;  // ~512 KB of int8 rows a block, as w8a8_mm
  tiled_product<W4A8_OUTS, W4A8_ROWS>(
      R, N, W4A8_OUTS * P / 2, budget, [&](auto no, auto nr, int64_t r, int64_t o) {
        w4a8_tile<decltype(no)::value, decltype(nr)::value>(
            qp + r * P, dp + r * nb, dap + r * nb, P, G, wp + o * (P / 2),
            szp + o * 2 * (P / G),
            yp + r * N + o, N);
      });
  return y;
}

// An int4 weight in pack_int4's layout (cpu_int4.cpp: packed (N16, K / 2) uint8, sz (N16,
// K / G, 2) bfloat16) laid out for w4a8_mm, its first n rows: what w4a8_layout computes in
// torch from the unpacked values, in one pass a row at a time (the torch form's permutations
// of small dimensions took ~20 s for 7B's weights; see PackedW4A8).
std::tuple<at::Tensor, at::Tensor> w4a8_pack(const at::Tensor& packed16, const at::Tensor& sz16,
                                             int64_t n, int64_t group_size) {
  TORCH_CHECK(packed16.dim() == 2 && packed16.scalar_type() == at::kByte &&
              packed16.is_contiguous() && packed16.size(0) % 16 == 0 && n <= packed16.size(0),
              "w4a8_pack: packed must be pack_int4's (N16, K / 2) uint8");
  const int64_t N16 = packed16.size(0), K = packed16.size(1) * 2, G = group_size;
  TORCH_CHECK(G % BLOCK == 0 && K % G == 0 && sz16.scalar_type() == at::kBFloat16 &&
              sz16.is_contiguous() && sz16.numel() == N16 * (K / G) * 2,
              "w4a8_pack: sz must be pack_int4's (N16, K / G, 2) bfloat16, G a multiple of 32");
  const int64_t P = (K + GROUP - 1) / GROUP * GROUP, groups = K / G;
  at::Tensor packed = new_tensor({n, P / 2}, at::kByte);
  at::Tensor sz = new_tensor({n, 2 * (P / G)}, at::kBFloat16);
  const uint8_t* in = packed16.data_ptr<uint8_t>();
  const uint16_t* szin = reinterpret_cast<const uint16_t*>(sz16.data_ptr<at::BFloat16>());
  uint8_t* out = packed.data_ptr<uint8_t>();
  uint16_t* szout = reinterpret_cast<uint16_t*>(sz.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> v(P, 0);  // a row's values, zero past K
    for (int64_t o = begin; o < end; ++o) {
      const int64_t block = o / 16, oi = o % 16;
      const uint8_t* rows = in + block * 16 * (K / 2);  // the block's 16 rows, step by step
      for (int64_t c = 0; c < K; ++c) {  // word 2 oi + parity of step c / 8, nibble p
        const int64_t step = c / 8, parity = c % 2, p = (c % 8) / 2;
        const uint8_t byte = rows[step * 64 + 4 * oi + 2 * parity + p / 2];
        v[c] = p % 2 ? byte >> 4 : byte & 15;
      }
      uint8_t* row = out + o * (P / 2);
      for (int64_t g = 0; g < P; g += GROUP)
        for (int64_t pair = 0; pair < 4; ++pair)
          for (int64_t i = 0; i < 64; ++i) {  // byte i of steps 2 pair and 2 pair + 1
            const int64_t col = g + 32 * (i / 4) + i % 4;
            row[g / 2 + 64 * pair + i] = static_cast<uint8_t>(
                v[col + 8 * pair] | v[col + 8 * pair + 4] << 4);
          }
      const uint16_t* pairs = szin + block * 16 * groups * 2;  // (group, output, 2)
      uint16_t* s = szout + o * 2 * (P / G);
      const int64_t S = GROUP / G;
      for (int64_t wg = 0; wg < P / G; ++wg) {  // per 512 columns: S scales, then S zeros
        const bool inside = wg < groups;
        s[wg / S * 2 * S + wg % S] = inside ? pairs[(wg * 16 + oi) * 2] : 0;
        s[wg / S * 2 * S + S + wg % S] = inside ? pairs[(wg * 16 + oi) * 2 + 1] : 0;
      }
    }
  });
  return {packed, sz};
}
