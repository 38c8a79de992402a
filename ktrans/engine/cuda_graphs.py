"""CUDA-graph decode steps: a decode-only step (every request adds one token) replays a graph
captured once per batch bucket (1, 2, 4, ... 128) instead of launching ~15 kernels per layer from
Python.

What is captured: the decoder layers, final norm and lm_head (`forward_hidden`) over static
buffers: the embeddings [bucket, H], and one int64 metadata block holding token ids, positions,
KV lengths, page tables and (models with linear-attention layers) each request's recurrent-state
rows read and written. Each step writes that block on the host (pinned), copies it in one
transfer, looks the embeddings up (on the CPU by default), replays, and returns a copy of the
logits rows. Attention reads lengths and pages on the device (the paged decode kernel), and the
CPU experts run as host functions ordered on the stream (cpu_experts' stream-ordered path), so
nothing in the graph depends on a host value that changes between steps.

Padding: a batch of B requests runs in the smallest bucket >= B; the extra rows are dummy
one-token requests whose KV lives in a scratch page past the pool's pages (KVStorage holds one
more page than the page pool hands out), and whose recurrent state is the scratch state row, so
they never touch a real request's cache. Reserving more state rows (the engine does, per batch
slot) replaces the state tensors: the graphs captured before are dropped (`invalidate`).

A model is eligible when everything after the embedding runs on one CUDA device except the
routed experts in `cpu_experts` (C++ kernels), and every attention layer uses its paged kernel.
Anything else (an all-CPU placement, torch experts on the GPU, the torch attention backend)
runs eagerly; a capture that fails falls back to eager with one warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ktrans.engine.batch import DecodeGroup, ForwardBatch, ForwardContext, scoped_context
from ktrans.kernels import next_pow2
from ktrans.operators.experts import arm_tasks, captured_tasks
from ktrans.operators.model import layer_input, embed_packed, forward_hidden, module_placement

log = logging.getLogger("ktrans.engine")

# Largest bucket: the CPU experts' stream-ordered path takes up to this many tokens per call.
MAX_BUCKET = 128


def graph_blockers(model: torch.nn.Module) -> list[str]:
    """Why this model's decode step cannot be a CUDA graph (empty: it can)."""
    from ktrans.operators.experts import CPUExperts

    inner = model.model
    device, _ = module_placement(layer_input(inner.layers[0]))
    if device.type != "cuda":
        return [f"the decoder layers run on {device}"]
    reasons, cpu_experts = [], []
    for prefix, part in (("model.layers", inner.layers), ("model.norm", inner.norm), ("lm_head", model.lm_head)):
        for name, mod in part.named_modules(prefix=prefix):
            if any(name.startswith(p) for p in cpu_experts):
                continue
            if isinstance(mod, CPUExperts):
                cpu_experts.append(name)
                if mod._moe is None:
                    reasons.append(f"{name}: cpu_experts with backend torch runs synchronously")
                continue
            if hasattr(mod, "decode_kernel") and not mod.decode_kernel:
                reasons.append(f"{name}: attention without its paged decode kernel (attn_backend torch)")
            if getattr(mod, "name", "") == "torch_experts":
                reasons.append(f"{name}: torch_experts syncs with the host in every call")
            for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t.device != device:
                    reasons.append(f"{name}.{pname} is on {t.device}, the layers on {device}")
    return reasons


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor       # [bucket, V] float32, written by every replay
    tasks: list                # memop hand-off tasks in the graph, armed before every replay


