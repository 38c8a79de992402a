// Scalar reference quantization of the float and legacy 32-value formats, and of q8_K (the
// activation format of the K-quant dot products).
//
// NOTE: q8_0 / q4_0 / q5_0 follow llama.cpp's reference quantizers operation for operation
// (float32 absmax, d = max / -8 etc., 1/d, truncation after + 8.5), so the bytes equal those of
// gguf-py's numpy quantize, including fp16 rounding of d (to nearest even) and the first-index
// tie rule of the absmax search. Baseline x86-64 has no FMA, so x*id + 8.5 rounds twice, as numpy.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/numeric.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

void q_f32(const float* x, void* dst, int64_t n) { std::memcpy(dst, x, n * sizeof(float)); }

void q_f16(const float* x, void* dst, int64_t n) {
  uint16_t* y = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) y[i] = f32_to_fp16(x[i]);
}

void q_bf16(const float* x, void* dst, int64_t n) {
  uint16_t* y = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) y[i] = f32_to_bf16(x[i]);
}

// Round half away from zero (C roundf), as llama.cpp's q8_0 reference and gguf-py's np_roundf.
static inline int round_away(float v) { return static_cast<int>(std::round(v)); }

void q_q8_0(const float* x, void* dst, int64_t n) {
  BlockQ8_0* y = static_cast<BlockQ8_0*>(dst);
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = f32_to_fp16(d);
    for (int j = 0; j < kQK; ++j) y[i].qs[j] = static_cast<int8_t>(round_away(x[j] * id));
  }
}

// Signed value of largest magnitude (first one on ties), the reference point of q4_0/q5_0.
static inline float signed_absmax(const float* x, int n) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

void q_q4_0(const float* x, void* dst, int64_t n) {
  BlockQ4_0* y = static_cast<BlockQ4_0*>(dst);
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    const float d = signed_absmax(x, kQK) / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = f32_to_fp16(d);
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = std::min(15, static_cast<int>(x[j] * id + 8.5f));
      const int hi = std::min(15, static_cast<int>(x[j + kQK / 2] * id + 8.5f));
      y[i].qs[j] = static_cast<uint8_t>(lo | hi << 4);
    }
  }
}

void q_q5_0(const float* x, void* dst, int64_t n) {
  BlockQ5_0* y = static_cast<BlockQ5_0*>(dst);
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    const float d = signed_absmax(x, kQK) / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[i].d = f32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = std::min(31, static_cast<int>(x[j] * id + 16.5f));
      const int hi = std::min(31, static_cast<int>(x[j + kQK / 2] * id + 16.5f));
      y[i].qs[j] = static_cast<uint8_t>((lo & 0xF) | (hi & 0xF) << 4);
      qh |= static_cast<uint32_t>(lo >> 4) << j | static_cast<uint32_t>(hi >> 4) << (j + kQK / 2);
    }
    std::memcpy(y[i].qh, &qh, 4);
  }
}

// q8_K: symmetric 8-bit per 256 values, d = amax/127 kept as float32, plus sums of 16 for the
// K-quant min terms. Range [-127, 127] (never -128) so AVX2 sign tricks stay exact.
void q_q8_k(const float* x, void* dst, int64_t n) {
  BlockQ8_K* y = static_cast<BlockQ8_K*>(dst);
  for (int64_t i = 0; i < n / kQK_K; ++i, x += kQK_K) {
    float amax = 0.0f;
    for (int j = 0; j < kQK_K; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    y[i].d = amax != 0.0f ? amax / 127.0f : 0.0f;
    for (int g = 0; g < kQK_K / 16; ++g) {
      int sum = 0;
      for (int j = 16 * g; j < 16 * g + 16; ++j) {
        const int q = static_cast<int>(std::lrintf(x[j] * id));
        y[i].qs[j] = static_cast<int8_t>(q);
        sum += q;
      }
      y[i].bsums[g] = static_cast<int16_t>(sum);
    }
  }
}

#define KT_REG(t) RegisterKernel<QuantizeRowFn> reg_q_##t(k_quantize_row[qi(QType::t)], Isa::generic, q_##t);
KT_REG(f32) KT_REG(f16) KT_REG(bf16) KT_REG(q8_0) KT_REG(q4_0) KT_REG(q5_0) KT_REG(q8_k)
#undef KT_REG

}  // namespace
}  // namespace ktrans
