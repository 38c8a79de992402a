// Multi-token dot products for the MoE gguf backend: one weight row against up to
// kMoeDotTokens activation rows at once, so the weight blocks are unpacked once per group of
// tokens instead of once per token (prefill, where an expert sees many tokens).
//
// k_moe_dot_multi[qtype](n, w_row, acts, nacts, out): out[j] = vec_dot(n, w_row, acts[j]) for
// j < nacts (nacts <= kMoeDotTokens); activations in the format's vec_dot_type. A format with no
// implementation at any level falls back to k_vec_dot one token at a time (moe_forward.cpp).
#pragma once
#include <cstdint>

#include "common/isa.h"
#include "quant/quant.h"

namespace ktrans {

constexpr int kMoeDotTokens = 8;

using MoeDotMultiFn = void (*)(int64_t n, const void* w_row, const void* const* acts, int nacts, float* out);

extern Kernel<MoeDotMultiFn> k_moe_dot_multi[kNumQTypes];

// The gating of the MoE MLP: out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, i < n; out may
// alias g or u. Generic: std::exp; AVX2: a polynomial exp within a few f32 ulps.
using MoeSiluMulFn = void (*)(const float* g, const float* u, float* out, int64_t n);
extern Kernel<MoeSiluMulFn> k_moe_silu_mul;

}  // namespace ktrans
