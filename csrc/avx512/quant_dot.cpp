// AVX-512 (VNNI) dot products of one weight row with one quantized activation row.
//
// Legacy formats (one 32-value block per step): 256-bit vpdpbusd (u8 |w| x s8 a with w's sign,
// 4 products per i32 lane) replaces AVX2's maddubs + madd; one float scale per block.
// K-quants use 64-byte vectors holding two sub-blocks (or four 16-value groups).
// K-quants: vpmaddubsw (pairs in i16, no saturation: at most 63*127*2) then vpdpwssd, which
// multiplies by the per-group scale and accumulates in one instruction. Offsets (q6_K -32, q3_K
// -4) and mins go through the activation's 16-value sums (bsums). Every integer sum equals the
// reference's; only the float summation order differs.
#include <immintrin.h>

#include <cstring>

#include "common/prefetch.h"
#include "common/numeric.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX512_BEGIN
#include "quant/q6k_levels.h"
namespace ktrans {
namespace {

// F16C conversion: exact for every half value, far cheaper than the portable helper.
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
inline __m512 join_ps(float lo, float hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(lo))),
                                             _mm256_castps_pd(_mm256_set1_ps(hi)), 1));
}

// 16 packed bytes -> 32 nibbles (low nibbles first), as in the block layouts.
inline __m256i nibbles_16(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

inline int hsum_epi32_128(__m128i s) {
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

float dot_f32_avx512(int64_t n, const void* w, const void* a) {
  const float* x = static_cast<const float*>(w);
  const float* y = static_cast<const float*>(a);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead<128>(x + i);
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

template <bool kBf16>
float dot_half_avx512(int64_t n, const void* w, const void* a) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  auto load16 = [&](int64_t i) {
    const __m256i h = load256(x + i);
    if constexpr (kBf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  };
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead<64>(x + i);
    acc0 = _mm512_fmadd_ps(load16(i), _mm512_loadu_ps(y + i), acc0);
    acc1 = _mm512_fmadd_ps(load16(i + 16), _mm512_loadu_ps(y + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += (kBf16 ? bf16_to_f32(x[i]) : h2f(x[i])) * y[i];
  return s;
}

// Signed levels (32 bytes) of a legacy block.
inline __m256i levels(const BlockQ8_0& b) { return load256(b.qs); }
inline __m256i levels(const BlockQ4_0& b) { return _mm256_sub_epi8(nibbles_16(b.qs), _mm256_set1_epi8(8)); }
inline __m256i levels(const BlockQ5_0& b) {
  uint32_t qh;
  std::memcpy(&qh, b.qh, 4);
  const __m256i hi = _mm256_maskz_mov_epi8(static_cast<__mmask32>(qh), _mm256_set1_epi8(0x10));
  return _mm256_sub_epi8(_mm256_or_si256(nibbles_16(b.qs), hi), _mm256_set1_epi8(16));
}

// One block per step with 256-bit vpdpbusd: |w| as the unsigned operand, w's sign moved onto a.
// (Two blocks per 512-bit vector measured slower: the halves come from separate 34-byte blocks.)
template <class Block>
float dot_q32_avx512(int64_t n, const void* w, const void* a) {
  const Block* x = static_cast<const Block*>(w);
  const BlockQ8_0* y = static_cast<const BlockQ8_0*>(a);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const int64_t nb = n / kQK;
  int64_t i = 0;
  auto block = [&](int64_t k) {
    const __m256i q = levels(x[k]), ya = load256(y[k].qs);
    const __m256i dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(q, q), _mm256_sign_epi8(ya, q));
    return _mm256_mul_ps(_mm256_set1_ps(h2f(x[k].d) * h2f(y[k].d)), _mm256_cvtepi32_ps(dp));
  };
  for (; i + 2 <= nb; i += 2) {
    prefetch_ahead<2 * sizeof(Block)>(x + i);
    acc0 = _mm256_add_ps(acc0, block(i));
    acc1 = _mm256_add_ps(acc1, block(i + 1));
  }
  if (i < nb) acc0 = _mm256_add_ps(acc0, block(i));
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// sum_j v[j] * (sum of activation values 32j..32j+31), v: 8 int16.
inline int dot_pairs_bsums(__m128i v, const int16_t* bsums) {
  const __m128i pairs = _mm_hadd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bsums)),
                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsums + 8)));
  return hsum_epi32_128(_mm_madd_epi16(pairs, v));
}

