// AVX-512 f32 <-> bf16 conversion: 16 lanes per step, masked tail, the scalar reference's integer
// rounding (bit-identical output; vcvtneps2bf16 is not used because its NaN payloads differ).
#include <immintrin.h>

#include "common/convert.h"
#include "common/numeric.h"

KTRANS_TARGET_AVX512_BEGIN
namespace ktrans {
namespace {

inline __m256i f32x16_to_bf16(__m512i u) {
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                             _mm512_set1_epi32(0x7f800000));
  __m512i r = _mm512_mask_or_epi32(rounded, is_nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

void f32_to_bf16_avx512(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), f32x16_to_bf16(_mm512_loadu_si512(x + i)));
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m256i r = f32x16_to_bf16(_mm512_maskz_loadu_epi32(m, x + i));
    _mm256_mask_storeu_epi16(y + i, m, r);
  }
}

void bf16_to_f32_avx512(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    _mm512_storeu_si512(y + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m256i h = _mm256_maskz_loadu_epi16(m, x + i);
    _mm512_mask_storeu_epi32(y + i, m, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

RegisterKernel<F32ToBf16Fn> reg_f32_to_bf16(k_f32_to_bf16, Isa::avx512, f32_to_bf16_avx512);
RegisterKernel<Bf16ToF32Fn> reg_bf16_to_f32(k_bf16_to_f32, Isa::avx512, bf16_to_f32_avx512);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
