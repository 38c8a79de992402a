// packed_gemm(): argument checks and the choice of kernel (selected or explicit ISA level).
// The AMX-level kernels pick tiles or AVX-512 by M themselves (csrc/amx/packed_amx.cpp).
#include <stdexcept>
#include <string>

#include "packed/kernels.h"
#include "packed/packed.h"

namespace ktrans {

Kernel<PackedGemmFn>& packed_gemm_kernel(PackedFormat f) {
  switch (f) {
    case PackedFormat::bf16: return k_packed_gemm_bf16;
    case PackedFormat::int8: return k_packed_gemm_int8;
    case PackedFormat::int4: return k_packed_gemm_int4;
  }
  throw std::invalid_argument("unknown packed format");
}

void check_packed_gemm_args(PackedFormat f, int64_t N, int64_t K, int64_t ldx, int64_t M, int64_t ldy,
                            int64_t n_begin, int64_t n_end) {
  check_packed_shape(f, N, K);
  auto s = [](int64_t v) { return std::to_string(v); };
  if (M < 0) throw std::invalid_argument("packed_gemm: M=" + s(M) + " must be >= 0");
  if (n_begin < 0 || n_begin > n_end || n_end > N)
    throw std::invalid_argument("packed_gemm: column range [" + s(n_begin) + ", " + s(n_end) +
                                ") is not inside [0, N=" + s(N) + ")");
  if (ldx < K) throw std::invalid_argument("packed_gemm: ldx=" + s(ldx) + " is smaller than K=" + s(K));
  if (ldy < n_end) throw std::invalid_argument("packed_gemm: ldy=" + s(ldy) + " is smaller than n_end=" + s(n_end));
}

void packed_gemm_isa(Isa isa, PackedFormat f, const uint8_t* packed, int64_t N, int64_t K, const uint16_t* x,
                     int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n_begin, int64_t n_end,
                     bool accumulate) {
  check_packed_gemm_args(f, N, K, ldx, M, ldy, n_begin, n_end);
  if (M == 0 || n_begin == n_end) return;
  packed_gemm_kernel(f).get(isa)(packed, N, K, x, ldx, M, y, ldy, n_begin, n_end, accumulate);
}

void packed_gemm(PackedFormat f, const uint8_t* packed, int64_t N, int64_t K, const uint16_t* x, int64_t ldx,
                 int64_t M, float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  packed_gemm_isa(selected_isa(), f, packed, N, K, x, ldx, M, y, ldy, n_begin, n_end, accumulate);
}

size_t packed_acts_bytes(Isa isa, PackedFormat f, int64_t M, int64_t K) {
  check_packed_shape(f, 1, K);
  if (static_cast<int>(isa) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("packed activations: ISA '") + isa_name(isa) +
                                "' is not supported by this CPU");
  if (packed_gemm_kernel(f).resolved(isa) != Isa::amx) return 0;
  return static_cast<size_t>(packed::amx_acts_bytes(f, M, K));
}

PackedActs packed_prepare_acts(Isa isa, PackedFormat f, const uint16_t* x, int64_t ldx, int64_t M, int64_t K,
                               uint8_t* buf) {
  check_packed_gemm_args(f, 1, K, ldx, M, 1, 0, 0);
  const bool tiles = packed_acts_bytes(isa, f, M, K) > 0;
  if (tiles) packed::amx_prepare_acts(f, x, ldx, M, K, buf);
  return PackedActs{isa, f, x, ldx, M, K, tiles ? buf : nullptr};
}

void packed_gemm_prepared(const PackedActs& a, const uint8_t* packed, int64_t N, float* y, int64_t ldy,
                          int64_t n_begin, int64_t n_end, bool accumulate) {
  if (!a.buf)
    return packed_gemm_isa(a.isa, a.format, packed, N, a.K, a.x, a.ldx, a.M, y, ldy, n_begin, n_end, accumulate);
  check_packed_gemm_args(a.format, N, a.K, a.ldx, a.M, ldy, n_begin, n_end);
  if (n_begin == n_end) return;
  packed::amx_gemm_prepared(a.format, a.buf, a.M, a.K, packed, N, y, ldy, n_begin, n_end, accumulate);
}

}  // namespace ktrans
