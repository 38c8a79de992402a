// AVX2 mxfp4 x q8_0 dot products (see csrc/generic/quant_mxfp4.cpp for the format and the
// reference): the 32 codes of a block become signed levels with one pshufb into the kMXFP4
// table, then the sign trick |w| * sign(a, w) in maddubs (pairs at most 12 * 127 * 2, no i16
// saturation) and madd into 8 x i32. The block's float scale fp16(d_a) * 2^(e-128) is applied
// with one FMA into 8-lane accumulators: the integer sums equal the reference's, only the float
// summation order differs. The multi-token version (moe/moe_dot.h) decodes a block once for up
// to 8 activation rows.
#include <immintrin.h>

#include "common/prefetch.h"
#include "moe/moe_dot.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Signed levels of one block: byte j = kMXFP4[code j] (element order of the block).
inline __m256i levels(const BlockMXFP4& b, __m256i table) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
  return _mm256_shuffle_epi8(table, _mm256_and_si256(both, _mm256_set1_epi8(0x0F)));
}

inline __m256i table256() {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kMXFP4)));
}

float dot_mxfp4_avx2(int64_t n, const void* w, const void* a) {
  const BlockMXFP4* x = static_cast<const BlockMXFP4*>(w);
  const BlockQ8_0* y = static_cast<const BlockQ8_0*>(a);
  const __m256i table = table256(), ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / kQK; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    const __m256i q = levels(x[i], table);
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(load256(y[i].qs), q));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(y[i].d) * e8m0_to_fp32_half(x[i].e));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc);
  }
  return hsum_ps(acc);
}

template <int N>
void dot_mxfp4_multi(int64_t n, const void* w, const void* const* acts, float* out) {
  const BlockMXFP4* x = static_cast<const BlockMXFP4*>(w);
  const BlockQ8_0* y[N];
  __m256 acc[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_0*>(acts[j]);
    acc[j] = _mm256_setzero_ps();
  }
  const __m256i table = table256(), ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < n / kQK; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    const __m256i q = levels(x[i], table), aq = _mm256_sign_epi8(q, q);
    const float e = e8m0_to_fp32_half(x[i].e);
    for (int j = 0; j < N; ++j) {
      const __m256i p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(load256(y[j][i].qs), q));
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(y[j][i].d) * e);
      acc[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = hsum_ps(acc[j]);
}

void dot_mxfp4_multi_avx2(int64_t n, const void* w, const void* const* acts, int nacts, float* out) {
  switch (nacts) {
    case 8: return dot_mxfp4_multi<8>(n, w, acts, out);
    case 7: return dot_mxfp4_multi<7>(n, w, acts, out);
    case 6: return dot_mxfp4_multi<6>(n, w, acts, out);
    case 5: return dot_mxfp4_multi<5>(n, w, acts, out);
    case 4: return dot_mxfp4_multi<4>(n, w, acts, out);
    case 3: return dot_mxfp4_multi<3>(n, w, acts, out);
    case 2: return dot_mxfp4_multi<2>(n, w, acts, out);
    default: return dot_mxfp4_multi<1>(n, w, acts, out);
  }
}

RegisterKernel<VecDotFn> reg_dot(k_vec_dot[qi(QType::mxfp4)], Isa::avx2, dot_mxfp4_avx2);
RegisterKernel<MoeDotMultiFn> reg_multi(k_moe_dot_multi[qi(QType::mxfp4)], Isa::avx2, dot_mxfp4_multi_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
