// AVX2 decode-step vector kernels (decode/kernels.h): 8 lanes, scalar tails; the sum of squares
// in 8 partial sums (a different float order than the reference, within f32 rounding).
#include <immintrin.h>

#include <cmath>

#include "decode/kernels.h"

KTRANS_TARGET_AVX2_BEGIN
namespace ktrans {
namespace {

void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void rms_scale_avx2(const float* x, const float* w, float* y, int64_t n, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  float ss = 0.f;
  for (float p : part) ss += p;
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), rv)));
  for (; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

RegisterKernel<AxpyFn> reg_axpy(k_axpy_f32, Isa::avx2, axpy_avx2);
RegisterKernel<RmsScaleFn> reg_rms(k_rms_scale, Isa::avx2, rms_scale_avx2);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