// sum_g sc[g] * bsums[g] over 16 groups of 16; sc: 16 int8.
inline int dot16_bsums(__m128i sc8, const int16_t* bsums) {
  const __m256i p = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), load256(bsums));
  return hsum_epi32_128(_mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
}

// q4_K / q5_K: per 64 values one maddubs on [sub-block 2c | 2c+1], vpdpwssd by the two scales.
template <bool kQ5>
float dot_k45_avx512(int64_t n, const void* w, const void* a) {
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  float acc_m = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const uint8_t* qs;
    const uint8_t* scales;
    uint32_t qh[8] = {};
    uint16_t d16, dmin16;
    if constexpr (kQ5) {
      const BlockQ5_K& b = static_cast<const BlockQ5_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ5_K)>(&b);
      qs = b.qs, scales = b.scales, d16 = b.d, dmin16 = b.dmin;
      std::memcpy(qh, b.qh, 32);
    } else {
      const BlockQ4_K& b = static_cast<const BlockQ4_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ4_K)>(&b);
      qs = b.qs, scales = b.scales, d16 = b.d, dmin16 = b.dmin;
    }
    alignas(16) uint8_t sm[16];
    unpack_scales_mins_k4(scales, sm);
    const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + 8)));
    acc_m += h2f(dmin16) * y[i].d * static_cast<float>(dot_pairs_bsums(mins, y[i].bsums));
    // 8 scales as int16, replicated so that vpermw can pick [sc 2c x16 | sc 2c+1 x16]
    const __m512i sc16 = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm))));
    const __m512i hbits = _mm512_broadcast_i64x4(load256(qh));
    __m512i sumi = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      // [low nibbles | high nibbles] of the 32 bytes = [sub-block 2c | 2c+1]
      const __m512i q32 = _mm512_broadcast_i64x4(load256(qs + 32 * c));
      __m512i q = _mm512_and_si512(_mm512_mask_srli_epi16(q32, 0xFFFF0000u, q32, 4), low4);
      if constexpr (kQ5) {  // bit 2c (low half) / 2c+1 (high half) of each qh byte -> 0x10
        const __m512i bit = join(_mm256_set1_epi8(static_cast<char>(1 << (2 * c))),
                                 _mm256_set1_epi8(static_cast<char>(2 << (2 * c))));
        q = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(hbits, bit), q, _mm512_or_si512(q, _mm512_set1_epi8(0x10)));
      }
      const __m512i sc = _mm512_permutexvar_epi16(
          join(_mm256_set1_epi16(static_cast<int16_t>(2 * c)), _mm256_set1_epi16(static_cast<int16_t>(2 * c + 1))), sc16);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(q, load512(y[i].qs + 64 * c)), sc);
    }
    acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(d16) * y[i].d), _mm512_cvtepi32_ps(sumi), acc);
  }
  return _mm512_reduce_add_ps(acc) - acc_m;
}

// Scales of 16-value groups 4k..4k+3 as 32 int16 (8 per group: one per maddubs pair), from 16 int8.
inline __m512i group_scales(__m256i sc8x2, int k) {
  const __m256i idx = _mm256_add_epi8(
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
      _mm256_set1_epi8(static_cast<char>(4 * k)));
  return _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(sc8x2, idx));
}

