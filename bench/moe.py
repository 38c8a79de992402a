"""One CPU MoE layer at DeepSeek-V3, Qwen3-30B-A3B and gpt-oss-120b shapes, ktrans vs kt-kernel 0.7.2.

For each weight format and T: µs per layer call (submit + sync, routing new every call, layers
cycled so the weights stream from DRAM), GB/s of expert weights read, TFLOP/s, and the fraction
of the roofline max(FLOPs / AMX peak, bytes / bandwidth); the machine's read bandwidth and AMX
peak are measured in the same run. kt-kernel runs the comparable format (AMXINT8, AMXINT4, BF16,
LLAMAFILE Q4_K) on the same bytes and threads; `ratio` = its time / ours (> 1: ktrans faster).
gpt-oss's shape runs its expert MLP (clamped SwiGLU); its released format is mxfp4 (kt-kernel has
none), and its H = I = 2880 is not a multiple of q4_k's 256-value blocks: q4_0 is the 4-bit
GGUF format to compare with there.

  python bench/moe.py --quick                       # small machine: fewer experts and cases
  python bench/moe.py --json moe.json               # the full table (16-core machine)
  python bench/moe.py --shapes qwen3 --formats q4_k,amx_int8 --T 1,512
  python bench/moe.py --repeat 5 ...                # each case 5 times, interleaved; the best counts
  python bench/moe.py --shapes gptoss --formats mxfp4,q4_0,q8_0,amx_int8 --T 1,32,512

On a shared machine one timing (and one AMX peak probe) moves by 2-3x: --repeat N times each
case N times (ours and the peer alternating) and keeps the fastest of each, and re-probes the
AMX peak before every row; each row's `roofline` and `peak%` are then taken against the highest
peak probed in the whole run (recomputed at the end), so two runs agree far better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_peer  # noqa: E402

from ktrans import _C, cpu  # noqa: E402
from ktrans.weights import quant  # noqa: E402

SHAPES = {"dsv3": dict(E=256, k=8, H=7168, I=2048, layers=1),
          "qwen3": dict(E=128, k=8, H=2048, I=768, layers=16),
          "gptoss": dict(E=128, k=4, H=2880, I=2880, layers=1, act="swiglu_oai")}
# format -> (ktrans backend, stored type of the source bytes)
FORMATS = {"q4_k": ("gguf", "q4_k"), "q6_k": ("gguf", "q6_k"), "q8_0": ("gguf", "q8_0"), "bf16": ("gguf", "bf16"),
           "amx_bf16": ("amx_bf16", "bf16"), "amx_int8": ("amx_int8", "bf16"), "amx_int4": ("amx_int4", "bf16")}
DEFAULT_FORMATS = list(FORMATS)
# Further GGUF block formats, on request (--formats q5_k,...).
FORMATS.update({q: ("gguf", q) for q in ("q5_k", "q4_0", "q5_0", "q2_k", "q3_k", "iq4_xs", "mxfp4")})
TS = (1, 4, 32, 512, 2048, 8192)
NPOOL = 4        # distinct random experts, tiled over E (same bytes, separate memory)
ROUTINGS = 61    # prime: a layer never sees the same routing twice in a row


def measure_bandwidth(threads: int, repeat: int = 1) -> float:
    """GB/s of a large streaming read (torch sum over 2 GiB, or 1/8 of RAM if smaller); the best
    of `repeat` rounds of 5 sums."""
    torch.set_num_threads(threads)
    n = min(1 << 29, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 32)
    x = torch.ones(n)
    x.sum()
    best = 0.0
    for _ in range(max(1, repeat)):
        t0, reps = time.perf_counter(), 5
        for _ in range(reps):
            x.sum()
        best = max(best, reps * x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def measure_amx_peak(threads: int, repeat: int = 1) -> dict[str, float]:
    """Tile-only FLOP/s (bf16) and op/s (int8) on `threads` cores, 0 where there is no AMX.

    NOTE: the best of `repeat` short probes (~10 ms each at 1 core): a probe during which another
    process held the core reads low, never high.
    """
    if cpu.best_isa() != "amx" or not hasattr(_C, "amx_peak"):
        return {"bf16": 0.0, "int8": 0.0}
    iters = 500_000 if repeat > 1 else 2_000_000
    out = {}
    for dtype, ops in (("bf16", 16 * 16 * 32 * 2), ("int8", 16 * 16 * 64 * 2)):
        _C.amx_peak(dtype, iters // 10, threads, 6)
        t = min(_C.amx_peak(dtype, iters, threads, 6) for _ in range(max(1, repeat)))
        out[dtype] = iters * threads * ops / t
    return out


def merge_peaks(best: dict[str, float], new: dict[str, float]) -> None:
    for k, v in new.items():
        best[k] = max(best.get(k, 0.0), v)


def source_experts(H: int, I: int) -> dict[str, list[np.ndarray]]:
    """NPOOL random experts per projection, bf16-rounded: f32 arrays [NPOOL, rows, cols]."""
    g = torch.Generator().manual_seed(0)
    mk = lambda r, c: (torch.randn(NPOOL, r, c, generator=g) / c**0.5).bfloat16().float().numpy()  # noqa: E731
    return {"gate": mk(I, H), "up": mk(I, H), "down": mk(H, I)}


def stored(src, qtype: str) -> list[np.ndarray]:
    """Per projection: uint8 [NPOOL, bytes per expert] in `qtype`."""
    out = []
    for p in ("gate", "up", "down"):
        a = src[p]
        if qtype == "bf16":  # values are bf16-exact: the high half of each f32 is the bf16
            raw = (a.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            raw = quant.quantize(a, qtype)
        out.append(np.ascontiguousarray(raw).reshape(NPOOL, -1))
    return out


def build_ours(fmt, shape, pool, src, max_len, gemm_min_tokens=-1, fused_max_tokens=-1):
    backend, qtype = FORMATS[fmt]
    E, H, I = shape["E"], shape["H"], shape["I"]
    raws = stored(src, qtype)
    layers = [_C.MoeLayer(pool, E, H, I, [qtype] * 3, backend=backend, max_chunk=max(max_len, 1),
                          gemm_min_tokens=gemm_min_tokens, act=shape.get("act", "silu"))
              for _ in range(shape["layers"])]
    if fused_max_tokens >= 0:
        for m in layers:
            m.fused_max_tokens = fused_max_tokens
    load_s, src_bytes = 0.0, 0
    for p in range(3):  # one projection of all E experts at a time: what a model load does
        full = np.ascontiguousarray(raws[p][np.arange(E) % NPOOL])
        t0 = time.perf_counter()
        for m in layers:
            m.load(p, 0, full)
        load_s += time.perf_counter() - t0
        src_bytes += full.nbytes * len(layers)
    return layers, dict(load_s=load_s, load_gbs=src_bytes / load_s / 1e9), raws


def full_tensors(fmt, shape, src, raws):
    """The peer's sources: contiguous [E, ...] tensors (bf16 values, or the same GGUF blocks)."""
    E = shape["E"]
    idx = np.arange(E) % NPOOL
    if fmt == "q4_k":
        return tuple(torch.from_numpy(np.ascontiguousarray(r[idx])) for r in raws)
    return tuple(torch.from_numpy(np.ascontiguousarray(src[p][idx])).bfloat16() for p in ("gate", "up", "down"))


