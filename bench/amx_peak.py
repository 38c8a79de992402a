"""AMX peak of this machine, measured with a tile-only loop (no memory traffic).

The prefill roofline of bench/packed_gemm.py and bench/moe.py is FLOPs / this peak, taken at the
clock the cores really run under AMX load (lower than the nominal one). One TDPBF16PS is
16*16*32 multiply-adds (16384 FLOP), one TDPBSSD 16*16*64 (32768 int8 ops).

    python bench/amx_peak.py [--threads N ...] [--json out.json]

`measure(dtype, threads)` is the importable entry point.
"""

from __future__ import annotations

import argparse
import json

from ktrans import _C, cpu

FLOP_PER_TDP = {"bf16": 2 * 16 * 16 * 32, "int8": 2 * 16 * 16 * 64}


def measure(dtype: str, threads: int, reps: int = 15, accumulators: int = 4) -> dict:
    """AMX throughput with `threads` busy cores: TFLOP/s (TOP/s for int8) and FLOP/cycle/core.

    NOTE: each figure is the best of `reps` short runs (~10 ms): on a shared or virtual machine a
    long run also counts the time the vCPU was not scheduled, which would understate the peak.
    """
    iters = 96_000  # ~0.5 ms of tile ops at 16 cycles each and 3 GHz, per thread
    _C.amx_peak(dtype, iters, threads, accumulators)  # warm-up: AMX power license, tile state
    t = min(_C.amx_peak(dtype, iters * 20, threads, accumulators) for _ in range(reps))
    flops = FLOP_PER_TDP[dtype] * iters * 20 * threads / t
    ghz = max(_C.core_clock_ghz(threads) for _ in range(reps))
    return {
        "dtype": dtype,
        "threads": threads,
        "accumulators": accumulators,
        "tflops": flops / 1e12,
        "clock_ghz": ghz,
        "flop_per_cycle_per_core": flops / threads / (ghz * 1e9),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default: 1 and all physical cores)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if "amx" not in cpu.supported_isas():
        raise SystemExit("amx_peak: this CPU has no usable AMX")
    threads = args.threads or sorted({1, cpu.physical_cores()})
    rows = [measure(d, n, accumulators=a) for d in ("bf16", "int8") for n in threads for a in (4, 6)]
    print(f"{'dtype':6} {'threads':>7} {'accum':>5} {'TFLOP/s':>8} {'GHz':>5} {'FLOP/cycle/core':>16}")
    for r in rows:
        print(f"{r['dtype']:6} {r['threads']:7d} {r['accumulators']:5d} {r['tflops']:8.2f} {r['clock_ghz']:5.2f} "
              f"{r['flop_per_cycle_per_core']:16.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
