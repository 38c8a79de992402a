// AVX-512 decode-step vector kernels (decode/kernels.h): 16 lanes, masked tails.
#include <immintrin.h>

#include <cmath>

#include "decode/kernels.h"

KTRANS_TARGET_AVX512_BEGIN
namespace ktrans {
namespace {

inline __mmask16 tail(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

void axpy_avx512(float a, const float* x, float* y, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = tail(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

void rms_scale_avx512(const float* x, const float* w, float* y, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (i < n) {
    const __m512 v = _mm512_maskz_loadu_ps(tail(n - i), x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (i = 0; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), rv)));
  if (i < n) {
    const __mmask16 m = tail(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i),
                                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rv)));
  }
}

RegisterKernel<AxpyFn> reg_axpy(k_axpy_f32, Isa::avx512, axpy_avx512);
RegisterKernel<RmsScaleFn> reg_rms(k_rms_scale, Isa::avx512, rms_scale_avx512);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
