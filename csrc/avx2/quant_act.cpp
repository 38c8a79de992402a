// AVX2 activation quantizers (q8_0 for the 32-value formats, q8_K for the K-quants): 8 floats per
// step. Bit-identical to the generic reference: the same float32 absmax, scale and reciprocal,
// q8_0 rounds half away from zero (floor + compare of the exact fraction), q8_K rounds to nearest
// even (cvtps2dq under the default MXCSR mode, like lrintf). The packing keeps element order.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "common/numeric.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Largest |x| over n (a multiple of 8) floats.
inline float absmax(const float* x, int n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
  return hmax_ps(m);
}

// Packs 4 x 8 int32 (values in int8 range) into 32 int8 in element order.
inline __m256i pack_i32x32(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v0, v1), _mm256_packs_epi32(v2, v3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// round(v) with halves away from zero, exactly as roundf (the fraction a - floor(a) is exact).
inline __m256i round_away_epi32(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, v);
  const __m256 t = _mm256_floor_ps(a);
  const __m256 up = _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(a, t), _mm256_set1_ps(0.5f), _CMP_GE_OQ),
                                  _mm256_set1_ps(1.0f));
  const __m256 r = _mm256_or_ps(_mm256_add_ps(t, up), _mm256_and_ps(v, sign));
  return _mm256_cvttps_epi32(r);
}

void q8_0_avx2(const float* x, void* dst, int64_t n) {
  BlockQ8_0* y = static_cast<BlockQ8_0*>(dst);
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    const float d = absmax(x, kQK) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = f32_to_fp16(d);
    const __m256 vid = _mm256_set1_ps(id);
    __m256i v[4];
    for (int k = 0; k < 4; ++k) v[k] = round_away_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), vid));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs), pack_i32x32(v[0], v[1], v[2], v[3]));
  }
}

void q8_k_avx2(const float* x, void* dst, int64_t n) {
  BlockQ8_K* y = static_cast<BlockQ8_K*>(dst);
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    const float amax = absmax(x, kQK_K);
    const __m256 vid = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    y[i].d = amax != 0.0f ? amax / 127.0f : 0.0f;
    for (int c = 0; c < kQK_K / 32; ++c) {
      __m256i v[4];
      for (int k = 0; k < 4; ++k) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * c + 8 * k), vid));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[i].qs + 32 * c), pack_i32x32(v[0], v[1], v[2], v[3]));
      y[i].bsums[2 * c] = static_cast<int16_t>(hsum_epi32(_mm256_add_epi32(v[0], v[1])));
      y[i].bsums[2 * c + 1] = static_cast<int16_t>(hsum_epi32(_mm256_add_epi32(v[2], v[3])));
    }
  }
}

RegisterKernel<QuantizeRowFn> reg_q8_0(k_quantize_row[qi(QType::q8_0)], Isa::avx2, q8_0_avx2);
RegisterKernel<QuantizeRowFn> reg_q8_k(k_quantize_row[qi(QType::q8_k)], Isa::avx2, q8_k_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
