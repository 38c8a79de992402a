"""Decide where a model goes on this machine: a pure function of the model's bytes
(ktrans.fit.model_bytes) and the machine's profile (ktrans.fit.profile), so it is tested on
made-up machines.

Order of the GPU's memory, after a reserve for working memory and a safety margin:
1. the parts outside the layers that the rules put on the GPU (final norm, lm_head);
2. each layer's dense part and KV cache, first layer first (a layer that does not fit, and every
   later one, runs whole on the CPU: hidden states cross once);
3. routed experts of the GPU layers, most used first: by the activation counts when there are
   some (`ktrans probe --experts`, or counted while serving), else whole layers in order.
RAM then holds everything else; with several NUMA nodes the CPU experts are replicated per node
when every node has room for a copy, else split across the nodes (ktrans.fit.numa). A placement
whose RAM need exceeds what is available is refused (`check_fits`) with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ktrans.errors import KtransError
from ktrans.fit.model_bytes import ModelBytes
from ktrans.fit.numa import NumaChoice, choose_numa
from ktrans.fit.profile import Profile

GiB = 2**30


class FitError(KtransError):
    """The model cannot be placed on this machine (the message has the numbers)."""


@dataclass(frozen=True)
class FitOptions:
    gpu_index: int = 0                  # which GPU (cuda:N) the rules target
    gpu_memory: int | None = None       # cap on the GPU bytes to use (--gpu_memory); None = all free
    gpu_reserve: int = 1 * GiB          # CUDA workspaces, graph pools, allocator slack
    margin: float = 0.05                # of the usable memory, left free on each device
    ram_reserve: int = 2 * GiB          # the OS, Python, torch and the page cache of the weights' metadata
    use_gpu: bool = True                # False: everything on the CPU (--device cpu)


@dataclass
class Placement:
    gpu: str | None                     # "cuda:N" the GPU parts go to, None: all on the CPU
    gpu_layers: int                     # layers [0, gpu_layers) run on the GPU, the rest on the CPU
    gpu_experts: dict[int, tuple[int, ...]]  # layer -> routed experts held on the GPU
    numa: NumaChoice
    needed: dict[str, int]              # estimated bytes per device ("cpu", "cuda:0")
    available: dict[str, int]           # usable bytes per device (after reserves and margin)
    hit_rate: dict[int, float]          # layer -> expected share of its routed work on the GPU
    counted: bool = False               # whether expert activation counts chose the experts
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(self.needed.get(d, 0) <= self.available.get(d, 0) for d in self.needed)

    def whole_layers(self, mb: ModelBytes) -> list[int]:
        """Layers whose every routed expert is on the GPU."""
        return [i for i, ids in self.gpu_experts.items() if len(ids) == mb.layers[i].num_experts]


def gpu_budget(profile: Profile, mb: ModelBytes, opts: FitOptions) -> int:
    """Bytes the placement may fill on the GPU: free (or the cap), less working memory, the
    reserve and the margin; 0 without a GPU."""
    gpu = profile.gpu(opts.gpu_index) if opts.use_gpu else None
    if gpu is None:
        return 0
    free = gpu.mem_free if opts.gpu_memory is None else min(gpu.mem_free, opts.gpu_memory)
    return max(0, int((free - opts.gpu_reserve - mb.activations_gpu) * (1 - opts.margin)))


def ram_budget(profile: Profile, opts: FitOptions) -> int:
    return max(0, int((profile.ram_available - opts.ram_reserve) * (1 - opts.margin)))


def _gpu_layers(mb: ModelBytes, budget: int) -> tuple[int, int]:
    """(layers whose dense part and KV fit on the GPU, first layer first; bytes used)."""
    if budget < mb.outer_gpu:
        return 0, 0
    used, n = mb.outer_gpu, 0
    for lb in mb.layers:
        if used + lb.dense_gpu + lb.kv_gpu > budget:
            break
        used += lb.dense_gpu + lb.kv_gpu
        n += 1
    return n, used


def _expert_order(mb: ModelBytes, layers: range, counts: dict[int, list[int]] | None) -> list[tuple[float, int, int]]:
    """(share of the layer's routed work, layer, expert), best first. Without counts every expert
    of a layer weighs 1/E: whole layers in order (the sort is stable)."""
    out = []
    for i in layers:
        lb = mb.layers[i]
        if not lb.num_experts:
            continue
        c = (counts or {}).get(i)
        total = sum(c) if c and len(c) == lb.num_experts else 0
        for e in range(lb.num_experts):
            out.append((c[e] / total if total else 1.0 / lb.num_experts, i, e))
    if counts:
        out.sort(key=lambda t: -t[0])
    return out


def decide(mb: ModelBytes, profile: Profile, opts: FitOptions = FitOptions(),
           counts: dict[int, list[int]] | None = None) -> Placement:
    """The placement of `mb` on `profile`'s machine (see the module docstring)."""
    budget = gpu_budget(profile, mb, opts)
    n_gpu, used = _gpu_layers(mb, budget)
    notes = []
    if n_gpu == 0 and budget:
        notes.append("the GPU cannot hold even the first layer next to the parts outside the layers: "
                     "everything runs on the CPU")
    gpu = f"cuda:{opts.gpu_index}" if n_gpu else None
    if gpu and n_gpu < len(mb.layers):
        notes.append(f"layers {n_gpu}-{len(mb.layers) - 1} run on the CPU: their attention and KV cache do "
                     f"not fit in the GPU's {budget / GiB:.1f} GiB budget")
    chosen: dict[int, list[int]] = {}
    hit: dict[int, float] = {}
    for share, i, e in _expert_order(mb, range(n_gpu), counts):
        size = mb.layers[i].expert_gpu
        if used + size > budget:
            if counts:
                continue                # a smaller share may still fit; sizes can differ per layer
            break
        used += size
        chosen.setdefault(i, []).append(e)
        hit[i] = hit.get(i, 0.0) + share
    gpu_experts = {i: tuple(sorted(ids)) for i, ids in sorted(chosen.items())}
    cpu_experts = sum(lb.expert_cpu * (lb.num_experts - len(gpu_experts.get(lb.index, ())))
                      for lb in mb.layers)
    ram_other = (mb.outer_cpu if gpu else mb.outer_all_cpu) + sum(
        lb.dense_cpu + lb.kv_cpu for lb in mb.layers[n_gpu:])
    numa = choose_numa(cpu_experts, ram_other, profile, opts.ram_reserve, opts.margin)
    needed = {"cpu": ram_other + cpu_experts * numa.copies}
    available = {"cpu": ram_budget(profile, opts)}
    if gpu:
        needed[gpu], available[gpu] = used, budget
    return Placement(gpu, n_gpu, gpu_experts, numa, needed, available, hit, bool(counts), notes + numa.notes)


def check_fits(needed: dict[str, int], available: dict[str, int], what: str) -> None:
    """Refuse a model that cannot fit, before anything is loaded: one message with the bytes
    needed and available on every device."""
    over = [d for d in needed if needed[d] > available.get(d, 0)]
    if not over:
        return
    rows = "; ".join(f"{d}: needs {needed[d] / GiB:.1f} GiB, {available.get(d, 0) / GiB:.1f} GiB usable"
                     for d in sorted(needed))
    hint = ("free memory (other processes), use a smaller quantization, lower --cache_lens, or place "
            "fewer parts on the GPU" if any(d.startswith("cuda") for d in over) else
            "free memory (other processes) or use a smaller quantization or a machine with more RAM")
    raise FitError(f"{what} does not fit on this machine ({rows}); usable = free memory less the "
                   f"reserves for the OS and working memory. To go on: {hint}")
