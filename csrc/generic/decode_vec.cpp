// Scalar references of the decode step's vector kernels (decode/kernels.h).
#include <cmath>

#include "decode/kernels.h"

namespace ktrans {
namespace {

void axpy_ref(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void rms_scale_ref(const float* x, const float* w, float* y, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

}  // namespace

Kernel<AxpyFn> k_axpy_f32{"axpy_f32", {axpy_ref, nullptr, nullptr, nullptr}};
Kernel<RmsScaleFn> k_rms_scale{"rms_scale", {rms_scale_ref, nullptr, nullptr, nullptr}};

}  // namespace ktrans
