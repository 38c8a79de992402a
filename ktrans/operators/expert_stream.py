"""Long-prompt prefill of CPU-placed experts on the GPU.

A layer's routed experts live in host RAM for the CPU kernels. For a prefill chunk of many
tokens the CPU's compute time grows with the chunk while copying the layer's experts over PCIe
does not, so past a crossover chunk size (ktrans.fit.prefill, from the machine profile's measured
rates) it is faster to stream the experts to the GPU and compute them there:

- only the experts that got tokens in this chunk are copied, as stored (GGUF blocks or bf16/f16/
  f32 rows, straight from the mapped weight file: no second copy of the experts is kept in RAM);
- in groups sized to a GPU memory budget, through two pinned host buffers and two device
  buffers: while the GPU dequantizes and computes group j, the host gathers group j+1 into the
  other pinned buffer and a copy stream moves it to the device;
- on the GPU a group is dequantized to bf16 (ktrans.kernels.quant_matmul's field split and
  dequantization, bit-exact with gguf-py before the cast) and computed as one grouped matmul per
  projection (`torch._grouped_mm`; a per-expert loop where that op is missing).

Routing is read on the host once per layer (a prefill chunk syncs anyway): the slots are sorted
by expert, and every group's rows, offsets and weights are sliced from that order with host
integers, so the loop over groups never waits for the GPU. `StreamedExperts.run` also runs with
`device="cpu"` (no pinned memory or streams; the same grouping, dequantization and math): that is
how the CPU-only tests hold it to the torch oracle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Formats the stream dequantizes on the GPU (the others stay on the CPU for every chunk).
STREAM_QTYPES = ("q8_0", "q4_k", "q5_k", "q6_k", "bf16", "f16", "f32")
_PLAIN = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def dequantize_stored(qtype: str, raw: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Stored bytes (uint8, `rows` rows of `cols` values, on any device) -> [rows, cols] `dtype`."""
    if qtype in _PLAIN:
        return raw.view(_PLAIN[qtype]).reshape(rows, cols).to(dtype)
    from ktrans.kernels.quant_matmul import dequantize, pack

    return dequantize(qtype, pack(qtype, raw, rows, cols)).to(dtype)


def _readonly(a: np.ndarray) -> torch.Tensor:
    from ktrans.kernels.quant_matmul import _readonly_tensor

    return _readonly_tensor(a)


@dataclass
class StoredExperts:
    """One layer's experts as stored: per projection (gate, up, down) its format, the bytes
    [E, bytes per expert] (a view of the mapped file) and one expert's [rows, cols]."""
    qtypes: tuple[str, str, str]
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    shapes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    @classmethod
    def of(cls, raws: list[tuple[str, np.ndarray]], num_experts: int, hidden: int, inter: int) -> "StoredExperts | str":
        """From cpu_experts' (format, bytes) of gate, up, down; or why the layer cannot stream."""
        bad = sorted({q for q, _ in raws if q not in STREAM_QTYPES})
        if bad:
            return f"no GPU dequantization for {', '.join(bad)} (streamed formats: {', '.join(STREAM_QTYPES)})"
        if any(a.flags.writeable for _, a in raws):
            # NOTE: a writable array is a copy made at load (experts not stored stacked in the
            # file, or converted): keeping it would hold the experts twice in RAM.
            return "the experts are not stored stacked in the weight file (streaming would keep a second copy)"
        data = tuple(_readonly(a.reshape(num_experts, -1)) for _, a in raws)
        return cls(tuple(q for q, _ in raws), data, ((inter, hidden), (inter, hidden), (hidden, inter)))

    def expert_bytes(self) -> int:
        return sum(int(d.shape[1]) for d in self.data)


class _Staging:
    """Two pinned host buffers, two device buffers and a copy stream for one device, shared by
    every layer (layers run one after another). On the CPU the host buffers are used directly."""

    def __init__(self, device: torch.device, slot_bytes: int):
        self.device, self.slot_bytes = device, slot_bytes
        self.cuda = device.type == "cuda"
        self.host = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        if self.cuda:
            self.dev = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.consumed = [torch.cuda.Event() for _ in range(2)]
        else:
            self.dev = self.host

    def fill(self, slot: int) -> torch.Tensor:
        """The host buffer of `slot`, once the copy that last read it has finished."""
        if self.cuda:
            self.copied[slot].synchronize()
        return self.host[slot]

    def to_device(self, slot: int, nbytes: int) -> torch.Tensor:
        """Queue the copy of the first `nbytes` of host buffer `slot` (after the compute that last
        read device buffer `slot`); the current stream waits for it. Returns the device bytes."""
        if not self.cuda:
            return self.host[slot][:nbytes]
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.consumed[slot])
            self.dev[slot][:nbytes].copy_(self.host[slot][:nbytes], non_blocking=True)
            self.copied[slot].record(self.copy_stream)
        current.wait_event(self.copied[slot])
        return self.dev[slot][:nbytes]

    def release(self, slot: int) -> None:
        """Device buffer `slot` has been read by the work queued so far on the current stream."""
        if self.cuda:
            self.consumed[slot].record(torch.cuda.current_stream(self.device))


_stagings: dict[str, _Staging] = {}


def staging(device: torch.device, slot_bytes: int) -> _Staging:
    """The device's staging, with slots of at least `slot_bytes` (layers of a mixed-format model
    differ a little: the first larger one replaces it once)."""
    st = _stagings.get(str(device))
    if st is None or st.slot_bytes < slot_bytes:
        if st is not None and st.cuda:
            torch.cuda.synchronize(device)       # the old buffers may still be read by queued copies
        st = _stagings[str(device)] = _Staging(device, slot_bytes)
    return st


