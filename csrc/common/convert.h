// Element-wise f32 <-> bf16 conversion kernels (the smallest dispatched kernels; also used by the
// ISA dispatch tests because every variant must give bit-identical results).
#pragma once
#include <cstdint>

#include "common/isa.h"

namespace ktrans {

using F32ToBf16Fn = void (*)(const float* x, uint16_t* y, int64_t n);
using Bf16ToF32Fn = void (*)(const uint16_t* x, float* y, int64_t n);

extern Kernel<F32ToBf16Fn> k_f32_to_bf16;
extern Kernel<Bf16ToF32Fn> k_bf16_to_f32;

}  // namespace ktrans
