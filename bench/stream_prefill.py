"""Long-prompt prefill with the routed experts streamed to the GPU (cpu_experts' gpu_prefill)
against computing them on the CPU, same model, same process, same run.

Two measurements on a gen-model preset (random weights in the real shape, q4_k_m GGUF), loaded
once with the shipped CUDA rules (routed experts in cpu_experts, the rest on the GPU):
1. one MoE layer (its cpu_experts operator) at chunk sizes T: seconds per call on the CPU
   kernels and streamed; the measured crossover (smallest T where streaming wins) beside the one
   `gpu_prefill: auto` takes from the machine profile (`ktrans probe`), and the streamed rate
   as GB/s of expert bytes moved;
2. the whole model: a prompt of --prompt-len tokens prefilled in chunks of each --chunks size,
   tok/s with the experts on the CPU and streamed (every chunk above the 128-token stream
   limit streams).

  python bench/stream_prefill.py --preset deepseek-v2-lite --prompt-len 8192 --chunks 512,2048,8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import ensure_model, measure, resolve_preset  # noqa: E402
from ktrans.engine.model_runner import ModelRunner  # noqa: E402


def _experts_ops(runner):
    from ktrans.operators.experts import CPUExperts

    return [m for m in runner.model.modules() if isinstance(m, CPUExperts)]


def _set(ops, value) -> None:
    for op in ops:
        op.set_gpu_prefill(value)


def _time_call(op, x, ids, w, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        op(x, ids, w)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def layer_sweep(runner, sizes: list[int], repeat: int) -> list[dict]:
    ops = _experts_ops(runner)
    op = ops[0]
    k = runner.config.num_experts_per_tok
    rows = []
    for t in sizes:
        x = torch.randn(t, op.hidden_size, device="cuda", dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(op.num_experts)[:k] for _ in range(t)]).cuda()
        w = torch.rand(t, k, device="cuda")
        op.set_gpu_prefill("off")
        cpu_s = _time_call(op, x, ids, w, repeat)
        op.set_gpu_prefill(129)
        stream_s = _time_call(op, x, ids, w, repeat) if t > 128 else None
        moved = len(torch.unique(ids)) * op.streamed.stored.expert_bytes()
        rows.append(dict(t=t, cpu_ms=cpu_s * 1e3, stream_ms=stream_s and stream_s * 1e3,
                         stream_gbs=stream_s and moved / stream_s / 1e9))
    op.set_gpu_prefill("auto")
    auto = op.stream_from(torch.device("cuda"))
    measured = next((r["t"] for r in rows if r["stream_ms"] and r["stream_ms"] < r["cpu_ms"]), None)
    print(f"\none MoE layer ({op.key}; {op.num_experts} experts of {op.hidden_size}x{op.intermediate_size}, "
          f"{op.streamed.stored.qtypes}, group {op.streamed.group}):")
    print(f"{'T':>6s} {'CPU ms':>9s} {'stream ms':>10s} {'stream GB/s':>12s}")
    for r in rows:
        s = f"{r['stream_ms']:10.2f} {r['stream_gbs']:12.1f}" if r["stream_ms"] else f"{'-':>10s} {'-':>12s}"
        print(f"{r['t']:6d} {r['cpu_ms']:9.2f} {s}")
    print(f"measured crossover: {measured}; gpu_prefill auto (machine profile): "
          f"{auto if auto is not None else 'none (' + op.stream_why_not + ')'}")
    return rows + [dict(measured_crossover=measured, auto_crossover=auto)]


def model_prefill(runner, prompt_len: int, chunks: list[int]) -> list[dict]:
    ops = _experts_ops(runner)
    rows = []
    print(f"\nwhole model, {prompt_len}-token prompt:")
    print(f"{'chunk':>6s} {'CPU experts tok/s':>18s} {'streamed tok/s':>15s} {'ratio':>6s}")
    for chunk in chunks:
        got = {}
        for mode, value in (("cpu", "off"), ("stream", 129)):
            _set(ops, value)
            measure(runner, min(chunk, prompt_len), 0, chunk)                    # warm-up at this size
            got[mode] = measure(runner, prompt_len, 0, chunk)["prefill_tok_s"]
        rows.append(dict(prompt_len=prompt_len, chunk=chunk, cpu_tok_s=got["cpu"], stream_tok_s=got["stream"]))
        print(f"{chunk:6d} {got['cpu']:18.1f} {got['stream']:15.1f} {got['stream'] / got['cpu']:6.2f}x", flush=True)
    _set(ops, "auto")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--model-root", default="/tmp/bench-models")
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--chunks", default="512,2048,8192")
    ap.add_argument("--layer-sizes", default="128,256,512,1024,2048,4096,8192")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpu-infer", type=int, default=None)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("stream_prefill: needs a CUDA GPU (the experts stream to it)", file=sys.stderr)
        return 2
    arch, preset = resolve_preset(args.preset)
    d = ensure_model(Path(args.model_root), arch, preset, args.quant, None)
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cuda", cpu_infer=args.cpu_infer,
                         cache_lens=args.prompt_len + 256, page_size=64, progress=False, cuda_graphs=False)
    ops = _experts_ops(runner)
    _set(ops, "auto")                                   # keeps each layer's stored experts for the stream
    if not ops or any(op.streamed is None for op in ops):
        print(f"stream_prefill: layers that cannot stream: {[op.stream_why_not for op in ops]}", file=sys.stderr)
        return 1
    rows = layer_sweep(runner, [int(s) for s in args.layer_sizes.split(",")], args.repeat)
    rows += model_prefill(runner, args.prompt_len, [int(s) for s in args.chunks.split(",")])
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(model=f"{arch}:{preset}:{args.quant}", gpu=torch.cuda.get_device_name(), **r))
                        + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
