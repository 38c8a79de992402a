"""One engine step as the model sees it: the packed tokens of every scheduled request plus the
paged-KV metadata, and the scoped context through which operators read it.

The scheduler builds a ForwardBatch; the model runner validates it, derives the per-token tensors
the attention operators need (where each new token's K/V goes, which request each token belongs
to) once per step, and makes them visible to operators with
``with forward_context(batch, kv): model(...)``. Operators call ``current_forward()``; outside a
forward there is no context and asking for one is an error, so no state leaks between steps.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ktrans.errors import KtransError


@dataclass
class ForwardBatch:
    """One engine step, all scheduled requests packed back to back (request r's tokens are rows
    sum(num_new[:r]) .. sum(num_new[:r+1]) of input_ids)."""

    input_ids: torch.Tensor       # [T] int64, tokens of all requests back to back
    positions: torch.Tensor       # [T] int64, position of each token in its sequence (RoPE, causal mask)
    seq_ids: list[int]            # [R] request slots in this step (the scheduler's ids; not used for KV lookup)
    num_computed: list[int]       # [R] tokens already in the KV cache for each request (read, not written)
    num_new: list[int]            # [R] tokens scheduled now (sum == T); their K/V is written this step
    page_table: torch.Tensor      # [R, max_pages] int32, KV page ids of each request (-1 = none)
    logits_indices: torch.Tensor  # [R'] int64, rows of the packed tokens whose logits are needed
    # [R, 2] int64, (row read, row written) of each request's recurrent state (kv_cache/state.py);
    # needed only by models with linear-attention layers, whose state is not in the KV pages.
    state_rows: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_reqs(self) -> int:
        return len(self.num_new)

    def validate(self, page_size: int) -> None:
        """KtransError naming the field if the batch is inconsistent (a scheduler bug would
        otherwise show up as silently wrong attention)."""
        r, t = len(self.num_new), self.num_tokens
        if len(self.seq_ids) != r or len(self.num_computed) != r:
            raise KtransError(f"ForwardBatch: seq_ids/num_computed/num_new lengths differ "
                              f"({len(self.seq_ids)}/{len(self.num_computed)}/{r})")
        if sum(self.num_new) != t or any(n <= 0 for n in self.num_new):
            raise KtransError(f"ForwardBatch: num_new {self.num_new} must be positive and sum to T={t}")
        if self.positions.shape != (t,):
            raise KtransError(f"ForwardBatch: positions shape {tuple(self.positions.shape)}, expected ({t},)")
        if self.page_table.dim() != 2 or self.page_table.shape[0] != r:
            raise KtransError(f"ForwardBatch: page_table shape {tuple(self.page_table.shape)}, "
                              f"expected ({r}, max_pages)")
        for i, (c, n) in enumerate(zip(self.num_computed, self.num_new)):
            need = -(-(c + n) // page_size)
            have = int((self.page_table[i] >= 0).sum())
            if have < need:
                raise KtransError(f"ForwardBatch: request {self.seq_ids[i]} needs {need} KV pages "
                                  f"for {c + n} tokens (page size {page_size}), page_table gives {have}")
        if self.logits_indices.numel() and (int(self.logits_indices.min()) < 0 or int(self.logits_indices.max()) >= t):
            raise KtransError(f"ForwardBatch: logits_indices must lie in [0, {t})")
        if self.state_rows is not None and tuple(self.state_rows.shape) != (r, 2):
            raise KtransError(f"ForwardBatch: state_rows shape {tuple(self.state_rows.shape)}, expected ({r}, 2)")

    def check_state_rows(self, num_rows: int) -> None:
        """KtransError unless every request's state rows lie within [0, num_rows)."""
        if self.state_rows.numel() and (int(self.state_rows.min()) < 0 or int(self.state_rows.max()) >= num_rows):
            raise KtransError(f"ForwardBatch: state_rows must lie in [0, {num_rows}) (the rows reserved for "
                              f"recurrent state)")