// 16-group K-quants from 8 unsigned 32-value slices (slice s = values 32s..32s+31):
// sum_g sc[g] * sum_{l in g} q_l * a_l, integer.
inline __m512i dot_slices16(const __m256i* slices, __m128i sc8, const int8_t* aq) {
  const __m256i sc8x2 = _mm256_broadcastsi128_si256(sc8);
  __m512i sumi = _mm512_setzero_si512();
  for (int k = 0; k < 4; ++k) {
    const __m512i p = _mm512_maddubs_epi16(join(slices[2 * k], slices[2 * k + 1]), load512(aq + 64 * k));
    sumi = _mm512_dpwssd_epi32(sumi, p, group_scales(sc8x2, k));
  }
  return sumi;
}

float dot_q6_k_avx512(int64_t n, const void* w, const void* a) {
  const BlockQ6_K* x = static_cast<const BlockQ6_K*>(w);
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  __m512 acc = _mm512_setzero_ps();
  float acc_off = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(BlockQ6_K)>(x + i);
    const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
    const float d = h2f(x[i].d) * y[i].d;
    acc_off += d * static_cast<float>(32 * dot16_bsums(sc8, y[i].bsums));
    __m256i sl[8];
    q6k_levels(x[i], sl);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(dot_slices16(sl, sc8, y[i].qs)), acc);
  }
  return _mm512_reduce_add_ps(acc) - acc_off;
}

// The 16 signed 6-bit scales of a q3_K block as int8 (low 4 bits in bytes 0..7, nibble by
// nibble; high 2 bits in bytes 8..11, 2 bits per group of four scales).
inline __m128i q3k_scales(const uint8_t* s) {
  uint32_t a[3], w[4];
  std::memcpy(a, s, 12);
  w[0] = (a[0] & 0x0F0F0F0F) | ((a[2] & 0x03030303) << 4);
  w[1] = (a[1] & 0x0F0F0F0F) | (((a[2] >> 2) & 0x03030303) << 4);
  w[2] = ((a[0] >> 4) & 0x0F0F0F0F) | (((a[2] >> 4) & 0x03030303) << 4);
  w[3] = ((a[1] >> 4) & 0x0F0F0F0F) | (((a[2] >> 6) & 0x03030303) << 4);
  return _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)), _mm_set1_epi8(32));
}

// q2_K (kQ3 = false) and q3_K (kQ3 = true); see the AVX2 file for the level layout.
template <bool kQ3>
float dot_k23_avx512(int64_t n, const void* w, const void* a) {
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  const __m256i low2 = _mm256_set1_epi8(3);
  __m512 acc = _mm512_setzero_ps();
  float acc_off = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    __m128i sc8;
    const uint8_t* qs;
    __m256i hm = _mm256_setzero_si256();
    float d;
    if constexpr (kQ3) {
      const BlockQ3_K& b = static_cast<const BlockQ3_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ3_K)>(&b);
      sc8 = q3k_scales(b.scales);
      qs = b.qs;
      hm = load256(b.hmask);
      d = h2f(b.d) * y[i].d;
      acc_off += d * static_cast<float>(4 * dot16_bsums(sc8, y[i].bsums));
    } else {
      const BlockQ2_K& b = static_cast<const BlockQ2_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ2_K)>(&b);
      const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
      sc8 = _mm_and_si128(s, _mm_set1_epi8(0x0F));
      const __m128i m = _mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(0x0F));
      qs = b.qs;
      d = h2f(b.d) * y[i].d;
      acc_off += h2f(b.dmin) * y[i].d * static_cast<float>(dot16_bsums(m, y[i].bsums));
    }
    __m256i sl[8];
    for (int h = 0; h < 2; ++h) {
      const __m256i q2 = load256(qs + 32 * h);
      for (int s = 0; s < 4; ++s) {
        __m256i q = _mm256_and_si256(_mm256_srli_epi16(q2, 2 * s), low2);
        if constexpr (kQ3) {
          const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << (4 * h + s)));
          q = _mm256_mask_blend_epi8(_mm256_test_epi8_mask(hm, bit), q, _mm256_or_si256(q, _mm256_set1_epi8(4)));
        }
        sl[4 * h + s] = q;
      }
    }
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(dot_slices16(sl, sc8, y[i].qs)), acc);
  }
  return _mm512_reduce_add_ps(acc) - acc_off;
}

