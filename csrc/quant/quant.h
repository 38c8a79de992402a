// GGUF / llama.cpp block quantization formats: block layouts, per-type traits and the dispatched
// row kernels shared by the weight loader, the CPU MoE kernels and gen-model.
//
// Stable interface (other parts build on it):
//   QType                    dense ktrans id of a format (NOT the ggml id; see ggml_type_id()).
//   qtype_traits(t)          name, block size, bytes per block, ggml id, activation format.
//   qtype_row_bytes(t, n)    bytes of a row of n values (n % block_size == 0).
//   k_dequantize_row[t]      void(const void* src, float* dst, int64_t n): n values, n % bs == 0.
//   k_quantize_row[t]        void(const float* src, void* dst, int64_t n): llama.cpp-compatible
//                            bytes. For q8_k (activations only) this is the activation quantizer.
//   vec_dot_type(t)          format the activations must be in for vec_dot of weight type t:
//                            q8_0 for q4_0/q5_0/q8_0/mxfp4, q8_k for the K-quants, f32 for
//                            f32/f16/bf16.
//   k_vec_dot[t]             float(int64_t n, const void* w_row, const void* act_row): the dot
//                            product of one weight row of type t with one activation row already
//                            quantized by k_quantize_row[vec_dot_type(t)].
// Each slot is a Kernel<Fn> (common/isa.h): generic scalar reference (csrc/generic/quant_*.cpp,
// the test oracle) plus AVX2 / AVX-512 overrides (csrc/avx2/quant_*.cpp, csrc/avx512/quant_*.cpp).
// Blocks are independent, so a row kernel may be called on any whole-block slice of a row; this
// is how quantization is split across threads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/isa.h"

namespace ktrans {

constexpr int kQK = 32;    // block size of the legacy formats (q4_0, q5_0, q8_0)
constexpr int kQK_K = 256;  // super-block size of the K-quants
constexpr int kKScaleSize = 12;  // packed 6-bit scales + mins of q4_K / q5_K

// Dense ids; the order is the index into the k_* kernel tables. A slot a format lacks (e.g.
// quantize for iq4_xs, vec_dot for q8_k) has no generic impl: check Kernel::get() for nullptr.
enum class QType : int {
  f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q5_k, q6_k, q2_k, q3_k, iq4_xs, mxfp4, q8_k, count
};
constexpr int kNumQTypes = static_cast<int>(QType::count);
constexpr int qi(QType t) { return static_cast<int>(t); }  // index into the k_* tables

// Block layouts, byte for byte as in ggml (fp16 scales stored as raw IEEE half bits).
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };  // element j: low nibble of qs[j], j+16: high
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[kQK / 2]; };  // qh bit j = bit 4 of element j
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[kKScaleSize];  // 8 x (6-bit scale, 6-bit min), packed (see unpack_scale_min_k4)
  uint8_t qs[kQK_K / 2];        // per 64 values: 32 bytes, low nibbles first 32, high next 32
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[kKScaleSize];
  uint8_t qh[kQK_K / 8];  // bit s of qh[l] = bit 4 of element 32*s + l
  uint8_t qs[kQK_K / 2];
};
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];   // low 4 bits
  uint8_t qh[kQK_K / 4];   // high 2 bits
  int8_t scales[kQK_K / 16];  // one per 16 values
  uint16_t d;
};
struct BlockQ2_K {
  uint8_t scales[kQK_K / 16];  // low nibble: scale, high nibble: min, per 16 values
  uint8_t qs[kQK_K / 4];
  uint16_t d, dmin;
};
struct BlockQ3_K {
  uint8_t hmask[kQK_K / 8];
  uint8_t qs[kQK_K / 4];
  uint8_t scales[12];  // 16 x 6-bit signed scales (offset 32)
  uint16_t d;
};
struct BlockIQ4_XS {
  uint16_t d;
  uint16_t scales_h;            // bits 2j..2j+1: high 2 bits of the 6-bit scale of sub-block j
  uint8_t scales_l[kQK_K / 64];  // nibbles: low 4 bits of the scales (offset 32)
  uint8_t qs[kQK_K / 2];        // per 32 values: 16 bytes, low nibbles first, indices into kIQ4NL
};
// mxfp4 (OCP microscaling, gpt-oss's experts): one E8M0 exponent byte per 32 values, values are
// E2M1 codes. Element j: low nibble of qs[j], element j+16: high nibble (as q4_0).
// value = kMXFP4[code] * e8m0_to_fp32_half(e), kMXFP4 being the E2M1 values doubled.
struct BlockMXFP4 { uint8_t e; uint8_t qs[kQK / 2]; };
constexpr int8_t kMXFP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// 2^(e - 128) = half of the E8M0 scale 2^(e - 127), exactly as ggml_e8m0_to_fp32_half (e < 2
// gives the two subnormal patterns).
inline float e8m0_to_fp32_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// Non-linear 4-bit codebook of iq4_nl / iq4_xs.
constexpr int8_t kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
// Activation format of the K-quant dot products (never stored in GGUF files by us).
struct BlockQ8_K {
  float d;
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];  // sum of each group of 16 qs
};

static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ5_0) == 22, "layout");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210, "layout");
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ8_K) == 292, "layout");
static_assert(sizeof(BlockIQ4_XS) == 136 && sizeof(BlockMXFP4) == 17, "layout");

struct QTypeTraits {
  const char* name;   // ktrans name: "q4_k", ...
  int ggml_type;      // gguf.GGMLQuantizationType value
  int block_size;     // values per block
  int type_size;      // bytes per block
  QType vec_dot_type;  // activation format for k_vec_dot
};

const QTypeTraits& qtype_traits(QType t);
inline QType vec_dot_type(QType t) { return qtype_traits(t).vec_dot_type; }
// Returns false when the ggml id is not a format ktrans implements.
bool qtype_from_ggml_id(int ggml_type, QType* out);
// Returns false for an unknown name.
bool qtype_from_name(const char* name, QType* out);
inline int64_t qtype_row_bytes(QType t, int64_t n) {
  const QTypeTraits& tr = qtype_traits(t);
  return n / tr.block_size * tr.type_size;
}

using DequantizeRowFn = void (*)(const void* src, float* dst, int64_t n);
using QuantizeRowFn = void (*)(const float* src, void* dst, int64_t n);
using VecDotFn = float (*)(int64_t n, const void* w_row, const void* act_row);

extern Kernel<DequantizeRowFn> k_dequantize_row[kNumQTypes];
extern Kernel<QuantizeRowFn> k_quantize_row[kNumQTypes];
extern Kernel<VecDotFn> k_vec_dot[kNumQTypes];  // null impl for q8_k (activation-only format)

// 6-bit scale and min of sub-block j (0..7) of a q4_K / q5_K block.
static inline void unpack_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// All 8 scales and mins of a q4_K / q5_K block at once, as bytes: sc in out[0..7], m in
// out[8..15] (the same values as unpack_scale_min_k4, four per 32-bit word).
static inline void unpack_scales_mins_k4(const uint8_t* q, uint8_t* out) {
  uint32_t a[3], r[4];
  std::memcpy(a, q, 12);
  r[0] = a[0] & 0x3f3f3f3f;                                         // scales 0..3
  r[1] = (a[2] & 0x0f0f0f0f) | ((a[0] >> 2) & 0x30303030);          // scales 4..7
  r[2] = a[1] & 0x3f3f3f3f;                                         // mins 0..3
  r[3] = ((a[2] >> 4) & 0x0f0f0f0f) | ((a[1] >> 2) & 0x30303030);   // mins 4..7
  std::memcpy(out, r, 16);
}

}  // namespace ktrans
