"""Speed of `ktrans gen-model` on real-size presets, next to its floor.

Claim: generating a real-size model is bound by quantization (multi-threaded C++), not by Python:
tensors are generated, quantized and written chunk by chunk on every core. The floor printed
beside each run is the same number of parameters pushed through `quant.quantize` alone on all
threads (no generation, no I/O), so "x floor" near 1 means the pipeline adds little.

    python bench/gen_model.py                                    # qwen3-30b-a3b + deepseek-v2-lite, 4 layers, q4_k
    python bench/gen_model.py --quant q4_k_m --layers 8 --with-safetensors
    python bench/gen_model.py --models deepseek_v3:deepseek-v3 --layers 4 --quant q4_k

Output goes to a temporary directory (or --out) and is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ktrans.genmodel import generate_model  # noqa: E402
from ktrans.genmodel.generate import total_gguf_bytes  # noqa: E402
from ktrans.weights import quant  # noqa: E402

DEFAULT_MODELS = "qwen3_moe:qwen3-30b-a3b,deepseek_v2:deepseek-v2-lite"


def quantize_floor(qtype: str, nthreads: int, cols: int = 2048, rows: int = 8192) -> float:
    """Parameters/s of quant.quantize alone on all threads (best of 3), the pipeline's floor."""
    base = {"q4_k_m": "q4_k"}.get(qtype, qtype)
    x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * 0.02
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        quant.quantize(x, base, nthreads=nthreads)
        best = max(best, x.size / (time.perf_counter() - t0))
    return best


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def run_one(arch: str, preset: str, args, root: Path) -> None:
    out = root / f"{arch}-{preset}-{args.layers}l-{args.quant}"
    gguf_bytes = total_gguf_bytes(arch, preset, args.quant, args.layers)
    t0 = time.perf_counter()
    generate_model(out, arch=arch, preset=preset, quant=args.quant, layers=args.layers, seed=0,
                   with_safetensors=args.with_safetensors, force=True, nthreads=args.threads)
    secs = time.perf_counter() - t0
    params = _params(out)
    total = dir_bytes(out)
    floor = quantize_floor(args.quant, args.threads)
    print(f"{arch:12s} {preset:18s} {args.layers:3d} layers {args.quant:7s} "
          f"{params / 1e9:6.2f} B params  gguf {gguf_bytes / 1e9:6.2f} GB  all files {total / 1e9:6.2f} GB  "
          f"{secs:7.1f} s  {total / 1e6 / secs:7.0f} MB/s  {params / 1e6 / secs:7.0f} Mparam/s  "
          f"(quantize alone: {floor / 1e6:.0f} Mparam/s, x{floor * secs / params:.2f} of floor time)", flush=True)
    if not args.keep:
        shutil.rmtree(out)


def _params(out: Path) -> int:
    import gguf

    return sum(int(np.prod([int(x) for x in t.shape])) for t in gguf.GGUFReader(out / "model.gguf").tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma list of arch:preset")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="q4_k")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--with-safetensors", action="store_true")
    ap.add_argument("--out", default=None, help="directory for the models (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    print(f"gen-model bench: {args.threads} threads, {os.cpu_count()} CPUs", flush=True)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ktrans-genbench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for item in args.models.split(","):
            arch, preset = item.split(":")
            run_one(arch, preset, args, root)
    finally:
        if not args.out and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
