// AMX tile-only throughput probe (bench/amx_peak.py): the compute ceiling the packed kernels are
// measured against, taken at the clock the cores really run under AMX load.
#pragma once
#include <cstdint>

namespace ktrans {

// Runs `iters` tile dot products (TDPBF16PS or TDPBSSD, 16x16 C tiles from 16x64-byte A/B tiles
// already in registers, `accumulators` independent C tiles: 4 or 6) on each of nthreads threads
// at once; returns the wall time in seconds. Needs AMX (checked by the caller).
double amx_peak_seconds(bool int8, int64_t iters, int nthreads, int accumulators = 4);

// Core clock in GHz seen by nthreads threads at once, from a chain of dependent register-register adds
// (one per cycle; immediate adds are folded at rename on recent cores); used to turn FLOP/s into FLOP/cycle.
double core_clock_ghz(int nthreads);

}  // namespace ktrans
