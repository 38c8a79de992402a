"""The cost of handing a decode step's routed experts from the GPU to the CPU and back, per layer.

A decode step runs, per MoE layer: GPU work, the stream-ordered CPU experts (copies of x/ids/
weights to pinned buffers, a host function that starts the CPU task, GPU work that overlaps it,
a host function that holds the stream until the task is done, the copy back), more GPU work.
This script runs exactly that loop over every MoE layer of a generated model, with one-token
inputs, and times (best of --repeat, each over --steps steps):
  gpu      the GPU work alone (no experts);
  cpu      every layer's experts called directly on the CPU, one after another (no GPU);
  eager    the stream-ordered loop launched op by op;
  graph    the same loop captured as one CUDA graph and replayed (what a decode step does);
and prints the hand-off per layer: (graph - cpu - gpu work that cannot overlap) / layers, which
is what the stream-ordered mechanism itself costs. Run it under different settings (e.g.
KTRANS_STREAM_SPIN_US, KTRANS_SPIN_US) in separate processes to compare them.

  python bench/handoff.py --preset deepseek-v2-lite --quant q4_k_m
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

from bench.e2e import ensure_model, resolve_preset  # noqa: E402
from ktrans.engine.model_runner import ModelRunner  # noqa: E402


def _best(fn, steps: int, repeat: int) -> float:
    """Best mean seconds per step of `fn` over `repeat` rounds of `steps` calls."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--model-root", default="/tmp/bench-models")
    ap.add_argument("--batch", type=int, default=1, help="tokens per step")
    ap.add_argument("--gpu-work", type=int, default=2048, help="side of the square matmul standing in for a "
                                                                  "layer's GPU work (0: none)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="append a JSON line here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("handoff: needs a CUDA GPU", file=sys.stderr)
        return 2
    arch, preset = resolve_preset(args.preset)
    d = ensure_model(Path(args.model_root), arch, preset, args.quant, None)
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cuda", cache_lens=256,
                         page_size=64, progress=False, cuda_graphs=False)
    from ktrans.operators.experts import CPUExperts

    ops = [m for m in runner.model.modules() if isinstance(m, CPUExperts)]
    k, t, h = runner.config.num_experts_per_tok, args.batch, ops[0].hidden_size
    dev = torch.device("cuda")
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(ops[0].num_experts)[:k] for _ in range(t)]).to(dev)
    w = torch.rand(t, k, device=dev)
    n = args.gpu_work
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16) if n else None

    def gpu_work(v):
        if a is not None:
            torch.mm(a, a)
        return v * 1.0001

    def gpu_only():
        v = x
        for _ in ops:
            v = gpu_work(gpu_work(v))
        return v

    xc, idc, wc = x.cpu(), ids.cpu(), w.cpu()

    def cpu_only():
        for op in ops:
            op.forward(xc, idc, wc)

    def layers():
        v = x
        for op in ops:
            v = gpu_work(v)
            handle = op.submit(v, ids, w)
            shared = gpu_work(v)                       # overlaps the CPU experts
            v = op.sync(handle) + shared
        return v

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        g = _best(gpu_only, args.steps, args.repeat)
        eager = _best(layers, args.steps, args.repeat)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layers()
        replay = _best(graph.replay, args.steps, args.repeat)
    torch.cuda.synchronize()
    c = _best(cpu_only, args.steps, args.repeat)
    # GPU work on the critical path: the half before each submit (the other half overlaps)
    serial_gpu = g / 2
    per_layer = (replay - c - serial_gpu) / len(ops)
    env = {v: os.environ[v] for v in ("KTRANS_SPIN_US", "KTRANS_STREAM_SPIN_US") if v in os.environ}
    print(f"{arch}:{preset}:{args.quant}, {len(ops)} MoE layers, T={t}, GPU work {n}^2 matmul x2 per layer, "
          f"{torch.cuda.get_device_name()}, {env or 'default spins'}")
    print(f"{'gpu ms':>8s} {'cpu ms':>8s} {'eager ms':>9s} {'graph ms':>9s} {'hand-off us/layer':>18s}")
    print(f"{g * 1e3:8.3f} {c * 1e3:8.3f} {eager * 1e3:9.3f} {replay * 1e3:9.3f} {per_layer * 1e6:18.1f}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(dict(model=f"{arch}:{preset}:{args.quant}", layers=len(ops), batch=t, gpu_work=n,
                                    gpu_ms=g * 1e3, cpu_ms=c * 1e3, eager_ms=eager * 1e3, graph_ms=replay * 1e3,
                                    handoff_us_per_layer=per_layer * 1e6, env=env,
                                    gpu=torch.cuda.get_device_name())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
