// Generic scalar reference of packed_gemm for every format: the test oracle and the fallback on a
// plain x86-64. Reads the packed layout element by element (packed/layout.h).
//
// bf16: f32 products of the bf16 inputs, summed in f32 in k order.
// int8: activations quantized per row (packed/layout.h), exact int32 dot, y = dot * sw[n] * sx[m].
// int4: same activations; exact int32 dot per 32-group, y = sx[m] * sum_g dot_g * s[n, g].
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numeric.h"
#include "packed/layout.h"

namespace ktrans {
namespace {

using namespace packed;

inline void store(float* y, float v, bool accumulate) { *y = accumulate ? *y + v : v; }

// x row -> int8 q and its scale (the definition every ISA's quantizer reproduces).
float quantize_row_ref(const uint16_t* x, int64_t K, int8_t* q) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(bf16_to_f32(x[k])));
  const float inv = act_inv_scale(amax);
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(bf16_to_f32(x[k]) * inv));
  return act_scale(amax);
}

void gemm_bf16_ref(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                   float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::bf16, K));
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* panel = packed + n / kPanelCols * pb;
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        uint16_t w;
        std::memcpy(&w, panel + bf16_offset(n % kPanelCols, k), 2);
        s += bf16_to_f32(x[m * ldx + k]) * bf16_to_f32(w);
      }
      store(y + m * ldy + n, s, accumulate);
    }
  }
}

void gemm_int8_ref(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                   float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::int8, K));
  std::vector<int8_t> q(K);
  for (int64_t m = 0; m < M; ++m) {
    const float sx = quantize_row_ref(x + m * ldx, K, q.data());
    for (int64_t n = n_begin; n < n_end; ++n) {
      const uint8_t* panel = packed + n / kPanelCols * pb;
      const int64_t c = n % kPanelCols;
      int32_t dot = 0;
      for (int64_t k = 0; k < K; ++k) dot += q[k] * static_cast<int8_t>(panel[int8_offset(c, k)]);
      float sw;
      std::memcpy(&sw, panel + int8_data_bytes(K) + c * 4, 4);
      store(y + m * ldy + n, static_cast<float>(dot) * sw * sx, accumulate);
    }
  }
}

void gemm_int4_ref(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                   float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::int4, K));
  std::vector<int8_t> q(K);
  for (int64_t m = 0; m < M; ++m) {
    const float sx = quantize_row_ref(x + m * ldx, K, q.data());
    for (int64_t n = n_begin; n < n_end; ++n) {
      const uint8_t* panel = packed + n / kPanelCols * pb;
      const int64_t c = n % kPanelCols;
      float acc = 0.f;
      for (int64_t g = 0; g < K / kInt4Group; ++g) {
        int32_t dot = 0;
        for (int64_t i = 0; i < kInt4Group; ++i) {
          const int64_t k = g * kInt4Group + i;
          bool high;
          const uint8_t b = panel[int4_offset(c, k, &high)];
          dot += q[k] * ((high ? b >> 4 : b & 0x0f) - 8);
        }
        uint16_t sbits;
        std::memcpy(&sbits, panel + int4_data_bytes(K) + (g * kPanelCols + c) * 2, 2);
        acc += static_cast<float>(dot) * bf16_to_f32(sbits);
      }
      store(y + m * ldy + n, acc * sx, accumulate);
    }
  }
}

}  // namespace

Kernel<PackedGemmFn> k_packed_gemm_bf16{"packed_gemm_bf16", {gemm_bf16_ref, nullptr, nullptr, nullptr}};
Kernel<PackedGemmFn> k_packed_gemm_int8{"packed_gemm_int8", {gemm_int8_ref, nullptr, nullptr, nullptr}};
Kernel<PackedGemmFn> k_packed_gemm_int4{"packed_gemm_int4", {gemm_int4_ref, nullptr, nullptr, nullptr}};

}  // namespace ktrans
