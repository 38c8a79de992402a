// Scalar reference dequantization of every format: block -> float32 values.
//
// NOTE: results are bit-identical to gguf-py's numpy dequantization: every product is a single
// float32 multiply (scale * sub-scale first, then * q, then - min) with no fused multiply-add.
// This file is compiled for baseline x86-64, which has no FMA, so the compiler cannot contract.
#include <cstring>

#include "common/numeric.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

void dq_f32(const void* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

void dq_f16(const void* src, float* dst, int64_t n) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(h[i]);
}

void dq_bf16(const void* src, float* dst, int64_t n) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(h[i]);
}

void dq_q8_0(const void* src, float* dst, int64_t n) {
  const BlockQ8_0* b = static_cast<const BlockQ8_0*>(src);
  for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
    const float d = fp16_to_f32(b[i].d);
    for (int j = 0; j < kQK; ++j) dst[j] = static_cast<float>(b[i].qs[j]) * d;
  }
}

void dq_q4_0(const void* src, float* dst, int64_t n) {
  const BlockQ4_0* b = static_cast<const BlockQ4_0*>(src);
  for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
    const float d = fp16_to_f32(b[i].d);
    for (int j = 0; j < kQK / 2; ++j) {
      dst[j] = d * static_cast<float>((b[i].qs[j] & 0xF) - 8);
      dst[j + kQK / 2] = d * static_cast<float>((b[i].qs[j] >> 4) - 8);
    }
  }
}

void dq_q5_0(const void* src, float* dst, int64_t n) {
  const BlockQ5_0* b = static_cast<const BlockQ5_0*>(src);
  for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
    const float d = fp16_to_f32(b[i].d);
    uint32_t qh;
    std::memcpy(&qh, b[i].qh, 4);
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = (b[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int hi = (b[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      dst[j] = d * static_cast<float>(lo - 16);
      dst[j + kQK / 2] = d * static_cast<float>(hi - 16);
    }
  }
}

// q4_K / q5_K: 8 sub-blocks of 32 values, value = (d*sc) * q - (dmin*m); q5_K adds bit 4 from qh.
void dq_k45(const uint8_t* scales, const uint8_t* qs, const uint8_t* qh, uint16_t d16, uint16_t dmin16,
            float* dst) {
  const float d = fp16_to_f32(d16), dmin = fp16_to_f32(dmin16);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    unpack_scale_min_k4(j, scales, &sc, &m);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(m);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> shift) & 0xF;
      if (qh) v |= ((qh[l] >> j) & 1) << 4;
      dst[32 * j + l] = dl * static_cast<float>(v) - ml;
    }
  }
}

void dq_q4_k(const void* src, float* dst, int64_t n) {
  const BlockQ4_K* b = static_cast<const BlockQ4_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i) dq_k45(b[i].scales, b[i].qs, nullptr, b[i].d, b[i].dmin, dst + i * kQK_K);
}

void dq_q5_k(const void* src, float* dst, int64_t n) {
  const BlockQ5_K* b = static_cast<const BlockQ5_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i) dq_k45(b[i].scales, b[i].qs, b[i].qh, b[i].d, b[i].dmin, dst + i * kQK_K);
}

// q6_K: 16 groups of 16 values, value = (d*scale) * (q - 32), q = 4 low bits | 2 high bits << 4.
void dq_q6_k(const void* src, float* dst, int64_t n) {
  const BlockQ6_K* b = static_cast<const BlockQ6_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d);
    for (int e = 0; e < kQK_K; ++e) {
      const int half = e / 128, r = e % 128, s = r / 32, l = r % 32;  // s: 32-value slice in the half
      const uint8_t lo = b[i].ql[64 * half + l + 32 * (s % 2)] >> (4 * (s / 2)) & 0xF;
      const uint8_t hi = (b[i].qh[32 * half + l] >> (2 * s)) & 3;
      const float dl = d * static_cast<float>(b[i].scales[e / 16]);
      dst[e] = dl * static_cast<float>((lo | hi << 4) - 32);
    }
  }
}

// q2_K: 16 groups of 16, value = (d*(sc&15)) * q - (dmin*(sc>>4)), q 2 bits.
void dq_q2_k(const void* src, float* dst, int64_t n) {
  const BlockQ2_K* b = static_cast<const BlockQ2_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d), dmin = fp16_to_f32(b[i].dmin);
    for (int e = 0; e < kQK_K; ++e) {
      const int half = e / 128, r = e % 128, s = r / 32, l = r % 32;
      const int q = (b[i].qs[32 * half + l] >> (2 * s)) & 3;
      const uint8_t sc = b[i].scales[e / 16];
      const float dl = d * static_cast<float>(sc & 0xF), ml = dmin * static_cast<float>(sc >> 4);
      dst[e] = dl * static_cast<float>(q) - ml;
    }
  }
}

// Signed 6-bit scale j (0..15) of a q3_K block.
static inline int q3k_scale(const uint8_t* s, int j) {
  const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (lo | hi << 4) - 32;
}

// q3_K: 16 groups of 16, value = (d*scale) * (q - 4*(1 - hbit)), q 2 low bits.
void dq_q3_k(const void* src, float* dst, int64_t n) {
  const BlockQ3_K* b = static_cast<const BlockQ3_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d);
    for (int e = 0; e < kQK_K; ++e) {
      const int half = e / 128, r = e % 128, s = r / 32, l = r % 32;
      const int q = (b[i].qs[32 * half + l] >> (2 * s)) & 3;
      const int h = (b[i].hmask[e % 32] >> (e / 32)) & 1;
      const float dl = d * static_cast<float>(q3k_scale(b[i].scales, e / 16));
      dst[e] = dl * static_cast<float>(q - (h ? 0 : 4));
    }
  }
}

// iq4_xs: 8 sub-blocks of 32, value = (d*(scale-32)) * kIQ4NL[q].
void dq_iq4_xs(const void* src, float* dst, int64_t n) {
  const BlockIQ4_XS* b = static_cast<const BlockIQ4_XS*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d);
    for (int j = 0; j < 8; ++j) {
      const int ls = ((b[i].scales_l[j / 2] >> (4 * (j % 2))) & 0xF) | (((b[i].scales_h >> (2 * j)) & 3) << 4);
      const float dl = d * static_cast<float>(ls - 32);
      for (int l = 0; l < 16; ++l) {
        const uint8_t q = b[i].qs[16 * j + l];
        dst[32 * j + l] = dl * static_cast<float>(kIQ4NL[q & 0xF]);
        dst[32 * j + l + 16] = dl * static_cast<float>(kIQ4NL[q >> 4]);
      }
    }
  }
}

void dq_q8_k(const void* src, float* dst, int64_t n) {
  const BlockQ8_K* b = static_cast<const BlockQ8_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K)
    for (int j = 0; j < kQK_K; ++j) dst[j] = static_cast<float>(b[i].qs[j]) * b[i].d;
}

#define KT_REG(t) \
  RegisterKernel<DequantizeRowFn> reg_dq_##t(k_dequantize_row[qi(QType::t)], Isa::generic, dq_##t);
KT_REG(f32) KT_REG(f16) KT_REG(bf16) KT_REG(q8_0) KT_REG(q4_0) KT_REG(q5_0) KT_REG(q4_k) KT_REG(q5_k)
KT_REG(q6_k) KT_REG(q2_k) KT_REG(q3_k) KT_REG(iq4_xs) KT_REG(q8_k)
#undef KT_REG

}  // namespace
}  // namespace ktrans
