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

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: a third less to parse per file
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LA_AVX512 1

// exp(x) for x <= 0 to ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series to
// r^7 (error < 2e-8), times 2^n. Below -87.3 the result is 0 (as float32's exp underflows).
static inline __m512 exp_nonpositive(__m512 x) {
  const __m512 tiny = _mm512_set1_ps(-87.3f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, tiny, _CMP_LT_OQ);
  x = _mm512_max_ps(x, tiny);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);  // and the rest
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LA_AVX2 1

// The AVX-512 exp_nonpositive's steps on 8 lanes; 2^n is made from its exponent bits (n is
// -126..0 here, so 2^n is a normal float) and multiplied in, which is exact as scalef is.
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 tiny = _mm256_set1_ps(-87.3f);
  const __m256 kept = _mm256_cmp_ps(x, tiny, _CMP_GE_OQ);
  x = _mm256_max_ps(x, tiny);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(kept, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

static inline float sum8(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
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
#if defined(LA_AVX512)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif
#if defined(LA_AVX2)
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

template <typename T>
static inline float dot(const float* a, const T* b, int64_t d) {
#if defined(LA_AVX512)
  if (d % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif defined(LA_AVX2)
  if (d % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
    return sum8(acc);
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
#if defined(LA_AVX512)
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vm));
    _mm512_storeu_ps(scores + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (j < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(
        mask, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), vm)));
    _mm512_mask_storeu_ps(scores + j, mask, e);
    vsum = _mm512_add_ps(vsum, e);
    j = n;
  }
  sum = _mm512_reduce_add_ps(vsum);
#elif defined(LA_AVX2)
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vm));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = sum8(vsum);
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
#if defined(LA_AVX512)
  const __m512 vp = _mm512_set1_ps(p);
  for (; i + 16 <= d; i += 16)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(vp, load16(v + i), _mm512_loadu_ps(out + i)));
#elif defined(LA_AVX2)
  const __m256 vp = _mm256_set1_ps(p);
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vp, load8(v + i), _mm256_loadu_ps(out + i)));
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
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  if (bf16)
    attend_rows<uint16_t>(q, k, v, sp, ep, s, out);
  else
    attend_rows<float>(q, k, v, sp, ep, s, out);
  return out;
}

TORCH_LIBRARY_FRAGMENT(llama_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor starts, Tensor ends, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_kernels, CPU, m) { m.impl("decode_attention", &decode_attention); }
