// AVX-512 (VNNI) multi-token dots (see moe/moe_dot.h): each 256-value weight block is unpacked
// once into 64-byte vectors and multiplied with N activation rows (N <= 8). Per token and per 64
// values: one vpmaddubsw (u8 level x s8 activation, pairs in i16, no saturation: 63 * 127 * 2)
// and one vpdpwssd that multiplies by the sub-block scales and accumulates in i32, where AVX2
// needs two maddubs, two madd and two adds. The offset terms (q4_K mins, q6_K's -32) go through
// the activation's 16-value sums (bsums) with one 256-bit madd per token and block.
// Every integer sum equals the reference's; only the float summation order differs.
// q8_0 keeps the AVX2 version (one 32-value block per scale: nothing to gain from the width).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "common/prefetch.h"
#include "moe/moe_dot.h"

KTRANS_TARGET_AVX512_BEGIN
#include "quant/q6k_levels.h"
namespace ktrans {
namespace {

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

// q4_K / q5_K x q8_K: d * d_a * sum_g sc[g] (q . a)_g  -  dmin * d_a * sum_g m[g] * (sum of a over g);
// q5_K adds the 5th bit of value l of sub-block j from bit j of qh[l].
template <bool kQ5, int N>
void dot_k45(int64_t n, const void* w, const void* const* acts, float* out) {
  using Block = std::conditional_t<kQ5, BlockQ5_K, BlockQ4_K>;
  const Block* x = static_cast<const Block*>(w);
  const BlockQ8_K* y[N];
  __m512 acc[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_K*>(acts[j]);
    acc[j] = _mm512_setzero_ps();
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // mins m[g] as int16, each twice: the 16 bsums are pairs of 16-value sums of sub-block g
  const __m128i dup = _mm_setr_epi8(0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1);
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(Block)>(x + i);
    alignas(16) uint8_t sm[16];
    unpack_scales_mins_k4(x[i].scales, sm);
    const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + 8));
    const __m256i mins = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_shuffle_epi8(m8, dup)),
                                                 _mm_shuffle_epi8(_mm_srli_si128(m8, 4), dup), 1);
    const __m512i sc16 = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm))));
    __m512i q[4], sc[4];
    __m512i hbits = _mm512_setzero_si512();
    if constexpr (kQ5) hbits = _mm512_broadcast_i64x4(load256(x[i].qh));
    for (int c = 0; c < 4; ++c) {  // [low nibbles | high nibbles] of 32 bytes = [sub-block 2c | 2c+1]
      const __m512i q32 = _mm512_broadcast_i64x4(load256(x[i].qs + 32 * c));
      q[c] = _mm512_and_si512(_mm512_mask_srli_epi16(q32, 0xFFFF0000u, q32, 4), low4);
      if constexpr (kQ5) {  // bit 2c (low half) / 2c+1 (high half) of each qh byte -> 0x10
        const __m512i bit = join(_mm256_set1_epi8(static_cast<char>(1 << (2 * c))),
                                 _mm256_set1_epi8(static_cast<char>(2 << (2 * c))));
        q[c] = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(hbits, bit), q[c], _mm512_or_si512(q[c], _mm512_set1_epi8(0x10)));
      }
      sc[c] = _mm512_permutexvar_epi16(
          join(_mm256_set1_epi16(static_cast<int16_t>(2 * c)), _mm256_set1_epi16(static_cast<int16_t>(2 * c + 1))), sc16);
    }
    const float d = _cvtsh_ss(x[i].d), dmin = _cvtsh_ss(x[i].dmin);
    for (int j = 0; j < N; ++j) {
      const BlockQ8_K& a = y[j][i];
      __m512i sumi = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q[0], load512(a.qs)), sc[0]);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[1], load512(a.qs + 64)), sc[1]);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[2], load512(a.qs + 128)), sc[2]);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[3], load512(a.qs + 192)), sc[3]);
      const __m512i msum = _mm512_zextsi256_si512(_mm256_madd_epi16(mins, load256(a.bsums)));
      acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(sumi), acc[j]);
      acc[j] = _mm512_fnmadd_ps(_mm512_set1_ps(dmin * a.d), _mm512_cvtepi32_ps(msum), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
}

// q6_K x q8_K: levels 0..63 (-32 applied through bsums), 16 groups of 16 with int8 scales.
template <int N>
void dot_q6k(int64_t n, const void* w, const void* const* acts, float* out) {
  const BlockQ6_K* x = static_cast<const BlockQ6_K*>(w);
  const BlockQ8_K* y[N];
  __m512 acc[N];
  for (int j = 0; j < N; ++j) {
    y[j] = static_cast<const BlockQ8_K*>(acts[j]);
    acc[j] = _mm512_setzero_ps();
  }
  const __m256i gidx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(BlockQ6_K)>(x + i);
    const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
    const __m256i sc16x32 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(sc8), 5);  // 32 * sc[g], for the offset
    const __m256i sc8x2 = _mm256_broadcastsi128_si256(sc8);
    __m256i sl[8];
    q6k_levels(x[i], sl);
    __m512i q[4], sc[4];
    for (int k = 0; k < 4; ++k) {  // values 64k..64k+63 = groups 4k..4k+3, 8 int16 scales each
      q[k] = join(sl[2 * k], sl[2 * k + 1]);
      sc[k] = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(sc8x2, _mm256_add_epi8(gidx, _mm256_set1_epi8(static_cast<char>(4 * k)))));
    }
    const float d = _cvtsh_ss(x[i].d);
    for (int j = 0; j < N; ++j) {
      const BlockQ8_K& a = y[j][i];
      __m512i sumi = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q[0], load512(a.qs)), sc[0]);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[1], load512(a.qs + 64)), sc[1]);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[2], load512(a.qs + 128)), sc[2]);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q[3], load512(a.qs + 192)), sc[3]);
      sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(_mm256_madd_epi16(sc16x32, load256(a.bsums))));
      acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(sumi), acc[j]);
    }
  }
  for (int j = 0; j < N; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
}

// NOTE: each ISA file keeps this switch inside its own target region: one shared template in
// moe_dot.h (compiled for the baseline ISA) measured 25 % slower at q4_k T=512.
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

RegisterKernel<MoeDotMultiFn> reg_q4_k(k_moe_dot_multi[qi(QType::q4_k)], Isa::avx512, dispatch<Q4K>);
RegisterKernel<MoeDotMultiFn> reg_q5_k(k_moe_dot_multi[qi(QType::q5_k)], Isa::avx512, dispatch<Q5K>);
RegisterKernel<MoeDotMultiFn> reg_q6_k(k_moe_dot_multi[qi(QType::q6_k)], Isa::avx512, dispatch<Q6K>);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