def inputs(shape, T: int, n_layers: int):
    E, k, H = shape["E"], shape["k"], shape["H"]
    ids = torch.rand(ROUTINGS, T, E).argsort(-1)[..., :k].contiguous()                  # [G, T, k] int64
    w = torch.rand(ROUTINGS, T, k)
    x = (torch.randn(n_layers, T, H) / 4).bfloat16()
    out = torch.empty(n_layers, T, H, dtype=torch.bfloat16)
    return ids, w, x, out


def np16(t):
    return t.view(torch.int16).numpy().view(np.uint16)


def time_calls(call, T: int, budget_s: float) -> tuple[float, int]:
    # NOTE: kt-kernel's workers busy-spin for 50 ms after each task; wait them out so that
    # neither side is timed while the other's threads still hold the cores.
    time.sleep(0.2)
    for i in range(2 if T >= 2048 else 5):
        call(i)
    n, t0 = 0, time.perf_counter()
    while True:
        call(n)
        n += 1
        dt = time.perf_counter() - t0
        if (dt > budget_s and n >= 3) or n >= 2000:
            return dt / n, n


def bytes_per_expert(fmt: str, shape) -> float:
    """Bytes of one expert's three matrices as the kernels read them."""
    backend, qtype = FORMATS[fmt]
    H, I = shape["H"], shape["I"]
    if backend == "gguf":
        return 2 * quant.row_bytes(qtype, H) * I + quant.row_bytes(qtype, I) * H
    return _C.moe_weight_bytes(1, H, I, [qtype] * 3, backend, "replicate", 1)


