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
// Loops run over (half h, slice s, l) so the inner loop reads contiguous bytes.
void dq_q6_k(const void* src, float* dst, int64_t n) {
  const BlockQ6_K* b = static_cast<const BlockQ6_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s) {
        const uint8_t* ql = b[i].ql + 64 * h + 32 * (s % 2);
        const uint8_t* qh = b[i].qh + 32 * h;
        float* out = dst + 128 * h + 32 * s;
        for (int g = 0; g < 2; ++g) {
          const float dl = d * static_cast<float>(b[i].scales[8 * h + 2 * s + g]);
          for (int l = 16 * g; l < 16 * g + 16; ++l) {
            const int q = ((ql[l] >> (4 * (s / 2))) & 0xF) | ((qh[l] >> (2 * s)) & 3) << 4;
            out[l] = dl * static_cast<float>(q - 32);
          }
        }
      }
  }
}

// q2_K: 16 groups of 16, value = (d*(sc&15)) * q - (dmin*(sc>>4)), q 2 bits.
void dq_q2_k(const void* src, float* dst, int64_t n) {
  const BlockQ2_K* b = static_cast<const BlockQ2_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d), dmin = fp16_to_f32(b[i].dmin);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int g = 0; g < 2; ++g) {
          const uint8_t sc = b[i].scales[8 * h + 2 * s + g];
          const float dl = d * static_cast<float>(sc & 0xF), ml = dmin * static_cast<float>(sc >> 4);
          const uint8_t* qs = b[i].qs + 32 * h;
          float* out = dst + 128 * h + 32 * s;
          for (int l = 16 * g; l < 16 * g + 16; ++l) out[l] = dl * static_cast<float>((qs[l] >> (2 * s)) & 3) - ml;
        }
  }
}

// Signed 6-bit scale j (0..15) of a q3_K block.
static inline int q3k_scale(const uint8_t* s, int j) {
  const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (lo | hi << 4) - 32;
}

// q3_K: 16 groups of 16, value = (d*scale) * (q - 4*(1 - hbit)), q 2 low bits; the hmask bit of
// value 32*k + l is bit k of hmask[l].
void dq_q3_k(const void* src, float* dst, int64_t n) {
  const BlockQ3_K* b = static_cast<const BlockQ3_K*>(src);
  for (int64_t i = 0; i < n / kQK_K; ++i, dst += kQK_K) {
    const float d = fp16_to_f32(b[i].d);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int g = 0; g < 2; ++g) {
          const float dl = d * static_cast<float>(q3k_scale(b[i].scales, 8 * h + 2 * s + g));
          const uint8_t* qs = b[i].qs + 32 * h;
          const int k = 4 * h + s;
          float* out = dst + 32 * k;
          for (int l = 16 * g; l < 16 * g + 16; ++l) {
            const int q = ((qs[l] >> (2 * s)) & 3) - (((b[i].hmask[l] >> k) & 1) ? 0 : 4);
            out[l] = dl * static_cast<float>(q);
          }
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
