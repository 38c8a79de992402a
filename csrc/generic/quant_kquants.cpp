// Scalar reference quantization of the K-quants (q2_K .. q6_K), following the method of
// llama.cpp's reference quantizers:
//   - q4_K / q5_K / q2_K: per sub-block an affine fit x ~ scale*L + min (min <= 0), searched over
//     a small set of candidate inverse scales, each refitted by weighted least squares;
//   - q6_K / q3_K: per group a symmetric fit x ~ scale*L, weighted by x^2 (large values matter);
//   - then the sub-block scales (and mins) are themselves quantized (6 or 4 bits against an fp16
//     super-block scale) and every value is re-rounded against the scale it will really have.
// NOTE: K-quant bytes are not expected to equal llama.cpp's bit for bit (its summation order and
// rounding helpers differ); the error level matches (measured in docs/quant.md).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/numeric.h"
#include "quant/kquant_impl.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

constexpr float kGroupEps = kKQuantGroupEps;

static inline int nearest_int(float v) { return kq_nearest_int(v); }
static inline int clampi(int v, int lo, int hi) { return kq_clamp(v, lo, hi); }

// Weighted error of x ~ scale*L + min (squared, or absolute when abs_err).
float affine_error(int n, const float* x, const float* w, const uint8_t* L, float scale, float min, bool abs_err) {
  float err = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float diff = scale * L[i] + min - x[i];
    err += w[i] * (abs_err ? std::fabs(diff) : diff * diff);
  }
  return err;
}

// Affine fit x ~ scale*L + min with L in [0, nmax] and min <= 0. Tries the plain min/max grid,
// then nstep+1 inverse scales (nmax + rmin + k*rdelta)/(max - min), each with the least-squares
// scale and min for its rounding; keeps the lowest weighted error. Returns scale, writes -min.
float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                    float rmin, float rdelta, int nstep, bool abs_err) {
  float lo = x[0], hi = x[0], sum_w = 0.0f, sum_x = 0.0f;
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  lo = std::min(lo, 0.0f);
  if (hi == lo) {
    std::memset(L, 0, n);
    *neg_min = -lo;
    return 0.0f;
  }
  float iscale = nmax / (hi - lo), scale = 1.0f / iscale, min = lo;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(clampi(nearest_int(iscale * (x[i] - lo)), 0, nmax));
  float best = affine_error(n, x, w, L, scale, min, abs_err);
  uint8_t cand[kQK];
  for (int k = 0; k <= nstep; ++k) {
    iscale = (rmin + rdelta * k + nmax) / (hi - lo);
    float sl = 0.0f, sl2 = 0.0f, sxl = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest_int(iscale * (x[i] - lo)), 0, nmax);
      cand[i] = static_cast<uint8_t>(l);
      sl += w[i] * l;
      sl2 += w[i] * l * l;
      sxl += w[i] * l * x[i];
    }
    const float det = sum_w * sl2 - sl * sl;
    if (det <= 0.0f) continue;
    float s = (sum_w * sxl - sum_x * sl) / det, m = (sl2 * sum_x - sl * sxl) / det;
    if (m > 0.0f) {  // the format only has non-positive mins: refit the scale alone
      m = 0.0f;
      s = sxl / sl2;
    }
    const float err = affine_error(n, x, w, cand, s, m, abs_err);
    if (err < best) {
      std::memcpy(L, cand, n);
      best = err;
      scale = s;
      min = m;
    }
  }
  *neg_min = -min;
  return scale;
}

// Symmetric fit x ~ scale*l, l in [-nmax, nmax-1], weight x^2. Tries 19 inverse scales around
// -nmax/max (max = signed largest-magnitude value) and keeps the best least-squares one.
// Writes l + nmax to L.
float fit_symmetric(int n, int nmax, const float* x, uint8_t* L) {
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < kGroupEps) {
    std::memset(L, nmax, n);
    return 0.0f;
  }
  float best_scale = 0.0f, best = -1.0f;
  uint8_t cand[kQK];
  for (int k = 0; k <= 19; ++k) {
    // k = 0 is the plain grid; then offsets -0.9 .. +0.9 (without 0) of the level count.
    const float off = k == 0 ? 0.0f : 0.1f * (k <= 9 ? k - 10 : k - 9);
    const float iscale = -(nmax + off) / max;
    float slx = 0.0f, sl2 = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
      cand[i] = static_cast<uint8_t>(l + nmax);
      const float w = x[i] * x[i];
      slx += w * x[i] * l;
      sl2 += w * l * l;
    }
    // Least-squares error is sum(w x^2) - slx^2/sl2: maximise slx^2/sl2.
    if (sl2 > 0.0f && (best < 0.0f || slx * slx > best * sl2)) {
      std::memcpy(L, cand, n);
      best_scale = slx / sl2;
      best = best_scale * slx;
    }
  }
  return best_scale;
}

