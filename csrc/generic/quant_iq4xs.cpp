// Scalar reference quantization of iq4_xs (non-linear 4-bit codebook kIQ4NL, 6-bit sub-block
// scales under an fp16 super-block scale), following the method of llama.cpp's reference:
// per sub-block of 32, try 15 scales that map the largest-magnitude value onto codebook entries
// near the end of the table, each refitted by weighted least squares (weight x^2), keep the best;
// then quantize the 8 sub-block scales to 6 bits and re-pick every value's nearest codebook entry.
#include <cmath>

#include "quant/kquant_impl.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

// Least-squares scale of 32 values for the codes picked with inverse scale `id`; returns the
// explained energy sumqx^2/sumq2 (to maximise) and writes the scale.
float fit_codes(const float* x, float id, float* scale) {
  float sqx = 0.0f, sq2 = 0.0f;
  for (int l = 0; l < 32; ++l) {
    const float q = kIQ4NL[kq_iq4_nearest_code(id * x[l])], w = x[l] * x[l];
    sqx += w * q * x[l];
    sq2 += w * q * q;
  }
  *scale = sq2 > 0.0f ? sqx / sq2 : 0.0f;
  return sq2 > 0.0f ? sqx * sqx / sq2 : -1.0f;
}

float fit_iq4_sub_block(const float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int l = 0; l < 32; ++l) {
    if (std::fabs(x[l]) > amax) {
      amax = std::fabs(x[l]);
      max = x[l];
    }
  }
  if (amax < kKQuantGroupEps) return 0.0f;
  float best_scale, s;
  // start: the largest-magnitude value lands on the codebook's most negative entry
  float best = fit_codes(x, kIQ4NL[0] / max, &best_scale);
  for (int t = -7; t <= 7; ++t) {
    const float e = fit_codes(x, (t + kIQ4NL[0]) / max, &s);
    if (e > best) {
      best = e;
      best_scale = s;
    }
  }
  return best_scale;
}

void q_iq4_xs(const float* x, void* dst, int64_t n) {
  BlockIQ4_XS* y = static_cast<BlockIQ4_XS*>(dst);
  float sc[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    for (int j = 0; j < 8; ++j) sc[j] = fit_iq4_sub_block(x + 32 * j);
    kq_finish_iq4_xs(x, sc, &y[i]);
  }
}

RegisterKernel<QuantizeRowFn> reg_q_iq4_xs(k_quantize_row[qi(QType::iq4_xs)], Isa::generic, q_iq4_xs);

}  // namespace
}  // namespace ktrans
