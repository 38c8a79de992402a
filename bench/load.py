"""Weight-loading speed of a multi-GB GGUF with the page cache warm, next to memory bandwidth.

Claim: loading is bound by memory bandwidth, not by Python. With the file in the page cache a
load is a copy from cached pages into process memory, so its floor is the time of a plain memcpy
of the same bytes; this script prints both, plus the zero-copy paths (open, raw(),
expert_stack()) whose cost must not grow with the bytes at all.

    python bench/load.py                                   # generate deepseek_v3 'small' bf16 (36 layers), 3.9 GB
    python bench/load.py --layers 40 --quant bf16          # bigger
    python bench/load.py --gguf /models/DeepSeek-V3-Q4_K_M/  # any GGUF file, split set or directory

Generated models are cached under --cache (regenerate with --force). Dequantizing K-quant files
is compute-bound and reported separately (--dequant).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ktrans.weights import open_weights  # noqa: E402
from ktrans.weights.gguf_source import GGUFSource  # noqa: E402
from ktrans.weights.progress import human_bytes  # noqa: E402


def memcpy_bandwidth(nbytes: int = 1 << 30, repeats: int = 3, fresh: bool = False) -> float:
    """Best-of-n single-threaded copy speed between anonymous buffers, bytes/s; `fresh` copies
    into newly allocated memory each time (first-touch page faults and zeroing included, as
    every loaded tensor pays them)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        if fresh:
            src.copy()
        else:
            np.copyto(dst, src)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def warm(files: list[str]) -> float:
    """Read every file once (page cache warm); returns seconds."""
    buf = bytearray(64 << 20)                # reused: fresh buffers would time page zeroing instead
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def model_path(args) -> str:
    if args.gguf:
        return args.gguf
    from ktrans.genmodel import generate_model

    out = Path(args.cache) / f"{args.arch}-{args.preset}-{args.quant}-L{args.layers}"
    if args.force or not (out / "model.gguf").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {out} ...", flush=True)
        t0 = time.perf_counter()
        generate_model(out, arch=args.arch, preset=args.preset, quant=args.quant, layers=args.layers,
                       seed=0, force=True)
        print(f"  generated in {time.perf_counter() - t0:.1f} s")
    return str(out / "model.gguf")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench(path: str, dequant: bool) -> None:
    bw, bw_fresh = memcpy_bandwidth(), memcpy_bandwidth(fresh=True)
    _, t_import = timed(lambda: __import__("transformers").DeepseekV3Config)
    src, t_open = timed(lambda: open_weights(None, path))
    assert isinstance(src, GGUFSource)
    files = [f.path for f in src.reader.files]
    total = src.reader.nbytes
    t_warm = warm(files)
    print(f"file(s): {len(files)}, {len(src.reader.tensors)} tensors, {human_bytes(total)}; "
          f"warm-up read {t_warm:.2f} s ({human_bytes(total / t_warm)}/s)")
    _, t_cfg = timed(lambda: (src.config(), src.expected_shapes()))   # first use imports the model class
    names, t_names = timed(src.names)
    print(f"import transformers {t_import:.2f} s (not counted below); open + parse header: {t_open * 1e3:.1f} ms; "
          f"config + meta-model shapes: {t_cfg * 1e3:.1f} ms; resolve {len(names)} parameter names: "
          f"{t_names * 1e3:.1f} ms")

    as_is = [n for n in names if src._mapping()[n].transform == "copy"]   # stored in the HF layout
    raws, t_raw = timed(lambda: [src.raw(n) for n in as_is])
    print(f"raw() of the {len(as_is)} parameters stored as-is, {human_bytes(sum(r.nbytes for r in raws))}: "
          f"{t_raw * 1e3:.1f} ms (zero-copy)")
    del raws
    cfg = src.config()
    moe = [i for i in range(cfg.num_hidden_layers) if src.has(f"model.layers.{i}.mlp.experts.down_proj")]
    stacks, t_stack = timed(lambda: [src.expert_stack(i, p) for i in moe for p in ("gate", "up", "down")])
    print(f"expert_stack() of {len(stacks)} layer x proj stacks, {human_bytes(sum(s.nbytes for s in stacks))}: "
          f"{t_stack * 1e3:.1f} ms (zero-copy)")
    del stacks

    floor = total / bw
    print(f"\nmemcpy (anonymous -> anonymous, 1 thread): {human_bytes(bw)}/s into touched memory, "
          f"{human_bytes(bw_fresh)}/s into fresh memory; floor for {human_bytes(total)}: {floor:.2f} s / "
          f"{total / bw_fresh:.2f} s")
    plain = [n for n in names if src.info(n).qtype in ("f32", "f16", "bf16")]
    quant = [n for n in names if n not in plain]
    for label, group in (("plain (f32/f16/bf16)", plain), ("quantized (dequantized to f32)", quant if dequant else [])):
        if not group:
            continue
        nbytes = sum(src.info(n).nbytes for n in group)
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
        cpu0 = time.process_time()
        with src.loading(total_bytes=nbytes) as prog:
            for n in group:
                src.tensor(n, dtype=dtype.get(src.info(n).qtype, torch.float32))
        cpu = time.process_time() - cpu0
        rate = nbytes / prog.seconds
        # NOTE: CPU seconds (all threads) say how much work the load cost, whatever else shares
        # the machine; wall time is what a user waits.
        print(f"tensor() of {len(group)} {label} parameters: {prog.seconds:.2f} s wall, {human_bytes(rate)}/s "
              f"= {rate / bw_fresh:.0%} of memcpy into fresh memory; "
              f"{cpu:.2f} CPU-s = {human_bytes(nbytes / cpu)}/CPU-s")
    if quant and not dequant:
        print(f"({len(quant)} quantized parameters skipped; --dequant to time their dequantization)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="existing GGUF file, split set or directory (else one is generated)")
    ap.add_argument("--arch", default="deepseek_v3")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--cache", default=os.environ.get("KTRANS_BENCH_CACHE", "/tmp/ktrans-bench"))
    ap.add_argument("--force", action="store_true", help="regenerate the model")
    ap.add_argument("--dequant", action="store_true", help="also time tensor() of quantized parameters")
    args = ap.parse_args()
    print(f"ktrans bench/load.py  torch {torch.__version__}  cpus {os.cpu_count()}  "
          f"load average {os.getloadavg()[0]:.1f}")
    bench(model_path(args), args.dequant)


if __name__ == "__main__":
    main()
