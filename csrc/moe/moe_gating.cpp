// The gating of the expert MLP and the expert biases (see MoeGating in moe.h): SiLU gating runs
// through the vectorized k_moe_silu_mul when the layer has no gate/up biases; biases and gpt-oss's
// clamped SwiGLU go through the scalar moe_gate, whose std::exp is the same as the vec_dot path's.
// The down bias is added once per (position, output row), weighted like the expert's output:
// out += w * (down(h) + b), in the accumulator of NUMA slice 0 only (the slices are summed after).
#include <cstring>
#include <stdexcept>
#include <string>

#include "moe/moe.h"

namespace ktrans {

void MoeLayer::load_bias(int proj, const float* src) {
  if (proj < 0 || proj > 2) throw std::invalid_argument("projection must be 0 (gate), 1 (up) or 2 (down)");
  const int64_t n = shape_.E * (proj < 2 ? shape_.I : shape_.H);
  bias_[proj].assign(src, src + n);
  // NOTE: gate_one reads the gate and up biases together: a layer given one gets a zero other.
  if (proj < 2 && bias_[1 - proj].empty()) bias_[1 - proj].assign(static_cast<size_t>(n), 0.0f);
}

void MoeLayer::gate_rows(int64_t e, int64_t r0, const float* g, const float* u, float* out, int64_t n) const {
  if (shape_.gating.act == MoeAct::silu && bias_[0].empty()) return k_moe_silu_mul.get(isa_)(g, u, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = gate_one(e, r0 + i, g[i], u[i]);
}

void MoeLayer::add_down_bias(const MoeArgs& a, int64_t t0, int64_t tc, int64_t r0, int64_t r1, float* acc) const {
  const int64_t H = shape_.H;
  for (int64_t t = 0; t < tc; ++t) {
    float* dst = acc + t * H;
    for (int64_t j = 0; j < a.k; ++j) {
      const int64_t i = (t0 + t) * a.k + j;
      const int64_t e = a.ids_i64 ? static_cast<const int64_t*>(a.ids)[i] : static_cast<const int32_t*>(a.ids)[i];
      if (e < 0 || e >= shape_.E) continue;
      const float w = a.weights[i];
      const float* b = bias_[2].data() + e * H;
      for (int64_t r = r0; r < r1; ++r) dst[r] += w * b[r];
    }
  }
}

}  // namespace ktrans
