// Generic SiLU gating of the MoE MLP (moe/moe_dot.h): the reference the ISA versions are tested
// against, with the C library's exp.
#include <cmath>

#include "moe/moe_dot.h"

namespace ktrans {
namespace {

void silu_mul_ref(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

Kernel<MoeSiluMulFn> k_moe_silu_mul{"moe_silu_mul", {silu_mul_ref, nullptr, nullptr, nullptr}};

}  // namespace ktrans
