// AVX-512 (VNNI) mxfp4 x q8_0 dot products (format and reference: csrc/generic/quant_mxfp4.cpp).
// As the AVX2 version, with the 256-bit vpdpbusd (u8 |w| x s8 a with w's sign, 4 products per
// i32 lane) in place of maddubs + madd, two accumulators to hide its latency. The integer sums
// equal the reference's; only the float summation order differs. The multi-token version decodes
// a block once for up to 8 activation rows.
#include <immintrin.h>

#include "common/prefetch.h"
#include "moe/moe_dot.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX512_BEGIN
namespace ktrans {
namespace {

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline float hsum256(__m256 acc) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

inline __m256i table256() {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kMXFP4)));
}

// Signed levels of one block: byte j = kMXFP4[code j] (element order of the block).
inline __m256i levels(const BlockMXFP4& b, __m256i table) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
  return _mm256_shuffle_epi8(table, _mm256_and_si256(both, _mm256_set1_epi8(0x0F)));
}

float dot_mxfp4_avx512(int64_t n, const void* w, const void* a) {
  const BlockMXFP4* x = static_cast<const BlockMXFP4*>(w);
  const BlockQ8_0* y = static_cast<const BlockQ8_0*>(a);
  const __m256i table = table256();
  auto block = [&](int64_t k) {
    const __m256i q = levels(x[k], table);
    const __m256i dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(q, q),
                                           _mm256_sign_epi8(load256(y[k].qs), q));
    return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(y[k].d) * e8m0_to_fp32_half(x[k].e)), _mm256_cvtepi32_ps(dp));
  };
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const int64_t nb = n / kQK;
  int64_t i = 0;
  for (; i + 2 <= nb; i += 2) {
    prefetch_ahead<2 * sizeof(*x)>(x + i);
    acc0 = _mm256_add_ps(acc0, block(i));
    acc1 = _mm256_add_ps(acc1, block(i + 1));
  }
  if (i < nb) acc0 = _mm256_add_ps(acc0, block(i));
  return hsum256(_mm256_add_ps(acc0, acc1));
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
  const __m256i table = table256();
  for (int64_t i = 0; i < n / kQK; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    const __m256i q = levels(x[i], table), aq = _mm256_sign_epi8(q, q);
    const float e = e8m0_to_fp32_half(x[i].e);
    for (int j = 0; j < N; ++j) {
      const __m256i dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aq, _mm256_sign_epi8(load256(y[j][i].qs), q));
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(y[j][i].d) * e), _mm256_cvtepi32_ps(dp), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = hsum256(acc[j]);
}

void dot_mxfp4_multi_avx512(int64_t n, const void* w, const void* const* acts, int nacts, float* out) {
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

RegisterKernel<VecDotFn> reg_dot(k_vec_dot[qi(QType::mxfp4)], Isa::avx512, dot_mxfp4_avx512);
RegisterKernel<MoeDotMultiFn> reg_multi(k_moe_dot_multi[qi(QType::mxfp4)], Isa::avx512, dot_mxfp4_multi_avx512);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
