"""When a prefill chunk should run a layer's CPU experts on the GPU instead: the crossover chunk
size, from the profile's measured rates (never a constant). Pure: tested on made-up machines.

For a chunk of T tokens through one MoE layer (k experts per token, E experts of H x I):
- on the CPU: max(FLOPs / CPU MoE rate, bytes of the experts touched / read bandwidth), with
  FLOPs = 2 * 3 * H * I * k * T and min(E, T * k) experts touched;
- streamed: every expert of the layer crosses PCIe (pinned, double-buffered so the next layer's
  copy overlaps this layer's compute), then the GPU computes: max(copy, FLOPs / GPU rate).
The CPU time grows with T and the streamed time hardly does, so past one chunk size streaming
wins; that size is the crossover (None when it never wins, or a rate was not measured).
"""

from __future__ import annotations

from dataclasses import dataclass

from ktrans.fit.model_bytes import ModelBytes
from ktrans.fit.profile import Profile

_MAX_T = 1 << 20                 # search bound: a chunk larger than any context


@dataclass(frozen=True)
class PrefillChoice:
    crossover: int | None        # smallest chunk (tokens) for which streaming is faster; None: never
    stream_s: float              # seconds to copy one layer's experts to the GPU
    cpu_s_per_token: float       # the CPU's compute-bound time per token and layer
    gpu_s_per_token: float


@dataclass(frozen=True)
class LayerShape:
    """What the choice needs of one MoE layer: expert count and shape, experts per token, and one
    expert's bytes in the CPU kernels and as streamed (stored)."""
    num_experts: int
    hidden_size: int
    moe_intermediate: int
    top_k: int
    expert_cpu: int
    expert_stored: int

    def flops(self, t: int) -> float:
        return 2.0 * 3 * self.hidden_size * self.moe_intermediate * self.top_k * t


def cpu_seconds(t: int, shape: LayerShape, cpu_tflops: float, read_gbs: float) -> float:
    touched = min(shape.num_experts, t * shape.top_k) * shape.expert_cpu
    return max(shape.flops(t) / (cpu_tflops * 1e12), touched / (read_gbs * 1e9))


def streamed_seconds(t: int, shape: LayerShape, stream_s: float, gpu_tflops: float) -> float:
    return max(stream_s, shape.flops(t) / (gpu_tflops * 1e12))


def layer_crossover(shape: LayerShape, profile: Profile, *, gpu_index: int = 0,
                    cpu_format: str = "q4_k") -> PrefillChoice | None:
    """The crossover of one MoE layer of `shape` on `profile`'s machine, or None when the profile
    lacks a rate it needs (the CPU MoE rate of `cpu_format`, else the best measured format)."""
    gpu = profile.gpu(gpu_index)
    rates = profile.cpu_moe_tflops
    cpu_tflops = rates.get(cpu_format) or (max(rates.values()) if rates else None)
    if gpu is None or not (gpu.h2d_gbs and gpu.matmul_tflops and cpu_tflops and profile.read_gbs):
        return None
    stream_s = shape.num_experts * shape.expert_stored / (gpu.h2d_gbs * 1e9)
    faster = lambda t: streamed_seconds(t, shape, stream_s, gpu.matmul_tflops) < \
        cpu_seconds(t, shape, cpu_tflops, profile.read_gbs)  # noqa: E731
    choice = dict(stream_s=stream_s, cpu_s_per_token=shape.flops(1) / (cpu_tflops * 1e12),
                  gpu_s_per_token=shape.flops(1) / (gpu.matmul_tflops * 1e12))
    if not faster(_MAX_T):
        return PrefillChoice(None, **choice)
    lo, hi = 1, _MAX_T                   # faster(hi) holds; find the smallest such T (monotone in T)
    while lo < hi:
        mid = (lo + hi) // 2
        if faster(mid):
            hi = mid
        else:
            lo = mid + 1
    return PrefillChoice(lo, **choice)


def prefill_crossover(mb: ModelBytes, profile: Profile, *, gpu_index: int = 0, cpu_format: str = "q4_k",
                      stream_bytes_per_expert: int | None = None) -> PrefillChoice | None:
    """The crossover for `mb`'s first MoE layer (they are all alike) on `profile`'s machine, or
    None when the profile lacks a rate it needs. `stream_bytes_per_expert` defaults to the stored
    format (the GPU dequantizes); pass the bf16 size to price a dequantized copy."""
    moe = mb.moe_layers()
    if not moe:
        return None
    lb = moe[0]
    shape = LayerShape(lb.num_experts, mb.hidden_size, mb.moe_intermediate, mb.top_k, lb.expert_cpu,
                       stream_bytes_per_expert or lb.expert_stored)
    return layer_crossover(shape, profile, gpu_index=gpu_index, cpu_format=cpu_format)


def describe_prefill(choice: PrefillChoice | None, gpu: str) -> str:
    if choice is None:
        return "prefill: the crossover for streaming experts to the GPU needs measured rates (run `ktrans probe`)"
    if choice.crossover is None:
        return f"prefill: streaming a layer's experts to {gpu} ({choice.stream_s * 1e3:.1f} ms a layer) never beats the CPU"
    return (f"prefill: from {choice.crossover} tokens per chunk, streaming a layer's experts to {gpu} "
            f"({choice.stream_s * 1e3:.1f} ms a layer) beats computing them on the CPU "
            f"(cpu_experts with gpu_prefill: auto streams such chunks)")
