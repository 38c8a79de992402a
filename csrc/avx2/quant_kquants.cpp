// AVX2 quantization of q2_K / q4_K / q5_K / q6_K / iq4_xs: the per-sub-block scale (and min)
// search of the reference, run for 8 sub-blocks (q2_K / q6_K: 8 groups of 16) at once (lane j =
// sub-block j; values gathered so that vector l holds element l of every sub-block). The scale
// quantization, re-rounding and packing are the shared scalar steps of quant/kquant_impl.h.
// NOTE: bit-identical to the generic reference: each lane performs the reference's float
// operations in the same order (sequential sums over l, IEEE div/sqrt, round-to-nearest-even
// conversion), and fused multiply-add contraction is turned off for this file.
#include <immintrin.h>

#include "quant/kquant_impl.h"
#include "quant/quant.h"

KTRANS_TARGET_AVX2_BEGIN
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
namespace ktrans {
namespace {

// Levels round(iscale * (x - lo)) clamped to [0, nmax], as int32 lanes.
inline __m256i levels(__m256 x, __m256 lo, __m256 iscale, __m256i nmax) {
  const __m256i l = _mm256_cvtps_epi32(_mm256_mul_ps(iscale, _mm256_sub_ps(x, lo)));
  return _mm256_min_epi32(_mm256_max_epi32(l, _mm256_setzero_si256()), nmax);
}

// Weighted error (squared, or absolute when kAbs) of x ~ scale*L + min per lane, summed over l
// in order.
template <int N, bool kAbs>
inline __m256 fit_error(const __m256* X, const __m256* W, const __m256i* L, __m256 scale, __m256 min) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 err = _mm256_setzero_ps();
  for (int l = 0; l < N; ++l) {
    const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(L[l])), min), X[l]);
    const __m256 e = kAbs ? _mm256_and_ps(diff, abs_mask) : _mm256_mul_ps(diff, diff);
    err = _mm256_add_ps(err, _mm256_mul_ps(W[l], e));
  }
  return err;
}

template <int N>
struct LaneFit {
  __m256 scale, min;  // per sub-block
  __m256i L[N];       // levels, vector l = element l of each sub-block
};

