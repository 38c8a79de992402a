"""Fixed cost of one CPU MoE call: what a decode step pays per layer before any weight is read.

A tiny q4_k layer (E 8, H = I = 256: 0.3 MB of experts, in L2) at T = 1 through ktrans's C++
layer, for each thread count and idle-spin setting; next to it the same layer in plain torch ops
(dequantized weights, one F.linear per projection and expert: the naive baseline) and the floor,
an empty task submitted to the pool, fanned out to every thread and waited for (submit + one
barrier + sync, no work). Medians over --calls calls, routing new every call.

    python bench/moe_call.py                       # threads 1 and all cores, spin 0 / 200 / 5000 us
    python bench/moe_call.py --threads 16 --spin 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ktrans import _C, cpu
from ktrans.weights import quant

E, H, I, K = 8, 256, 256, 8


def median_us(fn, calls: int) -> float:
    for _ in range(min(20, calls)):  # warm-up
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="", help="comma list (default: 1 and the physical cores)")
    ap.add_argument("--spin", default="0,200,5000", help="comma list of idle spins in us (KTRANS_SPIN_US)")
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    cores = cpu.physical_cores()
    try:
        threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
        spins = [int(s) for s in args.spin.split(",")]
    except ValueError:
        ap.error("--threads and --spin take comma lists of integers")
    if min(threads) < 1 or min(spins) < 0 or args.calls < 1:
        ap.error("--threads must be >= 1, --spin >= 0 and --calls >= 1")
    rng = np.random.default_rng()
    src = [rng.standard_normal((E * I, H)).astype(np.float32) * 0.05,
           rng.standard_normal((E * I, H)).astype(np.float32) * 0.05,
           rng.standard_normal((E * H, I)).astype(np.float32) * 0.05]
    raw = [quant.quantize(w, "q4_k") for w in src]
    deq = [torch.from_numpy(quant.dequantize(r, "q4_k", w.shape)).view(E, -1, w.shape[1]) for r, w in zip(raw, src)]
    x = rng.standard_normal((1, H)).astype(np.float32)
    xt = torch.from_numpy(x)
    out = np.zeros_like(x)
    wts = rng.random((1, K)).astype(np.float32)
    routes = [rng.permutation(E)[:K].astype(np.int64).reshape(1, K) for _ in range(64)]
    it = iter(range(1 << 62))

    def torch_layer():
        ids = routes[next(it) % len(routes)][0]
        y = torch.zeros(1, H)
        for j, e in enumerate(ids):
            h = F.silu(F.linear(xt, deq[0][e])) * F.linear(xt, deq[1][e])
            y += float(wts[0, j]) * F.linear(h, deq[2][e])
        return y

    torch.set_num_threads(1)
    peer = median_us(torch_layer, args.calls)
    print(f"isa={cpu.selected_isa()} physical cores={cores}; tiny q4_k layer E={E} H={H} I={I} k={K}, T=1")
    print(f"{'threads':>7} {'spin us':>8} {'ktrans us':>10} {'torch us':>9} {'floor us':>9}")
    for n in threads:
        for spin in spins:
            pool = _C.ThreadPool(n, 0, True, spin)
            layer = _C.MoeLayer(pool, E, H, I, ["q4_k"] * 3)
            for p in range(3):
                layer.load(p, 0, raw[p].reshape(E, -1))
            ours = median_us(lambda: layer.forward(x, routes[next(it) % len(routes)], wts, out, False), args.calls)
            floor = median_us(pool.round_trip, args.calls) if hasattr(pool, "round_trip") else float("nan")
            print(f"{n:7d} {spin:8d} {ours:10.1f} {peer:9.1f} {floor:9.1f}", flush=True)
            del layer, pool


if __name__ == "__main__":
    main()
