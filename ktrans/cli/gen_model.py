"""`ktrans gen-model`: write a random model directory of any supported architecture and size."""

from __future__ import annotations

import sys
import time

_HELP = """\
Write a complete random model directory: config.json (loads with transformers' AutoConfig),
a byte-level BPE tokenizer with the family's chat template and special tokens, model.gguf
(llama.cpp metadata and tensor names) and, with --with-safetensors, the same weights as HF
safetensors in the real checkpoint layout. Weights are scaled so activations stay finite through
every layer. Presets: tiny/small test shapes, or the real model's shapes (e.g. deepseek-v3,
qwen3-30b-a3b); --layers cuts depth for quick runs.
"""


def register(sub) -> None:
    from ktrans.config.arch import ARCHS
    from ktrans.genmodel.presets import QUANT_CHOICES
    from ktrans.genmodel.presets import PRESETS

    presets = "; ".join(f"{a}: {', '.join(p)}" for a, p in PRESETS.items())
    p = sub.add_parser("gen-model", help="write a random model (config, tokenizer, GGUF, safetensors)",
                       description=_HELP)
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty unless --force)")
    p.add_argument("--arch", required=True, help=f"architecture: {', '.join(ARCHS)}")
    p.add_argument("--preset", default="tiny", help=f"model shape (default tiny). {presets}")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--quant", default="f32",
                   help=f"GGUF tensor type: {', '.join(QUANT_CHOICES)} (q4_k_m = llama.cpp's mixture; "
                        "default f32)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--with-safetensors", action="store_true",
                   help="also write the weights (dequantized from the GGUF) as HF safetensors")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--threads", type=int, default=0, help="worker threads (default: all cores)")
    p.set_defaults(func=run)


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from ktrans.genmodel import generate_model
    from ktrans.genmodel.generate import total_gguf_bytes

    kw = dict(arch=args.arch, preset=args.preset, quant=args.quant, layers=args.layers, seed=args.seed,
              with_safetensors=args.with_safetensors, force=args.force, nthreads=args.threads)
    t0 = time.perf_counter()
    if sys.stderr.isatty():
        total = total_gguf_bytes(args.arch, args.preset, args.quant, args.layers)
        with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      transient=True) as bar:
            task = bar.add_task("model.gguf", total=total)
            out = generate_model(args.out, **kw, on_bytes=lambda n: bar.advance(task, n))
    else:
        out = generate_model(args.out, **kw)
    secs = time.perf_counter() - t0
    mb = _size(out) / 1e6
    print(f"wrote {out}: {args.arch} {args.preset} ({args.quant}), {', '.join(sorted(f.name for f in out.iterdir()))}"
          f" — {mb:.1f} MB in {secs:.1f} s ({mb / secs:.0f} MB/s)")
    return 0
