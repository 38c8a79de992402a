// AVX2 multi-token dots (see moe/moe_dot.h): each weight block is unpacked once and multiplied
// with N activation rows (N <= 8, one accumulator set per token). Per token the arithmetic is the
// reference's: the same integer sums per sub-block, then the block scales.
//   q4_K / q5_K x q8_K: d * d_act * sum - dmin * d_act * (mins . bsums); q5_K adds bit 4 from qh
//   q6_K x q8_K: levels 0..63, the -32 offset subtracted through bsums in the same i32 lanes
//   q8_0 x q8_0: |w| * sign(a, w) products, d_w * d_a per block of 32
// AVX-512 machines run csrc/avx512/moe_dot.cpp for the K-quants, and this q8_0.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "common/prefetch.h"
#include "moe/moe_dot.h"

KTRANS_TARGET_AVX2_BEGIN
#include "quant/q6k_levels.h"
namespace ktrans {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i loadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// q4_K x q8_K: d * d_a * sum_g sc[g] (q . a)_g  -  dmin * d_a * sum_g m[g] * (sum of a over g).
// The unpacked block (8 level vectors, 8 scale splats) stays in L1 while the tokens take turns:
// with 16 ymm registers, one token's accumulators live in registers at a time.
template <bool kQ5, int N>
void dot_k45(int64_t n, const void* w, const void* const* acts, float* out) {
  using Block = std::conditional_t<kQ5, BlockQ5_K, BlockQ4_K>;
  const Block* x = static_cast<const Block*>(w);
  const BlockQ8_K* y[N];
  __m256 acc[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_K*>(acts[j]);
    acc[j] = _mm256_setzero_ps();
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  // mins m[g] as int16, each twice: the 16 bsums are pairs of 16-value sums of sub-block g
  const __m128i dup = _mm_setr_epi8(0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1);
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    alignas(16) uint8_t sm[16];
    unpack_scales_mins_k4(x[i].scales, sm);
    const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + 8));
    const __m256i mins = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_shuffle_epi8(m8, dup)),
                                                 _mm_shuffle_epi8(_mm_srli_si128(m8, 4), dup), 1);
    alignas(32) __m256i q[8], s[8];  // 32 low nibbles (sub-block 2c), 32 high (2c + 1)
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kQ5) qh = loadu(x[i].qh);  // bit j of qh[l]: 5th bit of value l of sub-block j
    for (int c = 0; c < 4; ++c) {
      const __m256i b = loadu(x[i].qs + 32 * c);
      q[2 * c] = _mm256_and_si256(b, low4);
      q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
      if constexpr (kQ5) {
        q[2 * c] = _mm256_or_si256(q[2 * c], _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
        q[2 * c + 1] = _mm256_or_si256(q[2 * c + 1], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
        qh = _mm256_srli_epi16(qh, 2);
      }
      s[2 * c] = _mm256_set1_epi16(sm[2 * c]);
      s[2 * c + 1] = _mm256_set1_epi16(sm[2 * c + 1]);
    }
    const float d = _cvtsh_ss(x[i].d), dmin = _cvtsh_ss(x[i].dmin);
    for (int j = 0; j < N; ++j) {
      const BlockQ8_K& a = y[j][i];
      __m256i sum0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q[0], loadu(a.qs)), s[0]);
      __m256i sum1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q[1], loadu(a.qs + 32)), s[1]);
      for (int k = 2; k < 8; k += 2) {
        sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], loadu(a.qs + 32 * k)), s[k]));
        sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k + 1], loadu(a.qs + 32 * k + 32)), s[k + 1]));
      }
      const __m256i msum = _mm256_madd_epi16(mins, loadu(a.bsums));
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc[j]);
      acc[j] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * a.d), _mm256_cvtepi32_ps(msum), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = hsum(acc[j]);
}

// Two 16-value group scales for one 32-byte maddubs result: a for bytes 0..15, b for 16..31.
inline __m256i scale_pair(int a, int b) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(static_cast<int16_t>(a))),
                                 _mm_set1_epi16(static_cast<int16_t>(b)), 1);
}

