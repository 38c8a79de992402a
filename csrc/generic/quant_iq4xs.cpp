// Scalar reference quantization of iq4_xs (non-linear 4-bit codebook kIQ4NL, 6-bit sub-block
// scales under an fp16 super-block scale), following the method of llama.cpp's reference:
// per sub-block of 32, try 15 scales that map the largest-magnitude value onto codebook entries
// near the end of the table, each refitted by weighted least squares (weight x^2), keep the best;
// then quantize the 8 sub-block scales to 6 bits and re-pick every value's nearest codebook entry.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant/kquant_impl.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

// Index of the codebook entry nearest to v (ties to the larger entry): the number of midpoints
// between consecutive entries that v reaches. Branch-free, so the 32-value loops vectorise.
constexpr float kIQ4Mid[15] = {-115.5f, -93.5f, -74.0f, -57.0f, -42.0f, -28.5f, -16.0f, -4.5f,
                               7.0f,    19.0f,  31.5f,  45.5f,  61.0f,  79.0f,  101.0f};
constexpr bool midpoints_match_codebook() {
  for (int k = 0; k < 15; ++k)
    if (kIQ4NL[k] + kIQ4NL[k + 1] != 2.0f * kIQ4Mid[k]) return false;
  return true;
}
static_assert(midpoints_match_codebook(), "kIQ4Mid must hold the midpoints of kIQ4NL");

inline int nearest_code(float v) {
  int idx = 0;
  for (int k = 0; k < 15; ++k) idx += v >= kIQ4Mid[k];
  return idx;
}

// Least-squares scale of 32 values for the codes picked with inverse scale `id`; returns the
// explained energy sumqx^2/sumq2 (to maximise) and writes the scale and the codes.
float fit_codes(const float* x, float id, uint8_t* L, float* scale) {
  float sqx = 0.0f, sq2 = 0.0f;
  for (int l = 0; l < 32; ++l) {
    L[l] = static_cast<uint8_t>(nearest_code(id * x[l]));
    const float q = kIQ4NL[L[l]], w = x[l] * x[l];
    sqx += w * q * x[l];
    sq2 += w * q * q;
  }
  *scale = sq2 > 0.0f ? sqx / sq2 : 0.0f;
  return sq2 > 0.0f ? sqx * sqx / sq2 : -1.0f;
}

float fit_iq4_sub_block(const float* x, uint8_t* L) {
  float amax = 0.0f, max = 0.0f;
  for (int l = 0; l < 32; ++l) {
    if (std::fabs(x[l]) > amax) {
      amax = std::fabs(x[l]);
      max = x[l];
    }
  }
  if (amax < kKQuantGroupEps) {
    std::memset(L, 0, 32);
    return 0.0f;
  }
  uint8_t cand[32];
  float best_scale, s;
  // start: the largest-magnitude value lands on the codebook's most negative entry
  float best = fit_codes(x, kIQ4NL[0] / max, L, &best_scale);
  for (int t = -7; t <= 7; ++t) {
    const float e = fit_codes(x, (t + kIQ4NL[0]) / max, cand, &s);
    if (e > best) {
      best = e;
      best_scale = s;
      std::memcpy(L, cand, 32);
    }
  }
  return best_scale;
}

void q_iq4_xs(const float* x, void* dst, int64_t n) {
  BlockIQ4_XS* y = static_cast<BlockIQ4_XS*>(dst);
  uint8_t L[kQK_K];
  float sc[8];
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    float amax = 0.0f, max_sc = 0.0f;
    for (int j = 0; j < 8; ++j) {
      sc[j] = fit_iq4_sub_block(x + 32 * j, L + 32 * j);
      if (std::fabs(sc[j]) > amax) {
        amax = std::fabs(sc[j]);
        max_sc = sc[j];
      }
    }
    std::memset(&y[i], 0, sizeof(BlockIQ4_XS));
    if (amax < kKQuantGroupEps) continue;  // all-zero block: d = 0
    const float d = -max_sc / 32.0f, id = 1.0f / d;
    y[i].d = f32_to_fp16(d);
    const float dq = fp16_to_f32(y[i].d);
    for (int j = 0; j < 8; ++j) {
      const int ls = kq_clamp(kq_nearest_int(id * sc[j]), -32, 31);
      y[i].scales_l[j / 2] |= static_cast<uint8_t>(((ls + 32) & 0xF) << (4 * (j % 2)));
      y[i].scales_h |= static_cast<uint16_t>(((ls + 32) >> 4) << (2 * j));
      const float dl = dq * ls, idl = dl != 0.0f ? 1.0f / dl : 0.0f;
      for (int l = 0; l < 32; ++l) L[32 * j + l] = static_cast<uint8_t>(nearest_code(idl * x[32 * j + l]));
      for (int l = 0; l < 16; ++l) y[i].qs[16 * j + l] = L[32 * j + l] | L[32 * j + l + 16] << 4;
    }
  }
}

RegisterKernel<QuantizeRowFn> reg_q_iq4_xs(k_quantize_row[qi(QType::iq4_xs)], Isa::generic, q_iq4_xs);

}  // namespace
}  // namespace ktrans
