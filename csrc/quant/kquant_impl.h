// Shared scalar steps of the K-quant and iq4_xs quantizers, used by the generic reference and the AVX2
// quantizer (which vectorises only the per-sub-block scale/min search): quantizing the 8
// sub-block scales and mins to 6 bits, re-rounding every value against its final scale, and
// packing levels into the block layout. static inline: each file keeps a baseline-ISA copy.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/numeric.h"
#include "quant/quant.h"

namespace ktrans {

constexpr float kKQuantGroupEps = 1e-15f;  // a group whose largest |x| is below this is all zeros

static inline int kq_nearest_int(float v) { return static_cast<int>(std::lrintf(v)); }
static inline int kq_clamp(int v, int lo, int hi) { return std::min(hi, std::max(lo, v)); }

// Packs 8 6-bit scales and mins in the q4_K / q5_K layout (inverse of unpack_scale_min_k4).
static inline void kq_pack_scale_min(const uint8_t* ls, const uint8_t* lm, uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = ls[j] | static_cast<uint8_t>((ls[j + 4] >> 4) << 6);
    q[j + 4] = lm[j] | static_cast<uint8_t>((lm[j + 4] >> 4) << 6);
    q[j + 8] = (ls[j + 4] & 0xF) | static_cast<uint8_t>((lm[j + 4] & 0xF) << 4);
  }
}

// From the fitted sub-block scales sc[8] and mins mn[8] (as -min): writes the 6-bit scales, d and
// dmin, and returns in dl[8] / ml[8] the scale and min each sub-block really decodes with.
static inline void kq_k45_scales(const float* sc, const float* mn, uint8_t* scales, uint16_t* d16, uint16_t* dmin16,
                                 float* dl, float* ml) {
  float max_sc = 0.0f, max_mn = 0.0f;
  for (int j = 0; j < 8; ++j) {
    max_sc = std::max(max_sc, sc[j]);
    max_mn = std::max(max_mn, mn[j]);
  }
  const float inv_sc = max_sc > 0.0f ? 63.0f / max_sc : 0.0f, inv_mn = max_mn > 0.0f ? 63.0f / max_mn : 0.0f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    ls[j] = static_cast<uint8_t>(std::min(63, kq_nearest_int(inv_sc * sc[j])));
    lm[j] = static_cast<uint8_t>(std::min(63, kq_nearest_int(inv_mn * mn[j])));
  }
  kq_pack_scale_min(ls, lm, scales);
  *d16 = f32_to_fp16(max_sc / 63.0f);
  *dmin16 = f32_to_fp16(max_mn / 63.0f);
  const float d = fp16_to_f32(*d16), dmin = fp16_to_f32(*dmin16);
  for (int j = 0; j < 8; ++j) {
    dl[j] = d * ls[j];
    ml[j] = dmin * lm[j];
  }
}

// Re-rounds every value against the scale and min it will decode with; a sub-block with scale 0
// keeps the fit's levels (every level decodes to -ml there).
static inline void kq_finish_k45(const float* x, const float* sc, const float* mn, int nmax, uint8_t* scales,
                                 uint16_t* d16, uint16_t* dmin16, uint8_t* L) {
  float dl[8], ml[8];
  kq_k45_scales(sc, mn, scales, d16, dmin16, dl, ml);
  for (int j = 0; j < 8; ++j) {
    if (dl[j] == 0.0f) continue;
    for (int l = 0; l < 32; ++l)
      L[32 * j + l] = static_cast<uint8_t>(kq_clamp(kq_nearest_int((x[32 * j + l] + ml[j]) / dl[j]), 0, nmax));
  }
}

// Levels 0..15 of 256 values -> q4_K qs: per 64 values, 32 bytes (low nibble first 32).
static inline void kq_pack_q4_k(const uint8_t* L, BlockQ4_K* y) {
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) y->qs[32 * c + l] = L[64 * c + l] | L[64 * c + 32 + l] << 4;
}

// Levels 0..31 -> q5_K qs (low 4 bits) + qh (bit 4 of value 32*j + l at bit j of qh[l]).
static inline void kq_pack_q5_k(const uint8_t* L, BlockQ5_K* y) {
  std::memset(y->qh, 0, sizeof(y->qh));
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 32; ++l) y->qh[l] |= static_cast<uint8_t>((L[32 * j + l] >> 4) << j);
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) y->qs[32 * c + l] = (L[64 * c + l] & 0xF) | (L[64 * c + 32 + l] & 0xF) << 4;
}