class DecodeGraphs:
    """Captures and replays decode steps for one ModelRunner (see the module docstring)."""

    def __init__(self, model, rotary, kv, *, num_pages: int, page_size: int, capture: bool = True):
        self.model, self.rotary, self.kv = model, rotary, kv
        # NOTE: capture=False runs the same static-buffer step eagerly, on any device: the tests
        # check the padding rows and scratch page with it where no GPU is.
        self.capture = capture
        self.page_size = page_size
        self.scratch_page = num_pages                   # KVStorage has this one page more
        self.width = num_pages                          # most pages a request can hold
        blockers = graph_blockers(model) if capture else []
        self.enabled = not blockers
        self.reason = "; ".join(blockers[:3]) + (f" (+{len(blockers) - 3} more)" if len(blockers) > 3 else "")
        self.graphs: dict[int, _Captured] = {}
        self._pool = None
        self._buffers = None
        self._copied = None                             # event: the last staging copy is done

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.enabled and batch.num_tokens == batch.num_reqs <= MAX_BUCKET

    def invalidate(self) -> None:
        """Drop the captured graphs (the cache tensors they read were replaced)."""
        self.graphs.clear()

    # -- static buffers ------------------------------------------------------------------------

    def _alloc(self, device: torch.device, dtype: torch.dtype, hidden: int) -> None:
        n, w = MAX_BUCKET, self.width
        size = n * (5 + w)                              # ids, positions, lengths, state rows x 2, page table
        self._buffers = {
            "host": torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda"),
            "meta": torch.zeros(size, dtype=torch.int64, device=device),
            "hidden": torch.zeros(n, hidden, dtype=dtype, device=device),
            "rows": torch.arange(n, device=device),
        }

    def _views(self, t: torch.Tensor):
        """(ids [N], positions [N], seq_lens [N], state rows read [N], written [N], page_table [N, W])
        regions of a metadata block."""
        n = MAX_BUCKET
        return (t[:n], t[n:2 * n], t[2 * n:3 * n], t[3 * n:4 * n], t[4 * n:5 * n], t[5 * n:].view(n, self.width))

    def _stage(self, batch: ForwardBatch, bucket: int) -> None:
        """Write this step's inputs into the static buffers (one host-to-device copy)."""
        bsz = batch.num_reqs
        if self._copied is not None:
            self._copied.synchronize()                  # the pinned block is free to rewrite
        ids, pos, lens, read, write, table = self._views(self._buffers["host"])
        ids[:bsz] = batch.input_ids
        pos[:bsz] = batch.positions
        lens[:bsz] = torch.tensor(batch.num_computed, dtype=torch.int64) + 1
        scratch = max(self.kv.num_state_rows - 1, 0)       # (no recurrent layers: unused)
        if batch.state_rows is not None and self.kv.recurrent_layers:
            batch.check_state_rows(self.kv.num_state_rows)
            read[:bsz], write[:bsz] = batch.state_rows[:, 0], batch.state_rows[:, 1]
        read[bsz:bucket] = write[bsz:bucket] = scratch
        pt = batch.page_table.to(torch.int64)
        table[:bsz, :pt.shape[1]] = torch.where(pt >= 0, pt, self.scratch_page)
        # Padding rows: one token at position 0, in the scratch page.
        ids[bsz:bucket] = 0
        pos[bsz:bucket] = 0
        lens[bsz:bucket] = 1
        table[bsz:bucket, 0] = self.scratch_page
        # NOTE: two copies: the small per-row regions whole, and only the bucket's page-table rows
        # (the table holds MAX_BUCKET rows of every page a request may own).
        meta, host, n = self._buffers["meta"], self._buffers["host"], MAX_BUCKET
        meta[:5 * n].copy_(host[:5 * n], non_blocking=True)
        meta[5 * n:5 * n + bucket * self.width].copy_(host[5 * n:5 * n + bucket * self.width], non_blocking=True)
        if meta.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        h = embed_packed(self.model, batch.input_ids)[0]                               # [B, H]
        self._buffers["hidden"][:bsz].copy_(h, non_blocking=True)

    # -- capture and replay --------------------------------------------------------------------

    def _body(self, bucket: int) -> torch.Tensor:
        """The captured step over the static buffers' first `bucket` rows: logits [bucket, V]."""
        ids, pos, lens, read, write, table = (t[:bucket] for t in self._views(self._buffers["meta"]))
        ps = self.page_size
        rows = self._buffers["rows"][:bucket]
        batch = ForwardBatch(input_ids=ids, positions=pos, seq_ids=list(range(bucket)), num_computed=[0] * bucket,
                             num_new=[1] * bucket, page_table=table, logits_indices=rows)
        slot_mapping = table.gather(1, (pos // ps)[:, None])[:, 0] * ps + pos % ps           # [B]
        group = DecodeGroup(reqs=frozenset(range(bucket)), rows=rows, page_table=table, whole=True,
                            q_pos=pos[:, None], seq_lens=lens, max_len=None)
        # NOTE: num_computed and the host seq_lens are unknown here (they change between replays);
        # operators read only the decode group, which covers every row.
        ctx = ForwardContext(batch=batch, kv=self.kv, device=ids.device, slot_mapping=slot_mapping,
                             query_start=list(range(bucket + 1)), seq_lens=[], page_table=table,
                             positions=pos, cache={"decode": group}, state_read=read, state_write=write)
        with scoped_context(ctx):
            return forward_hidden(self.model, self.rotary, ctx, self._buffers["hidden"][:bucket][None])

    def _capture(self, bucket: int) -> _Captured:
        device = self._buffers["meta"].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._body(bucket)                          # warm-up: kernels compiled, pinned buffers made
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with captured_tasks() as tasks:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._body(bucket)
        self._pool = self._pool or graph.pool()
        return _Captured(graph, logits, tasks)

    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Logits [B, V] float32 of a decode-only batch, or None when graphs are (now) off and
        the caller must run the step eagerly."""
        bsz = batch.num_reqs
        bucket = next_pow2(bsz)
        if self._buffers is None:
            dev, dtype = module_placement(layer_input(self.model.model.layers[0]))
            self._alloc(dev, dtype, self.model.config.hidden_size)
        self._stage(batch, bucket)
        if not self.capture:
            return self._body(bucket)[:bsz].clone()
        captured = self.graphs.get(bucket)
        if captured is None:
            try:
                captured = self.graphs[bucket] = self._capture(bucket)
            except Exception as e:                      # a module the checks missed syncs the host
                self.enabled = False
                self.reason = f"capture failed: {type(e).__name__}: {e}"
                log.warning("CUDA graphs off for this model (%s); decode runs eagerly", self.reason)
                torch.cuda.synchronize()
                return None
            log.info("captured the decode step for batch size %d", bucket)
        arm_tasks(captured.tasks)
        captured.graph.replay()
        return captured.logits[:bsz].clone()