// The reference's fit_scale_min for 8 sub-blocks of N (min <= 0).
template <int N, bool kAbs>
void fit_lanes(const __m256* X, const __m256* W, int nmax, float rmin, int nstep, LaneFit<N>* f) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256i vnmax = _mm256_set1_epi32(nmax);
  __m256 lo = X[0], hi = X[0], sum_w = zero, sum_x = zero;
  for (int l = 0; l < N; ++l) {
    lo = _mm256_min_ps(X[l], lo);
    hi = _mm256_max_ps(X[l], hi);
    sum_w = _mm256_add_ps(sum_w, W[l]);
    sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(W[l], X[l]));
  }
  lo = _mm256_min_ps(zero, lo);
  const __m256 range = _mm256_sub_ps(hi, lo);
  const __m256 flat = _mm256_cmp_ps(hi, lo, _CMP_EQ_OQ);
  __m256 iscale = _mm256_div_ps(_mm256_set1_ps(static_cast<float>(nmax)), range);
  __m256 scale = _mm256_div_ps(_mm256_set1_ps(1.0f), iscale), min = lo;
  for (int l = 0; l < N; ++l) f->L[l] = levels(X[l], lo, iscale, vnmax);
  __m256 best = fit_error<N, kAbs>(X, W, f->L, scale, min);
  __m256i cand[N];
  for (int k = 0; k <= nstep; ++k) {
    const float c = rmin + 0.1f * static_cast<float>(k) + static_cast<float>(nmax);
    iscale = _mm256_div_ps(_mm256_set1_ps(c), range);
    __m256 sl = zero, sl2 = zero, sxl = zero;
    for (int l = 0; l < N; ++l) {
      cand[l] = levels(X[l], lo, iscale, vnmax);
      const __m256 lf = _mm256_cvtepi32_ps(cand[l]);
      const __m256 wl = _mm256_mul_ps(W[l], lf);
      sl = _mm256_add_ps(sl, wl);
      sl2 = _mm256_add_ps(sl2, _mm256_mul_ps(wl, lf));
      sxl = _mm256_add_ps(sxl, _mm256_mul_ps(wl, X[l]));
    }
    const __m256 det = _mm256_sub_ps(_mm256_mul_ps(sum_w, sl2), _mm256_mul_ps(sl, sl));
    const __m256 ok = _mm256_cmp_ps(det, zero, _CMP_NLE_UQ);  // the reference skips det <= 0
    __m256 s = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sxl), _mm256_mul_ps(sum_x, sl)), det);
    __m256 m = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sl2, sum_x), _mm256_mul_ps(sl, sxl)), det);
    const __m256 pos = _mm256_cmp_ps(m, zero, _CMP_GT_OQ);
    s = _mm256_blendv_ps(s, _mm256_div_ps(sxl, sl2), pos);
    m = _mm256_blendv_ps(m, zero, pos);
    const __m256 err = fit_error<N, kAbs>(X, W, cand, s, m);
    const __m256 better = _mm256_and_ps(ok, _mm256_cmp_ps(err, best, _CMP_LT_OQ));
    const __m256i bi = _mm256_castps_si256(better);
    for (int l = 0; l < N; ++l) f->L[l] = _mm256_blendv_epi8(f->L[l], cand[l], bi);
    best = _mm256_blendv_ps(best, err, better);
    scale = _mm256_blendv_ps(scale, s, better);
    min = _mm256_blendv_ps(min, m, better);
  }
  // Constant sub-blocks: scale 0, min = lo, levels 0 (as the reference's early return).
  f->scale = _mm256_blendv_ps(scale, zero, flat);
  f->min = _mm256_blendv_ps(min, lo, flat);
  for (int l = 0; l < N; ++l) f->L[l] = _mm256_andnot_si256(_mm256_castps_si256(flat), f->L[l]);
}

// Gathers one super-block as lanes, builds the reference's weights and fits; outputs as the
// generic fit_k45_block does (sc, -min per sub-block, levels in natural order).
void fit_k45_avx2(const float* x, int nmax, float rmin, int nstep, float* sc, float* mn, uint8_t* L) {
  const __m256i idx = _mm256_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224);
  __m256 X[32], W[32];
  __m256 sum2 = _mm256_setzero_ps();
  for (int l = 0; l < 32; ++l) {
    X[l] = _mm256_i32gather_ps(x + l, idx, 4);
    sum2 = _mm256_add_ps(sum2, _mm256_mul_ps(X[l], X[l]));
  }
  const __m256 av = _mm256_sqrt_ps(_mm256_div_ps(sum2, _mm256_set1_ps(32.0f)));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int l = 0; l < 32; ++l) W[l] = _mm256_add_ps(av, _mm256_and_ps(X[l], abs_mask));
  LaneFit<32> f;
  fit_lanes<32, false>(X, W, nmax, rmin, nstep, &f);
  _mm256_storeu_ps(sc, f.scale);
  _mm256_storeu_ps(mn, _mm256_xor_ps(f.min, _mm256_set1_ps(-0.0f)));  // -min, as unary minus
  alignas(32) int32_t lv[8];
  for (int l = 0; l < 32; ++l) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lv), f.L[l]);
    for (int j = 0; j < 8; ++j) L[32 * j + l] = static_cast<uint8_t>(lv[j]);
  }
}