@dataclass
class ForwardContext:
    """What operators read during one forward: the batch, the KV storage and derived metadata,
    all on the device the attention runs on."""

    batch: ForwardBatch
    kv: Any                        # ktrans.kv_cache.storage.KVStorage
    device: torch.device
    slot_mapping: torch.Tensor     # [T] int64, flat KV slot (page * page_size + offset) of each new token
    query_start: list[int]         # [R+1] prefix sums of num_new: request r owns rows query_start[r]:[r+1]
    seq_lens: list[int]            # [R] num_computed + num_new: tokens each request attends over
    page_table: torch.Tensor       # [R, max_pages] int64 on `device`
    positions: torch.Tensor        # [T] int64 on `device`
    cache: dict = field(default_factory=dict)  # per-step values shared between layers
    # [R] int64 on `device`: each request's recurrent-state row read / written (None: no recurrent layers)
    state_read: torch.Tensor | None = None
    state_write: torch.Tensor | None = None

    def on(self, device: torch.device) -> "ForwardContext":
        """This step's metadata on `device` (a layer placed on another GPU than the first),
        copied once per step and device."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("on", device)
        if key not in self.cache:
            self.cache[key] = ForwardContext(
                batch=self.batch, kv=self.kv, device=device, slot_mapping=self.slot_mapping.to(device),
                query_start=self.query_start, seq_lens=self.seq_lens, page_table=self.page_table.to(device),
                positions=self.positions.to(device),
                state_read=None if self.state_read is None else self.state_read.to(device),
                state_write=None if self.state_write is None else self.state_write.to(device))
        return self.cache[key]

    def decode_group(self) -> "DecodeGroup | None":
        """The requests with exactly one new token, batched for attention. Built once per step
        with everything that is the same in every layer (rows, page tables, lengths on the
        device), so a layer adds no host-to-device copies (on CUDA each would wait for the
        stream) and no kernels that only recompute these."""
        if "decode" not in self.cache:
            reqs = [r for r, n in enumerate(self.batch.num_new) if n == 1]
            group = None
            if reqs:
                whole = len(reqs) == self.batch.num_tokens      # every token of the step decodes
                rows = (torch.arange(len(reqs), device=self.device) if whole else
                        torch.tensor([self.query_start[r] for r in reqs], device=self.device))
                tables = self.page_table if whole else self.page_table.index_select(
                    0, torch.tensor(reqs, device=self.device))
                lens = [self.seq_lens[r] for r in reqs]
                group = DecodeGroup(reqs=frozenset(reqs), rows=rows, page_table=tables, whole=whole,
                                    q_pos=self.positions.index_select(0, rows)[:, None],
                                    seq_lens=torch.tensor(lens, dtype=torch.int32).to(self.device, non_blocking=True),
                                    max_len=max(lens))
            self.cache["decode"] = group
        return self.cache["decode"]


@dataclass
class DecodeGroup:
    """The decode requests of a step as attention reads them. Paged kernels read page_table and
    seq_lens on the device; the padded torch path also needs a host bound on the lengths
    (max_len), which a CUDA-graph step does not have (its lengths change between replays)."""

    reqs: frozenset[int]           # request indices (into the batch) with num_new == 1
    rows: torch.Tensor             # [B] int64 on the device, their token rows in the packed batch
    page_table: torch.Tensor       # [B, max_pages] int64/int32 on the device
    whole: bool                    # rows are 0..T-1: the step is decode only (no row indexing needed)
    q_pos: torch.Tensor            # [B, 1] int64, position of each decode token
    seq_lens: torch.Tensor         # [B] int32 on the device, tokens each request attends over
    max_len: int | None            # longest of the lengths; None inside a CUDA graph
    _padded: tuple | None = field(default=None, repr=False)

    def padded(self, kv) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [B, max_len] to gather (KVStorage.padded_slots), hidden [B, 1, 1, max_len] bool,
        True where a key is masked out), built once per step for the torch decode path."""
        if self.max_len is None:
            raise KtransError("this decode step runs inside a CUDA graph, where the padded torch "
                              "attention cannot run; the attention operator must use its paged kernel")
        if self._padded is None:
            keys = torch.arange(self.max_len, device=self.q_pos.device)
            self._padded = (kv.padded_slots(self.page_table, self.max_len),
                            (keys[None, None, :] > self.q_pos[:, :, None])[:, None])
        return self._padded


def build_context(batch: ForwardBatch, kv, device: torch.device) -> ForwardContext:
    """Derive per-token metadata once per step (shared by every layer)."""
    page_size = kv.page_size
    batch.validate(page_size)
    positions = batch.positions.to(device=device, dtype=torch.long)
    page_table = batch.page_table.to(device=device, dtype=torch.long)
    qs = [0]
    for n in batch.num_new:
        qs.append(qs[-1] + n)
    # NOTE: output_size spares CUDA a device->host sync to learn T.
    req_of_token = torch.repeat_interleave(
        torch.arange(batch.num_reqs, device=device), torch.tensor(batch.num_new, device=device),
        output_size=batch.num_tokens)  # [T]
    pages = page_table[req_of_token, positions // page_size]  # [T]
    slot_mapping = pages * page_size + positions % page_size  # [T]
    seq_lens = [c + n for c, n in zip(batch.num_computed, batch.num_new)]
    read = write = None
    if batch.state_rows is not None and getattr(kv, "recurrent_layers", None):
        batch.check_state_rows(kv.num_state_rows)
        rows = batch.state_rows.to(device=device, dtype=torch.long)
        read, write = rows[:, 0], rows[:, 1]
    return ForwardContext(batch=batch, kv=kv, device=device, slot_mapping=slot_mapping,
                          query_start=qs, seq_lens=seq_lens, page_table=page_table, positions=positions,
                          state_read=read, state_write=write)


_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("ktrans_forward", default=None)


@contextmanager
def forward_context(batch: ForwardBatch, kv, device: torch.device | str | None = None) -> Iterator[ForwardContext]:
    """Make `batch` (and the KV storage `kv`) visible to operators for the duration of a forward."""
    dev = torch.device(device) if device is not None else kv.device
    with scoped_context(build_context(batch, kv, dev)) as ctx:
        yield ctx


@contextmanager
def scoped_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make an already built context visible to operators (a CUDA-graph step builds its own from
    static buffers)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current_forward() -> ForwardContext:
    """The ForwardContext of the forward in progress; KtransError outside one."""
    ctx = _CURRENT.get()
    if ctx is None:
        raise KtransError("no forward in progress: operators that need batch metadata must run "
                          "inside `with forward_context(batch, kv)` (ModelRunner.execute sets it)")
    return ctx
