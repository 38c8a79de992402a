// Scalar reference dot products: one weight row (any format) with one activation row already
// quantized to the weight's vec_dot_type (q8_0 for the 32-value formats, q8_K for the K-quants,
// f32 for f32/f16/bf16). The test oracle of the AVX2 / AVX-512 versions.
//
// Integer parts are exact: per block, sum_j scale_j * sum_l q_l * a_l in int32 (bounded by
// 127 * 256 * 127 * 63 < 2^31), then one float multiply by the two fp16/f32 block scales.
// K-quant mins use the activation block's 16-value sums (bsums): sum_l (q_l*sc - m) * a_l =
// sc * sum_l q_l*a_l - m * sum_l a_l.
#include <cstring>

#include "common/numeric.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

float dot_f32(int64_t n, const void* w, const void* a) {
  const float* x = static_cast<const float*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

float dot_f16(int64_t n, const void* w, const void* a) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += fp16_to_f32(x[i]) * y[i];
  return s;
}

float dot_bf16(int64_t n, const void* w, const void* a) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += bf16_to_f32(x[i]) * y[i];
  return s;
}

// 32-value formats against q8_0: levels() writes the signed levels of one weight block.
template <class Block, void (*levels)(const Block&, int*)>
float dot_q32(int64_t n, const void* w, const void* a) {
  const Block* x = static_cast<const Block*>(w);
  const BlockQ8_0* y = static_cast<const BlockQ8_0*>(a);
  float s = 0.0f;
  int q[kQK];
  for (int64_t i = 0; i < n / kQK; ++i) {
    levels(x[i], q);
    int sumi = 0;
    for (int l = 0; l < kQK; ++l) sumi += q[l] * y[i].qs[l];
    s += static_cast<float>(sumi) * (fp16_to_f32(x[i].d) * fp16_to_f32(y[i].d));
  }
  return s;
}

void levels_q8_0(const BlockQ8_0& b, int* q) {
  for (int l = 0; l < kQK; ++l) q[l] = b.qs[l];
}

void levels_q4_0(const BlockQ4_0& b, int* q) {
  for (int l = 0; l < kQK / 2; ++l) {
    q[l] = (b.qs[l] & 0xF) - 8;
    q[l + kQK / 2] = (b.qs[l] >> 4) - 8;
  }
}

void levels_q5_0(const BlockQ5_0& b, int* q) {
  uint32_t qh;
  std::memcpy(&qh, b.qh, 4);
  for (int l = 0; l < kQK / 2; ++l) {
    q[l] = ((b.qs[l] & 0xF) | ((qh >> l) & 1) << 4) - 16;
    q[l + kQK / 2] = ((b.qs[l] >> 4) | ((qh >> (l + 16)) & 1) << 4) - 16;
  }
}

// One K-quant super-block decoded to integers: value_e = d * sc[g] * q[e] - dmin * m[g], with
// groups of `group` values (g = e / group).
struct KLevels {
  int q[kQK_K];
  int sc[16];
  int m[16];
  int group;
  float d, dmin;
};

// sum_e value_e * a_e for one super-block, with a = dx * qs and group sums from bsums.
float dot_klevels(const KLevels& k, const BlockQ8_K& y) {
  int sumi = 0, summ = 0;
  const int ngroups = kQK_K / k.group;
  for (int g = 0; g < ngroups; ++g) {
    int s = 0, asum = 0;
    for (int l = g * k.group; l < (g + 1) * k.group; ++l) s += k.q[l] * y.qs[l];
    for (int b = g * k.group / 16; b < (g + 1) * k.group / 16; ++b) asum += y.bsums[b];
    sumi += k.sc[g] * s;
    summ += k.m[g] * asum;
  }
  return k.d * y.d * static_cast<float>(sumi) - k.dmin * y.d * static_cast<float>(summ);
}

