// Helpers that one ISA's packed kernels export to a higher level's (the AMX kernels reuse the
// AVX-512 activation quantizer). Only called after the ISA check, so the caller needs no target.
#pragma once
#include <cstdint>

namespace ktrans {
namespace packed {

// Quantize M rows of bf16 x [M, K] (row stride ldx) per row (packed/layout.h's definition) into q
// [M, ldq] int8, zero-filling columns K..ldq; sx[m] = row scale. xor_mask 0x80 stores q + 128
// as u8 (the vpdpbusd operand). gsum, when not null, gets [M, K/32] sums of q per 32-group.
void quantize_rows_avx512(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t ldq, int8_t* q,
                          float* sx, int32_t* gsum, uint8_t xor_mask);

}  // namespace packed
}  // namespace ktrans
