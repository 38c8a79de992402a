// AVX-512 dequantization of the block formats that the MoE GEMM path (bf16 panels from GGUF
// blocks, every chunk) and the load-time repacking into the AMX formats read most: q4_K, q6_K and
// q8_0. Bit-identical to the generic reference and to gguf-py: every scale product is one rounded
// f32 multiply and q4_K's min a separate rounded subtraction, as there. The explicit-rounding
// forms (_mm512_mul_round_ps, _mm512_sub_round_ps) keep the compiler from contracting the two
// into a fused multiply-add, which would round once and differ in the last bit.
#include <immintrin.h>

#include <cstring>

#include "quant/quant.h"

KTRANS_TARGET_AVX512_BEGIN
#include "quant/q6k_levels.h"
namespace ktrans {
namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, kRound); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_round_ps(a, b, kRound); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
// 16 bytes (unsigned / signed) -> 16 floats, exact.
inline __m512 u8_ps(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
inline __m512 i8_ps(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }

// q4_K: sub-block j (32 values) = (d * sc[j]) * q - (dmin * m[j]); q = low nibbles of
// qs[32 (j/2) ..] for even j, high nibbles for odd j.
void dq_q4_k(const void* src, float* dst, int64_t n) {
  const BlockQ4_K* b = static_cast<const BlockQ4_K*>(src);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    alignas(16) uint8_t sm[16];
    unpack_scales_mins_k4(b[i].scales, sm);
    const float d = _cvtsh_ss(b[i].d), dmin = _cvtsh_ss(b[i].dmin);
    for (int c = 0; c < 4; ++c) {
      const __m256i q = load256(b[i].qs + 32 * c);
      const __m256i v[2] = {_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_srli_epi16(q, 4), low4)};
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * c + h;
        const __m512 dl = _mm512_set1_ps(d * static_cast<float>(sm[j]));
        const __m512 ml = _mm512_set1_ps(dmin * static_cast<float>(sm[8 + j]));
        _mm512_storeu_ps(dst + 32 * j, sub(mul(dl, u8_ps(_mm256_castsi256_si128(v[h]))), ml));
        _mm512_storeu_ps(dst + 32 * j + 16, sub(mul(dl, u8_ps(_mm256_extracti128_si256(v[h], 1))), ml));
      }
    }
  }
}

// q6_K: group g (16 values) = (d * scale[g]) * (q - 32), q = 4 low bits | 2 high bits << 4.
void dq_q6_k(const void* src, float* dst, int64_t n) {
  const BlockQ6_K* b = static_cast<const BlockQ6_K*>(src);
  const __m256i off = _mm256_set1_epi8(32);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = _cvtsh_ss(b[i].d);
    __m256i lv[8];
    q6k_levels(b[i], lv);
    for (int k = 0; k < 8; ++k) {  // values 32 k .. + 31, as signed q - 32; groups 2k, 2k + 1
      const __m256i q = _mm256_sub_epi8(lv[k], off);
      _mm512_storeu_ps(dst + 32 * k, mul(_mm512_set1_ps(d * static_cast<float>(b[i].scales[2 * k])),
                                         i8_ps(_mm256_castsi256_si128(q))));
      _mm512_storeu_ps(dst + 32 * k + 16, mul(_mm512_set1_ps(d * static_cast<float>(b[i].scales[2 * k + 1])),
                                              i8_ps(_mm256_extracti128_si256(q, 1))));
    }
  }
}

// q8_0: q * d per block of 32.
void dq_q8_0(const void* src, float* dst, int64_t n) {
  const BlockQ8_0* b = static_cast<const BlockQ8_0*>(src);
  for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(b[i].d));
    const __m256i q = load256(b[i].qs);
    _mm512_storeu_ps(dst, mul(i8_ps(_mm256_castsi256_si128(q)), d));
    _mm512_storeu_ps(dst + 16, mul(i8_ps(_mm256_extracti128_si256(q, 1)), d));
  }
}

RegisterKernel<DequantizeRowFn> reg_q4_k(k_dequantize_row[qi(QType::q4_k)], Isa::avx512, dq_q4_k);
RegisterKernel<DequantizeRowFn> reg_q6_k(k_dequantize_row[qi(QType::q6_k)], Isa::avx512, dq_q6_k);
RegisterKernel<DequantizeRowFn> reg_q8_0(k_dequantize_row[qi(QType::q8_0)], Isa::avx512, dq_q8_0);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
