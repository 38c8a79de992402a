// AVX2 f32 <-> bf16 conversion: 8 lanes per step with the same integer rounding as the scalar
// reference (bit-identical output, NaN included); the tail goes through the scalar helpers.
#include <immintrin.h>

#include "common/convert.h"
#include "common/numeric.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

void f32_to_bf16_avx2(const float* x, uint16_t* y, int64_t n) {
  const __m256i lsb_mask = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x00400000);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), lsb_mask);
    __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(bias, lsb));
    __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
    __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(u, quiet), is_nan);
    r = _mm256_srli_epi32(r, 16);
    // pack 8 x u32 (values < 65536) into 8 x u16
    __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm_packus_epi32(lo, hi));
  }
  for (; i < n; ++i) y[i] = f32_to_bf16(x[i]);
}

void bf16_to_f32_avx2(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), u);
  }
  for (; i < n; ++i) y[i] = bf16_to_f32(x[i]);
}

RegisterKernel<F32ToBf16Fn> reg_f32_to_bf16(k_f32_to_bf16, Isa::avx2, f32_to_bf16_avx2);
RegisterKernel<Bf16ToF32Fn> reg_bf16_to_f32(k_bf16_to_f32, Isa::avx2, bf16_to_f32_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
