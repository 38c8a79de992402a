// AVX2 packed_gemm for bf16, int8 and int4 panels (CI's Zen 3 and other AVX2-only CPUs).
//
// Same panel layouts as the AVX-512 kernels (packed/packed.h); a 64-byte line is two 256-bit
// halves of 8 columns each. bf16: the even / odd k of each pair become f32 by a shift / a mask and
// meet broadcast activations in FMAs. int8 / int4: no VNNI here, so 4 columns x 4 k at a time are
// widened to int16 and vpmaddwd'ed with the row's activation quad (int16), giving pairs of
// partial sums per column that are folded at the end. Rows go in groups of up to 4 per panel.
// Integer sums and activation quantization are the reference's exactly; f32 order differs.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/numeric.h"
#include "packed/layout.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

using namespace packed;

// Reference quantizer (packed/layout.h), as int16 for vpmaddwd; gsum per 32-group when asked.
float quantize_row(const uint16_t* x, int64_t K, int16_t* q, int32_t* gsum) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(bf16_to_f32(x[k])));
  const float inv = act_inv_scale(amax);
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int16_t>(std::nearbyint(bf16_to_f32(x[k]) * inv));
  for (int64_t g = 0; gsum && g < K / kInt4Group; ++g) {
    int32_t s = 0;
    for (int64_t i = 0; i < kInt4Group; ++i) s += q[g * kInt4Group + i];
    gsum[g] = s;
  }
  return act_scale(amax);
}

inline void store16(float* y, int64_t n0, int64_t n_begin, int64_t n_end, const float* v, bool accumulate) {
  for (int64_t c = std::max<int64_t>(0, n_begin - n0); c < std::min<int64_t>(kPanelCols, n_end - n0); ++c)
    y[n0 + c] = accumulate ? y[n0 + c] + v[c] : v[c];
}

// acc[4] (int32 x 8, each = 2 columns x 2 partial sums) += 16 columns x 4 k of int8 `w` . xq.
inline void madd_line(const __m128i* w, __m256i xq, __m256i* acc) {
  for (int i = 0; i < 4; ++i)
    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w + i)), xq));
}

// Folds acc[4] into 16 column sums (pairs of adjacent lanes belong to one column).
inline void fold(const __m256i* acc, int32_t* out) {
  for (int i = 0; i < 4; i += 2) {
    const __m256i h = _mm256_hadd_epi32(acc[i], acc[i + 1]);  // [a0 a1 b0 b1 | a2 a3 b2 b3]
    const __m256i p = _mm256_permute4x64_epi64(h, 0xd8);       // [a0 a1 a2 a3 | b0 b1 b2 b3]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * 4), p);
  }
}

inline __m256i bcast_quad(const int16_t* q) {
  int64_t v;
  std::memcpy(&v, q, 8);
  return _mm256_set1_epi64x(v);
}

void gemm_bf16_avx2(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                    float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::bf16, K));
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t p = n_begin / kPanelCols; p * kPanelCols < n_end; ++p) {
    const uint8_t* panel = packed + p * pb;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mr = std::min<int64_t>(4, M - m0);
      __m256 acc[4][2];
      for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
      for (int64_t j = 0; j < K / 2; ++j) {
        for (int h = 0; h < 2; ++h) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + j * kLine + h * 32));
          const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
          const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
          for (int64_t r = 0; r < mr; ++r) {
            const uint16_t* xp = x + (m0 + r) * ldx + 2 * j;
            acc[r][h] = _mm256_fmadd_ps(even, _mm256_set1_ps(bf16_to_f32(xp[0])), acc[r][h]);
            acc[r][h] = _mm256_fmadd_ps(odd, _mm256_set1_ps(bf16_to_f32(xp[1])), acc[r][h]);
          }
        }
      }
      for (int64_t r = 0; r < mr; ++r) {
        float v[16];
        _mm256_storeu_ps(v, acc[r][0]);
        _mm256_storeu_ps(v + 8, acc[r][1]);
        store16(y + (m0 + r) * ldy, p * kPanelCols, n_begin, n_end, v, accumulate);
      }
    }
  }
}