void klevels_q4_k(const BlockQ4_K& b, KLevels* k) {
  k->group = 32;
  k->d = fp16_to_f32(b.d);
  k->dmin = fp16_to_f32(b.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    unpack_scale_min_k4(j, b.scales, &sc, &m);
    k->sc[j] = sc;
    k->m[j] = m;
    for (int l = 0; l < 32; ++l) k->q[32 * j + l] = (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
  }
}

void klevels_q5_k(const BlockQ5_K& b, KLevels* k) {
  k->group = 32;
  k->d = fp16_to_f32(b.d);
  k->dmin = fp16_to_f32(b.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    unpack_scale_min_k4(j, b.scales, &sc, &m);
    k->sc[j] = sc;
    k->m[j] = m;
    for (int l = 0; l < 32; ++l)
      k->q[32 * j + l] = ((b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF) | ((b.qh[l] >> j) & 1) << 4;
  }
}

void klevels_q6_k(const BlockQ6_K& b, KLevels* k) {
  k->group = 16;
  k->d = fp16_to_f32(b.d);
  k->dmin = 0.0f;
  for (int e = 0; e < kQK_K; ++e) {
    const int h = e / 128, s = (e % 128) / 32, l = e % 32;
    const int lo = (b.ql[64 * h + l + 32 * (s % 2)] >> (4 * (s / 2))) & 0xF;
    const int hi = (b.qh[32 * h + l] >> (2 * s)) & 3;
    k->q[e] = (lo | hi << 4) - 32;
  }
  for (int g = 0; g < 16; ++g) {
    k->sc[g] = b.scales[g];
    k->m[g] = 0;
  }
}

void klevels_q2_k(const BlockQ2_K& b, KLevels* k) {
  k->group = 16;
  k->d = fp16_to_f32(b.d);
  k->dmin = fp16_to_f32(b.dmin);
  for (int e = 0; e < kQK_K; ++e) k->q[e] = (b.qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
  for (int g = 0; g < 16; ++g) {
    k->sc[g] = b.scales[g] & 0xF;
    k->m[g] = b.scales[g] >> 4;
  }
}

void klevels_q3_k(const BlockQ3_K& b, KLevels* k) {
  k->group = 16;
  k->d = fp16_to_f32(b.d);
  k->dmin = 0.0f;
  for (int e = 0; e < kQK_K; ++e) {
    const int q = (b.qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    k->q[e] = q - (((b.hmask[e % 32] >> (e / 32)) & 1) ? 0 : 4);
  }
  for (int g = 0; g < 16; ++g) {
    const int lo = g < 8 ? (b.scales[g] & 0xF) : (b.scales[g - 8] >> 4);
    k->sc[g] = (lo | ((b.scales[8 + g % 4] >> (2 * (g / 4))) & 3) << 4) - 32;
    k->m[g] = 0;
  }
}

void klevels_iq4_xs(const BlockIQ4_XS& b, KLevels* k) {
  k->group = 32;
  k->d = fp16_to_f32(b.d);
  k->dmin = 0.0f;
  for (int j = 0; j < 8; ++j) {
    k->sc[j] = (((b.scales_l[j / 2] >> (4 * (j % 2))) & 0xF) | ((b.scales_h >> (2 * j)) & 3) << 4) - 32;
    k->m[j] = 0;
    for (int l = 0; l < 16; ++l) {
      k->q[32 * j + l] = kIQ4NL[b.qs[16 * j + l] & 0xF];
      k->q[32 * j + l + 16] = kIQ4NL[b.qs[16 * j + l] >> 4];
    }
  }
}

template <class Block, void (*decode)(const Block&, KLevels*)>
float dot_k(int64_t n, const void* w, const void* a) {
  const Block* x = static_cast<const Block*>(w);
  const BlockQ8_K* y = static_cast<const BlockQ8_K*>(a);
  KLevels k;
  float s = 0.0f;
  for (int64_t i = 0; i < n / kQK_K; ++i) {
    decode(x[i], &k);
    s += dot_klevels(k, y[i]);
  }
  return s;
}

RegisterKernel<VecDotFn> reg_f32(k_vec_dot[qi(QType::f32)], Isa::generic, dot_f32);
RegisterKernel<VecDotFn> reg_f16(k_vec_dot[qi(QType::f16)], Isa::generic, dot_f16);
RegisterKernel<VecDotFn> reg_bf16(k_vec_dot[qi(QType::bf16)], Isa::generic, dot_bf16);
RegisterKernel<VecDotFn> reg_q8_0(k_vec_dot[qi(QType::q8_0)], Isa::generic, dot_q32<BlockQ8_0, levels_q8_0>);
RegisterKernel<VecDotFn> reg_q4_0(k_vec_dot[qi(QType::q4_0)], Isa::generic, dot_q32<BlockQ4_0, levels_q4_0>);
RegisterKernel<VecDotFn> reg_q5_0(k_vec_dot[qi(QType::q5_0)], Isa::generic, dot_q32<BlockQ5_0, levels_q5_0>);
RegisterKernel<VecDotFn> reg_q4_k(k_vec_dot[qi(QType::q4_k)], Isa::generic, dot_k<BlockQ4_K, klevels_q4_k>);
RegisterKernel<VecDotFn> reg_q5_k(k_vec_dot[qi(QType::q5_k)], Isa::generic, dot_k<BlockQ5_K, klevels_q5_k>);
RegisterKernel<VecDotFn> reg_q6_k(k_vec_dot[qi(QType::q6_k)], Isa::generic, dot_k<BlockQ6_K, klevels_q6_k>);
RegisterKernel<VecDotFn> reg_q2_k(k_vec_dot[qi(QType::q2_k)], Isa::generic, dot_k<BlockQ2_K, klevels_q2_k>);
RegisterKernel<VecDotFn> reg_q3_k(k_vec_dot[qi(QType::q3_k)], Isa::generic, dot_k<BlockQ3_K, klevels_q3_k>);
RegisterKernel<VecDotFn> reg_iq4_xs(k_vec_dot[qi(QType::iq4_xs)], Isa::generic, dot_k<BlockIQ4_XS, klevels_iq4_xs>);

}  // namespace
}  // namespace ktrans
