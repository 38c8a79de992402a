// AVX-512 panel packers: 16 f32 rows [16, K] -> one bf16 or int8 panel (packed/packed.h layout).
//
// Per 32 k: each row's 32 floats become 16 pair-words (bf16 k2j | k2j+1 << 16) in one register,
// with the reference's integer round-to-nearest-even (NaN kept quiet), so the bytes are the
// scalar packer's exactly. Panel line j is word j of all 16 rows: a 16 x 16 transpose of 32-bit
// words (packed/transpose16.h).
#include <immintrin.h>

#include <cstring>

#include "packed/pack_impl.h"

KTRANS_TARGET_AVX512_BEGIN
#include "packed/transpose16.h"
namespace ktrans {
namespace {

using namespace packed;

inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i r = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

void pack_panel_bf16_avx512(const float* rows, int64_t K, uint8_t* panel) {
  __m512i r[16];
  for (int64_t k = 0; k < K; k += 32) {
    for (int c = 0; c < 16; ++c) {
      const float* src = rows + c * K + k;
      r[c] = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(_mm512_loadu_ps(src))),
                                to_bf16(_mm512_loadu_ps(src + 16)), 1);
    }
    transpose16(r, panel + k / 32 * 16 * kLine);
  }
}

// int8: each row is quantized like pack_row_int8 (same f32 inv, round to nearest even) into a
// thread-local [16, Kp] buffer, then every 64 k of the 16 rows is one 16 x 16 quad-word
// transpose; scales and column sums fill the two metadata lines.
void pack_panel_int8_avx512(const float* rows, int64_t K, uint8_t* panel) {
  const int64_t kp = int8_kpad(K);
  int8_t* q = reinterpret_cast<int8_t*>(scratch(kScratchB, kPanelCols * kp));
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  float scales[16];
  int32_t sums[16];
  for (int c = 0; c < 16; ++c) {
    const float* src = rows + c * K;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(src + k), abs_mask), amax);
    const float a = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.0f / a : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + k), inv));
      sum = _mm512_add_epi32(sum, qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c * kp + k), _mm512_cvtsepi32_epi8(qi));
    }
    for (int64_t k = K; k < kp; ++k) q[c * kp + k] = 0;
    scales[c] = a / 127.0f;
    sums[c] = _mm512_reduce_add_epi32(sum);
  }
  __m512i r[16];
  for (int64_t k = 0; k < kp; k += 64) {
    for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(q + c * kp + k);
    transpose16(r, panel + k / 4 * kLine);
  }
  uint8_t* meta = panel + int8_data_bytes(K);
  std::memcpy(meta, scales, 64);
  std::memcpy(meta + kLine, sums, 64);
}

RegisterKernel<PackPanelFn> reg_pack_panel(k_pack_panel_bf16, Isa::avx512, pack_panel_bf16_avx512);
RegisterKernel<PackPanelFn> reg_pack_panel_int8(k_pack_panel_int8, Isa::avx512, pack_panel_int8_avx512);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
