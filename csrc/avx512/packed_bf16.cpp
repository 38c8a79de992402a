// AVX-512 packed_gemm for bf16 panels, the small-M (decode) path: y[m, n] (+)= x[m, :] . W[n, :].
//
// Layout (packed/packed.h): a panel line is one k pair of 16 columns, so one vdpbf16ps with the
// broadcast pair (x[m, 2j], x[m, 2j+1]) adds both products to the 16 column sums of row m. Two
// panels stream side by side (two independent memory streams, 2*MR accumulator chains) and up to
// eight rows of x share each weight load; more rows re-read the panel pair from L2.
// Without AVX512_BF16 (e.g. Ice Lake) each line becomes two f32 FMAs on the even/odd halves.
// Differs from the reference only in summation order (pairs, then lines in k order).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/numeric.h"
#include "packed/layout.h"

KTRANS_TARGET_AVX512_BEGIN
namespace ktrans {
namespace {

using namespace packed;

constexpr int64_t kPrefetch = 1024;  // bytes ahead on each panel stream
constexpr int64_t kMaxRows = 8;      // rows sharing one pass over a panel pair (16 accumulators)

inline void store_cols(float* yrow, int64_t n0, __mmask16 mask, __m512 v, bool accumulate) {
  if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, yrow + n0));
  _mm512_mask_storeu_ps(yrow + n0, mask, v);
}

inline __m512i bcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc[r][t] = sum over the K of panel t's 16 columns times row r of x (vdpbf16ps).
template <int MR, int NT>
__attribute__((target("avx512bf16"))) void lines_dp(const uint8_t* const* panels, int64_t K, const uint16_t* x,
                                                    int64_t ldx, __m512* acc) {
  for (int i = 0; i < MR * NT; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K / 2; ++j) {
    __m512i xb[MR];
    for (int r = 0; r < MR; ++r) xb[r] = bcast_pair(x + r * ldx + 2 * j);
    for (int t = 0; t < NT; ++t) {
      const uint8_t* line = panels[t] + j * kLine;
      _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetch), _MM_HINT_T0);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(line);
      for (int r = 0; r < MR; ++r) acc[r * NT + t] = _mm512_dpbf16_ps(acc[r * NT + t], (__m512bh)xb[r], w);
    }
  }
}

// Same sums with f32 FMAs: the even k of a pair is the low half of each 32-bit lane, the odd k
// the high half, so a shift / a mask turns them into f32 without any shuffle.
template <int MR, int NT>
void lines_fma(const uint8_t* const* panels, int64_t K, const uint16_t* x, int64_t ldx, __m512* acc) {
  for (int i = 0; i < MR * NT; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t j = 0; j < K / 2; ++j) {
    for (int t = 0; t < NT; ++t) {
      const uint8_t* line = panels[t] + j * kLine;
      _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetch), _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(line);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask));
      for (int r = 0; r < MR; ++r) {
        const uint16_t* xp = x + r * ldx + 2 * j;
        acc[r * NT + t] = _mm512_fmadd_ps(even, _mm512_set1_ps(bf16_to_f32(xp[0])), acc[r * NT + t]);
        acc[r * NT + t] = _mm512_fmadd_ps(odd, _mm512_set1_ps(bf16_to_f32(xp[1])), acc[r * NT + t]);
      }
    }
  }
}

template <int MR, int NT>
void block(bool dp, const uint8_t* const* panels, int64_t K, const uint16_t* x, int64_t ldx, float* y,
           int64_t ldy, int64_t n0, int64_t n_begin, int64_t n_end, bool accumulate) {
  __m512 acc[MR * NT];
  if (dp)
    lines_dp<MR, NT>(panels, K, x, ldx, acc);
  else
    lines_fma<MR, NT>(panels, K, x, ldx, acc);
  for (int t = 0; t < NT; ++t) {
    const int64_t c0 = n0 + t * kPanelCols;
    const __mmask16 mask = panel_col_mask(c0, n_begin, n_end);
    for (int r = 0; r < MR; ++r) store_cols(y + r * ldy, c0, mask, acc[r * NT + t], accumulate);
  }
}

template <int NT>
void rows(bool dp, int64_t mr, const uint8_t* const* panels, int64_t K, const uint16_t* x, int64_t ldx, float* y,
          int64_t ldy, int64_t n0, int64_t n_begin, int64_t n_end, bool accumulate) {
  switch (mr) {
    case 1: return block<1, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    case 2: return block<2, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    case 3: return block<3, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    case 4: return block<4, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    case 5: return block<5, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    case 6: return block<6, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    case 7: return block<7, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
    default: return block<8, NT>(dp, panels, K, x, ldx, y, ldy, n0, n_begin, n_end, accumulate);
  }
}

void gemm_bf16_avx512(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                      float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const bool dp = cpu_features().avx512_bf16;
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::bf16, K));
  const int64_t p_end = (n_end + kPanelCols - 1) / kPanelCols;
  for (int64_t p = n_begin / kPanelCols; p < p_end; p += 2) {
    const uint8_t* panels[2] = {packed + p * pb, packed + (p + 1) * pb};
    const int64_t n0 = p * kPanelCols;
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t mr = std::min<int64_t>(kMaxRows, M - m);
      if (p + 1 < p_end)
        rows<2>(dp, mr, panels, K, x + m * ldx, ldx, y + m * ldy, ldy, n0, n_begin, n_end, accumulate);
      else
        rows<1>(dp, mr, panels, K, x + m * ldx, ldx, y + m * ldy, ldy, n0, n_begin, n_end, accumulate);
    }
  }
}

RegisterKernel<PackedGemmFn> reg_bf16(k_packed_gemm_bf16, Isa::avx512, gemm_bf16_avx512);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
