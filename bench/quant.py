"""Throughput of the quant kernels, per format and ISA variant.

One-thread figures are per CPU-second of the calling thread (time.thread_time), so a busy
machine does not distort them; the all-threads figure is wall-clock.

- quantize: MB/s of float32 input, one thread and all threads, next to gguf-py's numpy quantize
  where it has one (q8_0, q4_0, q5_0, bf16);
- dequantize: MB/s of float32 output, ours (one thread) vs gguf-py's numpy dequantize;
- vec_dot: GB/s of weight bytes for a [rows, n] GEMV on one thread (activations quantized once).

Usage: python bench/quant.py [--types q4_k,q8_0] [--rows 1024] [--cols 4096] [--json out.json]
Numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

from ktrans import _C, cpu
from ktrans.weights import quant


def _best_time(fn, min_time: float = 0.3, max_reps: int = 50, cpu: bool = False) -> float:
    """Best of several runs. cpu=True times the calling thread's CPU seconds (for one-thread
    kernels: a per-core figure that other processes on a busy machine do not distort)."""
    clock = time.thread_time if cpu else time.perf_counter
    fn()  # warm-up
    best, total, reps = float("inf"), 0.0, 0
    while total < min_time and reps < max_reps:
        t0 = clock()
        fn()
        dt = clock() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def bench_type(qtype: str, rows: int, cols: int, isas: list[str]) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    mb = x.nbytes / 1e6
    q = quant.QTYPES[qtype]
    res: dict = {"type": qtype, "rows": rows, "cols": cols, "quantize_MBps": {}, "vec_dot_GBps": {}}
    raw = quant.quantize(x, qtype)
    flat = raw.reshape(-1)
    for isa in isas:
        t1 = _best_time(lambda: _C.quant_quantize(qtype, x, nthreads=1, isa=isa), cpu=True)
        tn = _best_time(lambda: _C.quant_quantize(qtype, x, nthreads=0, isa=isa))
        res["quantize_MBps"][isa] = {"1 thread (per CPU-s)": mb / t1, f"{os.cpu_count()} threads (wall)": mb / tn}
        td = _best_time(lambda: _C.quant_dequantize(qtype, flat, x.size, nthreads=1, isa=isa), cpu=True)
        res.setdefault("dequantize_MBps", {})[isa] = mb / td
        tv = _best_time(lambda: _C.quant_vec_dot(qtype, raw, x[0], isa=isa, nthreads=1), cpu=True)
        res["vec_dot_GBps"][isa] = raw.nbytes / tv / 1e9
    ggml = GT(q.ggml_type)
    try:
        tq = _best_time(lambda: gq.quantize(x, ggml), min_time=0.2, max_reps=3, cpu=True)
        res["gguf_numpy_quantize_MBps"] = mb / tq
    except NotImplementedError:
        res["gguf_numpy_quantize_MBps"] = None
    tdq = _best_time(lambda: gq.dequantize(raw, ggml), min_time=0.2, max_reps=5, cpu=True)
    res["gguf_numpy_dequantize_MBps"] = mb / tdq
    return res


def _print(r: dict) -> None:
    print(f"\n{r['type']}  [{r['rows']} x {r['cols']}]")
    for isa, v in r["quantize_MBps"].items():
        qs = ", ".join(f"{k}: {mbps:8.1f}" for k, mbps in v.items())
        print(f"  quantize   {isa:8s} MB/s  {qs}")
    for isa, v in r.get("dequantize_MBps", {}).items():
        print(f"  dequantize {isa:8s} MB/s  1 thread (per CPU-s): {v:8.1f}")
    for isa, v in r["vec_dot_GBps"].items():
        print(f"  vec_dot    {isa:8s} GB/s of weights, 1 thread (per CPU-s): {v:6.2f}")
    gq_ = r["gguf_numpy_quantize_MBps"]
    print(f"  gguf-py numpy quantize MB/s: {gq_:.1f}" if gq_ else "  gguf-py numpy quantize: not implemented")
    print(f"  gguf-py numpy dequantize MB/s: {r['gguf_numpy_dequantize_MBps']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f16,bf16,q8_0,q4_0,q5_0,q4_k,q5_k,q6_k,q2_k,q3_k,iq4_xs")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--isas", default=",".join(cpu.supported_isas()))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    isas = [i for i in args.isas.split(",") if i in cpu.supported_isas()]
    print(f"CPU threads: {os.cpu_count()}, ISAs: {isas}")
    results = []
    for t in args.types.split(","):
        r = bench_type(t, args.rows, args.cols, isas)
        _print(r)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_threads": os.cpu_count(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
