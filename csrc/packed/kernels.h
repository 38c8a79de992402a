// Helpers that one ISA's packed kernels export to a higher level's (the AMX kernels reuse the
// AVX-512 activation quantizer) or to the dispatcher (prepared activations). Only called after the ISA check, so the caller needs no target.
#pragma once
#include <cstdint>

#include "packed/packed.h"

namespace ktrans {
namespace packed {

// Quantize M rows of bf16 x [M, K] (row stride ldx) per row (packed/layout.h's definition) into q
// [M, ldq] int8, zero-filling columns K..ldq; sx[m] = row scale. xor_mask 0x80 stores q + 128
// as u8 (the vpdpbusd operand). gsum, when not null, gets [M, K/32] sums of q per 32-group.
void quantize_rows_avx512(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t ldq, int8_t* q,
                          float* sx, int32_t* gsum, uint8_t xor_mask);

// The AMX kernels' activation preparation, split from the product so that packed_prepare_acts /
// packed_gemm_prepared can reuse it (csrc/amx/packed_amx.cpp). Bytes 0: M is below the format's
// tile threshold and the AVX-512 kernel reads x directly.
int64_t amx_acts_bytes(PackedFormat f, int64_t M, int64_t K);
void amx_prepare_acts(PackedFormat f, const uint16_t* x, int64_t ldx, int64_t M, int64_t K, uint8_t* buf);
void amx_gemm_prepared(PackedFormat f, const uint8_t* acts, int64_t M, int64_t K, const uint8_t* packed, int64_t N,
                       float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate);

}  // namespace packed
}  // namespace ktrans
