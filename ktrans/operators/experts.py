"""Routed-expert operators: drop-ins for transformers' fused experts module
(`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`).

- `cpu_experts`: one layer's experts in ktrans's C++ MoE kernels (csrc/moe/), on the owned thread
  pool. `submit`/`sync` let the MoE block overlap the shared experts on the GPU with the routed
  experts on the CPU. With CUDA inputs of up to `_STREAM_MAX_T` tokens the work is stream-ordered
  (copies to pinned buffers, the CPU task as host functions on the current stream, copy back), so
  no host sync is needed and the step can be captured in a CUDA graph. A CUDA prefill chunk from
  the layer's crossover size up (`gpu_prefill`) streams the experts to the GPU and computes them
  there instead (ktrans.operators.expert_stream).
- `torch_experts`: the experts dequantized as plain torch tensors on a device.

Both take a negative expert id as "skip this slot". Weights come from the layer's expert stacks
(`WeightSource.expert_stack`): GGUF blocks are used as stored; formats the kernels lack
(e.g. FP8 safetensors) are dequantized to bf16 at load.

The expert MLP's gating is the arch entry's `expert_gating` (SiLU, or gpt-oss's clamped SwiGLU
with the HF module's alpha / limit), with the gate/up/down biases of HF modules that have them
(`has_bias`; gate_up_proj_bias interleaved or concatenated as the module's `is_concatenated`
says). The C++ layer applies both (csrc/moe/moe_gating.cpp), the torch paths here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.registry import register_operator

BACKENDS = ("auto", "gguf", "amx_bf16", "amx_int8", "amx_int4", "torch")
NUMA_MODES = ("auto", "replicate", "split")
PROJS = ("gate", "up", "down")
# Formats the gguf backend computes from directly (the others are dequantized to bf16 at load).
KERNEL_QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q2_k", "q3_k", "iq4_xs",
                 "mxfp4")
# Largest T that goes through the stream-ordered path (decode, small batches, CUDA-graph sizes);
# each layer pins buffers for this many tokens. Larger CUDA batches copy synchronously.
_STREAM_MAX_T = 128

_pools: dict[tuple[int, int], Any] = {}

# How a stream-ordered call hands off between the GPU and the CPU (KTRANS_HANDOFF): hostfn, two
# host functions on the stream (CUDA's callback thread starts the task, then holds the stream
# until it is done); memop, stream memory operations on two pinned flags (the GPU writes a start
# flag a spinning pool job waits for, and waits on the job's done flag), no callback thread.
HANDOFFS = ("hostfn", "memop")
# Memop tasks captured into the CUDA graph being recorded (cuda_graphs arms them before replays).
_capturing: list | None = None


def handoff_mode() -> str:
    import os

    mode = os.environ.get("KTRANS_HANDOFF", "").strip() or "hostfn"
    if mode not in HANDOFFS:
        raise KtransError(f"KTRANS_HANDOFF must be one of {', '.join(HANDOFFS)}, got {mode!r}")
    if mode == "memop":
        from ktrans import _C

        if not _C.cuda_memops_available():
            import logging

            logging.getLogger("ktrans").warning("KTRANS_HANDOFF=memop: %s; using host functions",
                                                _C.cuda_memops_unavailable_reason())
            return "hostfn"
    return mode


class captured_tasks:
    """Within it, memop tasks launched while a CUDA graph is captured are collected (in launch
    order) instead of armed: the graph's owner arms them before every replay."""

    def __enter__(self) -> list:
        global _capturing
        self.outer, _capturing = _capturing, []
        return _capturing

    def __exit__(self, *exc) -> None:
        global _capturing
        _capturing = self.outer


def arm_tasks(tasks: list) -> None:
    """Arm captured memop tasks for one replay (an earlier run's error is raised first)."""
    for task in tasks:
        err = task.take_error()
        if err:
            raise KtransError(f"an earlier stream-ordered MoE call failed: {err}")
        task.arm()


DEFAULT_SPIN_US = 200


def pool_spin_us() -> int:
    """How long idle expert threads spin before sleeping (KTRANS_SPIN_US, microseconds)."""
    import os

    text = os.environ.get("KTRANS_SPIN_US", "").strip()
    if not text:
        return DEFAULT_SPIN_US
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 10_000_000:
        raise KtransError(f"KTRANS_SPIN_US must be a whole number of microseconds in [0, 10000000], got {text!r}")
    return value


