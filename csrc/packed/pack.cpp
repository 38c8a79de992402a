// Packed formats: names, shape rules, sizes, the per-row packer (f32 row -> panel column, with
// int8 / int4 quantization) and the inverse (unpack), plus the f32 and bf16 sources.
//
// NOTE (quantization): int8 is symmetric per output channel, q = round(w * 127 / amax) in
// [-127, 127], scale = amax / 127 (f32). int4 is symmetric per 32-value group along K with a
// signed bf16 scale (quantize_group_int4); q = clamp(round(w / scale), -8, 7) always uses the
// scale as rounded to bf16, so what is stored is exactly what the kernels multiply by.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/numeric.h"
#include "packed/pack_impl.h"

namespace ktrans {

using namespace packed;

const char* packed_format_name(PackedFormat f) {
  switch (f) {
    case PackedFormat::bf16: return "bf16";
    case PackedFormat::int8: return "int8";
    case PackedFormat::int4: return "int4";
  }
  return "unknown";
}

PackedFormat parse_packed_format(const std::string& name) {
  for (PackedFormat f : {PackedFormat::bf16, PackedFormat::int8, PackedFormat::int4})
    if (name == packed_format_name(f)) return f;
  throw std::invalid_argument("unknown packed format '" + name + "'; expected one of: bf16, int8, int4");
}

void check_packed_shape(PackedFormat f, int64_t N, int64_t K) {
  // NOTE: the int32 sums of the int8 paths (u8 x s8 products up to 255 * 127) stay exact for
  // K <= 65536; no model comes near it.
  if (N <= 0 || K <= 0 || K % kPackKAlign != 0 || K > 65536)
    throw std::invalid_argument(std::string("packed ") + packed_format_name(f) + " weights need N > 0 and "
                                "0 < K <= 65536 with K a multiple of 32; got N=" + std::to_string(N) +
                                ", K=" + std::to_string(K));
}

size_t packed_panel_bytes(PackedFormat f, int64_t K) {
  switch (f) {
    case PackedFormat::bf16: return static_cast<size_t>(kPanelCols * K * 2);
    case PackedFormat::int8: return static_cast<size_t>(int8_data_bytes(K) + 2 * kLine);
    case PackedFormat::int4: return static_cast<size_t>(int4_data_bytes(K) + int4_scale_bytes(K));
  }
  return 0;
}

size_t packed_bytes(PackedFormat f, int64_t N, int64_t K) {
  check_packed_shape(f, N, K);
  return static_cast<size_t>(num_panels(N)) * packed_panel_bytes(f, K);
}

namespace packed {

void check_pack_range(PackedFormat f, int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  check_packed_shape(f, N, K);
  if (n_begin < 0 || n_begin > n_end || n_end > N)
    throw std::invalid_argument("packed row range [" + std::to_string(n_begin) + ", " + std::to_string(n_end) +
                                ") is not inside [0, N=" + std::to_string(N) + ")");
}

namespace {

void pack_row_bf16(const float* row, int64_t K, uint8_t* panel, int64_t c) {
  for (int64_t k = 0; k < K; ++k) {
    uint16_t v = row ? f32_to_bf16(row[k]) : 0;
    std::memcpy(panel + bf16_offset(c, k), &v, 2);
  }
}

void pack_row_int8(const float* row, int64_t K, uint8_t* panel, int64_t c) {
  float amax = 0.f;
  for (int64_t k = 0; row && k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
  const float inv = amax > 0.f ? 127.0f / amax : 0.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < int8_kpad(K); ++k) {
    int32_t q = (row && k < K) ? static_cast<int32_t>(std::nearbyint(row[k] * inv)) : 0;
    q = std::min(127, std::max(-127, q));
    sum += q;
    panel[int8_offset(c, k)] = static_cast<uint8_t>(static_cast<int8_t>(q));
  }
  const float scale = amax / 127.0f;
  uint8_t* meta = panel + int8_data_bytes(K);
  std::memcpy(meta + c * 4, &scale, 4);
  std::memcpy(meta + kLine + c * 4, &sum, 4);
}

// One 32-value group: the stored bf16 scale bits and q in [-8, 7] (zero group -> scale 0).
// NOTE: like Q4_0 the extreme value maps to -8 (step amax / 8 rather than amax / 7), then one
// least-squares refit of the scale to the chosen q (kept only if it lowers the error):
// NMSE 7.0e-3 on Gaussian groups against 9.4e-3 for amax / 7.
uint16_t quantize_group_int4(const float* w, int8_t* q) {
  float ext = 0.f;
  for (int64_t i = 0; w && i < kInt4Group; ++i)
    if (std::fabs(w[i]) > std::fabs(ext)) ext = w[i];
  auto quant = [&](uint16_t sbits, float* err) {
    const float s = bf16_to_f32(sbits), inv = s != 0.f ? 1.0f / s : 0.f;
    float e = 0.f;
    for (int64_t i = 0; i < kInt4Group; ++i) {
      const float v = w ? w[i] : 0.f;
      q[i] = static_cast<int8_t>(std::min(7.f, std::max(-8.f, std::nearbyint(v * inv))));
      e += (v - q[i] * s) * (v - q[i] * s);
    }
    *err = e;
  };
  uint16_t best = f32_to_bf16(ext / -8.0f);
  float err;
  quant(best, &err);
  float wq = 0.f, qq = 0.f;
  for (int64_t i = 0; w && i < kInt4Group; ++i) wq += w[i] * q[i], qq += static_cast<float>(q[i] * q[i]);
  if (qq > 0.f) {
    int8_t q2[kInt4Group];
    std::copy(q, q + kInt4Group, q2);
    const uint16_t refit = f32_to_bf16(wq / qq);
    float err2;
    quant(refit, &err2);
    if (err2 < err) return refit;
    std::copy(q2, q2 + kInt4Group, q);
  }
  return best;
}

void pack_row_int4(const float* row, int64_t K, uint8_t* panel, int64_t c) {
  uint8_t* scales = panel + int4_data_bytes(K);
  const int64_t used = K / kInt4Group * kPanelCols * 2;
  if (c == 0) std::memset(scales + used, 0, int4_scale_bytes(K) - used);  // alignment padding
  int8_t q[kInt4Group];
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    const uint16_t sbits = quantize_group_int4(row ? row + g * kInt4Group : nullptr, q);
    std::memcpy(scales + (g * kPanelCols + c) * 2, &sbits, 2);
    for (int64_t i = 0; i < kInt4Group; ++i) {
      const int32_t v = q[i] + 8;
      bool high;
      uint8_t* b = panel + int4_offset(c, g * kInt4Group + i, &high);
      *b = high ? static_cast<uint8_t>((*b & 0x0f) | (v << 4)) : static_cast<uint8_t>((*b & 0xf0) | v);
    }
  }
}

}  // namespace

void pack_row(PackedFormat f, const float* row, int64_t K, uint8_t* panel, int64_t c) {
  switch (f) {
    case PackedFormat::bf16: return pack_row_bf16(row, K, panel, c);
    case PackedFormat::int8: return pack_row_int8(row, K, panel, c);
    case PackedFormat::int4: return pack_row_int4(row, K, panel, c);
  }
}

namespace {
void pack_panel_bf16_ref(const float* rows, int64_t K, uint8_t* panel) {
  for (int64_t c = 0; c < kPanelCols; ++c) pack_row_bf16(rows + c * K, K, panel, c);
}
void pack_panel_int8_ref(const float* rows, int64_t K, uint8_t* panel) {
  for (int64_t c = 0; c < kPanelCols; ++c) pack_row_int8(rows + c * K, K, panel, c);
}
}  // namespace

Kernel<PackPanelFn> k_pack_panel_bf16{"pack_panel_bf16", {pack_panel_bf16_ref, nullptr, nullptr, nullptr}};
Kernel<PackPanelFn> k_pack_panel_int8{"pack_panel_int8", {pack_panel_int8_ref, nullptr, nullptr, nullptr}};

}  // namespace packed

