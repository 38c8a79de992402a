"""The model flags shared by `ktrans chat`, `ktrans generate`, local_chat.py and `ktrans serve`.

Spelled as KTransformers spells them (`--model_path`, `--gguf_path`, ...), with dashed aliases
(`--model-path`). `runner_kwargs()` turns parsed flags into ModelRunner keyword arguments and
`engine_kwargs()` into the engine's; both check values first and raise UsageError naming the flag.

With no model flags at all, `use_demo_model()` points them at a tiny random-weight model of the
DeepSeek-V3 architecture, generated once under the ktrans cache directory, so a first run works
anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ktrans.errors import UsageError

DEMO_ARCH = "deepseek_v3"
DEMO_PRESET = "tiny"
DEMO_QUANT = "q4_k"


def _flag(group, name: str, **kw) -> None:
    """Add `--name` with its dashed alias."""
    dashed = name.replace("_", "-")
    names = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    group.add_argument(*names, dest=name, **kw)


def add_model_args(parser, *, cache_lens: int = 4096, chunk_size: int = 2048, max_new_tokens: int = 1000):
    """Add the model flags to an argparse parser; defaults differ between chat and server."""
    g = parser.add_argument_group("model")
    _flag(g, "model_path", metavar="DIR", help="HF model directory (config.json, tokenizer); "
          "weights come from --gguf_path when given")
    _flag(g, "gguf_path", metavar="PATH", help="GGUF file, first file of a split set, or a directory "
          "of them; alone, config and tokenizer are read from its metadata")
    _flag(g, "optimize_config_path", metavar="YAML", help="placement rule file (default: on a GPU the placement "
          "fitted to this machine (--fit), else the shipped rules for the model's architecture)")
    # NOTE: on by default: on the H100, deepseek-v2-lite q4_k_m fitted (every expert in VRAM) decoded
    # at 113 tok/s and prefilled 1024 tokens at 4179 tok/s, the shipped rule file at 30 and 331
    # (docs/benchmarks.md, "--fit beside the shipped rule files").
    g.add_argument("--fit", dest="fit", action=argparse.BooleanOptionalAction, default=True,
                   help="with no rule file on a GPU (the default): place the model to fit this machine (dense "
                        "parts, KV cache, then the most used experts in spare VRAM) and write the rules it chose; "
                        "--no-fit loads the shipped rule file for the architecture instead")
    _flag(g, "gpu_memory", type=float, metavar="GB", help="--fit uses at most this many GiB of the GPU")
    _flag(g, "cpu_infer", type=int, metavar="N", help="CPU threads for the routed experts (default: physical cores)")
    _flag(g, "cache_lens", type=int, default=cache_lens, metavar="TOKENS",
          help=f"KV cache size in tokens, shared by all requests (default {cache_lens})")
    _flag(g, "chunk_size", type=int, default=chunk_size, metavar="TOKENS",
          help=f"most tokens run per engine step; longer prompts are prefilled in chunks (default {chunk_size})")
    _flag(g, "device", default="auto", metavar="DEV",
          help="cuda, cuda:N or cpu (default: cuda when available, else cpu with all-CPU rules)")
    _flag(g, "max_new_tokens", type=int, default=max_new_tokens, metavar="N",
          help=f"most tokens generated per reply (default {max_new_tokens})")
    _flag(g, "page_size", type=int, metavar="TOKENS", help="KV page size (default: the runner's)")
    _flag(g, "disable_cuda_graphs", action="store_true",
          help="run decode steps eagerly instead of replaying CUDA graphs (for debugging and comparison)")
    _flag(g, "force_think", action="store_true", help="start every reply inside <think> (R1-style models)")
    _flag(g, "trust_rules", action="store_true", help="allow rule files to import Python code they name")
    return g


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: expected cuda, cuda:N, cpu or auto")
    return device


def _positive(args, *names: str) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1, got {v}")


def runner_kwargs(args, *, progress: bool = True, say=None) -> dict:
    """ModelRunner keyword arguments from parsed flags (checked). On a GPU with no rule file
    named, --fit writes the placement for this machine and the runner loads that file; `say`
    (default: stderr) gets what it chose."""
    _positive(args, "cpu_infer", "cache_lens", "chunk_size", "max_new_tokens", "page_size")
    for name in ("model_path", "gguf_path", "optimize_config_path"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(os.path.expanduser(path)):
            raise UsageError(f"--{name} {path}: no such file or directory")
    kw = dict(model_path=_expand(args.model_path), gguf_path=_expand(args.gguf_path),
              optimize_config_path=_expand(args.optimize_config_path), device=resolve_device(args.device),
              cpu_infer=args.cpu_infer, cache_lens=args.cache_lens, trust_rules=args.trust_rules,
              progress=progress, cuda_graphs=not getattr(args, "disable_cuda_graphs", False))
    if args.page_size is not None:
        kw["page_size"] = args.page_size
    _fit(args, kw, say or (lambda msg: print(msg, file=sys.stderr)))
    return kw


def _fit(args, kw: dict, say) -> None:
    gpu_memory = getattr(args, "gpu_memory", None)
    if gpu_memory is not None and (kw["optimize_config_path"] or not getattr(args, "fit", True)):
        raise UsageError("--gpu_memory caps what --fit places; with --optimize_config_path or --no-fit the rule "
                         "file decides (drop --gpu_memory)")
    if gpu_memory is not None and not kw["device"].startswith("cuda"):
        raise UsageError(f"--gpu_memory caps the GPU, but the model runs on {kw['device']}; drop it or use --device cuda")
    if kw["optimize_config_path"] or not getattr(args, "fit", True) or not kw["device"].startswith("cuda"):
        return
    from ktrans.engine.model_runner import DEFAULT_PAGE_SIZE
    from ktrans.fit.load import fit_for_load

    result = fit_for_load(model_path=kw["model_path"], gguf_path=kw["gguf_path"], device=kw["device"],
                          cache_lens=kw["cache_lens"], page_size=kw.get("page_size", DEFAULT_PAGE_SIZE),
                          chunk_size=args.chunk_size, gpu_memory=gpu_memory, say=say,
                          state_slots=getattr(args, "max_batch_size", None) or 1)
    kw["optimize_config_path"] = str(result.path)


def engine_kwargs(args, *, max_batch_size: int = 1) -> dict:
    """LLMEngine/AsyncEngine keyword arguments besides the runner's."""
    return dict(max_batch_size=getattr(args, "max_batch_size", None) or max_batch_size,
                chunk_size=args.chunk_size, max_queue=getattr(args, "max_queue", None))


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(path)