def peak_for(fmt: str, peaks: dict[str, float]) -> float:
    """The tile-only peak a format's prefill is held to: int8 tiles for amx_int8, bf16 tiles for
    the others (amx_bf16, amx_int4's expanded panels, the gguf formats' GEMM path)."""
    return peaks["int8"] if FORMATS[fmt][0] == "amx_int8" else peaks["bf16"]


def metrics(fmt, shape, T, dt, ids, peaks, bw) -> dict:
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    uniq = float(np.mean([len(torch.unique(ids[g])) for g in range(ROUTINGS)]))       # experts touched
    nbytes = uniq * bytes_per_expert(fmt, shape)
    flops = 2.0 * 3 * H * I * k * T
    return dict(us=dt * 1e6, gbs=nbytes / dt / 1e9, tflops=flops / dt / 1e12, uniq_experts=uniq, bytes=nbytes,
                flops=flops, **roofline(fmt, flops, nbytes, dt, peaks, bw))


def roofline(fmt, flops, nbytes, dt, peaks, bw) -> dict:
    """roofline_frac = max(FLOPs / peak, bytes / bandwidth) / time; peak_frac = FLOP/s / peak."""
    peak = peak_for(fmt, peaks)
    floor = max(flops / peak if peak else 0.0, nbytes / (bw * 1e9))
    return dict(roofline_frac=floor / dt, peak_frac=flops / dt / peak if peak else 0.0)