void pack_rows_f32(PackedFormat f, const float* W, int64_t N, int64_t K, int64_t n_begin, int64_t n_end,
                   uint8_t* dst) {
  pack_rows_with(f, [&](int64_t n, float* row) { std::memcpy(row, W + n * K, K * sizeof(float)); }, N, K,
                 n_begin, n_end, dst);
}

void pack_rows_bf16(PackedFormat f, const uint16_t* W, int64_t N, int64_t K, int64_t n_begin, int64_t n_end,
                    uint8_t* dst) {
  pack_rows_with(f, [&](int64_t n, float* row) {
    const uint16_t* src = W + n * K;
    for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(src[k]);
  }, N, K, n_begin, n_end, dst);
}

void unpack_rows_f32(PackedFormat f, const uint8_t* packed, int64_t N, int64_t K, int64_t n_begin,
                     int64_t n_end, float* W) {
  check_pack_range(f, N, K, n_begin, n_end);
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(f, K));
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* panel = packed + n / kPanelCols * pb;
    const int64_t c = n % kPanelCols;
    float* row = W + n * K;
    for (int64_t k = 0; k < K; ++k) {
      if (f == PackedFormat::bf16) {
        uint16_t v;
        std::memcpy(&v, panel + bf16_offset(c, k), 2);
        row[k] = bf16_to_f32(v);
      } else if (f == PackedFormat::int8) {
        float s;
        std::memcpy(&s, panel + int8_data_bytes(K) + c * 4, 4);
        row[k] = static_cast<float>(static_cast<int8_t>(panel[int8_offset(c, k)])) * s;
      } else {
        bool high;
        uint8_t b = panel[int4_offset(c, k, &high)];
        uint16_t sbits;
        std::memcpy(&sbits, panel + int4_data_bytes(K) + (k / kInt4Group * kPanelCols + c) * 2, 2);
        row[k] = static_cast<float>((high ? b >> 4 : b & 0x0f) - 8) * bf16_to_f32(sbits);
      }
    }
  }
}

}  // namespace ktrans
