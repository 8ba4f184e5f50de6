// Attention of a decode step on the CPU: one query per row and head, over each row's own range
// of cached keys, in float32.
//
//   decode_attention(q, k, v, starts, ends, scale) -> out
//
// q: (B, G, R, D) float32, contiguous: R query heads share each of the G key/value heads
// (grouped-query attention; R = 1 without). k, v: (B, G, L, D) float32 or bfloat16 (both the
// same) views of the cache, the last dimension contiguous; bfloat16 keys and values are
// widened to float32 as they are read (exactly), so the result is the float32 kernel's on the
// widened cache, bit for bit, from half the bytes (a cache kept in bfloat16, kv_cache_dtype).
// starts, ends: (B,) int64; row b attends keys starts[b] .. ends[b] - 1, which must lie in
// 0 .. L - 1 with starts[b] < ends[b]. out: (B, G, R, D) = softmax(scale * q k^T) v over
// those keys.
//
// Each (row, kv head) is one thread's: its keys are read once for all R queries (scores kept
// in a buffer), the softmax is exact (max subtracted, float32 exp), then its values are read
// once. torch's scaled_dot_product_attention reads a decode step's cache at ~17 GB/s here;
// this at the machine's bandwidth (docs/QUANTIZATION.md). Only rows' own ranges are read, so
// rows of different lengths (a server's batch) cost their own lengths, not the longest's.
// Vectorised for AVX-512 (16 lanes) and AVX2 with FMA (8 lanes: most laptops' CPUs); a plain
// C++ build is slower than torch's attention, which the model then keeps
// (cpu_kernels.fast_attention).

