// Packed weight formats for the CPU matrix kernels (AMX tiles, AVX-512, AVX2): contract section 6.
//
// A weight matrix W [N, K] (a Linear's weight: N output channels, K inputs) is repacked once at
// load into 16-column panels whose 64-byte lines are exactly the rows of an AMX B tile and the
// operand of one vdpbf16ps / vpdpbusd. Layouts (docs/amx.md has the pictures):
//   bf16: line j of a panel = k pair (2j, 2j+1) of its 16 columns: [c0k0 c0k1 c1k0 c1k1 ...].
//   int8: line j = k quad 4j..4j+3 of 16 columns (int8, symmetric per-column scale), then a line
//         of 16 f32 scales and a line of 16 int32 column sums (for the +128 activation offset).
//   int4: groups of 32 k; 4 lines per group, byte (4c + i) of line l holds column c's k = 8l + i
//         (low nibble) and 8l + 4 + i (high nibble) as q + 8; then per group 16 bf16 scales.
// N is padded to a multiple of 16 (zero weights); K must be a multiple of 32. Panels are whole
// multiples of 64 bytes, so a 64-byte aligned buffer (recommended: any alignment works, but split
// cache lines cost bandwidth) keeps every line and tile row in one cache line.
//
// Packing is per row range so callers split N across threads; the matrix product works on an
// output-column range [n_begin, n_end) for the same reason. Neither allocates per call after a
// thread's first (scratch buffers are thread-local and only grow).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/isa.h"

namespace ktrans {

enum class PackedFormat { bf16, int8, int4 };  // int8: per-output-channel scales; int4: group scales

constexpr int64_t kPanelCols = 16;   // output columns per panel (one AMX B tile / one zmm of f32)
constexpr int64_t kPackKAlign = 32;  // K must be a multiple of this (one bf16 B tile's depth)
constexpr int64_t kInt4Group = 32;   // int4 scale group along K

const char* packed_format_name(PackedFormat f);
// Parses "bf16" / "int8" / "int4"; throws std::invalid_argument naming the valid ones.
PackedFormat parse_packed_format(const std::string& name);
// Throws std::invalid_argument (with N and K in the message) for shapes a format cannot hold.
void check_packed_shape(PackedFormat f, int64_t N, int64_t K);

size_t packed_bytes(PackedFormat f, int64_t N, int64_t K);
size_t packed_panel_bytes(PackedFormat f, int64_t K);  // bytes of one 16-column panel

// Pack rows [n_begin, n_end) of W [N, K] into dst (packed_bytes(f, N, K) bytes, shared by all
// callers); the call whose range ends at N also zero-fills the padding columns.
void pack_rows_f32(PackedFormat f, const float* W, int64_t N, int64_t K, int64_t n_begin, int64_t n_end,
                   uint8_t* dst);
void pack_rows_bf16(PackedFormat f, const uint16_t* W, int64_t N, int64_t K, int64_t n_begin, int64_t n_end,
                    uint8_t* dst);
// W: GGUF rows of type `qtype` (a csrc/quant/quant.h QType index), row_bytes apart.
void pack_rows_gguf(PackedFormat f, int qtype, const uint8_t* W, int64_t N, int64_t K, int64_t n_begin,
                    int64_t n_end, uint8_t* dst);
// W: fp8 e4m3 bytes [N, K]; scale_inv: f32 [ceil(N/128), ceil(K/128)], value = fp8 * scale_inv
// of its 128x128 block (DeepSeek-V3 safetensors' weight_scale_inv).
void pack_rows_fp8(PackedFormat f, const uint8_t* W, const float* scale_inv, int64_t N, int64_t K,
                   int64_t n_begin, int64_t n_end, uint8_t* dst);
// The weights the packed form stands for, dequantized: W [N, K] rows [n_begin, n_end) (tests, and
// the torch fallback of the experts operator).
void unpack_rows_f32(PackedFormat f, const uint8_t* packed, int64_t N, int64_t K, int64_t n_begin,
                     int64_t n_end, float* W);

// y[m, n] (+)= sum_k x[m, k] * W[n, k] for n in [n_begin, n_end): x bf16 [M, K] (row stride ldx),
// y f32 [M, N] (row stride ldy). Columns outside the range are not touched.
using PackedGemmFn = void (*)(const uint8_t* packed, int64_t N, int64_t K, const uint16_t* x, int64_t ldx,
                              int64_t M, float* y, int64_t ldy, int64_t n_begin, int64_t n_end,
                              bool accumulate);
extern Kernel<PackedGemmFn> k_packed_gemm_bf16;
extern Kernel<PackedGemmFn> k_packed_gemm_int8;
extern Kernel<PackedGemmFn> k_packed_gemm_int4;
Kernel<PackedGemmFn>& packed_gemm_kernel(PackedFormat f);

// The selected ISA's kernel (AMX tiles for M >= kAmxMinRows, AVX-512 / AVX2 below, generic
// reference on a plain x86-64), after checking the arguments (std::invalid_argument).
void packed_gemm(PackedFormat f, const uint8_t* packed, int64_t N, int64_t K, const uint16_t* x, int64_t ldx,
                 int64_t M, float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate);
// Same, on an explicit ISA level (tests run every level side by side).
void packed_gemm_isa(Isa isa, PackedFormat f, const uint8_t* packed, int64_t N, int64_t K, const uint16_t* x,
                     int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n_begin, int64_t n_end,
                     bool accumulate);
// Activations prepared once for many products with the same x: gate and up of one expert and
// all their column blocks, on any threads. On the AMX level with M at or above the format's tile
// threshold this is the blocked (int8: quantized) copy of x that packed_gemm otherwise rebuilds
// on every call, held in the caller's buffer of packed_acts_bytes (64-byte aligned); otherwise
// bytes is 0 and the products read x itself, which must then stay valid and unchanged.
struct PackedActs {
  Isa isa;
  PackedFormat format;
  const uint16_t* x;
  int64_t ldx, M, K;
  const uint8_t* buf;  // null when bytes == 0
};
size_t packed_acts_bytes(Isa isa, PackedFormat f, int64_t M, int64_t K);
PackedActs packed_prepare_acts(Isa isa, PackedFormat f, const uint16_t* x, int64_t ldx, int64_t M, int64_t K,
                               uint8_t* buf);
// Same result as packed_gemm(acts.format, packed, N, acts.K, acts.x, ...), bit for bit.
void packed_gemm_prepared(const PackedActs& acts, const uint8_t* packed, int64_t N, float* y, int64_t ldy,
                          int64_t n_begin, int64_t n_end, bool accumulate);
void check_packed_gemm_args(PackedFormat f, int64_t N, int64_t K, int64_t ldx, int64_t M, int64_t ldy,
                            int64_t n_begin, int64_t n_end);

}  // namespace ktrans
