// AMX tile-only peak loop: tile loads happen once, then only TDP instructions run, rotating over
// independent C tiles so their latency is hidden. One TDPBF16PS is 16*16*32 MACs, TDPBSSD
// 16*16*64; the caller turns seconds into FLOP/s.
#include "amx/amx_peak.h"

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "common/isa.h"

KTRANS_TARGET_AMX_BEGIN
namespace ktrans {
namespace {

struct alignas(64) PeakTileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#define KT_TDP(d, a, b) \
  if (int8)             \
    _tile_dpbssd(d, a, b); \
  else                  \
    _tile_dpbf16ps(d, a, b)

void peak_loop(bool int8, int64_t iters, int accumulators) {
  PeakTileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  __asm__ volatile("" : : "r"(&cfg) : "memory");  // GCC may sink the stores below ldtilecfg otherwise
  _tile_loadconfig(&cfg);
  alignas(64) static const uint8_t zeros[1024] = {};
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5);
  if (accumulators == 6) {
    for (int64_t i = 0; i < iters; i += 6) {
      KT_TDP(0, 6, 7); KT_TDP(1, 6, 7); KT_TDP(2, 6, 7);
      KT_TDP(3, 6, 7); KT_TDP(4, 6, 7); KT_TDP(5, 6, 7);
    }
  } else {
    for (int64_t i = 0; i < iters; i += 4) {
      KT_TDP(0, 6, 7); KT_TDP(1, 6, 7); KT_TDP(2, 6, 7); KT_TDP(3, 6, 7);
    }
  }
  alignas(64) uint8_t sink[1024];
  _tile_stored(0, sink, 64);
  _tile_release();
}
#undef KT_TDP

// Starts nthreads threads, releases them together, returns the wall time until all finished.
template <class Fn>
double run_together(int nthreads, Fn&& fn) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < nthreads; ++t)
    threads.emplace_back([&] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {}
      fn();
    });
  while (ready.load() < nthreads) {}
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : threads) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

double amx_peak_seconds(bool int8, int64_t iters, int nthreads, int accumulators) {
  return run_together(nthreads, [&] { peak_loop(int8, iters, accumulators); });
}

double core_clock_ghz(int nthreads) {
  constexpr uint64_t kIters = 5000000;  // x 8 dependent adds: ~10 ms, short enough to fit a time slice
  const double s = run_together(nthreads, [] {
    uint64_t v = 0, n = kIters;
    __asm__ volatile(
        "1:\n\t"
        "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
        "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
        "dec %1\n\tjnz 1b"
        : "+r"(v), "+r"(n));
  });
  return 8.0 * kIters / s / 1e9;
}

}  // namespace ktrans
KTRANS_TARGET_END