// q6_K from the 16 fitted group scales sc[16] and the fit's levels L (l + 32): quantizes the
// scales to int8 against an fp16 super-scale, re-rounds the values, packs ql / qh.
static inline void kq_finish_q6_k(const float* x, const float* sc, uint8_t* L, BlockQ6_K* y) {
  float max_abs = 0.0f, max_sc = 0.0f;
  for (int g = 0; g < 16; ++g) {
    if (std::fabs(sc[g]) > max_abs) {
      max_abs = std::fabs(sc[g]);
      max_sc = sc[g];
    }
  }
  if (max_abs < kKQuantGroupEps) {
    std::memset(y, 0, sizeof(BlockQ6_K));
    return;
  }
  const float iscale = -128.0f / max_sc;
  y->d = f32_to_fp16(1.0f / iscale);
  const float d = fp16_to_f32(y->d);
  for (int g = 0; g < 16; ++g) {
    y->scales[g] = static_cast<int8_t>(std::min(127, kq_nearest_int(iscale * sc[g])));
    const float dl = d * y->scales[g];
    if (dl == 0.0f) continue;
    for (int l = 16 * g; l < 16 * g + 16; ++l)
      L[l] = static_cast<uint8_t>(kq_clamp(kq_nearest_int(x[l] / dl), -32, 31) + 32);
  }
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* v = L + 128 * h + l;
      y->ql[64 * h + l] = (v[0] & 0xF) | (v[64] & 0xF) << 4;
      y->ql[64 * h + l + 32] = (v[32] & 0xF) | (v[96] & 0xF) << 4;
      y->qh[32 * h + l] = (v[0] >> 4) | (v[32] >> 4) << 2 | (v[64] >> 4) << 4 | (v[96] >> 4) << 6;
    }
}

// Packs 256 2-bit values: byte 32*half + l holds values 128*half + 32*s + l at bits 2s.
static inline void kq_pack_2bit(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* v = L + 128 * h + l;
      qs[32 * h + l] = (v[0] & 3) | (v[32] & 3) << 2 | (v[64] & 3) << 4 | (v[96] & 3) << 6;
    }
}

// q2_K from the 16 fitted group scales sc[16], mins mn[16] (as -min) and the fit's levels L:
// 4-bit scales and mins against fp16 d / dmin, re-rounded levels, packed.
static inline void kq_finish_q2_k(const float* x, const float* sc, const float* mn, uint8_t* L, BlockQ2_K* y) {
  float max_sc = 0.0f, max_mn = 0.0f;
  for (int g = 0; g < 16; ++g) {
    max_sc = std::max(max_sc, sc[g]);
    max_mn = std::max(max_mn, mn[g]);
  }
  const float inv_sc = max_sc > 0.0f ? 15.0f / max_sc : 0.0f, inv_mn = max_mn > 0.0f ? 15.0f / max_mn : 0.0f;
  for (int g = 0; g < 16; ++g)
    y->scales[g] = static_cast<uint8_t>(std::min(15, kq_nearest_int(inv_sc * sc[g])) |
                                        std::min(15, kq_nearest_int(inv_mn * mn[g])) << 4);
  y->d = f32_to_fp16(max_sc / 15.0f);
  y->dmin = f32_to_fp16(max_mn / 15.0f);
  const float d = fp16_to_f32(y->d), dmin = fp16_to_f32(y->dmin);
  for (int g = 0; g < 16; ++g) {
    const float dl = d * (y->scales[g] & 0xF), ml = dmin * (y->scales[g] >> 4);
    if (dl == 0.0f) continue;
    for (int l = 16 * g; l < 16 * g + 16; ++l)
      L[l] = static_cast<uint8_t>(kq_clamp(kq_nearest_int((x[l] + ml) / dl), 0, 3));
  }
  kq_pack_2bit(L, y->qs);
}