def cache_dir() -> Path:
    """Where ktrans keeps generated files: $KTRANS_CACHE, else $XDG_CACHE_HOME/ktrans, else ~/.cache/ktrans."""
    if os.environ.get("KTRANS_CACHE"):
        return Path(os.environ["KTRANS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ktrans"


def use_demo_model(args, say) -> bool:
    """With no model flags, point args at the demo model (generating it once); `say` gets the
    one-line notice. Returns whether the demo model is used."""
    if args.model_path or args.gguf_path:
        return False
    from ktrans.genmodel import generate_model

    target = cache_dir() / f"demo-{DEMO_ARCH}-{DEMO_PRESET}-{DEMO_QUANT}"
    if not (target / "model.gguf").exists():
        say(f"Generating the demo model once into {target} ...")
        target.parent.mkdir(parents=True, exist_ok=True)
        # generate_model writes into a temporary directory and renames it into place, so a
        # concurrent or interrupted first run never leaves half a model behind.
        generate_model(target, arch=DEMO_ARCH, preset=DEMO_PRESET, quant=DEMO_QUANT, force=True)
    say(f"No model given: using a tiny {DEMO_ARCH} model with RANDOM weights (replies are noise). "
        f"For a real model: --gguf_path FILE_OR_DIR [--model_path HF_DIR].")
    args.model_path, args.gguf_path = str(target), str(target / "model.gguf")
    return True
