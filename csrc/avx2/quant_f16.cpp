// AVX2 + F16C conversion between f16 weights and float32 (dequantize / quantize of "f16"),
// 8 values per step with vcvtph2ps / vcvtps2ph (round to nearest even). Identical to the scalar
// reference for every non-NaN value, subnormals and infinities included; a group of 8 that holds
// a NaN goes through the scalar helpers, so NaN bit patterns also match the reference.
#include <immintrin.h>

#include "common/numeric.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

void dq_f16_avx2(const void* src, float* dst, int64_t n) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  const __m128i exp_mask = _mm_set1_epi16(0x7c00), abs_mask = _mm_set1_epi16(0x7fff);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
    // NaN: exponent all ones and a non-zero mantissa, i.e. |v| > 0x7c00 (as signed 16-bit)
    if (_mm_movemask_epi8(_mm_cmpgt_epi16(_mm_and_si128(v, abs_mask), exp_mask))) {
      for (int k = 0; k < 8; ++k) dst[i + k] = fp16_to_f32(h[i + k]);
    } else {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(v));
    }
  }
  for (; i < n; ++i) dst[i] = fp16_to_f32(h[i]);
}

void q_f16_avx2(const float* x, void* dst, int64_t n) {
  uint16_t* y = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
      for (int k = 0; k < 8; ++k) y[i + k] = f32_to_fp16(x[i + k]);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
  for (; i < n; ++i) y[i] = f32_to_fp16(x[i]);
}

RegisterKernel<DequantizeRowFn> reg_dq_f16(k_dequantize_row[qi(QType::f16)], Isa::avx2, dq_f16_avx2);
RegisterKernel<QuantizeRowFn> reg_q_f16(k_quantize_row[qi(QType::f16)], Isa::avx2, q_f16_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
