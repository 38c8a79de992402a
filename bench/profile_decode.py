"""Where a decode step's time goes: the whole step (CUDA graph or eager) against the CPU experts
alone, and a kernel-level profile of a few graph replays.

For a generated model (gen-model preset, as bench/e2e.py makes them) it prints:
  step ms          — one greedy decode step after a short prompt (graph replay, or eager);
  CPU experts ms   — every layer's routed experts called directly on the CPU at T=1 (the same
                     C++ kernels, no GPU in the loop): the part the GPU cannot hide;
  rest ms          — step − experts: GPU kernels, launches, host-function hand-offs;
then, from torch.profiler over a few replays, GPU kernels per step, their summed time, and the
top kernels by time. `--trace FILE` writes the chrome trace.

  python bench/profile_decode.py --preset deepseek-v2-lite --quant q4_k_m --trace /tmp/out/trace.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import _step, ensure_model, resolve_preset  # noqa: E402

from ktrans.engine.model_runner import ModelRunner  # noqa: E402


def _decode_ms(runner, steps: int, batch: int = 1) -> float:
    tables = torch.arange(runner.num_pages, dtype=torch.int32)[: (runner.num_pages // batch) * batch].view(batch, -1)
    done = [16] * batch
    tokens = []
    for r in range(batch):
        tokens.append(_step(runner, [list(range(1, 17))], [0], tables[r:r + 1])[0])
    for _ in range(3):
        tokens = _step(runner, [[t] for t in tokens], done, tables)
        done = [d + 1 for d in done]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = _step(runner, [[t] for t in tokens], done, tables)
        done = [d + 1 for d in done]
    return (time.perf_counter() - t0) / steps * 1e3


def _experts_ms(runner, reps: int = 20) -> float:
    """Sum over layers of one T=1 call of the CPU experts, called directly on CPU tensors."""
    from ktrans.operators.experts import CPUExperts

    ops = [m for m in runner.model.modules() if isinstance(m, CPUExperts)]
    h, k = runner.config.hidden_size, runner.config.num_experts_per_tok
    total = 0.0
    for op in ops:
        x = torch.randn(1, h, dtype=torch.bfloat16)
        ids = torch.randperm(op.num_experts)[:k][None]
        w = torch.rand(1, k)
        op.forward(x, ids, w)
        t0 = time.perf_counter()
        for _ in range(reps):
            op.forward(x, torch.randperm(op.num_experts)[:k][None], w)
        total += (time.perf_counter() - t0) / reps
    return total * 1e3


def _profile(runner, steps: int, trace: str | None) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _decode_ms(runner, steps)
    if trace:
        prof.export_chrome_trace(trace)
    kernels = collections.Counter()
    times = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += 1
            times[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    n = steps + 3 + 1                                  # measured + warm steps + the prompt step
    print(f"GPU kernels per step ~{sum(kernels.values()) / n:.0f}, GPU busy ~{sum(times.values()) / n / 1e3:.2f} ms/step")
    for name, t in times.most_common(15):
        print(f"  {t / n / 1e3:8.3f} ms/step  {kernels[name] / n:6.1f}x  {name[:90]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument("--model-root", default="/tmp/bench-models")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--trace", default=None)
    args = p.parse_args(argv)
    arch, preset = resolve_preset(args.preset)
    model_dir = ensure_model(Path(args.model_root), arch, preset, args.quant, None)
    rows = []
    for graphs in (True, False):
        runner = ModelRunner(model_path=str(model_dir), gguf_path=str(model_dir / "model.gguf"), device="cuda",
                             cache_lens=2048, page_size=64, progress=False, cuda_graphs=graphs)
        runner.warm_up()
        step = _decode_ms(runner, args.steps)
        step4 = _decode_ms(runner, args.steps, batch=4)
        experts = _experts_ms(runner)
        rows.append((graphs, step, step4, experts))
        print(f"{'graph' if graphs else 'eager'}: step {step:.2f} ms (B=4: {step4:.2f} ms), CPU experts alone "
              f"{experts:.2f} ms, rest {step - experts:.2f} ms", flush=True)
        if graphs:
            _profile(runner, 5, args.trace)
        runner.close()
        del runner
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
