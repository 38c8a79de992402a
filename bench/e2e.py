"""End-to-end prefill and decode speed of a whole model through ModelRunner.

For each model (a gen-model preset, random weights in the real shape) and each placement
(`cuda`: the shipped rule file — routed experts on the CPU operator, the rest on the GPU;
`cpu`: the same rules with every GPU placement mapped to the CPU, the all-CPU baseline) it
measures, for each prompt length:
  prefill tok/s  — prompt tokens / time from the first prefill chunk to the logits of the last;
  decode tok/s   — greedy single-request decode steps per second right after that prompt.
Each step is timed to its logits on the host (argmax().item() waits for the GPU).
Next to decode it prints the memory-bound floor of the CPU experts: bytes of the activated
experts' weights per token ÷ the host memory bandwidth measured in the same run.

One command for the accelerator machine (models are generated once under --model-root):
  python bench/e2e.py --preset qwen3-30b-a3b --preset deepseek-v2-lite --quant q4_k \
      --devices cuda,cpu --prompt-lens 128,1024,4096 --out bench-e2e.jsonl
A tiny run that proves the script on any machine:
  python bench/e2e.py --preset qwen3_moe:tiny --devices cpu --prompt-lens 16,64 --decode-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktrans.engine.batch import ForwardBatch  # noqa: E402
from ktrans.engine.model_runner import ModelRunner  # noqa: E402
from ktrans.errors import KtransError  # noqa: E402


def resolve_preset(text: str) -> tuple[str, str]:
    """'arch:preset' or a preset name unique across architectures -> (arch, preset)."""
    from ktrans.genmodel.presets import PRESETS

    if ":" in text:
        arch, preset = text.split(":", 1)
        return arch, preset
    owners = [a for a, presets in PRESETS.items() if text in presets]
    if len(owners) != 1:
        raise KtransError(f"preset '{text}' names {len(owners)} architectures; write ARCH:PRESET")
    return owners[0], text


def ensure_model(root: Path, arch: str, preset: str, quant: str, layers: int | None) -> Path:
    """The generated model directory, generating it on first use."""
    from ktrans.genmodel import generate_model

    out = root / f"{arch}-{preset}-{quant}{f'-{layers}l' if layers else ''}"
    if not (out / "model.gguf").is_file():
        t0 = time.perf_counter()
        print(f"generating {out} ...", file=sys.stderr, flush=True)
        generate_model(out, arch=arch, preset=preset, quant=quant, layers=layers, seed=0)
        print(f"generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def _step(runner, ids: list[int], done: int, pages: torch.Tensor) -> int:
    """Run one step of the single request; returns the greedy next token (waits for logits)."""
    n = len(ids)
    batch = ForwardBatch(input_ids=torch.tensor(ids), positions=torch.arange(done, done + n), seq_ids=[0],
                         num_computed=[done], num_new=[n], page_table=pages[None],
                         logits_indices=torch.tensor([n - 1]))
    return int(runner.execute(batch)[0].argmax().item())


def measure(runner, prompt_len: int, decode_tokens: int, chunk: int) -> dict:
    """Prefill `prompt_len` random tokens in chunks, then decode `decode_tokens` greedily."""
    vocab = runner.config.vocab_size
    pages = torch.arange(runner.num_pages, dtype=torch.int32)
    prompt = torch.randint(0, vocab, (prompt_len,)).tolist()
    t0 = time.perf_counter()
    for start in range(0, prompt_len, chunk):
        token = _step(runner, prompt[start:start + chunk], start, pages)
    t1 = time.perf_counter()
    done = prompt_len
    for _ in range(decode_tokens):
        token = _step(runner, [token], done, pages)
        done += 1
    t2 = time.perf_counter()
    return {"prompt_len": prompt_len, "prefill_s": t1 - t0, "prefill_tok_s": prompt_len / (t1 - t0),
            "decode_tokens": decode_tokens, "decode_s": t2 - t1,
            "decode_tok_s": decode_tokens / (t2 - t1) if decode_tokens else None}


def host_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured host memory bandwidth (read + write of a 1 GiB copy, best of 3)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def active_expert_bytes(runner) -> int:
    """Bytes of routed-expert weights one decode token reads (top-k experts of every MoE layer)."""
    w = runner.weights
    total = 0
    for i in range(runner.config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        if not w.has(f"{prefix}.down_proj"):
            continue
        e = w.info(f"{prefix}.down_proj").shape[0]
        per_expert = (w.info(f"{prefix}.gate_up_proj").nbytes + w.info(f"{prefix}.down_proj").nbytes) / e
        total += int(per_expert * runner.config.num_experts_per_tok)
    return total


def run_one(args, model_dir: Path, label: str, device: str, bandwidth: float) -> list[dict]:
    cache = max(args.prompt_lens) + args.decode_tokens + 64
    t0 = time.perf_counter()
    runner = ModelRunner(model_path=str(model_dir), gguf_path=str(model_dir / "model.gguf"),
                         optimize_config_path=args.rules, device=device, cpu_infer=args.cpu_infer,
                         cache_lens=cache, page_size=64, progress=True)
    load_s = time.perf_counter() - t0
    measure(runner, min(32, min(args.prompt_lens)), 2, args.chunk)  # warm-up: kernels, allocator, caches
    floor = bandwidth * 1e9 / max(1, active_expert_bytes(runner))
    rows = []
    for n in args.prompt_lens:
        r = measure(runner, n, args.decode_tokens, args.chunk)
        r.update(model=label, device=device, rules=runner.rule_file, load_s=load_s,
                 decode_floor_tok_s=floor, host_bandwidth_gbs=bandwidth,
                 gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None)
        rows.append(r)
        dec = f"{r['decode_tok_s']:8.2f}" if r["decode_tok_s"] else "       -"
        print(f"{label:32s} {device:5s} {n:6d} {r['prefill_tok_s']:10.1f} {dec} {floor:10.1f}", flush=True)
    runner.close()
    del runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", required=True, help="gen-model preset (or ARCH:PRESET); repeatable")
    p.add_argument("--quant", default="q4_k", help="gen-model quant type of the weights (default q4_k)")
    p.add_argument("--layers", type=int, default=None, help="generate only this many layers (default: all)")
    p.add_argument("--devices", default="cuda,cpu", help="comma list: cuda (rules as shipped), cpu (all-CPU baseline)")
    p.add_argument("--prompt-lens", default="128,1024,4096", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk size in tokens")
    p.add_argument("--cpu-infer", type=int, default=None, help="CPU expert threads (default: the operator's)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for the CPU parts (default: torch's own choice)")
    p.add_argument("--rules", default=None, help="rule file (default: the shipped one for the architecture)")
    p.add_argument("--model-root", default=os.path.expanduser("~/.cache/ktrans/bench-models"))
    p.add_argument("--out", default=None, help="append one JSON line per measurement to this file")
    p.add_argument("--generate-only", action="store_true", help="only generate the models (a separate step)")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    root = Path(args.model_root)
    root.mkdir(parents=True, exist_ok=True)
    bandwidth = host_bandwidth_gbs()
    print(f"host memory bandwidth (copy): {bandwidth:.1f} GB/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads", flush=True)
    print(f"{'model':32s} {'dev':5s} {'prompt':>6s} {'prefill/s':>10s} {'decode/s':>8s} {'floor/s':>10s}")
    for text in args.preset:
        arch, preset = resolve_preset(text)
        model_dir = ensure_model(root, arch, preset, args.quant, args.layers)
        if args.generate_only:
            continue
        label = f"{arch}:{preset}-{args.quant}{f'-{args.layers}l' if args.layers else ''}"
        for device in args.devices.split(","):
            rows = run_one(args, model_dir, label, device.strip(), bandwidth)
            if args.out:
                with open(args.out, "a") as f:
                    for r in rows:
                        f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KtransError as e:
        print(f"bench/e2e.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