template <int N>
void dot_q6k(int64_t n, const void* w, const void* const* acts, float* out) {
  const BlockQ6_K* x = static_cast<const BlockQ6_K*>(w);
  const BlockQ8_K* y[N];
  __m256 acc[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_K*>(acts[j]);
    acc[j] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    alignas(32) int16_t sc[16];
    for (int g = 0; g < 16; ++g) sc[g] = x[i].scales[g];
    // 32 * sc[g] for the -32 offset: sum_g 32 sc[g] * bsums[g] in the same i32 lanes as the dots
    const __m256i off = _mm256_slli_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(sc)), 5);
    __m256i q[8], sp[8];  // levels 0..63 of values 32k..32k+31, and their two group scales
    q6k_levels(x[i], q);
    for (int k = 0; k < 8; ++k) sp[k] = scale_pair(sc[2 * k], sc[2 * k + 1]);
    const float d = _cvtsh_ss(x[i].d);
    for (int j = 0; j < N; ++j) {
      const BlockQ8_K& a = y[j][i];
      __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(off, loadu(a.bsums)));
      for (int k = 0; k < 8; ++k)
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], loadu(a.qs + 32 * k)), sp[k]));
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = hsum(acc[j]);
}

template <int N>
void dot_q80(int64_t n, const void* w, const void* const* acts, float* out) {
  const BlockQ8_0* x = static_cast<const BlockQ8_0*>(w);
  const BlockQ8_0* y[N];
  __m256 acc[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_0*>(acts[j]);
    acc[j] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < n / kQK; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    const __m256i q = loadu(x[i].qs);
    const __m256i aq = _mm256_sign_epi8(q, q);  // |w| (w is never -128 in q8_0)
    const float d = _cvtsh_ss(x[i].d);
    for (int j = 0; j < N; ++j) {
      const __m256i p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(loadu(y[j][i].qs), q));
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * _cvtsh_ss(y[j][i].d)),
                               _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = hsum(acc[j]);
}

template <template <int> class F>
void dispatch(int64_t n, const void* w, const void* const* acts, int nacts, float* out) {
  switch (nacts) {
    case 8: return F<8>::run(n, w, acts, out);
    case 7: return F<7>::run(n, w, acts, out);
    case 6: return F<6>::run(n, w, acts, out);
    case 5: return F<5>::run(n, w, acts, out);
    case 4: return F<4>::run(n, w, acts, out);
    case 3: return F<3>::run(n, w, acts, out);
    case 2: return F<2>::run(n, w, acts, out);
    default: return F<1>::run(n, w, acts, out);
  }
}

template <int N> struct Q4K { static void run(int64_t n, const void* w, const void* const* a, float* o) { dot_k45<false, N>(n, w, a, o); } };
template <int N> struct Q5K { static void run(int64_t n, const void* w, const void* const* a, float* o) { dot_k45<true, N>(n, w, a, o); } };
template <int N> struct Q6K { static void run(int64_t n, const void* w, const void* const* a, float* o) { dot_q6k<N>(n, w, a, o); } };
template <int N> struct Q80 { static void run(int64_t n, const void* w, const void* const* a, float* o) { dot_q80<N>(n, w, a, o); } };

RegisterKernel<MoeDotMultiFn> reg_q4_k(k_moe_dot_multi[qi(QType::q4_k)], Isa::avx2, dispatch<Q4K>);
RegisterKernel<MoeDotMultiFn> reg_q5_k(k_moe_dot_multi[qi(QType::q5_k)], Isa::avx2, dispatch<Q5K>);
RegisterKernel<MoeDotMultiFn> reg_q6_k(k_moe_dot_multi[qi(QType::q6_k)], Isa::avx2, dispatch<Q6K>);
RegisterKernel<MoeDotMultiFn> reg_q8_0(k_moe_dot_multi[qi(QType::q8_0)], Isa::avx2, dispatch<Q80>);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