// kq_finish_k45 with the re-rounding 8 values at a time (same float operations: (x + ml) / dl,
// round to nearest even, clamp).
void finish_k45_avx2(const float* x, const float* sc, const float* mn, int nmax, uint8_t* scales, uint16_t* d16,
                     uint16_t* dmin16, uint8_t* L) {
  float dl[8], ml[8];
  kq_k45_scales(sc, mn, scales, d16, dmin16, dl, ml);
  const __m256i vmax = _mm256_set1_epi32(nmax);
  for (int j = 0; j < 8; ++j) {
    if (dl[j] == 0.0f) continue;
    const __m256 vd = _mm256_set1_ps(dl[j]), vm = _mm256_set1_ps(ml[j]);
    __m256i v[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 q = _mm256_div_ps(_mm256_add_ps(_mm256_loadu_ps(x + 32 * j + 8 * k), vm), vd);
      v[k] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(q), _mm256_setzero_si256()), vmax);
    }
    // 4 x 8 int32 in 0..31 -> 32 bytes in element order
    const __m256i p = _mm256_packus_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(L + 32 * j),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

void q4_k_avx2(const float* x, void* dst, int64_t n) {
  BlockQ4_K* y = static_cast<BlockQ4_K*>(dst);
  alignas(32) uint8_t L[kQK_K];
  float sc[8], mn[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    fit_k45_avx2(x, 15, -1.0f, 20, sc, mn, L);
    finish_k45_avx2(x, sc, mn, 15, y[i].scales, &y[i].d, &y[i].dmin, L);
    kq_pack_q4_k(L, &y[i]);
  }
}

void q5_k_avx2(const float* x, void* dst, int64_t n) {
  BlockQ5_K* y = static_cast<BlockQ5_K*>(dst);
  alignas(32) uint8_t L[kQK_K];
  float sc[8], mn[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    fit_k45_avx2(x, 31, -0.5f, 15, sc, mn, L);
    finish_k45_avx2(x, sc, mn, 31, y[i].scales, &y[i].d, &y[i].dmin, L);
    kq_pack_q5_k(L, &y[i]);
  }
}

// The reference's fit_symmetric (q6_K: levels -32..31, weight x^2, 20 candidate scales) for 8
// groups of 16 at once; X[l] holds element l of each group. Writes scales and levels (l + 32).
void fit_symmetric_lanes(const __m256* X, float* sc, uint8_t* L, int group0) {
  constexpr int kNmax = 32;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 amax = zero, max = zero;
  for (int l = 0; l < 16; ++l) {
    const __m256 ax = _mm256_and_ps(X[l], abs_mask);
    const __m256 gt = _mm256_cmp_ps(ax, amax, _CMP_GT_OQ);  // strict: the first largest wins
    amax = _mm256_blendv_ps(amax, ax, gt);
    max = _mm256_blendv_ps(max, X[l], gt);
  }
  const __m256 tiny = _mm256_cmp_ps(amax, _mm256_set1_ps(kKQuantGroupEps), _CMP_LT_OQ);
  const __m256i lo = _mm256_set1_epi32(-kNmax), hi = _mm256_set1_epi32(kNmax - 1);
  __m256 best_scale = zero, best = _mm256_set1_ps(-1.0f);
  __m256i Lv[16], cand[16];
  for (int l = 0; l < 16; ++l) Lv[l] = _mm256_setzero_si256();
  for (int k = 0; k <= 19; ++k) {
    const float off = k == 0 ? 0.0f : 0.1f * static_cast<float>(k <= 9 ? k - 10 : k - 9);
    const __m256 iscale = _mm256_div_ps(_mm256_set1_ps(-(static_cast<float>(kNmax) + off)), max);
    __m256 slx = zero, sl2 = zero;
    for (int l = 0; l < 16; ++l) {
      cand[l] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(iscale, X[l])), lo), hi);
      const __m256 lf = _mm256_cvtepi32_ps(cand[l]);
      const __m256 w = _mm256_mul_ps(X[l], X[l]);
      slx = _mm256_add_ps(slx, _mm256_mul_ps(_mm256_mul_ps(w, X[l]), lf));
      sl2 = _mm256_add_ps(sl2, _mm256_mul_ps(_mm256_mul_ps(w, lf), lf));
    }
    const __m256 better = _mm256_and_ps(
        _mm256_cmp_ps(sl2, zero, _CMP_GT_OQ),
        _mm256_or_ps(_mm256_cmp_ps(best, zero, _CMP_LT_OQ),
                     _mm256_cmp_ps(_mm256_mul_ps(slx, slx), _mm256_mul_ps(best, sl2), _CMP_GT_OQ)));
    const __m256i bi = _mm256_castps_si256(better);
    for (int l = 0; l < 16; ++l) Lv[l] = _mm256_blendv_epi8(Lv[l], cand[l], bi);
    const __m256 s = _mm256_div_ps(slx, sl2);
    best_scale = _mm256_blendv_ps(best_scale, s, better);
    best = _mm256_blendv_ps(best, _mm256_mul_ps(s, slx), better);
  }
  // All-zero groups: scale 0, level 0 (stored as nmax), as the reference's early return.
  _mm256_storeu_ps(sc + group0, _mm256_blendv_ps(best_scale, zero, tiny));
  const __m256i ti = _mm256_castps_si256(tiny);
  alignas(32) int32_t lv[8];
  for (int l = 0; l < 16; ++l) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lv), _mm256_andnot_si256(ti, Lv[l]));
    for (int j = 0; j < 8; ++j) L[16 * (group0 + j) + l] = static_cast<uint8_t>(lv[j] + kNmax);
  }
}