def shared_pool(threads: int, groups: int):
    """The process's thread pool for (threads, thread groups): one owned pool shared by layers."""
    from ktrans import _C

    key = (threads, groups)
    if key not in _pools:
        _pools[key] = _C.ThreadPool(threads, groups, True, pool_spin_us())
    return _pools[key]


def numa_nodes_available() -> int:
    from ktrans import _C

    return len({node for _, node in _C.physical_cores()})


def layer_index(key: str) -> int:
    m = re.search(r"layers\.(\d+)\.", key + ".")
    if not m:
        raise KtransError(f"{key}: cannot find the layer index (expected '...layers.N...')")
    return int(m.group(1))


def expert_dims(orig_module) -> tuple[int, int, int]:
    """(E, H, I) from the fused HF experts module (gate_up_proj [E, 2I, H], or [E, H, 2I] where
    the module says is_transposed: gpt-oss)."""
    gu = getattr(orig_module, "gate_up_proj", None)
    if gu is None or gu.dim() != 3:
        raise KtransError(f"experts operators replace a fused experts module with gate_up_proj [E, 2I, H], "
                          f"got {type(orig_module).__name__}")
    if getattr(orig_module, "is_transposed", False):
        e, h, two_i = gu.shape
    else:
        e, two_i, h = gu.shape
    return int(e), int(h), int(two_i) // 2


