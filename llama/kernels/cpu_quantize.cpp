// int4 quantization on the CPU: the saved format of llama.quantize.formats.quantize_int4, the
// same bits, in one pass over the weight (the torch version makes ~8 elementwise passes over
// float32 copies; quantizing at load is where int4 models spent most of their load time).
//
//   int4_quantize(w, G) -> (weight, scales, zeros)
//
// w: (N, K) float32 or bfloat16, contiguous. weight: (N, K / 2) uint8, column 2j in the low
// nibble of byte j; scales, zeros: (N, K / G) bfloat16. Per group of G columns, in float32 with
// each operation rounded as torch rounds it (no contraction into FMAs: -ffp-contract=off):
//   zero  = bf16(lo + 8 * (hi - lo) / 15)
//   scale = the smallest bfloat16 >= max((zero - lo) / 8, (hi - zero) / 7, bf16's tiny)
//   q     = clamp(round_half_even((w - zero) / scale) + 8, 0, 15)
// A group holding inf or NaN gets a NaN scale (the caller refuses the weight).

#include "cpu_common.h"

namespace {

float widen(float v) { return v; }
float widen(at::BFloat16 v) { return bf16_to_float(v.x); }

// The smallest bfloat16 >= x, for positive finite x (the next one up where rounding went down).
uint16_t bf16_at_least(float x) {
  uint16_t r = float_to_bf16(x);
  return bf16_to_float(r) < x ? static_cast<uint16_t>(r + 1) : r;
}

#if defined(LK_AVX512)
__m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__m512 load16(const at::BFloat16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// A group's smallest and largest values, and whether all are finite.
template <typename T>
bool extremes(const T* src, int64_t G, float* lo_out, float* hi_out) {
  float lo = widen(src[0]), hi = lo;
  bool finite = true;
  int64_t k = 0;
#if defined(LK_AVX512)
  if (G % 16 == 0) {
    __m512 vlo = load16(src), vhi = vlo;
    __mmask16 bad = 0;
    for (; k < G; k += 16) {
      const __m512 v = load16(src + k);
      bad |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN or inf
      vlo = _mm512_min_ps(vlo, v);
      vhi = _mm512_max_ps(vhi, v);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
    finite = bad == 0;
  }
#endif
  for (; k < G; ++k) {
    const float v = widen(src[k]);
    finite = finite && std::isfinite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  *lo_out = lo;
  *hi_out = hi;
  return finite;
}

// q = clamp(round_half_even((v - zero) / scale) + 8, 0, 15), two to a byte.
template <typename T>
void values(const T* src, int64_t G, float zero, float scale, uint8_t* dst) {
  int64_t k = 0;
#if defined(LK_AVX512)
  const __m512 z = _mm512_set1_ps(zero), s = _mm512_set1_ps(scale), eight = _mm512_set1_ps(8.f);
  for (; k + 16 <= G; k += 16) {
    __m512 r = _mm512_div_ps(_mm512_sub_ps(load16(src + k), z), s);
    r = _mm512_add_ps(_mm512_roundscale_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                      eight);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), _mm512_set1_ps(15.f));
    const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));  // q0 .. q15
    const __m128i pairs = _mm_or_si128(_mm_and_si128(bytes, _mm_set1_epi16(0x00ff)),
                                       _mm_slli_epi16(_mm_srli_epi16(bytes, 8), 4));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + k / 2),
                     _mm_packus_epi16(pairs, _mm_setzero_si128()));
  }
#endif
  for (; k < G; k += 2) {
    uint8_t q[2];
    for (int i = 0; i < 2; ++i) {
      const float r = std::nearbyint((widen(src[k + i]) - zero) / scale) + 8.f;
      q[i] = static_cast<uint8_t>(std::min(std::max(r, 0.f), 15.f));
    }
    dst[k / 2] = static_cast<uint8_t>(q[0] | (q[1] << 4));
  }
}

template <typename T>
void quantize_rows(const T* w, int64_t begin, int64_t end, int64_t K, int64_t G, uint8_t* out,
                   uint16_t* scales, uint16_t* zeros) {
  const float tiny = std::numeric_limits<float>::min();  // bf16's smallest normal too
  const int64_t groups = K / G;
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* src = w + o * K + g * G;
      float lo, hi;
      const bool finite = extremes(src, G, &lo, &hi);
      const float span = 8.f * (hi - lo);
      const uint16_t zero_bits = float_to_bf16(lo + span / 15.f);
      const float zero = bf16_to_float(zero_bits);
      const float wanted = std::max(std::max((zero - lo) / 8.f, (hi - zero) / 7.f), tiny);
      const uint16_t scale_bits = bf16_at_least(wanted);
      const float scale = bf16_to_float(scale_bits);
      uint8_t* dst = out + o * (K / 2) + g * (G / 2);
      zeros[o * groups + g] = zero_bits;
      if (finite && std::isfinite(scale)) {
        scales[o * groups + g] = scale_bits;
        values(src, G, zero, scale, dst);
      } else {  // refused by the caller: NaN scale, no values computed from it
        scales[o * groups + g] = 0x7fc0;
        std::memset(dst, 0, G / 2);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& w,
                                                             int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
              (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "int4_quantize: w must be a contiguous (N, K) float32 or bfloat16 tensor");
  const int64_t N = w.size(0), K = w.size(1), G = group_size;
  TORCH_CHECK(G >= 2 && G % 2 == 0 && K % G == 0, "int4_quantize: the group size must be even "
              "and divide K");
  at::Tensor out = new_tensor({N, K / 2}, at::kByte);
  at::Tensor scales = new_tensor({N, K / G}, at::kBFloat16);
  at::Tensor zeros = new_tensor({N, K / G}, at::kBFloat16);
  uint8_t* op = out.data_ptr<uint8_t>();
  auto* sp = reinterpret_cast<uint16_t*>(scales.data_ptr<at::BFloat16>());
  auto* zp = reinterpret_cast<uint16_t*>(zeros.data_ptr<at::BFloat16>());
  const int64_t rows_grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, rows_grain, [&](int64_t begin, int64_t end) {
    if (w.scalar_type() == at::kFloat)
      quantize_rows(w.data_ptr<float>(), begin, end, K, G, op, sp, zp);
    else
      quantize_rows(w.data_ptr<at::BFloat16>(), begin, end, K, G, op, sp, zp);
  });
  return {out, scales, zeros};
}