void q6_k_avx2(const float* x, void* dst, int64_t n) {
  BlockQ6_K* y = static_cast<BlockQ6_K*>(dst);
  const __m256i idx = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);
  alignas(32) uint8_t L[kQK_K];
  float sc[16];
  __m256 X[16];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    for (int half = 0; half < 2; ++half) {
      for (int l = 0; l < 16; ++l) X[l] = _mm256_i32gather_ps(x + 128 * half + l, idx, 4);
      fit_symmetric_lanes(X, sc, L, 8 * half);
    }
    kq_finish_q6_k(x, sc, L, &y[i]);
  }
}

// q2_K: the reference's fit for 16 groups of 16 (weights |x|, absolute error), 8 groups per pass.
void q2_k_avx2(const float* x, void* dst, int64_t n) {
  BlockQ2_K* y = static_cast<BlockQ2_K*>(dst);
  const __m256i idx = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  alignas(32) uint8_t L[kQK_K];
  alignas(32) int32_t lv[8];
  float sc[16], mn[16];
  __m256 X[16], W[16];
  LaneFit<16> f;
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    for (int half = 0; half < 2; ++half) {
      for (int l = 0; l < 16; ++l) {
        X[l] = _mm256_i32gather_ps(x + 128 * half + l, idx, 4);
        W[l] = _mm256_and_ps(X[l], abs_mask);
      }
      fit_lanes<16, true>(X, W, 3, -0.5f, 15, &f);
      _mm256_storeu_ps(sc + 8 * half, f.scale);
      _mm256_storeu_ps(mn + 8 * half, _mm256_xor_ps(f.min, _mm256_set1_ps(-0.0f)));
      for (int l = 0; l < 16; ++l) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lv), f.L[l]);
        for (int j = 0; j < 8; ++j) L[16 * (8 * half + j) + l] = static_cast<uint8_t>(lv[j]);
      }
    }
    kq_finish_q2_k(x, sc, mn, L, &y[i]);
  }
}

