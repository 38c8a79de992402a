"""`hybrid_experts`: one layer's routed experts split between the GPU and the CPU — the experts
named in `gpu_experts` (the most used ones, or all of them) as torch tensors on the operator's
device, the others in ktrans's C++ kernels (an inner `cpu_experts` holding only those).

Same interface as the other experts operators (`forward(x [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`, negative ids skipped, `submit`/`sync` for the MoE block's
overlap). Each slot goes to the part that holds its expert: two lookup tables turn global expert
ids into each part's local ids (-1 where the other part owns it), so the split needs no host
sync. `submit` starts the CPU part first, then queues the GPU part on the device, and `sync`
adds the two. Both parts compute the layer's gating and biases (gpt-oss's clamped SwiGLU, its
gate/up/down biases) as the experts operators do.

The GPU part is a grouped matmul (`torch._grouped_mm`): slots sorted by expert, one product per
expert over its rows, reading only the experts that were chosen, with no host sync (so a decode
step can still be a CUDA graph). Where that op is missing for the device and dtype, the plain
per-expert loop `torch_moe` runs instead (it syncs with the host).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.experts import (CPUExperts, Gating, bias_layout, expert_biases, expert_dims, expert_tensors,
                                      gating_of, layer_index, torch_moe)
from ktrans.operators.registry import register_operator
from ktrans.weights.source import RawTensor


def parse_expert_ids(value, num_experts: int, key: str) -> tuple[int, ...]:
    """`gpu_experts`: "all" or a list of expert ids -> sorted unique ids."""
    if value == "all":
        return tuple(range(num_experts))
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(e, int) and not isinstance(e, bool) for e in value):
        raise KtransError(f"{key}: gpu_experts must be 'all' or a non-empty list of expert ids, got {value!r}")
    bad = [e for e in value if not 0 <= e < num_experts]
    if bad:
        raise KtransError(f"{key}: gpu_experts {bad} out of range; this layer has experts 0-{num_experts - 1}")
    return tuple(sorted(set(value)))


class ExpertSubset:
    """A WeightSource view holding only experts `ids` of one layer (renumbered 0..n-1): what the
    inner cpu_experts and the GPU tensors load from."""

    def __init__(self, weights, layer: int, ids: tuple[int, ...]):
        self.weights, self.layer, self.ids = weights, layer, np.asarray(ids, dtype=np.int64)

    def expert_stack(self, layer: int, proj: str) -> RawTensor:
        raw = self.weights.expert_stack(layer, proj)
        rows = np.ascontiguousarray(raw.data).reshape(raw.shape[0], -1)[self.ids]          # [n, bytes per expert]
        return RawTensor(raw.qtype, (len(self.ids), *raw.shape[1:]), rows.reshape(-1))

    def tensor(self, name: str, dtype=None, device="cpu"):
        return self.weights.tensor(name, dtype=dtype, device="cpu")[torch.from_numpy(self.ids)].to(device)

    def __getattr__(self, name):                 # has(), info(), path, ... of the whole source
        return getattr(self.weights, name)


def _shape_of(orig_module, num_experts: int, hidden: int, inter: int):
    """What the experts operators read from an HF experts module (expert_dims, gating_of,
    bias_layout), for a part of `num_experts` of its experts."""
    like = {a: getattr(orig_module, a) for a in ("alpha", "limit", "has_bias", "is_concatenated")
            if hasattr(orig_module, a)}
    return types.SimpleNamespace(gate_up_proj=torch.empty(num_experts, 2 * inter, hidden, device="meta"), **like)


def _lookup(ids: tuple[int, ...], num_experts: int) -> torch.Tensor:
    """Global expert id -> local id in a part (-1: not in it), one slot more for id -1 (skip)."""
    lut = torch.full((num_experts + 1,), -1, dtype=torch.int64)
    lut[list(ids)] = torch.arange(len(ids))
    return lut


def grouped_moe(x, ids, w, gate_up_t, down_t, gating: Gating = Gating(), biases=None) -> torch.Tensor:
    """x [T, H], ids [T, k] local (negative = not here), w [T, k]; gate_up_t [G, H, 2I] and down_t
    [G, I, H] (transposed views of contiguous stacks); biases (gate_up [G, 2I], down [G, H]) or
    None -> [T, H] float32. No host sync."""
    t, k = ids.shape
    g = gate_up_t.shape[0]
    flat = ids.reshape(-1)                                                               # [S]
    key = torch.where(flat >= 0, flat, g)                                                # skipped slots sort last
    order = torch.argsort(key, stable=True)                                              # [S]
    counts = torch.zeros(g + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offs = counts[:g].cumsum(0).to(torch.int32)                                          # [G] row ends
    tok = order // k                                                                     # [S] token of each row
    xs = x.to(gate_up_t.dtype).index_select(0, tok)                                      # [S, H]
    gu = torch._grouped_mm(xs, gate_up_t, offs=offs)                                     # [S, 2I]
    row_expert = key.index_select(0, order).clamp(max=g - 1)                             # [S] (skipped: any)
    if biases is not None:
        gu = gu + biases[0].index_select(0, row_expert)
    inter = gu.shape[1] // 2
    h = gating(gu[:, :inter], gu[:, inter:]).contiguous()                                # [S, I]
    y = torch._grouped_mm(h, down_t, offs=offs).float()                                  # [S, H]
    if biases is not None:
        y = y + biases[1].index_select(0, row_expert).float()
    ws = w.reshape(-1).index_select(0, order).float()                                    # [S]
    # NOTE: rows past the last group's end are left unwritten by _grouped_mm (garbage, maybe NaN):
    # where(), not a multiply by zero, drops them.
    y = torch.where((key.index_select(0, order) < g)[:, None], y * ws[:, None], 0.0)
    return torch.zeros(t, y.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y)


@functools.lru_cache(maxsize=None)
def grouped_supported(device: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (CUDA: Hopper or newer, bf16)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.zeros(16, 16, dtype=dtype, device=device)
        b = torch.zeros(2, 16, 16, dtype=dtype, device=device).transpose(1, 2)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@dataclass
class HybridPending:
    cpu: Any                    # the inner cpu_experts' Pending, or None (every expert on the GPU)
    gpu: torch.Tensor | None    # [T, H] float32 on the operator's device, or None
    device: torch.device        # where the input came from (the result goes back there)
    dtype: torch.dtype


@register_operator("hybrid_experts")
class HybridExperts(Operator):
    """Routed experts split between `device` (`gpu_experts`) and the CPU kernels (the rest).

    kwargs: gpu_experts ("all" or expert ids), dtype of the GPU part (auto: bf16 on CUDA, f32 on
    the CPU), and the CPU part's backend, cpu_infer, numa, numa_nodes, max_chunk (as cpu_experts).
    """

    name: ClassVar[str] = "hybrid_experts"

    def __init__(self, *, key: str, orig_module, config, device, gpu_experts="all", dtype: str = "auto",
                 backend: str = "auto", cpu_infer: int | None = None, numa: str = "auto",
                 numa_nodes: int | None = None, max_chunk: int = 4096, **kwargs):
        from ktrans.operators.linear import resolve_dtype

        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self.num_experts, self.hidden_size, self.intermediate_size = expert_dims(orig_module)
        self.layer = layer_index(key)
        self.dtype = resolve_dtype(dtype, self.device)
        self.gating, self.bias_layout = gating_of(config, orig_module), bias_layout(orig_module)
        self.gpu_ids = parse_expert_ids(gpu_experts, self.num_experts, key)
        self.cpu_ids = tuple(e for e in range(self.num_experts) if e not in set(self.gpu_ids))
        self.register_buffer("lut_gpu", _lookup(self.gpu_ids, self.num_experts).to(self.device), persistent=False)
        self.register_buffer("lut_cpu", _lookup(self.cpu_ids, self.num_experts).to(self.device), persistent=False)
        self.cpu_part = None
        if self.cpu_ids:
            self.cpu_part = CPUExperts(key=key, orig_module=_shape_of(orig_module, len(self.cpu_ids),
                                                                  self.hidden_size, self.intermediate_size),
                                  config=config, device="cpu", backend=backend, cpu_infer=cpu_infer, numa=numa,
                                  numa_nodes=numa_nodes, max_chunk=max_chunk)

    def load_weights(self, weights) -> None:
        if self.cpu_part is not None:
            self.cpu_part.load_weights(ExpertSubset(weights, self.layer, self.cpu_ids))
        mine = ExpertSubset(weights, self.layer, self.gpu_ids)
        gate, up, down = expert_tensors(mine, self.layer, self.dtype, "cpu")
        self.gate_up = torch.nn.Parameter(torch.cat([gate, up], 1).to(self.device), requires_grad=False)  # [G, 2I, H]
        self.down = torch.nn.Parameter(down.to(self.device), requires_grad=False)                         # [G, H, I]
        self.biases = None          # (gate_up [G, 2I], down [G, H]) in the GPU part's dtype
        b = expert_biases(mine, self.key, self.bias_layout, self.dtype, "cpu")
        if b is not None:
            self.biases = torch.nn.ParameterList(torch.nn.Parameter(t.to(self.device), requires_grad=False)
                                                 for t in (torch.cat([b[0], b[1]], 1), b[2]))
        self._grouped = grouped_supported(str(self.device), self.dtype)

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        from ktrans.operators.linear import resolve_dtype

        e, h, i = expert_dims(orig_module)
        n_gpu = len(parse_expert_ids(kwargs.get("gpu_experts", "all"), e, key))
        size = torch.empty(0, dtype=resolve_dtype(kwargs.get("dtype", "auto"), device)).element_size()
        out = {str(torch.device(device)): size * n_gpu * 3 * h * i}
        if n_gpu < e:
            cpu_kw = {k: v for k, v in kwargs.items() if k in CPUExperts.accepted_kwargs()}
            for dev, n in CPUExperts.planned_bytes(key=key, orig_module=_shape_of(orig_module, e - n_gpu, h, i),
                                                   config=config,
                                                   device=torch.device("cpu"), kwargs=cpu_kw, weights=weights).items():
                out[dev] = out.get(dev, 0) + n
        return out

    # ---- forward ----

    def _gpu_part(self, x, ids, w) -> torch.Tensor:
        """[T, H] float32 on self.device: the slots whose experts are held here."""
        x, w = x.to(self.device), w.to(self.device)
        local = self.lut_gpu[ids.to(self.device)]                                      # [T, k]
        if self._grouped:
            return grouped_moe(x, local, w, self.gate_up.transpose(1, 2), self.down.transpose(1, 2), self.gating,
                               self.biases)
        return torch_moe(x, local, w, *self._gpu_stacks(lambda t: t), gating=self.gating,
                         biases=self._gpu_biases(lambda t: t))

    def _gpu_stacks(self, to) -> tuple[torch.Tensor, ...]:
        """The GPU part's (gate [G, I, H], up [G, I, H], down [G, H, I]), each through `to`."""
        inter = self.intermediate_size
        return to(self.gate_up[:, :inter]), to(self.gate_up[:, inter:]), to(self.down)

    def _gpu_biases(self, to) -> tuple[torch.Tensor, ...] | None:
        """The GPU part's biases as torch_moe takes them (gate [G, I], up [G, I], down [G, H])."""
        if self.biases is None:
            return None
        inter = self.intermediate_size
        gu, down = to(self.biases[0]), to(self.biases[1])
        return gu[:, :inter], gu[:, inter:], down

    def submit(self, hidden_states, top_k_index, top_k_weights) -> HybridPending:
        x = hidden_states
        cpu = None
        if self.cpu_part is not None:                  # first, so the CPU computes while the GPU part runs
            cpu = self.cpu_part.submit(x, self.lut_cpu[top_k_index.to(self.device)], top_k_weights)
        return HybridPending(cpu, self._gpu_part(x, top_k_index, top_k_weights), x.device, x.dtype)

    def sync(self, handle: HybridPending) -> torch.Tensor:
        out = handle.gpu.to(handle.device)
        if handle.cpu is not None:
            out = out + self.cpu_part.sync(handle.cpu).to(handle.device, torch.float32)
        return out.to(handle.dtype)

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return self.sync(self.submit(hidden_states, top_k_index, top_k_weights))

    def forward_native(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """f32 torch oracle: both parts with the plain per-expert loop."""
        x, idx, w = hidden_states, top_k_index.to("cpu"), top_k_weights.to("cpu")
        f32 = lambda t: t.float().cpu()  # noqa: E731
        out = torch_moe(x.to("cpu", torch.float32), self.lut_gpu.cpu()[idx], w, *self._gpu_stacks(f32),
                        gating=self.gating, biases=self._gpu_biases(f32))
        if self.cpu_part is not None:
            out += self.cpu_part.forward_native(x.to("cpu", torch.float32), self.lut_cpu.cpu()[idx], w).float()
        return out.to(x.device, x.dtype)
