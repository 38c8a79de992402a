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


def _step(runner, ids: list[list[int]], done: list[int], tables: torch.Tensor) -> list[int]:
    """One step of len(ids) requests (request r adds ids[r] after done[r] cached tokens);
    returns each request's greedy next token (waits for the logits)."""
    new = [len(x) for x in ids]
    batch = ForwardBatch(input_ids=torch.tensor([t for x in ids for t in x]),
                         positions=torch.cat([torch.arange(d, d + n) for d, n in zip(done, new)]),
                         seq_ids=list(range(len(ids))), num_computed=list(done), num_new=new,
                         page_table=tables, logits_indices=torch.cumsum(torch.tensor(new), 0) - 1)
    return runner.execute(batch).argmax(-1).tolist()


def measure(runner, prompt_len: int, decode_tokens: int, chunk: int, batch: int = 1) -> dict:
    """Prefill `batch` prompts of `prompt_len` random tokens (one after another, in chunks),
    then decode `decode_tokens` greedy steps of all of them together."""
    vocab = runner.config.vocab_size
    per_req = runner.num_pages // batch
    tables = torch.arange(per_req * batch, dtype=torch.int32).view(batch, per_req)
    tokens, t0 = [], time.perf_counter()
    for r in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,)).tolist()
        for start in range(0, prompt_len, chunk):
            last = _step(runner, [prompt[start:start + chunk]], [start], tables[r:r + 1])[0]
        tokens.append(last)
    t1 = time.perf_counter()
    done = [prompt_len] * batch
    for _ in range(decode_tokens):
        tokens = _step(runner, [[t] for t in tokens], done, tables)
        done = [d + 1 for d in done]
    t2 = time.perf_counter()
    return {"prompt_len": prompt_len, "batch": batch, "prefill_s": t1 - t0,
            "prefill_tok_s": batch * prompt_len / (t1 - t0), "decode_tokens": decode_tokens, "decode_s": t2 - t1,
            "decode_tok_s": batch * decode_tokens / (t2 - t1) if decode_tokens else None}


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


def run_one(args, model_dir: Path, label: str, device: str, bandwidth: float, graphs: bool = True) -> list[dict]:
    batches = args.batch_sizes
    cache = (max(args.prompt_lens) + args.decode_tokens + 64) * max(batches)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    runner = ModelRunner(model_path=str(model_dir), gguf_path=str(model_dir / "model.gguf"),
                         optimize_config_path=args.rules, device=device, cpu_infer=args.cpu_infer,
                         cache_lens=cache, page_size=64, progress=True, cuda_graphs=graphs)
    load_s = time.perf_counter() - t0
    runner.warm_up()                    # what the engine does at start: kernels compiled, graph captured
    for b in sorted(set(batches)):      # warm-up: allocator, caches, each batch's graph
        measure(runner, min(32, min(args.prompt_lens)), 3, args.chunk, b)
    floor = bandwidth * 1e9 / max(1, active_expert_bytes(runner))
    mode = "" if not cuda else ("+graph" if runner.graphs is not None and runner.graphs.enabled else "+eager")
    rows = []
    for b in batches:
        for n in args.prompt_lens if b == 1 else args.prompt_lens[:1]:
            r = measure(runner, n, args.decode_tokens, args.chunk, b)
            r.update(model=label, device=device + mode, rules=runner.rule_file, load_s=load_s,
                     decode_floor_tok_s=floor, host_bandwidth_gbs=bandwidth,
                     peak_vram_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                     gpu=torch.cuda.get_device_name() if cuda else None)
            rows.append(r)
            dec = f"{r['decode_tok_s']:8.2f}" if r["decode_tok_s"] else "       -"
            vram = f"{r['peak_vram_gb']:6.2f}" if cuda else "     -"
            print(f"{label:32s} {device + mode:11s} {b:3d} {n:6d} {r['prefill_tok_s']:10.1f} {dec} {floor:10.1f} "
                  f"{vram}", flush=True)
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
    p.add_argument("--batch-sizes", default="1", type=lambda s: [int(x) for x in s.split(",")],
                   help="decode batch sizes (B prompts prefilled, then decoded together; default 1)")
    p.add_argument("--cuda-graphs", default="on", choices=("on", "off", "both"),
                   help="decode with CUDA graphs, eagerly, or both one after the other (default on)")
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
    print(f"{'model':32s} {'dev':11s} {'B':>3s} {'prompt':>6s} {'prefill/s':>10s} {'decode/s':>8s} {'floor/s':>10s} "
          f"{'VRAM GB':>7s}")
    for text in args.preset:
        arch, preset = resolve_preset(text)
        model_dir = ensure_model(root, arch, preset, args.quant, args.layers)
        if args.generate_only:
            continue
        label = f"{arch}:{preset}-{args.quant}{f'-{args.layers}l' if args.layers else ''}"
        modes = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graphs]
        for device, graphs in [(d.strip(), g) for d in args.devices.split(",") for g in modes]:
            if device == "cpu" and not graphs:
                continue
            rows = run_one(args, model_dir, label, device, bandwidth, graphs)
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
