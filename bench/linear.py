"""The CPU linear layer (csrc/linear/) on the dense shapes of a Qwen2-0.5B q4_k_m GGUF, against
torch's f32 F.linear on the dequantized weights (what the CPU path ran before) and the
memory-bound floor (weight bytes / host copy bandwidth measured in the same run).

Per shape and T: median time of one call through ktrans._C.Linear (dots path, and at T >= 16 on
AMX machines the bf16 tile GEMM: both are shown where both run), GB/s of weight bytes read, and
torch's time. Weights are random, quantized by ktrans.

    python bench/linear.py                      # T = 1, 8, 512 on the 0.5B shapes, all cores
    python bench/linear.py --tokens 1,512 --threads 1
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

# (name, format, N, K): the Qwen2-0.5B q4_k_m mix (attention and gate/up fall back to q5_0: 896
# is not a multiple of 256), and its tied q8_0 output head.
SHAPES = [("attn_q/o", "q5_0", 896, 896), ("ffn_gate/up", "q5_0", 4864, 896), ("ffn_down", "q4_k", 896, 4864),
          ("ffn_down", "q6_k", 896, 4864), ("output", "q8_0", 151936, 896)]


def median_s(fn, calls: int) -> float:
    fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / min(median_s(lambda: dst.copy_(src), 5) for _ in range(2)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,512", help="comma list of T")
    ap.add_argument("--threads", type=int, default=cpu.physical_cores())
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    torch.set_num_threads(args.threads)
    pool = _C.ThreadPool(args.threads)
    bw = bandwidth_gbs()
    print(f"isa {cpu.selected_isa()}, {args.threads} threads, host copy bandwidth {bw:.1f} GB/s")
    print(f"{'shape':12s} {'fmt':5s} {'N':>6s} {'K':>5s} {'T':>4s} {'dots ms':>8s} {'GB/s':>6s} "
          f"{'gemm ms':>8s} {'torch f32 ms':>12s} {'floor ms':>8s}")
    rng = np.random.default_rng(0)
    for name, fmt, n, k in SHAPES:
        w = (rng.standard_normal((n, k), dtype=np.float32) / k**0.5)
        raw = quant.quantize(w, fmt).reshape(-1)
        deq = torch.from_numpy(quant.dequantize(raw, fmt, (n, k)))
        dots = _C.Linear(pool, fmt, n, k, raw, gemm_min_tokens=0)
        gemm = _C.Linear(pool, fmt, n, k, raw, gemm_min_tokens=1) if cpu.selected_isa() == "amx" else None
        floor = raw.nbytes / (bw * 1e9)
        for t in tokens:
            x = torch.randn(t, k)
            y = torch.empty(t, n)
            td = median_s(lambda: dots.forward(x.numpy(), y.numpy()), args.calls)
            tg = median_s(lambda: gemm.forward(x.numpy(), y.numpy()), args.calls) if gemm and t > 1 else None
            tt = median_s(lambda: F.linear(x, deq), max(3, args.calls // 4))
            gs = f"{tg * 1e3:8.3f}" if tg else "       -"
            print(f"{name:12s} {fmt:5s} {n:6d} {k:5d} {t:4d} {td * 1e3:8.3f} {raw.nbytes / td / 1e9:6.1f} "
                  f"{gs} {tt * 1e3:12.3f} {floor * 1e3:8.3f}", flush=True)


if __name__ == "__main__":
    main()