// int8 and int4 share the row loop; int4 lines are first unpacked to two int8 quads.
template <bool kInt4>
void gemm_int_avx2(const uint8_t* packed, int64_t K, const uint16_t* x, int64_t ldx, int64_t M, float* y,
                   int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const PackedFormat f = kInt4 ? PackedFormat::int4 : PackedFormat::int8;
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(f, K)), ng = K / kInt4Group;
  const int64_t ldq = kInt4 ? K : int8_kpad(K);
  int16_t* q = reinterpret_cast<int16_t*>(scratch(kScratchA, M * (ldq * 2 + 4 + ng * 4)));
  float* sx = reinterpret_cast<float*>(q + M * ldq);
  int32_t* gsum = reinterpret_cast<int32_t*>(sx + M);
  for (int64_t m = 0; m < M; ++m) {
    sx[m] = quantize_row(x + m * ldx, K, q + m * ldq, kInt4 ? gsum + m * ng : nullptr);
    std::fill(q + m * ldq + K, q + (m + 1) * ldq, int16_t{0});
  }
  const __m256i nib = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
  for (int64_t p = n_begin / kPanelCols; p * kPanelCols < n_end; ++p) {
    const uint8_t* panel = packed + p * pb;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* qm = q + m * ldq;
      float out[16] = {};
      int32_t sums[16];
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
      if (!kInt4) {
        for (int64_t j = 0; j < ldq / 4; ++j)
          madd_line(reinterpret_cast<const __m128i*>(panel + j * kLine), bcast_quad(qm + 4 * j), acc);
        fold(acc, sums);
        float sw[16];
        std::memcpy(sw, panel + int8_data_bytes(K), 64);
        for (int c = 0; c < 16; ++c) out[c] = static_cast<float>(sums[c]) * sw[c] * sx[m];
      } else {
        for (int64_t g = 0; g < ng; ++g) {
          for (auto& a : acc) a = _mm256_setzero_si256();
          for (int64_t l = 0; l < 4; ++l) {
            alignas(32) __m256i wq[4];
            for (int h = 0; h < 2; ++h) {
              const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (g * 4 + l) * kLine + h * 32));
              wq[h] = _mm256_sub_epi8(_mm256_and_si256(w, nib), eight);  // k quad 8l .. 8l+3
              wq[2 + h] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(w, 4), nib), eight);
            }
            const int16_t* qk = qm + g * kInt4Group + l * 8;
            madd_line(reinterpret_cast<const __m128i*>(wq), bcast_quad(qk), acc);
            madd_line(reinterpret_cast<const __m128i*>(wq + 2), bcast_quad(qk + 4), acc);
          }
          fold(acc, sums);
          const uint16_t* sb = reinterpret_cast<const uint16_t*>(panel + int4_data_bytes(K)) + g * kPanelCols;
          for (int c = 0; c < 16; ++c) out[c] += static_cast<float>(sums[c]) * bf16_to_f32(sb[c]);
        }
        for (float& v : out) v *= sx[m];
      }
      store16(y + m * ldy, p * kPanelCols, n_begin, n_end, out, accumulate);
    }
  }
}

void gemm_int8_avx2(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M, float* y,
                    int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  gemm_int_avx2<false>(packed, K, x, ldx, M, y, ldy, n_begin, n_end, accumulate);
}

void gemm_int4_avx2(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M, float* y,
                    int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  gemm_int_avx2<true>(packed, K, x, ldx, M, y, ldy, n_begin, n_end, accumulate);
}

RegisterKernel<PackedGemmFn> reg_bf16(k_packed_gemm_bf16, Isa::avx2, gemm_bf16_avx2);
RegisterKernel<PackedGemmFn> reg_int8(k_packed_gemm_int8, Isa::avx2, gemm_int8_avx2);
RegisterKernel<PackedGemmFn> reg_int4(k_packed_gemm_int4, Isa::avx2, gemm_int4_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