def run_shape(name, shape, args, pool, peaks, bw, peer_variant):
    """Rows of one shape. With args.repeat > 1 each case runs that many rounds (ours, then the
    peer), each round re-probes the AMX peak into `peaks` (the run's best), and the fastest time
    of each side is kept."""
    rows = []
    src = source_experts(shape["H"], shape["I"])
    Ts = [t for t in args.T if t <= args.max_T]
    for fmt in args.formats:
        layers, load, raws = build_ours(fmt, shape, pool, src, max(Ts), args.gemm_min_tokens, args.fused_max_tokens)
        peer = label = None
        # NOTE: kt-kernel computes SiLU experts without biases: no peer for other expert MLPs
        # (gpt-oss's clamped SwiGLU), whose timing and NMSE would compare different functions.
        if peer_variant and fmt in moe_peer.PEERS and not args.no_peer and shape.get("act", "silu") == "silu":
            try:
                peer = moe_peer.Peer(args.peer_threads or args.threads)
                t0 = time.perf_counter()
                label = peer.build(fmt, shape["E"], shape["k"], shape["H"], shape["I"], shape["layers"], max(Ts),
                                   {fmt: full_tensors(fmt, shape, src, raws)})
                peer_load = time.perf_counter() - t0
            except RuntimeError as e:
                print(f"  peer {fmt}: {e}", flush=True)
                peer = None
        for T in Ts:
            ids, w, x, out = inputs(shape, T, len(layers))
            ours = lambda i: layers[i % len(layers)].forward(  # noqa: E731
                np16(x[i % len(layers)]), ids[i % ROUTINGS].numpy(), w[i % ROUTINGS].numpy(), np16(out[i % len(layers)]))
            call = None
            if peer is not None:
                qlen = torch.tensor([T], dtype=torch.int32)
                pout = torch.empty_like(out)
                call = lambda i: peer.call(i, T, shape["k"], ids[i % ROUTINGS], w[i % ROUTINGS],  # noqa: E731
                                           x[i % len(layers)], pout[i % len(layers)], qlen)
            runs, peer_runs, n = [], [], 0
            for _ in range(args.repeat):
                if args.repeat > 1:
                    merge_peaks(peaks, measure_amx_peak(args.threads, 3))
                dt, n = time_calls(ours, T, args.budget)
                runs.append(dt)
                if call is not None:
                    peer_runs.append(time_calls(call, T, args.budget)[0])
            dt = min(runs)
            row = dict(shape=name, format=fmt, T=T, layers=len(layers), calls=n, **load,
                       us_runs=[r * 1e6 for r in runs], **metrics(fmt, shape, T, dt, ids, peaks, bw))
            if call is not None:
                pdt = min(peer_runs)
                # same inputs, one call each: how far apart the two outputs are
                ours(0), call(0)
                ref = out[0].float()
                nmse = float((pout[0].float() - ref).pow(2).sum() / ref.pow(2).sum())
                row.update(peer=label, peer_us=pdt * 1e6, peer_us_runs=[r * 1e6 for r in peer_runs],
                           peer_load_s=peer_load, ratio=pdt / dt, nmse_vs_peer=nmse)
            rows.append(row)
            print(fmt_row(row), flush=True)
        if peer is not None:
            peer.free()
        del layers
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def fmt_row(r: dict) -> str:
    s = (f"{r['shape']:6} {r['format']:9} T={r['T']:<5} {r['us']:10.1f} us  {r['gbs']:7.1f} GB/s  "
         f"{r['tflops']:7.3f} TFLOP/s  roofline {100 * r['roofline_frac']:5.1f}%  peak {100 * r['peak_frac']:5.1f}%")
    if len(r.get("us_runs", ())) > 1:
        s += f"  (spread {max(r['us_runs']) / min(r['us_runs']):4.2f}x)"
    if "peer" in r:
        s += f"  | {r['peer']}: {r['peer_us']:10.1f} us  ratio {r['ratio']:5.2f}  nmse {r['nmse_vs_peer']:.1e}"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="dsv3,qwen3")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma list of: {', '.join(FORMATS)}")
    ap.add_argument("--T", default=",".join(map(str, TS)))
    ap.add_argument("--threads", type=int, default=0, help="ktrans threads (default: physical cores)")
    ap.add_argument("--peer-threads", type=int, default=0, help="kt-kernel threads (default: --threads)")
    ap.add_argument("--experts", type=int, default=0, help="override E (smaller machines)")
    ap.add_argument("--layers", type=int, default=0, help="override layers per shape")
    ap.add_argument("--max-T", type=int, default=1 << 30)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per case (and round)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per case, ours and the peer alternating; the fastest round of each counts, "
                         "and the AMX peak is re-probed every round (the run's best is the reference)")
    ap.add_argument("--quick", action="store_true", help="E=32, 2 layers, T in 1,32,512, 0.3 s per case")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--gemm-min-tokens", type=int, default=-1,
                    help="gguf formats: tokens per expert from which the bf16-panel GEMM path runs "
                         "(0: never; default: the layer's own, 24 with AMX)")
    ap.add_argument("--fused-max-tokens", type=int, default=-1,
                    help="chunks of at most this many tokens run in one fan-out (0: never; default: the layer's, 8)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.experts, args.layers, args.budget = args.experts or 32, args.layers or 2, 0.3
        args.T = args.T if args.T != ",".join(map(str, TS)) else "1,32,512"
    args.T = [int(t) for t in args.T.split(",")]
    args.formats = args.formats.split(",")
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)}; expected some of: {', '.join(FORMATS)}")
    bad_shapes = [n for n in args.shapes.split(",") if n not in SHAPES]
    if bad_shapes:
        ap.error(f"unknown shape(s) {', '.join(bad_shapes)}; expected some of: {', '.join(SHAPES)}")
    args.threads = args.threads or len(_C.physical_cores())
    pool = _C.ThreadPool(args.threads)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    bw = measure_bandwidth(args.threads, args.repeat)
    peaks = measure_amx_peak(args.threads, args.repeat)
    peer_variant = moe_peer.available()
    print(f"threads={args.threads} isa={cpu.selected_isa()} read bandwidth {bw:.1f} GB/s  AMX peak bf16 "
          f"{peaks['bf16'] / 1e12:.2f} TFLOP/s int8 {peaks['int8'] / 1e12:.2f} TOP/s  kt-kernel: {peer_variant}",
          flush=True)
    rows = []
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        shape["E"] = args.experts or shape["E"]
        shape["layers"] = args.layers or shape["layers"]
        rows += run_shape(name, shape, args, pool, peaks, bw, peer_variant)
    if args.repeat > 1:  # every row against the best peak of the whole run
        for r in rows:
            r.update(roofline(r["format"], r["flops"], r["bytes"], r["us"] / 1e6, peaks, bw))
        print(f"best AMX peak of the run: bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s, int8 {peaks['int8'] / 1e12:.2f} "
              f"TOP/s; rows against it:")
        for r in rows:
            print(fmt_row(r))
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit, cpu=cpu_model(),
                    threads=args.threads, isa=cpu.selected_isa(), bandwidth_gbs=bw, amx_peak=peaks,
                    kt_kernel=peer_variant, command=" ".join(sys.argv))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
