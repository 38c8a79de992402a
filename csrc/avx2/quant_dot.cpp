// AVX2 dot products of one weight row with one quantized activation row (see quant/quant.h).
//
// Integer core: maddubs (u8 x s8 -> pairs summed in i16) then madd with the per-group scale
// (i16 x i16 -> i32). Unsigned weight levels (K-quants, 0..63) go straight into maddubs; their
// offsets (q6_K's -32, q3_K's -4) and the K-quant mins are applied once per block through the
// activation's 16-value sums (bsums). Signed levels (q4_0/q5_0/q8_0, iq4_xs) use the sign trick
// |w| * sign(a, w). No i16 saturation: the largest pair is 63*127*2 (q6_K) or 128*127*2.
// Differs from the reference only in float summation order (block results go through FMA into
// 8-lane accumulators); the integer sums are identical.
#include <immintrin.h>

#include <cstring>

#include "common/prefetch.h"
#include "common/numeric.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX2_BEGIN
#include "quant/q6k_levels.h"
namespace ktrans {
namespace {

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 x i32 partial sums of 32 signed w * 32 signed a (a never -128).
inline __m256i dot_s8(__m256i w, __m256i a) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// F16C conversion: exact for every half value, far cheaper than the portable helper.
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 16 packed bytes -> 32 nibbles: low nibbles in bytes 0..15, high nibbles in bytes 16..31.
inline __m256i nibbles_16(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Byte i = 0xFF when bit i of the 32-bit word is set.
inline __m256i bits_to_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

float dot_f32_avx2(int64_t n, const void* w, const void* a) {
  const float* x = static_cast<const float*>(w);
  const float* y = static_cast<const float*>(a);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead<64>(x + i);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
  }
  float s = hsum_ps(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

template <bool kBf16>
float dot_half_avx2(int64_t n, const void* w, const void* a) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto load8 = [&](int64_t i) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    if constexpr (kBf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead<32>(x + i);
    acc0 = _mm256_fmadd_ps(load8(i), _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(load8(i + 8), _mm256_loadu_ps(y + i + 8), acc1);
  }
  float s = hsum_ps(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += (kBf16 ? bf16_to_f32(x[i]) : h2f(x[i])) * y[i];
  return s;
}

// Signed 32 levels of one block of a 32-value format.
inline __m256i levels(const BlockQ8_0& b) { return load256(b.qs); }
inline __m256i levels(const BlockQ4_0& b) { return _mm256_sub_epi8(nibbles_16(b.qs), _mm256_set1_epi8(8)); }
inline __m256i levels(const BlockQ5_0& b) {
  uint32_t qh;
  std::memcpy(&qh, b.qh, 4);
  const __m256i hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
  return _mm256_sub_epi8(_mm256_or_si256(nibbles_16(b.qs), hi), _mm256_set1_epi8(16));
}

template <class Block>
float dot_q32_avx2(int64_t n, const void* w, const void* a) {
  const Block* x = static_cast<const Block*>(w);
  const BlockQ8_0* y = static_cast<const BlockQ8_0*>(a);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / kQK; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    const __m256 d = _mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_s8(levels(x[i]), load256(y[i].qs))), acc);
  }
  return hsum_ps(acc);
}

// sum_g m[g] * (sum of activation group g), groups of 32 = pairs of bsums; m: 8 bytes.
inline int mins_dot_bsums(const uint8_t* m, const int16_t* bsums) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsums));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsums + 8));
  const __m128i pairs = _mm_hadd_epi16(lo, hi);  // 8 sums of 32
  const __m128i mm = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  __m128i p = _mm_madd_epi16(pairs, mm);
  p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4E));
  p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1));
  return _mm_cvtsi128_si32(p);
}

// q4_K / q5_K: sub-block j has 32 unsigned levels (4 or 5 bits) and one 6-bit scale.
template <bool kQ5>
float dot_k45_avx2(int64_t n, const void* w, const void* a) {
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  __m256 acc = _mm256_setzero_ps();
  float acc_m = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    const uint8_t* qs;
    const uint8_t* scales;
    const uint8_t* qhp = nullptr;
    uint16_t d16, dmin16;
    if constexpr (kQ5) {
      const BlockQ5_K& b = static_cast<const BlockQ5_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ5_K)>(&b);
      qs = b.qs, scales = b.scales, qhp = b.qh, d16 = b.d, dmin16 = b.dmin;
    } else {
      const BlockQ4_K& b = static_cast<const BlockQ4_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ4_K)>(&b);
      qs = b.qs, scales = b.scales, d16 = b.d, dmin16 = b.dmin;
    }
    alignas(16) uint8_t sm[16];
    unpack_scales_mins_k4(scales, sm);
    acc_m += h2f(dmin16) * y[i].d * static_cast<float>(mins_dot_bsums(sm + 8, y[i].bsums));
    __m256i qh = kQ5 ? load256(qhp) : _mm256_setzero_si256();
    __m256i sumi = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i q = load256(qs + 32 * c);
      __m256i q0 = _mm256_and_si256(q, low4), q1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      if constexpr (kQ5) {
        q0 = _mm256_or_si256(q0, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
        q1 = _mm256_or_si256(q1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
        qh = _mm256_srli_epi16(qh, 2);
      }
      const __m256i p0 = _mm256_maddubs_epi16(q0, load256(y[i].qs + 64 * c));
      const __m256i p1 = _mm256_maddubs_epi16(q1, load256(y[i].qs + 64 * c + 32));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p0, _mm256_set1_epi16(sm[2 * c])));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p1, _mm256_set1_epi16(sm[2 * c + 1])));
    }
    const __m256 d = _mm256_set1_ps(h2f(d16) * y[i].d);
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps(acc) - acc_m;
}