// q4_K / q5_K: fit 8 sub-blocks of 32 (weights: mean magnitude + |x|), then the shared finish
// (6-bit scales, re-rounding, packing; quant/kquant_impl.h).
void fit_k45_block(const float* x, int nmax, float rmin, int nstep, float* sc, float* mn, uint8_t* L) {
  float w[32];
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum2 = 0.0f;
    for (int l = 0; l < 32; ++l) sum2 += xs[l] * xs[l];
    const float av = std::sqrt(sum2 / 32);
    for (int l = 0; l < 32; ++l) w[l] = av + std::fabs(xs[l]);
    sc[j] = fit_scale_min(32, nmax, xs, w, L + 32 * j, &mn[j], rmin, 0.1f, nstep, false);
  }
}

void q_q4_k(const float* x, void* dst, int64_t n) {
  BlockQ4_K* y = static_cast<BlockQ4_K*>(dst);
  uint8_t L[kQK_K];
  float sc[8], mn[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    fit_k45_block(x, 15, -1.0f, 20, sc, mn, L);
    kq_finish_k45(x, sc, mn, 15, y[i].scales, &y[i].d, &y[i].dmin, L);
    kq_pack_q4_k(L, &y[i]);
  }
}

void q_q5_k(const float* x, void* dst, int64_t n) {
  BlockQ5_K* y = static_cast<BlockQ5_K*>(dst);
  uint8_t L[kQK_K];
  float sc[8], mn[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    fit_k45_block(x, 31, -0.5f, 15, sc, mn, L);
    kq_finish_k45(x, sc, mn, 31, y[i].scales, &y[i].d, &y[i].dmin, L);
    kq_pack_q5_k(L, &y[i]);
  }
}

void q_q6_k(const float* x, void* dst, int64_t n) {
  BlockQ6_K* y = static_cast<BlockQ6_K*>(dst);
  uint8_t L[kQK_K];
  float sc[16];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    for (int g = 0; g < 16; ++g) sc[g] = fit_symmetric(16, 32, x + 16 * g, L + 16 * g);
    kq_finish_q6_k(x, sc, L, &y[i]);
  }
}

void q_q2_k(const float* x, void* dst, int64_t n) {
  BlockQ2_K* y = static_cast<BlockQ2_K*>(dst);
  uint8_t L[kQK_K];
  float sc[16], mn[16], w[16];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    for (int g = 0; g < 16; ++g) {
      for (int l = 0; l < 16; ++l) w[l] = std::fabs(x[16 * g + l]);
      sc[g] = fit_scale_min(16, 3, x + 16 * g, w, L + 16 * g, &mn[g], -0.5f, 0.1f, 15, true);
    }
    kq_finish_q2_k(x, sc, mn, L, &y[i]);
  }
}

// Symmetric fit for q3_K (levels -nmax..nmax-1, weight x^2): start from the absmax grid, then
// move single values to the level that the least-squares scale of the others prefers, while the
// fit improves (at most 5 sweeps). Writes l + nmax to L.
float fit_symmetric_refined(int n, int nmax, const float* x, uint8_t* L) {
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < kGroupEps) {
    std::memset(L, nmax, n);
    return 0.0f;
  }
  const float iscale = -nmax / max;
  int l[kQK];
  float slx = 0.0f, sl2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    l[i] = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    const float w = x[i] * x[i];
    slx += w * x[i] * l[i];
    sl2 += w * l[i] * l[i];
  }
  for (int sweep = 0; sweep < 5; ++sweep) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float s_lx = slx - w * x[i] * l[i];
      if (s_lx <= 0.0f) continue;
      float s_l2 = sl2 - w * l[i] * l[i];
      const int nl = clampi(nearest_int(x[i] * s_l2 / s_lx), -nmax, nmax - 1);
      if (nl == l[i]) continue;
      s_lx += w * x[i] * nl;
      s_l2 += w * nl * nl;
      // keep the move when slx^2/sl2 (the explained energy) grows
      if (s_l2 > 0.0f && s_lx * s_lx * sl2 > slx * slx * s_l2) {
        l[i] = nl;
        slx = s_lx;
        sl2 = s_l2;
        ++changed;
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(l[i] + nmax);
  return sl2 > 0.0f ? slx / sl2 : 0.0f;
}

void q_q3_k(const float* x, void* dst, int64_t n) {
  BlockQ3_K* y = static_cast<BlockQ3_K*>(dst);
  uint8_t L[kQK_K];
  float sc[16];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    for (int g = 0; g < 16; ++g) sc[g] = fit_symmetric_refined(16, 4, x + 16 * g, L + 16 * g);
    kq_finish_q3_k(x, sc, L, &y[i]);
  }
}

#define KT_REG(t) RegisterKernel<QuantizeRowFn> reg_q_##t(k_quantize_row[qi(QType::t)], Isa::generic, q_##t);
KT_REG(q4_k) KT_REG(q5_k) KT_REG(q6_k) KT_REG(q2_k) KT_REG(q3_k)
#undef KT_REG

}  // namespace
}  // namespace ktrans