@dataclass(frozen=True)
class Gating:
    """h = act(g, u) of the expert MLP (see moe.h's MoeGating)."""
    act: str = "silu"          # silu | swiglu_oai
    alpha: float = 1.702       # swiglu_oai: sigmoid gain
    limit: float = 7.0         # swiglu_oai: clamp of g (above) and u (both sides)

    def __call__(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.act == "silu":
            return F.silu(g) * u
        g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        return g * torch.sigmoid(g * self.alpha) * (u + 1)


def gating_of(config, orig_module) -> Gating:
    """The arch entry's gating, with the numbers the HF module computes with."""
    from ktrans.config.arch import arch_from_config

    act = arch_from_config(config).expert_gating
    if act == "silu":
        return Gating()
    return Gating(act, float(getattr(orig_module, "alpha", 1.702)), float(getattr(orig_module, "limit", 7.0)))


def bias_layout(orig_module) -> str | None:
    """How an HF experts module's gate_up_proj_bias holds gate and up: "concatenated",
    "interleaved" (gpt-oss), or None when the module has no biases."""
    if not getattr(orig_module, "has_bias", False):
        return None
    return "concatenated" if getattr(orig_module, "is_concatenated", True) else "interleaved"


def expert_biases(weights, key: str, layout: str | None, dtype, device) -> tuple[torch.Tensor, ...] | None:
    """(gate [E, I], up [E, I], down [E, H]) biases of an experts module (bias_layout), or None."""
    if layout is None:
        return None
    gu = weights.tensor(f"{key}.gate_up_proj_bias", dtype=dtype, device=device)          # [E, 2I]
    if layout == "concatenated":
        g, u = gu.chunk(2, dim=-1)
    else:                                                                                 # gate 0, up 0, gate 1, ...
        g, u = gu[:, 0::2], gu[:, 1::2]
    down = weights.tensor(f"{key}.down_proj_bias", dtype=dtype, device=device)           # [E, H]
    return g.contiguous(), u.contiguous(), down.contiguous()


def torch_moe(x, ids, w, gate, up, down, gating: Gating = Gating(), biases=None) -> torch.Tensor:
    """Plain-torch MoE: x [T, H], ids [T, k] (negative = skip), w [T, k], gate/up [E, I, H],
    down [E, H, I], biases (gate [E, I], up [E, I], down [E, H]) or None -> [T, H] in float32
    (computed in the weights' dtype, accumulated in f32)."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    xw = x.to(gate.dtype)
    for e in torch.unique(ids[ids >= 0]).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = xw[tok]                                                                     # [m, H]
        g, u = xe @ gate[e].T, xe @ up[e].T                                              # [m, I]
        if biases is not None:
            g, u = g + biases[0][e], u + biases[1][e]
        y = gating(g, u) @ down[e].T                                                     # [m, H]
        if biases is not None:
            y = y + biases[2][e]
        out.index_add_(0, tok, y.float() * w[tok, slot, None].float())
    return out


def expert_tensors(weights, layer: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """(gate [E, I, H], up [E, I, H], down [E, H, I]) dequantized to `dtype` on `device`."""
    from ktrans.weights.source import raw_to_torch

    out = []
    for proj in PROJS:
        raw = weights.expert_stack(layer, proj)
        if raw.qtype in KERNEL_QTYPES:
            t = raw_to_torch(raw, where=f"layer {layer} {proj} experts")
        else:  # e.g. FP8: the source applies its scales when dequantizing by parameter name
            t = _fused_tensor(weights, layer, proj, torch.float32)
        out.append(t.to(dtype=dtype, device=device))
    return tuple(out)


def _fused_tensor(weights, layer: int, proj: str, dtype) -> torch.Tensor:
    pre = f"model.layers.{layer}.mlp.experts"
    if proj == "down":
        return weights.tensor(f"{pre}.down_proj", dtype=dtype)
    gu = weights.tensor(f"{pre}.gate_up_proj", dtype=dtype)                              # [E, 2I, H]
    half = gu.shape[1] // 2
    return gu[:, :half] if proj == "gate" else gu[:, half:]


@dataclass
class Pending:
    """A submitted CPU MoE call: keeps its inputs alive until sync."""
    ticket: int | None          # pool ticket (CPU path), None for the stream-ordered path
    out: torch.Tensor           # [T, H] CPU result (or the device result of the stream path)
    refs: tuple                 # tensors the C++ task reads
    device: torch.device
    dtype: torch.dtype
    stream_task: Any = None


def _np(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor; bf16 as uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _check_choice(key: str, name: str, value, choices) -> None:
    if value not in choices:
        raise KtransError(f"{key}: {name} '{value}' is not one of {', '.join(map(str, choices))}")


def _check_gpu_prefill(key: str, value) -> None:
    if not (value in ("auto", "off") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
        raise KtransError(f"{key}: gpu_prefill must be auto, off or a number of tokens >= 1, got {value!r}")


def default_threads() -> int:
    """Physical cores, leaving one to the Python/GPU-driving thread on larger machines."""
    from ktrans import _C

    n = len(_C.physical_cores())
    return n - 1 if n > 4 else n


def numa_layout(numa: str, numa_nodes: int | None, copy_bytes: int, config) -> tuple[str, int]:
    """(mode, thread groups). auto replicates when a copy per node of every layer's experts fits
    in 80% of RAM, else splits each expert across the nodes."""
    groups = numa_nodes if numa_nodes else numa_nodes_available()
    if numa != "auto":
        return numa, groups
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    layers = getattr(config, "num_hidden_layers", 1) or 1
    return ("replicate" if groups * copy_bytes * layers <= 0.8 * ram else "split"), groups


def resolve_backend(backend: str, types: list[str]) -> str:
    """auto: bf16 checkpoints run on AMX tiles where the CPU has them (same bytes, tile speed);
    GGUF blocks (and f32/f16) stay in their own format on the gguf backend."""
    if backend != "auto":
        return backend
    from ktrans import cpu

    return "amx_bf16" if all(t == "bf16" for t in types) and cpu.selected_isa() == "amx" else "gguf"


@register_operator("cpu_experts")
class CPUExperts(Operator):
    """One layer's routed experts in the C++ MoE kernels (see the module docstring).

    kwargs: backend (auto | gguf | amx_bf16 | amx_int8 | amx_int4 | torch), cpu_infer (threads;
    default: physical cores), numa (auto | replicate | split), numa_nodes (force a layout of that
    many thread groups, e.g. 2 on a one-node machine for tests), max_chunk (tokens per pass),
    gpu_prefill (CUDA chunks of at least this many tokens stream the experts to the GPU: a
    number, auto = the crossover from the machine profile of `ktrans probe`, or off, the
    default until the stream is measured on a GPU; never below 129 tokens, so decode steps and
    CUDA graphs keep the CPU path), gpu_prefill_mb (GPU memory a streamed group may use;
    default 1024).
    """

    name: ClassVar[str] = "cpu_experts"

    def __init__(self, *, key: str, orig_module, config, device, backend: str = "auto", cpu_infer: int | None = None,
                 numa: str = "auto", numa_nodes: int | None = None, max_chunk: int = 4096,
                 gpu_prefill="off", gpu_prefill_mb: int = 1024, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        _check_choice(key, "backend", backend, BACKENDS)
        _check_choice(key, "numa", numa, NUMA_MODES)
        if cpu_infer is not None and (not isinstance(cpu_infer, int) or cpu_infer < 1):
            raise KtransError(f"{key}: cpu_infer must be a positive number of threads, got {cpu_infer!r}")
        if numa_nodes is not None and (not isinstance(numa_nodes, int) or numa_nodes < 1):
            raise KtransError(f"{key}: numa_nodes must be a positive int, got {numa_nodes!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = expert_dims(orig_module)
        self.layer = layer_index(key)
        self.gating = gating_of(config, orig_module)
        self.bias_layout = bias_layout(orig_module)
        self._biases = None         # (gate, up, down) f32 biases for the torch paths
        self.backend, self.numa, self.numa_nodes = backend, numa, numa_nodes
        self.cpu_infer = cpu_infer or default_threads()
        self.max_chunk = int(max_chunk)
        _check_gpu_prefill(key, gpu_prefill)
        if not isinstance(gpu_prefill_mb, int) or isinstance(gpu_prefill_mb, bool) or gpu_prefill_mb < 1:
            raise KtransError(f"{key}: gpu_prefill_mb must be a positive number of MiB, got {gpu_prefill_mb!r}")
        self.gpu_prefill, self.gpu_prefill_mb = gpu_prefill, gpu_prefill_mb
        self.streamed = None        # StreamedExperts (stored experts the GPU can stream), or None
        self.stream_why_not = "not loaded"
        self._stream_from: dict[int, int | None] = {}  # GPU index -> smallest streamed chunk (None: never)
        self._moe = None            # the C++ MoeLayer
        self._native = None         # (gate, up, down) f32 tensors: backend torch, forward_native
        self._source = None         # WeightSource kept for forward_native's lazy dequantization
        self._pinned: dict[tuple, tuple] = {}  # (k, dtype) -> pinned x, ids, w, out [_STREAM_MAX_T, ...]
        self._stream: dict[tuple, tuple] = {}  # (T, k, dtype) -> views of those + their StreamTask
        self._handoff: str | None = None       # KTRANS_HANDOFF, read at the first stream-ordered call
        self._flags: list[torch.Tensor] = []   # the memop tasks' pinned flags (kept alive)

    # ---- loading ----

    def _raw_experts(self, weights) -> list[tuple[str, np.ndarray]]:
        """(format, bytes) of gate, up, down in a format the kernels compute from."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        out = []
        for proj, shape in zip(PROJS, ((e, i, h), (e, i, h), (e, h, i))):
            raw = weights.expert_stack(self.layer, proj)
            if tuple(raw.shape) != shape:
                raise KtransError(f"{self.key}: {proj} experts have shape {list(raw.shape)}, expected {list(shape)}")
            if raw.qtype in KERNEL_QTYPES:
                out.append((raw.qtype, np.ascontiguousarray(raw.data).reshape(-1)))
            else:
                t = _fused_tensor(weights, self.layer, proj, torch.bfloat16).contiguous()
                out.append(("bf16", _np(t).view(np.uint8).reshape(-1)))
        return out

    def load_weights(self, weights) -> None:
        from ktrans import _C

        self._source = weights
        self._biases = expert_biases(weights, self.key, self.bias_layout, torch.float32, "cpu")
        if self.backend == "torch":
            self._native = expert_tensors(weights, self.layer, torch.float32, "cpu")
            return
        raws = self._raw_experts(weights)
        types = [t for t, _ in raws]
        backend = resolve_backend(self.backend, types)
        copy_bytes = _C.moe_weight_bytes(self.num_experts, self.hidden_size, self.intermediate_size, types, backend,
                                         "split", 1)
        mode, groups = numa_layout(self.numa, self.numa_nodes, copy_bytes, self.config)
        pool = shared_pool(self.cpu_infer, groups if self.numa_nodes else 0)
        g = self.gating
        try:
            self._moe = _C.MoeLayer(pool, self.num_experts, self.hidden_size, self.intermediate_size, types,
                                    backend=backend, numa=mode, max_chunk=self.max_chunk, act=g.act, alpha=g.alpha,
                                    limit=g.limit)
            for p, (_, data) in enumerate(raws):
                self._moe.load(p, 0, data)
            for p, b in enumerate(self._biases or ()):
                self._moe.load_bias(p, b.numpy())
        except ValueError as e:
            raise KtransError(f"{self.key}: {e}") from None
        self._pool = pool
        self.numa_mode = mode
        self._cpu_expert_bytes = copy_bytes // self.num_experts
        self._keep_stored(raws)

    def _keep_stored(self, raws) -> None:
        """Keep the experts' stored bytes (views of the mapped file) for streamed prefill."""
        from ktrans.operators.expert_stream import StoredExperts, StreamedExperts

        self.streamed = None
        if self.gpu_prefill == "off":
            self.stream_why_not = "gpu_prefill: off"
            return
        if self.gating.act != "silu" or self.bias_layout is not None:
            self.stream_why_not = (f"the streamed path computes SiLU experts without biases; this layer's are "
                                   f"{self.gating.act}{' with biases' if self.bias_layout else ''} (gpt-oss)")
            return
        stored = StoredExperts.of(raws, self.num_experts, self.hidden_size, self.intermediate_size)
        if isinstance(stored, str):
            self.stream_why_not = stored
            return
        self.streamed = StreamedExperts(stored, self.gpu_prefill_mb << 20)
        self.stream_why_not = ""

    def set_gpu_prefill(self, value) -> None:
        """Change gpu_prefill after loading: auto, a number of tokens, or off."""
        _check_gpu_prefill(self.key, value)
        self.gpu_prefill, self._stream_from = value, {}
        if value != "off" and self.streamed is None and self._moe is not None:
            self._keep_stored(self._raw_experts(self._source))

    def stream_from(self, device: torch.device) -> int | None:
        """Smallest chunk (tokens) this layer streams to `device`, or None (never)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._stream_from:
            self._stream_from[index] = self._stream_threshold(index)
        return self._stream_from[index]

    def _stream_threshold(self, index: int) -> int | None:
        if self.streamed is None or self.gpu_prefill == "off":
            return None
        if self.gpu_prefill != "auto":
            return max(int(self.gpu_prefill), _STREAM_MAX_T + 1)
        from ktrans.fit.prefill import LayerShape, layer_crossover
        from ktrans.fit.profile import load_cached, profile_path

        profile = load_cached(profile_path())
        if profile is None:
            self.stream_why_not = "gpu_prefill: auto needs the machine profile (run `ktrans probe`)"
            return None
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        top_k = int(getattr(self.config, "num_experts_per_tok", 0) or 0) or 8
        shape = LayerShape(e, h, i, top_k, self._cpu_expert_bytes, self.streamed.stored.expert_bytes())
        choice = layer_crossover(shape, profile, gpu_index=index, cpu_format=self.streamed.stored.qtypes[0])
        if choice is None:
            self.stream_why_not = "gpu_prefill: auto needs measured GPU and CPU rates in the machine profile"
            return None
        if choice.crossover is None:
            self.stream_why_not = "streaming never beats the CPU on this machine (machine profile)"
            return None
        return max(choice.crossover, _STREAM_MAX_T + 1)

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        from ktrans import _C

        e, h, i = expert_dims(orig_module)
        backend = kwargs.get("backend", "auto")
        if backend == "torch":
            return {"cpu": 4 * e * 3 * h * i}
        types = []
        for name in ("gate_up_proj", "gate_up_proj", "down_proj"):
            qtype = "bf16"
            if weights is not None and weights.has(f"{key}.{name}"):
                qtype = weights.info(f"{key}.{name}").qtype
            types.append(qtype if qtype in KERNEL_QTYPES else "bf16")
        backend = resolve_backend(backend, types)
        one = _C.moe_weight_bytes(e, h, i, types, backend, "split", 1)
        mode, groups = numa_layout(kwargs.get("numa", "auto"), kwargs.get("numa_nodes"), one, config)
        return {"cpu": _C.moe_weight_bytes(e, h, i, types, backend, mode, groups)}

    # ---- forward ----

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return self.sync(self.submit(hidden_states, top_k_index, top_k_weights))

    def submit(self, hidden_states, top_k_index, top_k_weights) -> Pending:
        """Start the routed experts; returns a handle for sync()."""
        x, dev, dt = hidden_states, hidden_states.device, hidden_states.dtype
        if self._native is not None:
            out = torch_moe(x.to("cpu", torch.float32), top_k_index.to("cpu"), top_k_weights.to("cpu"), *self._native,
                            gating=self.gating, biases=self._biases)
            return Pending(None, out, (), dev, dt)
        if self._moe is None:
            raise KtransError(f"{self.key}: cpu_experts used before load_weights()")
        if dev.type == "cuda" and x.shape[0] <= _STREAM_MAX_T:
            return self._submit_stream(x, top_k_index, top_k_weights)
        if dev.type == "cuda" and self.streamed is not None:
            start = self.stream_from(dev)
            if start is not None and x.shape[0] >= start:
                return Pending(None, self.streamed.run(x, top_k_index, top_k_weights), (), dev, dt)
        xc = x.detach().to("cpu")
        xc = (xc if xc.dtype in (torch.bfloat16, torch.float32) else xc.float()).contiguous()
        ids = top_k_index.to("cpu", torch.int64).contiguous()
        w = top_k_weights.to("cpu", torch.float32).contiguous()
        out = torch.empty_like(xc)                                                       # [T, H]
        try:
            ticket = self._moe.submit(_np(xc), _np(ids), _np(w), _np(out), False)
        except ValueError as e:
            raise KtransError(f"{self.key}: {e}") from None
        return Pending(ticket, out, (xc, ids, w), dev, dt)

    def sync(self, handle: Pending) -> torch.Tensor:
        """Wait for a submit(); returns [T, H] in the input's dtype on its device."""
        if handle.stream_task is not None:
            return self._sync_stream(handle)
        if handle.ticket is not None:
            try:
                self._pool.sync(handle.ticket)
            except ValueError as e:
                raise KtransError(f"{self.key}: {e}") from None
        return handle.out.to(handle.device, handle.dtype)

    def _stream_buffers(self, t: int, k: int, dtype: torch.dtype) -> tuple:
        """Views [:t] of this layer's pinned buffers (capacity _STREAM_MAX_T tokens, allocated once
        per (k, dtype)) and the StreamTask bound to them (one per t: a CUDA graph keeps using it)."""
        key = (t, k, dtype)
        if key not in self._stream:
            cdt = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
            if (k, cdt) not in self._pinned:
                n, h = _STREAM_MAX_T, self.hidden_size
                self._pinned[(k, cdt)] = (torch.empty(n, h, dtype=cdt, pin_memory=True),
                                          torch.empty(n, k, dtype=torch.int64, pin_memory=True),
                                          torch.empty(n, k, dtype=torch.float32, pin_memory=True),
                                          torch.empty(n, h, dtype=cdt, pin_memory=True))
            x, ids, w, out = (b[:t] for b in self._pinned[(k, cdt)])
            task = self._moe.stream_task(_np(x), _np(ids), _np(w), _np(out), False)
            if self._handoff == "memop":
                flags = torch.zeros(2, dtype=torch.int32, pin_memory=True)
                task.set_flags(flags.numpy().view(np.uint32))
                self._flags.append(flags)
            self._stream[key] = (x, ids, w, out, task)
        return self._stream[key]

    def _submit_stream(self, x, idx, w) -> Pending:
        if self._handoff is None:
            self._handoff = handoff_mode()
        xb, ib, wb, ob, task = self._stream_buffers(x.shape[0], idx.shape[1], x.dtype)
        err = task.take_error()
        if err:
            raise KtransError(f"{self.key}: an earlier stream-ordered MoE call failed: {err}")
        stream = torch.cuda.current_stream(x.device).cuda_stream
        # NOTE: all copies and both host functions sit on the current stream, in order: no host
        # sync, and the pinned buffers are only reused by later work on the same stream.
        xb.copy_(x, non_blocking=True)
        ib.copy_(idx, non_blocking=True)
        wb.copy_(w, non_blocking=True)
        try:
            if self._handoff == "memop":
                # NOTE: the start write is queued before the job is armed (the job waits for the
                # flag either way), so a launch that fails leaves no job waiting for a start
                # that never comes.
                capturing = torch.cuda.is_current_stream_capturing()
                if capturing and _capturing is None:
                    raise KtransError(f"{self.key}: a memop hand-off captured outside captured_tasks()")
                task.launch_start_memop(stream)
                if capturing:
                    _capturing.append(task)
                else:
                    task.arm()
            else:
                task.launch_start(stream)
        except RuntimeError as e:
            raise KtransError(f"{self.key}: {e}") from None
        return Pending(None, ob, (xb, ib, wb), x.device, x.dtype, stream_task=task)

    def _sync_stream(self, handle: Pending) -> torch.Tensor:
        stream = torch.cuda.current_stream(handle.device).cuda_stream
        try:
            if self._handoff == "memop":
                handle.stream_task.launch_wait_memop(stream)
            else:
                handle.stream_task.launch_wait(stream)
        except RuntimeError as e:
            raise KtransError(f"{self.key}: {e}") from None
        return handle.out.to(handle.device, non_blocking=True).to(handle.dtype)

    def forward_native(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """f32 torch oracle on the same (dequantized) weights."""
        if self._native is None:
            if self._source is None:
                raise KtransError(f"{self.key}: forward_native needs load_weights() first")
            self._native = expert_tensors(self._source, self.layer, torch.float32, "cpu")
        x = hidden_states
        out = torch_moe(x.to("cpu", torch.float32), top_k_index.to("cpu"), top_k_weights.to("cpu"), *self._native,
                        gating=self.gating, biases=self._biases)
        return out.to(x.device, x.dtype)


@register_operator("torch_experts")
class TorchExperts(Operator):
    """The experts dequantized to `dtype` (auto: bf16 on CUDA, f32 on the CPU) on `device`."""

    name: ClassVar[str] = "torch_experts"

    def __init__(self, *, key: str, orig_module, config, device, dtype: str = "auto", **kwargs):
        from ktrans.operators.linear import resolve_dtype

        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self.num_experts, self.hidden_size, self.intermediate_size = expert_dims(orig_module)
        self.layer = layer_index(key)
        self.dtype = resolve_dtype(dtype, self.device)
        self.gating = gating_of(config, orig_module)
        self.bias_layout = bias_layout(orig_module)

    def load_weights(self, weights) -> None:
        gate, up, down = expert_tensors(weights, self.layer, self.dtype, self.device)
        self.gate_proj = torch.nn.Parameter(gate, requires_grad=False)                  # [E, I, H]
        self.up_proj = torch.nn.Parameter(up, requires_grad=False)                      # [E, I, H]
        self.down_proj = torch.nn.Parameter(down, requires_grad=False)                  # [E, H, I]
        biases = expert_biases(weights, self.key, self.bias_layout, self.dtype, self.device)
        self.biases = None if biases is None else torch.nn.ParameterList(
            torch.nn.Parameter(b, requires_grad=False) for b in biases)                 # [E, I], [E, I], [E, H]

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        from ktrans.operators.linear import resolve_dtype

        e, h, i = expert_dims(orig_module)
        size = torch.empty(0, dtype=resolve_dtype(kwargs.get("dtype", "auto"), device)).element_size()
        return {str(torch.device(device)): size * e * 3 * h * i}

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        x = hidden_states
        out = torch_moe(x.to(self.device), top_k_index.to(self.device), top_k_weights.to(self.device),
                        self.gate_proj, self.up_proj, self.down_proj, gating=self.gating, biases=self.biases)
        return out.to(x.device, x.dtype)

    def forward_native(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        x = hidden_states
        w = [p.float() for p in (self.gate_proj, self.up_proj, self.down_proj)]
        b = None if self.biases is None else [t.float() for t in self.biases]
        out = torch_moe(x.to(self.device, torch.float32), top_k_index.to(self.device), top_k_weights.to(self.device), *w,
                        gating=self.gating, biases=b)
        return out.to(x.device, x.dtype)