// Two 16-value group scales for one 32-byte maddubs result: scale a for bytes 0..15, b for 16..31.
inline __m256i scale_pair(int a, int b) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(static_cast<int16_t>(a))),
                                 _mm_set1_epi16(static_cast<int16_t>(b)), 1);
}

// sum_g sc[g] * bsums[g] over the 16 groups; sc as 16 int16.
inline int scales_dot_bsums(const int16_t* sc, const int16_t* bsums) {
  const __m256i p = _mm256_madd_epi16(load256(sc), load256(bsums));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// q6_K: 16 groups of 16, unsigned levels 0..63 with offset -32 applied through bsums.
float dot_q6_k_avx2(int64_t n, const void* w, const void* a) {
  const BlockQ6_K* x = static_cast<const BlockQ6_K*>(w);
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  __m256 acc = _mm256_setzero_ps();
  float acc_off = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    alignas(32) int16_t sc[16];
    for (int g = 0; g < 16; ++g) sc[g] = x[i].scales[g];
    const float d = h2f(x[i].d) * y[i].d;
    acc_off += d * static_cast<float>(32 * scales_dot_bsums(sc, y[i].bsums));
    __m256i lv[8];
    q6k_levels(x[i], lv);
    __m256i sumi = _mm256_setzero_si256();
    for (int k = 0; k < 8; ++k) {
      const __m256i p = _mm256_maddubs_epi16(lv[k], load256(y[i].qs + 32 * k));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(sc[2 * k], sc[2 * k + 1])));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps(acc) - acc_off;
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

// q2_K (kQ3 = false): levels 0..3, 4-bit scale and min per 16. q3_K (kQ3 = true): levels
// 0..7 = 2 low bits | hmask bit << 2, offset -4 applied through bsums, signed 6-bit scales.
template <bool kQ3>
float dot_k23_avx2(int64_t n, const void* w, const void* a) {
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  const __m256i low2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  __m256 acc = _mm256_setzero_ps();
  float acc_off = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    alignas(32) int16_t sc[16], m[16];
    const uint8_t* qs;
    __m256i hm = _mm256_setzero_si256();
    float d;
    if constexpr (kQ3) {
      const BlockQ3_K& b = static_cast<const BlockQ3_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ3_K)>(&b);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sc), _mm256_cvtepi8_epi16(q3k_scales(b.scales)));
      qs = b.qs;
      hm = load256(b.hmask);
      d = h2f(b.d) * y[i].d;
      acc_off += d * static_cast<float>(4 * scales_dot_bsums(sc, y[i].bsums));
    } else {
      const BlockQ2_K& b = static_cast<const BlockQ2_K*>(w)[i];
      prefetch_ahead<sizeof(BlockQ2_K)>(&b);
      const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
      const __m128i nib = _mm_set1_epi8(0x0F);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sc), _mm256_cvtepu8_epi16(_mm_and_si128(s8, nib)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(m), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s8, 4), nib)));
      qs = b.qs;
      d = h2f(b.d) * y[i].d;
      acc_off += h2f(b.dmin) * y[i].d * static_cast<float>(scales_dot_bsums(m, y[i].bsums));
    }
    __m256i sumi = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i q2 = load256(qs + 32 * h);
      for (int s = 0; s < 4; ++s) {
        __m256i q = _mm256_and_si256(_mm256_srli_epi16(q2, 2 * s), low2);
        if constexpr (kQ3)
          q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + s), one), 2));
        const __m256i p = _mm256_maddubs_epi16(q, load256(y[i].qs + 128 * h + 32 * s));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(sc[8 * h + 2 * s], sc[8 * h + 2 * s + 1])));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps(acc) - acc_off;
}

// iq4_xs: codebook lookup with pshufb, signed levels through the sign trick, 6-bit scale per 32.
float dot_iq4_xs_avx2(int64_t n, const void* w, const void* a) {
  const BlockIQ4_XS* x = static_cast<const BlockIQ4_XS*>(w);
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    prefetch_ahead<sizeof(*x)>(x + i);
    __m256i sumi = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      const int ls = (((x[i].scales_l[j / 2] >> (4 * (j % 2))) & 0xF) | ((x[i].scales_h >> (2 * j)) & 3) << 4) - 32;
      const __m256i q = _mm256_shuffle_epi8(table, nibbles_16(x[i].qs + 16 * j));
      const __m256i ya = load256(y[i].qs + 32 * j);
      const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(ya, q));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_set1_epi16(static_cast<int16_t>(ls))));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum_ps(acc);
}

#define KT_REG(t, fn) RegisterKernel<VecDotFn> reg_##t(k_vec_dot[qi(QType::t)], Isa::avx2, fn);
KT_REG(f32, dot_f32_avx2)
KT_REG(f16, dot_half_avx2<false>)
KT_REG(bf16, dot_half_avx2<true>)
KT_REG(q8_0, dot_q32_avx2<BlockQ8_0>)
KT_REG(q4_0, dot_q32_avx2<BlockQ4_0>)
KT_REG(q5_0, dot_q32_avx2<BlockQ5_0>)
KT_REG(q4_k, dot_k45_avx2<false>)
KT_REG(q5_k, dot_k45_avx2<true>)
KT_REG(q6_k, dot_q6_k_avx2)
KT_REG(q2_k, dot_k23_avx2<false>)
KT_REG(q3_k, dot_k23_avx2<true>)
KT_REG(iq4_xs, dot_iq4_xs_avx2)
#undef KT_REG

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
