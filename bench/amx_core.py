"""Per-core throughput of the packed AMX GEMMs at the shapes one MoE expert runs, next to the
tile-only AMX peak probed in the same run (the kernel-level view of bench/moe.py's prefill rows).

For each format, shape (dsv3: H 7168, I 2048; qwen3: H 2048, I 768) and M (positions of one
expert): gate + up as the MoE runs them (x prepared once, both matrices in 256-column blocks) and
down over all H columns (one thread owns them all here). One thread; each figure is the fastest
of `--repeat` rounds of ~`--budget` s of calls, with the AMX peak re-probed before every case
and the run's best peak the reference; the experts' weights stay in L2/L3 (one expert per
shape), so this is the kernel's compute rate, not the memory's.

--layer runs the whole MoE layer instead (csrc/moe: activation preparation, gate/up with the
SiLU gating, down, the weighted sum) for one expert that all M tokens route to, on a pool of one
thread: bench/moe.py's formats (amx_bf16, amx_int8, amx_int4, and the gguf formats q4_k, q5_k,
q6_k, ..., whose big experts are expanded to bf16 panels every call), one row per (format, M),
against the tile-only peak its prefill is held to (bench/moe.py's peak_for).

    python bench/amx_core.py [--formats bf16,int8,int4] [--M 16,32,64,128,256] [--repeat 3] [--json f]
    python bench/amx_core.py --layer --formats q4_k,q6_k,amx_int8 --shapes dsv3 --M 32,64,256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe import (  # noqa: E402
    FORMATS,
    measure_amx_peak,
    merge_peaks,
    np16,
    peak_for,
    source_experts,
    stored,
)

from ktrans import _C, cpu  # noqa: E402

SHAPES = {"dsv3": (7168, 2048), "qwen3": (2048, 768)}
COL_BLOCK = 256  # gate/up columns per MoE work item at large T (csrc/moe/moe_packed.cpp)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def best_time(fn, budget: float) -> float:
    fn()
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < budget:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cases(fmt: str, H: int, I: int, M: int):
    """(name, flops, call) for gate+up and down of one expert."""
    g = torch.Generator().manual_seed(0)
    gate, up = (bits(torch.randn(I, H, generator=g) / H**0.5) for _ in range(2))
    down = bits(torch.randn(H, I, generator=g) / I**0.5)
    pg, pu, pd = (_C.pack_bf16(fmt, w) for w in (gate, up, down))
    x, h = bits(torch.randn(M, H, generator=g)), bits(torch.randn(M, I, generator=g))
    yg, yu, yd = np.zeros((M, I), np.float32), np.zeros((M, I), np.float32), np.zeros((M, H), np.float32)
    blocks = [(b, min(b + COL_BLOCK, I)) for b in range(0, I, COL_BLOCK)]
    return [("gate+up", 2 * 2 * M * H * I, lambda: _C.packed_gemm_prepared(fmt, [pg, pu], I, H, x, [yg, yu], blocks)),
            ("down", 2 * M * H * I, lambda: _C.packed_gemm_prepared(fmt, [pd], H, I, h, [yd], [(0, H)]))]


def layer_cases(fmt: str, H: int, I: int, Ms: list[int], gemm_min_tokens: int):
    """(M, flops, call) of one expert through a whole MoE layer (E = 1, k = 1) on one thread."""
    backend, qtype = FORMATS[fmt]
    raws = stored(source_experts(H, I), qtype)
    pool = _C.ThreadPool(1)
    layer = _C.MoeLayer(pool, 1, H, I, [qtype] * 3, backend=backend, max_chunk=max(Ms), gemm_min_tokens=gemm_min_tokens)
    for p in range(3):
        layer.load(p, 0, np.ascontiguousarray(raws[p][:1]))
    out = []
    for M in Ms:
        ids, w = np.zeros((M, 1), np.int64), np.ones((M, 1), np.float32)
        x, y = np16((torch.randn(M, H) / 4).bfloat16()), np.zeros((M, H), np.uint16)
        out.append((M, 2 * 3 * M * H * I, lambda x=x, ids=ids, w=w, y=y: layer.forward(x, ids, w, y)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--shapes", default="dsv3,qwen3")
    ap.add_argument("--M", default="16,32,64,128,256")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--json", default="")
    ap.add_argument("--layer", action="store_true", help="the whole MoE layer for one expert (bench/moe.py formats)")
    ap.add_argument("--gemm-min-tokens", type=int, default=-1, help="--layer, gguf formats: see bench/moe.py")
    args = ap.parse_args()
    if "amx" not in cpu.supported_isas():
        raise SystemExit("amx_core: this CPU has no usable AMX")
    peaks: dict[str, float] = {}
    merge_peaks(peaks, measure_amx_peak(1, 5))
    rows = []
    for shape in args.shapes.split(","):
        H, I = SHAPES[shape]
        for fmt in args.formats.split(","):
            Ms = list(map(int, args.M.split(",")))
            if args.layer:
                todo = [(M, "layer", flops, call) for M, flops, call in layer_cases(fmt, H, I, Ms, args.gemm_min_tokens)]
            else:
                todo = [(M, name, flops, call) for M in Ms for name, flops, call in cases(fmt, H, I, M)]
            for M, name, flops, call in todo:
                t = float("inf")
                for _ in range(args.repeat):
                    merge_peaks(peaks, measure_amx_peak(1, 3))
                    t = min(t, best_time(call, args.budget))
                rows.append(dict(shape=shape, format=fmt, M=M, part=name, us=t * 1e6, tflops=flops / t / 1e12))
                r = rows[-1]
                print(f"{shape:6} {fmt:8} M={M:<4} {name:8} {r['us']:9.1f} us {r['tflops']:6.3f} TFLOP/s", flush=True)
    print(f"best tile-only peak of the run: bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s, int8 {peaks['int8'] / 1e12:.2f} TOP/s")
    print(f"{'shape':6} {'fmt':8} {'M':>4} {'part':8} {'TFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        peak = peak_for(r["format"], peaks) if args.layer else peaks["int8" if r["format"] == "int8" else "bf16"]
        r["peak_frac"] = r["tflops"] * 1e12 / peak
        print(f"{r['shape']:6} {r['format']:8} {r['M']:4d} {r['part']:8} {r['tflops']:8.3f} {100 * r['peak_frac']:6.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peaks=peaks, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
