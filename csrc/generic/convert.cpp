// Scalar reference for f32 <-> bf16 conversion (round to nearest even, NaN kept quiet).
#include "common/convert.h"
#include "common/numeric.h"

namespace ktrans {
namespace {

void f32_to_bf16_ref(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = f32_to_bf16(x[i]);
}

void bf16_to_f32_ref(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_f32(x[i]);
}

}  // namespace

Kernel<F32ToBf16Fn> k_f32_to_bf16{"f32_to_bf16", {f32_to_bf16_ref, nullptr, nullptr, nullptr}};
Kernel<Bf16ToF32Fn> k_bf16_to_f32{"bf16_to_f32", {bf16_to_f32_ref, nullptr, nullptr, nullptr}};

}  // namespace ktrans
