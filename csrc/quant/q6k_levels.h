// q6_K levels with 256-bit integer instructions, shared by the AVX2 and AVX-512 kernels.
// Include it after KTRANS_TARGET_AVX2_BEGIN / KTRANS_TARGET_AVX512_BEGIN (it needs AVX2, and
// <immintrin.h> before that); the function is static so that every file keeps the copy compiled
// for its own target (one shared inline definition could be the AVX-512 one on an AVX2 machine).
#pragma once

#include "quant/quant.h"

namespace ktrans {

// The 256 levels (0..63, before the -32 offset) of a q6_K block in value order: lv[k] holds
// values 32k .. 32k + 31, 4 low bits from ql and 2 high bits from qh.
static inline void q6k_levels(const BlockQ6_K& b, __m256i* lv) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * h));
    const __m256i lo[4] = {_mm256_and_si256(l0, low4), _mm256_and_si256(l1, low4),
                           _mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                           _mm256_and_si256(_mm256_srli_epi16(l1, 4), low4)};
    for (int s = 0; s < 4; ++s)
      lv[4 * h + s] = _mm256_or_si256(lo[s], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), low2), 4));
  }
}

}  // namespace ktrans
