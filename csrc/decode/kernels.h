// Small f32 vector kernels of the fused CPU decode step (decode/decoder.h), dispatched like every
// kernel (common/isa.h): generic reference in csrc/generic/decode_vec.cpp, AVX2 / AVX-512
// overrides beside it. Dot products reuse k_vec_dot[f32] (quant/quant.h).
//   k_axpy_f32(a, x, y, n):   y[i] += a * x[i]           (attention: values weighted by p)
//   k_rms_scale(x, w, y, n, eps): y = w * x / sqrt(mean(x^2) + eps), statistics in f32 (RMSNorm
//                             exactly as transformers computes it for f32 activations)
#pragma once
#include <cstdint>

#include "common/isa.h"

namespace ktrans {

using AxpyFn = void (*)(float a, const float* x, float* y, int64_t n);
using RmsScaleFn = void (*)(const float* x, const float* w, float* y, int64_t n, float eps);

extern Kernel<AxpyFn> k_axpy_f32;
extern Kernel<RmsScaleFn> k_rms_scale;

}  // namespace ktrans
