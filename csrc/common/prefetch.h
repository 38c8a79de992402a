// Software prefetch for the GGUF dot kernels: each weight block's dot first asks for the lines
// prefetch_distance() bytes further on (the next blocks of the row, then the next row: rows of a
// matrix are contiguous), so a row streamed from DRAM does not wait on the hardware prefetchers.
//
// NOTE: measured on a Sapphire Rapids core streaming q4_K rows of K 2048 from DRAM (one thread,
// `quant_vec_dot`): 4.6 GB/s with the hardware prefetchers alone, 10.3 GB/s with 1 KB ahead
// (4 KB ahead the same, 8 KB 7.9); the core read 15 GB/s. The packed kernels use the same 1 KB.
// KTRANS_PREFETCH_AHEAD=<bytes> sets the distance (0: off), for benchmarks beside the old path.
#pragma once
#include <cstdint>

namespace ktrans {

// Bytes ahead (a multiple of 64; 0 = no software prefetch), read once from KTRANS_PREFETCH_AHEAD.
extern const int64_t g_prefetch_ahead;

// g_prefetch_ahead, or std::invalid_argument naming a bad KTRANS_PREFETCH_AHEAD.
int64_t check_prefetch_env();

// The lines of kBytes bytes (one block, or one step of a loop) g_prefetch_ahead bytes past p,
// towards L1 (a hint: never faults; one uop a line).
template <int64_t kBytes>
inline void prefetch_ahead(const void* p) {
  const int64_t d = g_prefetch_ahead;
  if (d == 0) return;
  const char* c = static_cast<const char*>(p) + d;
  for (int64_t o = 0; o < kBytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

}  // namespace ktrans
