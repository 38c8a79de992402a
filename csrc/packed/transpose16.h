// 16 x 16 transpose of 32-bit words, shared by the AVX-512 panel packers and the AMX-level GGUF
// panel expansion. Include it after KTRANS_TARGET_AVX512_BEGIN / KTRANS_TARGET_AMX_BEGIN (and
// <immintrin.h> before that); the function is static so that every file keeps the copy compiled
// for its own target.
#pragma once

#include "packed/layout.h"

namespace ktrans {
namespace packed {

// r[c] holds 16 words of row c; line j (64 bytes at out + j * kLine) gets word j of all 16 rows:
// 32-bit and 64-bit unpacks inside 128-bit lanes, then two rounds of 128-bit shuffles.
static inline void transpose16(const __m512i* r, uint8_t* out) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + q], lane L: rows 4i..4i+3 of word 4L + q
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x88), c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xdd);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x88);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xdd);
    _mm512_storeu_si512(out + (0 + q) * kLine, _mm512_shuffle_i32x4(c0, c2, 0x88));
    _mm512_storeu_si512(out + (8 + q) * kLine, _mm512_shuffle_i32x4(c0, c2, 0xdd));
    _mm512_storeu_si512(out + (4 + q) * kLine, _mm512_shuffle_i32x4(c1, c3, 0x88));
    _mm512_storeu_si512(out + (12 + q) * kLine, _mm512_shuffle_i32x4(c1, c3, 0xdd));
  }
}

}  // namespace packed
}  // namespace ktrans
