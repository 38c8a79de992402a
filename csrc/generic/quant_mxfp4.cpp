// Scalar reference kernels of mxfp4 (block 32, 17 bytes: an E8M0 exponent byte e, then 16 bytes of
// E2M1 codes, element j in the low nibble of qs[j] and element j+16 in the high nibble):
//   value_j = kMXFP4[code_j] * 2^(e - 128)    (kMXFP4 = the E2M1 values doubled, quant.h)
//
// dequantize: one float32 multiply per value, bit-identical to gguf-py's MXFP4.dequantize_blocks.
// quantize:   llama.cpp's quantize_row_mxfp4_ref operation for operation: e = floor(log2(amax))
//             - 2 + 127 (the largest magnitude lands in [4, 8) * 2^(e-128), inside the code range
//             of +-12), then each value's nearest code (first index on ties).
// vec_dot:    against q8_0 activations, as ggml_vec_dot_mxfp4_q8_0: per block the exact integer
//             sum of code * activation level (|sum| <= 12 * 127 * 32), times
//             fp16(d_a) * 2^(e - 128) in one float multiply.
#include <algorithm>
#include <cmath>

#include "common/numeric.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

void dq_mxfp4(const void* src, float* dst, int64_t n) {
  const BlockMXFP4* b = static_cast<const BlockMXFP4*>(src);
  for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
    const float d = e8m0_to_fp32_half(b[i].e);
    for (int j = 0; j < kQK / 2; ++j) {
      dst[j] = d * static_cast<float>(kMXFP4[b[i].qs[j] & 0xF]);
      dst[j + kQK / 2] = d * static_cast<float>(kMXFP4[b[i].qs[j] >> 4]);
    }
  }
}

int nearest_code(float x, float d) {
  int best = 0;
  float best_err = std::fabs(kMXFP4[0] * d - x);
  for (int c = 1; c < 16; ++c) {
    const float err = std::fabs(kMXFP4[c] * d - x);
    if (err < best_err) {
      best = c;
      best_err = err;
    }
  }
  return best;
}

void q_mxfp4(const float* x, void* dst, int64_t n) {
  BlockMXFP4* y = static_cast<BlockMXFP4*>(dst);
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
    // NOTE: float -> uint8 as llama.cpp's cast; weights far outside 2^+-125 are not representable.
    const uint8_t e = amax > 0.0f ? static_cast<uint8_t>(std::floor(std::log2(amax)) - 2 + 127) : 0;
    const float d = e8m0_to_fp32_half(e);
    y[i].e = e;
    for (int j = 0; j < kQK / 2; ++j)
      y[i].qs[j] = static_cast<uint8_t>(nearest_code(x[j], d) | nearest_code(x[j + kQK / 2], d) << 4);
  }
}

float dot_mxfp4(int64_t n, const void* w, const void* a) {
  const BlockMXFP4* x = static_cast<const BlockMXFP4*>(w);
  const BlockQ8_0* y = static_cast<const BlockQ8_0*>(a);
  float s = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    int sumi = 0;
    for (int j = 0; j < kQK / 2; ++j)
      sumi += kMXFP4[x[i].qs[j] & 0xF] * y[i].qs[j] + kMXFP4[x[i].qs[j] >> 4] * y[i].qs[j + kQK / 2];
    s += fp16_to_f32(y[i].d) * e8m0_to_fp32_half(x[i].e) * static_cast<float>(sumi);
  }
  return s;
}

RegisterKernel<DequantizeRowFn> reg_dq(k_dequantize_row[qi(QType::mxfp4)], Isa::generic, dq_mxfp4);
RegisterKernel<QuantizeRowFn> reg_q(k_quantize_row[qi(QType::mxfp4)], Isa::generic, q_mxfp4);
RegisterKernel<VecDotFn> reg_dot(k_vec_dot[qi(QType::mxfp4)], Isa::generic, dot_mxfp4);

}  // namespace
}  // namespace ktrans
