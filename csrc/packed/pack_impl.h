// The packing loop shared by every weight source (f32, bf16, GGUF rows, fp8 blocks): a source
// turns one row of W into f32, pack_row() scatters it into its panel column. Header-only so each
// source's loader is inlined into its own loop.
#pragma once
#include <cstdint>

#include "packed/layout.h"

namespace ktrans {
namespace packed {

// Scatter one f32 row into column c of a panel (quantizing for int8/int4); row == nullptr writes
// a zero (padding) column.
void pack_row(PackedFormat f, const float* row, int64_t K, uint8_t* panel, int64_t c);
void check_pack_range(PackedFormat f, int64_t N, int64_t K, int64_t n_begin, int64_t n_end);

// A whole bf16 panel from 16 f32 rows [16, K] (K % 32 == 0): the generic version packs row by
// row; the AVX-512 one converts and transposes 16 x 16 pair-words at a time. Byte-identical.
using PackPanelFn = void (*)(const float* rows, int64_t K, uint8_t* panel);
extern Kernel<PackPanelFn> k_pack_panel_bf16;
extern Kernel<PackPanelFn> k_pack_panel_int8;  // same for int8 (quantize per row, transpose quads)

// A whole bf16 panel straight from 16 GGUF rows (row_bytes apart, K values each) of one block
// format, indexed by QType: byte-identical to dequantizing the rows and packing them with
// k_pack_panel_bf16. Only where a level has one (csrc/amx/gguf_panels.cpp: q4_K, q5_K, q6_K);
// pack_rows_gguf falls back to the row path elsewhere.
using PackPanelGgufFn = void (*)(const uint8_t* W, int64_t row_bytes, int64_t K, uint8_t* panel);
extern Kernel<PackPanelGgufFn> k_pack_panel_gguf_bf16[];

// load(n, float* row) fills row n of W as K floats. Whole bf16 / int8 panels inside the range go
// through the panel kernels (16 rows at once), everything else row by row.
template <class Load>
void pack_rows_with(PackedFormat f, Load&& load, int64_t N, int64_t K, int64_t n_begin, int64_t n_end,
                    uint8_t* dst) {
  check_pack_range(f, N, K, n_begin, n_end);
  const int64_t panel_bytes = static_cast<int64_t>(packed_panel_bytes(f, K));
  Kernel<PackPanelFn>* panel_kernel = f == PackedFormat::bf16   ? &k_pack_panel_bf16
                                      : f == PackedFormat::int8 ? &k_pack_panel_int8
                                                                : nullptr;
  const bool panels = panel_kernel != nullptr;
  float* row = reinterpret_cast<float*>(scratch(kScratchRow, (panels ? kPanelCols : 1) * K * sizeof(float)));
  for (int64_t n = n_begin; n < n_end;) {
    if (panels && n % kPanelCols == 0 && n + kPanelCols <= n_end) {
      for (int64_t c = 0; c < kPanelCols; ++c) load(n + c, row + c * K);
      panel_kernel->get()(row, K, dst + n / kPanelCols * panel_bytes);
      n += kPanelCols;
      continue;
    }
    load(n, row);
    pack_row(f, row, K, dst + n / kPanelCols * panel_bytes, n % kPanelCols);
    ++n;
  }
  if (n_end == N)
    for (int64_t n = N; n < num_panels(N) * kPanelCols; ++n)
      pack_row(f, nullptr, K, dst + n / kPanelCols * panel_bytes, n % kPanelCols);
}

}  // namespace packed
}  // namespace ktrans