// The 8 signed 6-bit sub-block scales of an iq4_xs block as int16: low nibbles from scales_l
// (sub-block 2k: low nibble of byte k, 2k+1: high nibble), high 2 bits spread by pdep.
inline __m128i iq4xs_scales(const BlockIQ4_XS& b) {
  uint32_t l32;
  std::memcpy(&l32, b.scales_l, 4);
  const __m128i even = _mm_cvtsi32_si128(static_cast<int>(l32 & 0x0F0F0F0F));
  const __m128i odd = _mm_cvtsi32_si128(static_cast<int>((l32 >> 4) & 0x0F0F0F0F));
  const __m128i hi = _mm_cvtsi64_si128(static_cast<int64_t>(_pdep_u64(b.scales_h, 0x0303030303030303ULL) << 4));
  const __m128i s8 = _mm_sub_epi8(_mm_or_si128(_mm_unpacklo_epi8(even, odd), hi), _mm_set1_epi8(32));
  return _mm_cvtepi8_epi16(s8);
}

// iq4_xs: signed codebook via vpshufb; |q| x (a with q's sign) in maddubs, then vpdpwssd by scale.
// 32 bytes of qs = sub-blocks 2c, 2c+1 (16 bytes each, low nibbles first): the 128-bit lanes
// become [lo(sub 2c) | hi(sub 2c) | lo(sub 2c+1) | hi(sub 2c+1)] = values in order.
float dot_iq4_xs_avx512(int64_t n, const void* w, const void* a) {
  const BlockIQ4_XS* x = static_cast<const BlockIQ4_XS*>(w);
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(BlockIQ4_XS)>(x + i);
    const __m512i sc16 = _mm512_castsi128_si512(iq4xs_scales(x[i]));
    __m512i sumi = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i b = _mm512_broadcast_i64x4(load256(x[i].qs + 32 * c));
      const __m512i b2 = _mm512_shuffle_i64x2(b, b, 0x50);  // lanes [0, 0, 1, 1]
      const __m512i nib = _mm512_and_si512(_mm512_mask_srli_epi16(b2, 0xFF00FF00u, b2, 4), low4);
      const __m512i q = _mm512_shuffle_epi8(table, nib);
      const __m512i ya = load512(y[i].qs + 64 * c);
      const __m512i ys = _mm512_mask_sub_epi8(ya, _mm512_movepi8_mask(q), _mm512_setzero_si512(), ya);
      const __m512i sc = _mm512_permutexvar_epi16(
          join(_mm256_set1_epi16(static_cast<int16_t>(2 * c)), _mm256_set1_epi16(static_cast<int16_t>(2 * c + 1))), sc16);
      sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(_mm512_abs_epi8(q), ys), sc);
    }
    acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(x[i].d) * y[i].d), _mm512_cvtepi32_ps(sumi), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

#define KT_REG(t, fn) RegisterKernel<VecDotFn> reg_##t(k_vec_dot[qi(QType::t)], Isa::avx512, fn);
KT_REG(f32, dot_f32_avx512)
KT_REG(f16, dot_half_avx512<false>)
KT_REG(bf16, dot_half_avx512<true>)
KT_REG(q8_0, dot_q32_avx512<BlockQ8_0>)
KT_REG(q4_0, dot_q32_avx512<BlockQ4_0>)
KT_REG(q5_0, dot_q32_avx512<BlockQ5_0>)
KT_REG(q4_k, dot_k45_avx512<false>)
KT_REG(q5_k, dot_k45_avx512<true>)
KT_REG(q6_k, dot_q6_k_avx512)
KT_REG(q2_k, dot_k23_avx512<false>)
KT_REG(q3_k, dot_k23_avx512<true>)
KT_REG(iq4_xs, dot_iq4_xs_avx512)
#undef KT_REG

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