// q3_K from the 16 fitted group scales sc[16] and the fit's levels L (l + 4): signed 6-bit
// scales against d = -max/32 (fp16), re-rounded levels, hmask bit 2 and packed low 2 bits.
static inline void kq_finish_q3_k(const float* x, const float* sc, uint8_t* L, BlockQ3_K* y) {
  float max_abs = 0.0f, max_sc = 0.0f;
  for (int g = 0; g < 16; ++g) {
    if (std::fabs(sc[g]) > max_abs) {
      max_abs = std::fabs(sc[g]);
      max_sc = sc[g];
    }
  }
  std::memset(y->scales, 0, sizeof(y->scales));
  int ls[16] = {};
  y->d = 0;
  if (max_sc != 0.0f) {
    const float iscale = -32.0f / max_sc;
    for (int g = 0; g < 16; ++g) {
      ls[g] = kq_clamp(kq_nearest_int(iscale * sc[g]), -32, 31);
      const int u = ls[g] + 32;
      y->scales[g % 8] |= static_cast<uint8_t>((u & 0xF) << (4 * (g / 8)));
      y->scales[8 + g % 4] |= static_cast<uint8_t>((u >> 4) << (2 * (g / 4)));
    }
    y->d = f32_to_fp16(1.0f / iscale);
  }
  const float d = fp16_to_f32(y->d);
  for (int g = 0; g < 16; ++g) {
    const float dl = d * ls[g];
    if (dl == 0.0f) continue;
    for (int l = 16 * g; l < 16 * g + 16; ++l)
      L[l] = static_cast<uint8_t>(kq_clamp(kq_nearest_int(x[l] / dl), -4, 3) + 4);
  }
  std::memset(y->hmask, 0, sizeof(y->hmask));
  for (int e = 0; e < kQK_K; ++e) {
    if (L[e] > 3) {
      y->hmask[e % 32] |= static_cast<uint8_t>(1 << (e / 32));
      L[e] -= 4;
    }
  }
  kq_pack_2bit(L, y->qs);
}

// Midpoints between consecutive kIQ4NL entries: the nearest entry to v is the number of
// midpoints v reaches (ties go to the larger entry). Branch-free, so loops vectorise.
constexpr float kIQ4Mid[15] = {-115.5f, -93.5f, -74.0f, -57.0f, -42.0f, -28.5f, -16.0f, -4.5f,
                               7.0f,    19.0f,  31.5f,  45.5f,  61.0f,  79.0f,  101.0f};
constexpr bool kq_iq4_midpoints_ok() {
  for (int k = 0; k < 15; ++k)
    if (kIQ4NL[k] + kIQ4NL[k + 1] != 2.0f * kIQ4Mid[k]) return false;
  return true;
}
static_assert(kq_iq4_midpoints_ok(), "kIQ4Mid must hold the midpoints of kIQ4NL");

static inline int kq_iq4_nearest_code(float v) {
  int idx = 0;
  for (int k = 0; k < 15; ++k) idx += v >= kIQ4Mid[k];
  return idx;
}

// iq4_xs from the 8 fitted sub-block scales: 6-bit scales against d = -max/32 (fp16), then every
// value's nearest codebook entry under its final scale.
static inline void kq_finish_iq4_xs(const float* x, const float* sc, BlockIQ4_XS* y) {
  float amax = 0.0f, max_sc = 0.0f;
  for (int j = 0; j < 8; ++j) {
    if (std::fabs(sc[j]) > amax) {
      amax = std::fabs(sc[j]);
      max_sc = sc[j];
    }
  }
  std::memset(y, 0, sizeof(BlockIQ4_XS));
  if (amax < kKQuantGroupEps) return;  // all-zero block: d = 0
  const float d = -max_sc / 32.0f, id = 1.0f / d;
  y->d = f32_to_fp16(d);
  const float dq = fp16_to_f32(y->d);
  uint8_t L[32];
  for (int j = 0; j < 8; ++j) {
    const int ls = kq_clamp(kq_nearest_int(id * sc[j]), -32, 31);
    y->scales_l[j / 2] |= static_cast<uint8_t>(((ls + 32) & 0xF) << (4 * (j % 2)));
    y->scales_h |= static_cast<uint16_t>(((ls + 32) >> 4) << (2 * j));
    const float dl = dq * ls, idl = dl != 0.0f ? 1.0f / dl : 0.0f;
    for (int l = 0; l < 32; ++l) L[l] = static_cast<uint8_t>(kq_iq4_nearest_code(idl * x[32 * j + l]));
    for (int l = 0; l < 16; ++l) y->qs[16 * j + l] = L[l] | L[l + 16] << 4;
  }
}

}  // namespace ktrans