// iq4_xs: sqx and sq2 of the codes picked with inverse scales `id` (lane = sub-block); returns
// the explained energy sqx^2/sq2 (-1 where sq2 <= 0) and the least-squares scale, as the
// reference's fit_codes.
inline __m256 iq4_fit_codes(const __m256* X, const __m256* W, __m256 id, __m256* scale) {
  const __m256 tab_lo = _mm256_setr_ps(-127, -104, -83, -65, -49, -35, -22, -10);
  const __m256 tab_hi = _mm256_setr_ps(1, 13, 25, 38, 53, 69, 89, 113);
  __m256 sqx = _mm256_setzero_ps(), sq2 = _mm256_setzero_ps();
  for (int l = 0; l < 32; ++l) {
    const __m256 v = _mm256_mul_ps(id, X[l]);
    __m256i idx = _mm256_setzero_si256();
    for (int k = 0; k < 15; ++k)  // count of midpoints reached (compare gives -1 per hit)
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(kIQ4Mid[k]), _CMP_GE_OQ)));
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    const __m256 q = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab_lo, idx), _mm256_permutevar8x32_ps(tab_hi, idx), upper);
    const __m256 wq = _mm256_mul_ps(W[l], q);
    sqx = _mm256_add_ps(sqx, _mm256_mul_ps(wq, X[l]));
    sq2 = _mm256_add_ps(sq2, _mm256_mul_ps(wq, q));
  }
  const __m256 pos = _mm256_cmp_ps(sq2, _mm256_setzero_ps(), _CMP_GT_OQ);
  *scale = _mm256_and_ps(pos, _mm256_div_ps(sqx, sq2));
  return _mm256_blendv_ps(_mm256_set1_ps(-1.0f), _mm256_div_ps(_mm256_mul_ps(sqx, sqx), sq2), pos);
}

// The reference's fit_iq4_sub_block for the 8 sub-blocks of a super-block; writes 8 scales.
void fit_iq4_lanes(const float* x, float* sc) {
  const __m256i gidx = _mm256_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 X[32], W[32], amax = _mm256_setzero_ps(), max = _mm256_setzero_ps();
  for (int l = 0; l < 32; ++l) {
    X[l] = _mm256_i32gather_ps(x + l, gidx, 4);
    W[l] = _mm256_mul_ps(X[l], X[l]);
    const __m256 ax = _mm256_and_ps(X[l], abs_mask);
    const __m256 gt = _mm256_cmp_ps(ax, amax, _CMP_GT_OQ);
    amax = _mm256_blendv_ps(amax, ax, gt);
    max = _mm256_blendv_ps(max, X[l], gt);
  }
  __m256 best_scale, s;
  __m256 best = iq4_fit_codes(X, W, _mm256_div_ps(_mm256_set1_ps(static_cast<float>(kIQ4NL[0])), max), &best_scale);
  for (int t = -7; t <= 7; ++t) {
    const __m256 id = _mm256_div_ps(_mm256_set1_ps(static_cast<float>(t + kIQ4NL[0])), max);
    const __m256 e = iq4_fit_codes(X, W, id, &s);
    const __m256 better = _mm256_cmp_ps(e, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, e, better);
    best_scale = _mm256_blendv_ps(best_scale, s, better);
  }
  const __m256 tiny = _mm256_cmp_ps(amax, _mm256_set1_ps(kKQuantGroupEps), _CMP_LT_OQ);
  _mm256_storeu_ps(sc, _mm256_andnot_ps(tiny, best_scale));
}

void iq4_xs_avx2(const float* x, void* dst, int64_t n) {
  BlockIQ4_XS* y = static_cast<BlockIQ4_XS*>(dst);
  float sc[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    fit_iq4_lanes(x, sc);
    kq_finish_iq4_xs(x, sc, &y[i]);
  }
}

RegisterKernel<QuantizeRowFn> reg_iq4_xs(k_quantize_row[qi(QType::iq4_xs)], Isa::avx2, iq4_xs_avx2);
RegisterKernel<QuantizeRowFn> reg_q2_k(k_quantize_row[qi(QType::q2_k)], Isa::avx2, q2_k_avx2);
RegisterKernel<QuantizeRowFn> reg_q6_k(k_quantize_row[qi(QType::q6_k)], Isa::avx2, q6_k_avx2);
RegisterKernel<QuantizeRowFn> reg_q4_k(k_quantize_row[qi(QType::q4_k)], Isa::avx2, q4_k_avx2);
RegisterKernel<QuantizeRowFn> reg_q5_k(k_quantize_row[qi(QType::q5_k)], Isa::avx2, q5_k_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
