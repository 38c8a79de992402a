// Internal helpers shared by the files of the fused decode step (decoder.h): scratch slots, step
// limits, and the fused "several linears over one input" fan-out.
#pragma once
#include <cstdint>

#include "linear/linear.h"
#include "moe/moe_buffers.h"

namespace ktrans {

// Most tokens one fused step takes (larger decode batches take the module path) and the largest
// top-k of any router (DeepSeek-V3: 8).
constexpr int64_t kMaxDecodeTokens = 64;
constexpr int64_t kMaxTopK = 16;

// Scratch slots of the pool's shared buffers (after the MoE layer's and QLinear's).
enum DecodeSlot {
  kSlotH = 60, kSlotXn, kSlotY, kSlotQ, kSlotK, kSlotV, kSlotAtt, kSlotGate, kSlotUp, kSlotDown,
  kSlotScores, kSlotQa, kSlotKv, kSlotLogits, kSlotXq
};

struct LinearOut {
  const QLinear* lin;
  float* y;  // [T, lin->N()]
};

// y_i = x · W_iᵀ for linears that read the same x [T, K]; with a shared activation format (and
// no GEMM at this T) x is quantized once and all their rows go out in one fan-out. Call inside a
// pool task.
void run_linears(const LinearOut* outs, int n, const float* x, int64_t T, MoeBuffers& scratch);

}  // namespace ktrans
