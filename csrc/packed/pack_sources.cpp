// Packing sources beyond f32/bf16: GGUF rows of any type ktrans reads (dequantized row by row
// with the quant kernels of csrc/quant/quant.h) and fp8 e4m3 with 128 x 128 block scales (the
// DeepSeek-V3 safetensors layout). Each turns one row into f32 and hands it to the shared packer,
// so peak extra memory is one row per thread.
#include <cmath>
#include <stdexcept>
#include <string>

#include "packed/pack_impl.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

// float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 0xf, m = b & 7;
      float a = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
      if ((b & 0x7f) == 0x7f) a = std::nanf("");
      v[b] = (b & 0x80) ? -a : a;
    }
  }
};

}  // namespace

namespace packed {
Kernel<PackPanelGgufFn> k_pack_panel_gguf_bf16[kNumQTypes] = {};
}  // namespace packed

void pack_rows_gguf(PackedFormat f, int qtype, const uint8_t* W, int64_t N, int64_t K, int64_t n_begin,
                    int64_t n_end, uint8_t* dst) {
  if (qtype < 0 || qtype >= kNumQTypes || qtype == qi(QType::q8_k))
    throw std::invalid_argument("pack_rows_gguf: qtype id " + std::to_string(qtype) + " is not a weight format");
  const QType t = static_cast<QType>(qtype);
  const QTypeTraits& tr = qtype_traits(t);
  if (K % tr.block_size != 0)
    throw std::invalid_argument(std::string("pack_rows_gguf: K=") + std::to_string(K) + " is not a multiple of " +
                                tr.name + "'s block size " + std::to_string(tr.block_size));
  const DequantizeRowFn deq = k_dequantize_row[qtype].get();
  if (!deq) throw std::invalid_argument(std::string("pack_rows_gguf: no dequantizer for ") + tr.name);
  const int64_t row_bytes = qtype_row_bytes(t, K);
  auto rows = [&](int64_t b, int64_t e) {
    packed::pack_rows_with(f, [&](int64_t n, float* row) { deq(W + n * row_bytes, row, K); }, N, K, b, e, dst);
  };
  const packed::PackPanelGgufFn panel = f == PackedFormat::bf16 ? packed::k_pack_panel_gguf_bf16[qtype].get() : nullptr;
  if (!panel) return rows(n_begin, n_end);
  // Whole panels inside the range straight from the blocks; the rows around them (and the
  // padding columns, when the range ends at N) through the row path.
  packed::check_pack_range(f, N, K, n_begin, n_end);
  const int64_t p0 = (n_begin + kPanelCols - 1) / kPanelCols * kPanelCols, p1 = n_end / kPanelCols * kPanelCols;
  if (p0 >= p1) return rows(n_begin, n_end);
  if (n_begin < p0) rows(n_begin, p0);
  const int64_t panel_bytes = static_cast<int64_t>(packed_panel_bytes(f, K));
  for (int64_t n = p0; n < p1; n += kPanelCols) panel(W + n * row_bytes, row_bytes, K, dst + n / kPanelCols * panel_bytes);
  if (p1 < n_end) rows(p1, n_end);  // (also zero-fills the padding when n_end == N)
}

void pack_rows_fp8(PackedFormat f, const uint8_t* W, const float* scale_inv, int64_t N, int64_t K,
                   int64_t n_begin, int64_t n_end, uint8_t* dst) {
  static const Fp8Table table;
  const int64_t kb = (K + 127) / 128;
  packed::pack_rows_with(f, [&](int64_t n, float* row) {
    const uint8_t* src = W + n * K;
    const float* s = scale_inv + n / 128 * kb;
    for (int64_t k = 0; k < K; ++k) row[k] = table.v[src[k]] * s[k / 128];
  }, N, K, n_begin, n_end, dst);
}

}  // namespace ktrans