@functools.lru_cache(maxsize=None)
def _grouped(device: str, dtype: torch.dtype) -> bool:
    from ktrans.operators.hybrid_experts import grouped_supported

    return grouped_supported(device, dtype)


class StreamedExperts:
    """One layer's stored experts, computed on `device` for a chunk: see the module docstring.

    budget_bytes: device memory for one group's working set (both raw buffers, the dequantized
    bf16 weights, one projection's f32 dequantization); a group holds as many experts as fit."""

    def __init__(self, stored: StoredExperts, budget_bytes: int):
        self.stored = stored
        (i, h), _, _ = stored.shapes
        self.inter, self.hidden = i, h
        per_expert = stored.expert_bytes()
        work = 2 * per_expert + 3 * i * h * 2 + i * h * 4          # raw x2, bf16 gate/up/down, one f32 proj
        self.group = max(1, min(stored.data[0].shape[0], budget_bytes // work))
        self.slot_bytes = self.group * per_expert

    def _groups(self, used: np.ndarray) -> list[np.ndarray]:
        return [used[a:a + self.group] for a in range(0, len(used), self.group)]

    def _gather(self, dst: torch.Tensor, experts: np.ndarray) -> list[tuple[int, int]]:
        """Copy the stored bytes of `experts` (sorted) into `dst`, projection after projection;
        returns each projection's (offset, bytes) in it."""
        spans, off = [], 0
        contiguous = int(experts[-1]) - int(experts[0]) + 1 == len(experts)
        for data in self.stored.data:
            n = len(experts) * int(data.shape[1])
            view = dst[off:off + n].view(len(experts), -1)
            if contiguous:
                view.copy_(data[int(experts[0]):int(experts[-1]) + 1])
            else:
                torch.index_select(data, 0, torch.from_numpy(experts), out=view)
            spans.append((off, n))
            off += n
        return spans

    def _weights(self, raw: torch.Tensor, spans, g: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [g, 2I, H] and down [g, H, I] in `dtype` from one group's stored bytes."""
        i, h = self.inter, self.hidden
        gate_up = torch.empty(g, 2 * i, h, dtype=dtype, device=raw.device)
        for p, (off, n) in enumerate(spans[:2]):
            w = dequantize_stored(self.stored.qtypes[p], raw[off:off + n], g * i, h, dtype)
            gate_up[:, p * i:(p + 1) * i] = w.view(g, i, h)
        off, n = spans[2]
        down = dequantize_stored(self.stored.qtypes[2], raw[off:off + n], g * h, i, dtype).view(g, h, i)
        return gate_up, down

    def run(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [T, H] on the computing device, top_k_index [T, k] (negative = skip), top_k_weights
        [T, k] -> [T, H] float32 on x's device. dtype: of the dequantized weights and the
        products (default bf16 on CUDA, f32 on the CPU)."""
        dev = x.device
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        t, k = top_k_index.shape
        flat = top_k_index.to("cpu", torch.int64).reshape(-1).numpy()                   # host sync
        e = self.stored.data[0].shape[0]
        order = np.argsort(np.where(flat >= 0, flat, e), kind="stable")[:int((flat >= 0).sum())]
        used, counts = np.unique(flat[order], return_counts=True)
        out = torch.zeros(t, self.hidden, dtype=torch.float32, device=dev)
        if not len(used):
            return out
        ends = np.cumsum(counts)                                                         # row ends per used expert
        order_dev = torch.from_numpy(order).to(dev, non_blocking=True)
        tok = order_dev // k                                                             # [S] token of each row
        wsel = top_k_weights.reshape(-1).to(dev).index_select(0, order_dev).float()     # [S]
        grouped = _grouped(str(dev), dtype)
        offs = torch.from_numpy(ends.astype(np.int32)).to(dev, non_blocking=True) if grouped else None
        st = staging(dev, self.slot_bytes)
        first = 0                                                                        # index into used
        for j, experts in enumerate(self._groups(used)):
            slot, g = j % 2, len(experts)
            spans = self._gather(st.fill(slot), experts)
            raw = st.to_device(slot, spans[-1][0] + spans[-1][1])
            gate_up, down = self._weights(raw, spans, g, dtype)
            st.release(slot)
            a = int(ends[first - 1]) if first else 0
            b = int(ends[first + g - 1])
            xs = x.index_select(0, tok[a:b]).to(dtype)                                  # [rows, H]
            if grouped:
                group_offs = offs[first:first + g] - a
                gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=group_offs)     # [rows, 2I]
                act = (F.silu(gu[:, :self.inter]) * gu[:, self.inter:]).contiguous()
                y = torch._grouped_mm(act, down.transpose(1, 2), offs=group_offs).float()
            else:
                y = torch.empty(b - a, self.hidden, dtype=torch.float32, device=dev)
                lo = a
                for n, hi in enumerate(ends[first:first + g]):
                    hi = int(hi)
                    gu = xs[lo - a:hi - a] @ gate_up[n].T
                    act = F.silu(gu[:, :self.inter]) * gu[:, self.inter:]
                    y[lo - a:hi - a] = (act @ down[n].T).float()
                    lo = hi
            out.index_add_(0, tok[a:b], y * wsel[a:b, None])
            first += g
        return out