#include "cpu_tensor.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The vector operations the loops below are written in, for one instruction set: fvec holds
// LANES float32 lanes; load() widens bfloat16 lanes as it loads them.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LA_VECTOR 1
#define LA_AVX512 1
using fvec = __m512;
static constexpr int64_t LANES = 16;
static inline fvec splat(float f) { return _mm512_set1_ps(f); }
static inline fvec zero() { return _mm512_setzero_ps(); }
static inline fvec load(const float* p) { return _mm512_loadu_ps(p); }
static inline fvec load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline void store(float* p, fvec v) { _mm512_storeu_ps(p, v); }
static inline fvec add(fvec a, fvec b) { return _mm512_add_ps(a, b); }
static inline fvec sub(fvec a, fvec b) { return _mm512_sub_ps(a, b); }
static inline fvec mul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
static inline fvec max(fvec a, fvec b) { return _mm512_max_ps(a, b); }
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline fvec fnma(fvec a, fvec b, fvec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline fvec nearest(fvec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline float total(fvec v) { return _mm512_reduce_add_ps(v); }
// p * 2^n (n an integer in -126..0), and 0 where x < least
static inline fvec times_pow2_above(fvec p, fvec n, fvec x, fvec least) {
  const __mmask16 below = _mm512_cmp_ps_mask(x, least, _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~below), _mm512_scalef_ps(p, n));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LA_VECTOR 1
using fvec = __m256;
static constexpr int64_t LANES = 8;
static inline fvec splat(float f) { return _mm256_set1_ps(f); }
static inline fvec zero() { return _mm256_setzero_ps(); }
static inline fvec load(const float* p) { return _mm256_loadu_ps(p); }
static inline fvec load(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline void store(float* p, fvec v) { _mm256_storeu_ps(p, v); }
static inline fvec add(fvec a, fvec b) { return _mm256_add_ps(a, b); }
static inline fvec sub(fvec a, fvec b) { return _mm256_sub_ps(a, b); }
static inline fvec mul(fvec a, fvec b) { return _mm256_mul_ps(a, b); }
static inline fvec max(fvec a, fvec b) { return _mm256_max_ps(a, b); }
static inline fvec fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline fvec fnma(fvec a, fvec b, fvec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline fvec nearest(fvec x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline float total(fvec v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
// p * 2^n (n an integer in -126..0), and 0 where x < least: 2^n from its exponent bits, a
// normal float, so the product is exact as AVX-512's scalef is
static inline fvec times_pow2_above(fvec p, fvec n, fvec x, fvec least) {
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const fvec kept = _mm256_cmp_ps(x, least, _CMP_NLT_UQ);
  return _mm256_and_ps(kept, mul(p, _mm256_castsi256_ps(bits)));
}
#endif

// A cached key's or value's element as float32: bfloat16 is float32's high half (exact).
static inline float widen(float x) { return x; }
static inline float widen(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(LA_VECTOR)
// exp(x) for x <= 0 to ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series to
// r^7 (error < 2e-8), times 2^n. Below -87.3 the result is 0 (as float32's exp underflows).
static inline fvec exp_nonpositive(fvec x) {
  const fvec least = splat(-87.3f);
  const fvec clamped = max(x, least);
  const fvec n = nearest(mul(clamped, splat(1.44269504088896341f)));
  fvec r = fnma(n, splat(0.693145751953125f), clamped);  // ln2, high bits
  r = fnma(n, splat(1.428606765330187045e-06f), r);      // and the rest
  fvec p = splat(1.f / 5040);
  p = fma(p, r, splat(1.f / 720));
  p = fma(p, r, splat(1.f / 120));
  p = fma(p, r, splat(1.f / 24));
  p = fma(p, r, splat(1.f / 6));
  p = fma(p, r, splat(0.5f));
  p = fma(p, r, splat(1.f));
  p = fma(p, r, splat(1.f));
  return times_pow2_above(p, n, x, least);
}
#endif

template <typename T>
static inline float dot(const float* a, const T* b, int64_t d) {
#if defined(LA_VECTOR)
  if (d % LANES == 0) {
    fvec acc = zero();
    for (int64_t i = 0; i < d; i += LANES) acc = fma(load(a + i), load(b + i), acc);
    return total(acc);
  }
#endif
  float sum = 0.f;
  for (int64_t i = 0; i < d; ++i) sum += a[i] * widen(b[i]);
  return sum;
}

// scores[0..n) -> exp(scores - max), returns their sum.
static float softmax_numerators(float* scores, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, scores[j]);
  float sum = 0.f;
  int64_t j = 0;
#if defined(LA_VECTOR)
  const fvec vm = splat(m);
  fvec vsum = zero();
  for (; j + LANES <= n; j += LANES) {
    const fvec e = exp_nonpositive(sub(load(scores + j), vm));
    store(scores + j, e);
    vsum = add(vsum, e);
  }
#if defined(LA_AVX512)
  if (j < n) {  // the last few lanes masked (elsewhere: std::exp, below)
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - j)) - 1);
    const fvec e = _mm512_maskz_mov_ps(
        mask, exp_nonpositive(sub(_mm512_maskz_loadu_ps(mask, scores + j), vm)));
    _mm512_mask_storeu_ps(scores + j, mask, e);
    vsum = add(vsum, e);
    j = n;
  }
#endif
  sum = total(vsum);
#endif
  for (; j < n; ++j) {
    scores[j] = std::exp(scores[j] - m);
    sum += scores[j];
  }
  return sum;
}

// out[0..d) += p * v[0..d)
template <typename T>
static inline void axpy(float* out, float p, const T* v, int64_t d) {
  int64_t i = 0;
#if defined(LA_VECTOR)
  const fvec vp = splat(p);
  for (; i + LANES <= d; i += LANES) store(out + i, fma(vp, load(v + i), load(out + i)));
#endif
  for (; i < d; ++i) out[i] += p * widen(v[i]);
}

// Row b's attention over its keys for every kv head (see the top), K/V elements of type T.
template <typename T>
static void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const int64_t* sp, const int64_t* ep, float s, at::Tensor& out) {
  const int64_t G = q.size(1), R = q.size(2), D = q.size(3);
  const float* qp = q.data_ptr<float>();
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kg = k.stride(1), kl = k.stride(2);
  const int64_t vb = v.stride(0), vg = v.stride(1), vl = v.stride(2);
  at::parallel_for(0, q.size(0) * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, inv(R);  // one thread's buffers, reused item after item
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / G, g = item % G, first = sp[b], n = ep[b] - sp[b];
      const T* keys = kp + b * kb + g * kg + first * kl;
      const T* values = vp + b * vb + g * vg + first * vl;
      const float* queries = qp + item * R * D;
      float* outs = op + item * R * D;
      scores.resize(R * n);
      for (int64_t j = 0; j < n; ++j)  // every key read once, for all R queries
        for (int64_t r = 0; r < R; ++r)
          scores[r * n + j] = dot(queries + r * D, keys + j * kl, D) * s;
      for (int64_t r = 0; r < R; ++r) inv[r] = 1.f / softmax_numerators(&scores[r * n], n);
      for (int64_t i = 0; i < R * D; ++i) outs[i] = 0.f;
      for (int64_t j = 0; j < n; ++j)  // every value read once
        for (int64_t r = 0; r < R; ++r) axpy(outs + r * D, scores[r * n + j], values + j * vl, D);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < D; ++i) outs[r * D + i] *= inv[r];
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& starts, const at::Tensor& ends, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "decode_attention: q must be a contiguous (B, G, R, D) float32 tensor");
  const int64_t B = q.size(0), G = q.size(1), D = q.size(3);
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B &&
              k.size(1) == G && k.size(3) == D && (bf16 || k.scalar_type() == at::kFloat) &&
              v.scalar_type() == k.scalar_type() && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: k and v must be (B, G, L, D), both float32 or both bfloat16, "
              "with contiguous rows");
  TORCH_CHECK(starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong &&
              starts.numel() == B && ends.numel() == B && starts.is_contiguous() &&
              ends.is_contiguous(), "decode_attention: starts and ends must be (B,) int64");
  const int64_t L = k.size(2);
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* ep = ends.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= sp[b] && sp[b] < ep[b] && ep[b] <= L, "decode_attention: row ", b,
                " attends keys ", sp[b], "..", ep[b], " of ", L);
  at::Tensor out = new_tensor(q.sizes(), at::kFloat);  // q: contiguous float32
  const float s = static_cast<float>(scale);
  if (bf16)
    attend_rows<uint16_t>(q, k, v, sp, ep, s, out);
  else
    attend_rows<float>(q, k, v, sp, ep, s, out);
  return out;
}
