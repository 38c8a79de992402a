"""Decode attention over the paged latent cache (DeepSeek's absorbed MLA): ktrans's paged Triton
kernel beside flashinfer's BatchMLAPagedAttentionWrapper where flashinfer imports, on the same
cache, queries and page tables, and the memory floor of the same run.

Per shape (heads H, latent r = 512, rope dr = 64, page 64 tokens, bf16) and (batch B, context L):
  ktrans     ktrans.kernels.paged_decode.paged_decode_attention (split-KV, both kernels)
  flashinfer plan() once for the lengths, then run() timed alone (what a graph replay would do;
             plan's host time is printed apart)
  floor      the latent rows each request reads once (B x L x 576 x 2 bytes) at the traffic rate of
             a device-to-device copy measured here (its reads and writes counted)
Times are medians of CUDA-event-timed calls after warm-up; the error column is each kernel's max
abs difference from a float32 torch reference on the same inputs (softmax over the gathered rows).

    python bench/attn_decode.py                           # H = 16 (v2-lite) and 128 (V3)
    python bench/attn_decode.py --heads 128 --contexts 4096,32768 --batches 1,8

flashinfer: `pip install flashinfer-python`, or from the sdist without an index (JIT-compiles the
MLA kernel with nvcc on first use; `bash bench/accel.sh flashinfer` does this on the accelerator).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktrans.kernels.paged_decode import paged_decode_attention  # noqa: E402

R, DR, PAGE = 512, 64, 64


def timed(fn, reps: int = 50) -> float:
    """Median seconds of one call (CUDA events)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def copy_rate_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x), 10) / 1e9


def reference(q_lat, q_pe, cache, tables, lens, scale) -> torch.Tensor:
    """float32 softmax over each request's gathered rows: [B, H, r]."""
    out = []
    for b in range(q_lat.shape[0]):
        n = int(lens[b])
        slots = (tables[b, torch.arange(n, device=cache.device) // PAGE] * PAGE
                 + torch.arange(n, device=cache.device) % PAGE)
        rows = cache[slots].float()                                                  # [n, r + dr]
        s = (q_lat[b].float() @ rows[:, :R].T + q_pe[b].float() @ rows[:, R:].T) * scale  # [H, n]
        out.append(torch.softmax(s, -1) @ rows[:, :R])
    return torch.stack(out)


def load_flashinfer():
    try:
        import flashinfer.mla  # noqa: F401
        return flashinfer, None
    except Exception as e:                # not installed, or its import failed: say which
        return None, f"{type(e).__name__}: {e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="16,128", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--contexts", default="1024,8192,32768", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--out", help="append one JSON line per row to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/attn_decode.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    fi, why = (None, "--no-flashinfer") if args.no_flashinfer else load_flashinfer()
    rate = copy_rate_gbs()
    print(f"{torch.cuda.get_device_name()}: device copy {rate:.0f} GB/s; flashinfer: "
          f"{fi.__version__ if fi else 'not run (' + why + ')'}", flush=True)
    print(f"{'H':>4s} {'B':>3s} {'L':>6s} {'ktrans us':>10s} {'flashinfer us':>13s} {'plan us':>8s} "
          f"{'floor us':>8s} {'ktrans % floor':>14s} {'err ktrans':>10s} {'err fi':>8s}")
    dev = torch.device("cuda")
    ws = torch.empty(128 << 20, dtype=torch.int8, device=dev) if fi else None
    for h in args.heads:
        scale = (128 + DR) ** -0.5
        for b in args.batches:
            for L in args.contexts:
                pages_per = -(-L // PAGE)
                total_pages = b * pages_per
                cache = torch.randn(total_pages * PAGE, R + DR, dtype=torch.bfloat16, device=dev) * 0.5
                tables = torch.randperm(total_pages, device=dev, dtype=torch.int32).view(b, pages_per)
                lens = torch.full((b,), L, dtype=torch.int32, device=dev)
                q_lat = torch.randn(b, h, R, dtype=torch.bfloat16, device=dev) * 0.1
                q_pe = torch.randn(b, h, DR, dtype=torch.bfloat16, device=dev) * 0.1
                latent, k_pe = cache[:, None, :R], cache[:, None, R:]
                ours = lambda: paged_decode_attention(q_lat, latent, latent, tables, lens, PAGE, scale,  # noqa: E731
                                                      q_b=q_pe, k_b=k_pe)
                ref = reference(q_lat, q_pe, cache, tables, lens, scale) if b * L <= 8 * 32768 else None
                t_ours = timed(ours)
                err = float((ours().float() - ref).abs().max()) if ref is not None else float("nan")
                t_fi = t_plan = err_fi = None
                if fi:
                    w = fi.mla.BatchMLAPagedAttentionWrapper(ws, backend="auto")
                    qo = torch.arange(b + 1, dtype=torch.int32, device=dev)
                    kv_indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * pages_per
                    t0 = time.perf_counter()
                    w.plan(qo, kv_indptr, tables.reshape(-1), lens, h, R, DR, PAGE, False, scale,
                           q_lat.dtype, cache.dtype)
                    t_plan = time.perf_counter() - t0
                    ckv = cache.view(total_pages, PAGE, R + DR)[:, :, :R]
                    kpe = cache.view(total_pages, PAGE, R + DR)[:, :, R:]
                    run = lambda: w.run(q_lat, q_pe, ckv, kpe)  # noqa: E731
                    t_fi = timed(run)
                    err_fi = float((run().float() - ref).abs().max()) if ref is not None else float("nan")
                floor = b * L * (R + DR) * 2 / (rate * 1e9)       # each row read once at the copy's traffic rate
                row = dict(heads=h, batch=b, context=L, ktrans_us=t_ours * 1e6,
                           flashinfer_us=t_fi * 1e6 if t_fi else None, plan_us=t_plan * 1e6 if t_plan else None,
                           floor_us=floor * 1e6, err_ktrans=err, err_flashinfer=err_fi,
                           gpu=torch.cuda.get_device_name(), flashinfer=getattr(fi, "__version__", None))
                fis = f"{t_fi * 1e6:13.1f}" if t_fi else f"{'-':>13s}"
                pls = f"{t_plan * 1e6:8.0f}" if t_plan else f"{'-':>8s}"
                efs = f"{err_fi:8.2e}" if err_fi is not None else f"{'-':>8s}"
                print(f"{h:4d} {b:3d} {L:6d} {t_ours * 1e6:10.1f} {fis} {pls} {floor * 1e6:8.1f} "
                      f"{100 * floor / t_ours:13.0f}% {err:10.2e} {efs}", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                del cache, tables
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
