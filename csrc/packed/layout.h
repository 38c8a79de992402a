// Internal helpers shared by the packers and the kernels of every ISA: byte offsets inside a
// panel (packed.h describes the formats), thread-local scratch, and the scalar activation
// quantizer that every ISA's int8 path must reproduce bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "packed/packed.h"

namespace ktrans {
namespace packed {

constexpr int64_t kLine = 64;  // bytes per panel line (one zmm, one AMX tile row)

// int8 panels pad K to whole AMX int8 tiles (64 k); the padding weights are zero.
inline int64_t int8_kpad(int64_t K) { return (K + 63) / 64 * 64; }
inline int64_t int8_data_bytes(int64_t K) { return kPanelCols * int8_kpad(K); }
inline int64_t int4_data_bytes(int64_t K) { return kPanelCols * K / 2; }
inline int64_t int4_scale_bytes(int64_t K) { return (K / kInt4Group * kPanelCols * 2 + 63) / 64 * 64; }
inline int64_t num_panels(int64_t N) { return (N + kPanelCols - 1) / kPanelCols; }

// Lanes of the 16-column panel starting at column n0 that fall inside [n_begin, n_end).
inline uint16_t panel_col_mask(int64_t n0, int64_t n_begin, int64_t n_end) {
  const int64_t lo = n_begin > n0 ? n_begin - n0 : 0;
  const int64_t hi = n_end - n0 < kPanelCols ? n_end - n0 : kPanelCols;
  return static_cast<uint16_t>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// Byte offset of element (c, k) of a panel, c < 16.
inline int64_t bf16_offset(int64_t c, int64_t k) { return ((k >> 1) * 32 + c * 2 + (k & 1)) * 2; }
inline int64_t int8_offset(int64_t c, int64_t k) { return (k >> 2) * kLine + c * 4 + (k & 3); }
// int4: byte holding (c, k) and whether it is the high nibble.
inline int64_t int4_offset(int64_t c, int64_t k, bool* high) {
  int64_t g = k / kInt4Group, r = k % kInt4Group, l = r / 8, i = r % 8;
  *high = i >= 4;
  return (g * 4 + l) * kLine + c * 4 + (i & 3);
}

// A 64-byte aligned thread-local buffer per slot that only grows (no allocation per call once a
// thread has seen its largest shape). Slots let one kernel hold several buffers at once.
enum ScratchSlot { kScratchA = 0, kScratchB, kScratchC, kScratchRow, kNumScratch };
inline uint8_t* scratch(ScratchSlot slot, size_t bytes) {
  struct Buf {
    uint8_t* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[kNumScratch];
  Buf& b = bufs[slot];
  if (b.n < bytes) {
    std::free(b.p);
    size_t n = (bytes + 4095) / 4096 * 4096;
    b.p = static_cast<uint8_t*>(std::aligned_alloc(64, n));
    if (!b.p) {
      b.n = 0;
      throw std::bad_alloc();
    }
    b.n = n;
  }
  return b.p;
}

// Per-row symmetric activation quantization used by the int8 and int4 paths:
// q = round_half_even(x * (127 / amax)), scale = amax / 127.
// NOTE: every ISA computes inv = 127.0f / amax and x * inv in f32 and rounds to nearest even,
// so the quantized activations (and hence the integer sums) are identical across ISAs.
inline float act_inv_scale(float amax) { return amax > 0.f ? 127.0f / amax : 0.f; }
inline float act_scale(float amax) { return amax / 127.0f; }

}  // namespace packed
}  // namespace ktrans
