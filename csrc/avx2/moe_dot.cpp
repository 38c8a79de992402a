// AVX2 multi-token dot for q4_K weights x q8_K activations (see moe/moe_dot.h): the nibbles and
// 6-bit scales of each weight block are unpacked once and multiplied with N activation rows
// (N <= 8, one accumulator set per token). Per token the arithmetic is the reference's: the same
// integer sums per 32-value sub-block, d * d_act * sum - dmin * d_act * (mins . bsums).
// Also used on AVX-512 machines (no AVX-512 override): the work is unpack-bound, not width-bound.
#include <immintrin.h>

#include <cstring>

#include "moe/moe_dot.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i loadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 12 packed bytes -> 8 scales (out[0..7]) and 8 mins (out[8..15]), 6 bits each.
inline void k4_scales(const uint8_t* q, uint8_t* out) {
  uint32_t a[3], r[4];
  std::memcpy(a, q, 12);
  r[0] = a[0] & 0x3f3f3f3f;                                         // scales 0..3
  r[1] = (a[2] & 0x0f0f0f0f) | ((a[0] >> 2) & 0x30303030);          // scales 4..7
  r[2] = a[1] & 0x3f3f3f3f;                                         // mins 0..3
  r[3] = ((a[2] >> 4) & 0x0f0f0f0f) | ((a[1] >> 2) & 0x30303030);   // mins 4..7
  std::memcpy(out, r, 16);
}

// sum over the 8 sub-blocks of min[g] * (sum of the 32 activations of sub-block g).
inline int mins_times_sums(const uint8_t* mins, const int16_t* bsums) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsums));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsums + 8));
  const __m128i sums = _mm_hadd_epi16(lo, hi);  // 8 sums of 32
  const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mins)));
  __m128i p = _mm_madd_epi16(sums, m);
  p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4E));
  p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1));
  return _mm_cvtsi128_si32(p);
}

template <int N>
void dot_q4k(int64_t n, const void* w, const void* const* acts, float* out) {
  const BlockQ4_K* x = static_cast<const BlockQ4_K*>(w);
  const BlockQ8_K* y[N];
  __m256 acc[N];
  float acc_min[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_K*>(acts[j]);
    acc[j] = _mm256_setzero_ps();
    acc_min[j] = 0.0f;
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    alignas(16) uint8_t sm[16];
    k4_scales(x[i].scales, sm);
    const float d = _cvtsh_ss(x[i].d), dmin = _cvtsh_ss(x[i].dmin);
    __m256i sumi[N];
    for (int j = 0; j < N; ++j) sumi[j] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {  // 64 values: 32 low nibbles (sub-block 2c), 32 high (2c + 1)
      const __m256i q = loadu(x[i].qs + 32 * c);
      const __m256i q0 = _mm256_and_si256(q, low4), q1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      const __m256i s0 = _mm256_set1_epi16(sm[2 * c]), s1 = _mm256_set1_epi16(sm[2 * c + 1]);
      for (int j = 0; j < N; ++j) {
        const __m256i p0 = _mm256_maddubs_epi16(q0, loadu(y[j][i].qs + 64 * c));
        const __m256i p1 = _mm256_maddubs_epi16(q1, loadu(y[j][i].qs + 64 * c + 32));
        sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1)));
      }
    }
    for (int j = 0; j < N; ++j) {
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * y[j][i].d), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
      acc_min[j] += dmin * y[j][i].d * static_cast<float>(mins_times_sums(sm + 8, y[j][i].bsums));
    }
  }
  for (int j = 0; j < N; ++j) out[j] = hsum(acc[j]) - acc_min[j];
}

void dot_q4k_multi(int64_t n, const void* w, const void* const* acts, int nacts, float* out) {
  switch (nacts) {
    case 8: return dot_q4k<8>(n, w, acts, out);
    case 7: return dot_q4k<7>(n, w, acts, out);
    case 6: return dot_q4k<6>(n, w, acts, out);
    case 5: return dot_q4k<5>(n, w, acts, out);
    case 4: return dot_q4k<4>(n, w, acts, out);
    case 3: return dot_q4k<3>(n, w, acts, out);
    case 2: return dot_q4k<2>(n, w, acts, out);
    default: return dot_q4k<1>(n, w, acts, out);
  }
}

RegisterKernel<MoeDotMultiFn> reg_q4_k(k_moe_dot_multi[qi(QType::q4_k)], Isa::avx2, dot_q4k_multi);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
