// What the int8-activation routes share (cpu_w8a8.cpp: int8 weights, cpu_w4a8.cpp: int4
// weights): activations rounded to int8 in blocks of 32 columns, one float scale per block,
// laid out so that int32 lane j of a 64-byte vector product sums block j of a group of 16
// blocks; and the fixed order in which the 16 lanes' float sums are added.
#pragma once

#include "cpu_common.h"

static constexpr int64_t BLOCK = 32;  // columns per activation scale
static constexpr int64_t LANES = 16;  // blocks per group
static constexpr int64_t GROUP = BLOCK * LANES;

// x (R, K) float32, each row rounded for a product of packed width P (K rounded up to
// GROUP): q (R, P) int8 in the packed order (per group, 8 steps of 64 bytes: byte 4j + t of
// step s is column 32j + 4s + t), d (R, P / 32) the blocks' scales, offset (R, P / 32) int32
// minus 128 times each block's sum of q. A block with an inf or NaN gets a NaN scale (its
// row's outputs are NaN, as a float product's would be). In cpu_w8a8.cpp.
struct Int8Blocks {
  at::Tensor q, d, offset;
};
Int8Blocks round_blocks_i8(const at::Tensor& x, int64_t P);

// The operators' own checks of what round_blocks_i8 takes (`op` names the operator): x a
// contiguous (rows, K) float32 tensor, and a packed width of P columns, K rounded up to GROUP
// (`note` ends the message: how the packed tensor's width relates to P).
static inline void check_block_rows(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
              x.size(1) == K, op, ": x must be a contiguous (rows, K) float32 tensor");
}
static inline void check_block_width(int64_t P, int64_t K, const char* op, const char* note) {
  TORCH_CHECK(P % GROUP == 0 && P >= K && P - K < GROUP, op,
              ": the packed width must be K rounded up to a multiple of 512", note);
}

// The 16 lanes' partial sums, added in one fixed order on every instruction set.
static inline float lanes_total(const float* lane) {
  float half[8];
  for (int i = 0; i < 8; ++i) half[i] = lane[i] + lane[i + 8];
  for (int i = 0; i < 4; ++i) half[i] += half[i + 4];
  return (half[0] + half[2]) + (half[1] + half[3]);
}

#if defined(LK_AVX512)
static inline float lanes_total(__m512 v) {  // lanes_total's order, in vectors
  const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));  // (0 + 2, 1 + 3)
  return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
}
#endif
