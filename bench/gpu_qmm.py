"""GGUF weights on the GPU as stored (ktrans.kernels.quant_matmul) against the dense bf16 weight.

For each format and each dense shape of deepseek-v2-lite / qwen3-30b-a3b (attention projections,
shared experts, the output head) and rows M (decode 1, 4, 8; prefill 512): time per call
(triton.testing.do_bench, CUDA events), GB/s of weight bytes read, the same product with torch's
bf16 F.linear on the dequantized weight (what `weights: dense` runs), and the floor: the weight
bytes at the device-to-device copy bandwidth measured in the same run (read + write / 2).

  python bench/gpu_qmm.py                     # every format, every shape
  python bench/gpu_qmm.py --formats q4_k --m 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktrans.kernels.quant_matmul import dequantize, pack, quant_matmul  # noqa: E402
from ktrans.weights import quant  # noqa: E402

# (name, N, K): deepseek-v2-lite (hidden 2048) and qwen3-30b-a3b (hidden 2048, 32 heads x 128)
SHAPES = [("v2 q_proj", 3072, 2048), ("v2 kv_a", 576, 2048), ("v2 o_proj", 2048, 2048),
          ("v2 shared gate+up", 5632, 2048), ("v2 shared down", 2048, 2816), ("qwen3 qkv", 5120, 2048),
          ("qwen3 o_proj", 2048, 4096), ("v2 lm_head", 102400, 2048)]


def copy_gbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    from triton.testing import do_bench

    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="q4_k,q5_k,q6_k,q8_0")
    ap.add_argument("--m", default="1,4,8,512")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_qmm: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    bw = copy_gbs()
    print(f"{torch.cuda.get_device_name()}: device copy {bw:.0f} GB/s (read + write)")
    print(f"{'shape':20s} {'fmt':5s} {'M':>4s} {'ours us':>8s} {'GB/s':>7s} {'bf16 us':>8s} {'floor us':>9s} "
          f"{'vs bf16':>8s} {'of floor':>9s}")
    rows = []
    for qtype in args.formats.split(","):
        for name, n, k in SHAPES:
            w = np.ascontiguousarray(np.random.randn(n, k).astype(np.float32) * 0.02)
            data = quant.quantize(w, qtype)
            packed = {f: t.cuda() for f, t in pack(qtype, data, n, k).items()}
            dense = dequantize(qtype, packed).to(torch.bfloat16)
            nbytes = sum(t.numel() * t.element_size() for t in packed.values())
            floor_us = nbytes / (bw / 2 * 1e9) * 1e6
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ours = do_bench(lambda: quant_matmul(x, qtype, packed, n, k), warmup=10, rep=100) * 1e3
                ref = do_bench(lambda: F.linear(x, dense), warmup=10, rep=100) * 1e3
                row = dict(shape=name, qtype=qtype, n=n, k=k, m=m, ours_us=ours, bf16_us=ref, floor_us=floor_us,
                           gbs=nbytes / (ours * 1e-6) / 1e9, copy_gbs=bw, gpu=torch.cuda.get_device_name())
                rows.append(row)
                print(f"{name:20s} {qtype:5s} {m:4d} {ours:8.1f} {row['gbs']:7.0f} {ref:8.1f} {floor_us:9.1f} "
                      f"{ref / ours:7.2f}x {floor_us / ours * 100:8.0f}%", flush=True)
            del packed, dense
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
