"""Which requests run in the next engine step, and how many of their tokens.

Each step has a token budget (`chunk_size`). Running requests that are decoding (one pending
token) are scheduled first, so a long prompt never stalls them; requests still in prefill then take
what is left of the budget; then waiting requests are admitted first-come-first-served while a batch
slot is free and the KV pool can hold their whole pending prompt. Chunked prefill is nothing more
than a request getting fewer tokens than it has pending: it simply stays in prefill next step.

A model with linear-attention layers also gives each admitted request a recurrent-state slot
(kv_cache/state.py) and takes it back with its pages; its state is not in the pages, so such a
model runs without the prefix cache.

Waiting requests first take the prefix cache's pages that match the start of their tokens (see
kv_cache.page_pool), so a shared prefix is not prefilled again. KV pages are allocated lazily,
step by step. When a running request needs a page and the pool is
empty, the most recently admitted request not yet scheduled in this step is preempted: its pages
are freed and it goes back to the front of the queue to recompute its KV later (its generated
tokens are kept, so the output is unaffected).

NOTE: the scheduler advances `num_computed_tokens` when it schedules tokens; if the step then
fails, the engine finishes those requests with an error (their KV is not trusted afterwards).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ktrans.engine.request import Request, Status
from ktrans.errors import KtransError
from ktrans.kv_cache import PagePool
from ktrans.kv_cache.state import StatePool


class QueueFullError(KtransError):
    """The waiting queue is at its limit; the caller should retry later (HTTP 503)."""


@dataclass
class ScheduledRequest:
    request: Request
    num_computed: int      # tokens already in the KV cache before this step
    num_new: int           # tokens run through the model in this step
    sample: bool           # this step reaches the end of the request's tokens: sample one more


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)   # lost their KV this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pool: PagePool, *, max_batch_size: int, chunk_size: int, max_context: int,
                 max_queue: int | None = None, prefix_cache: bool = True, states: StatePool | None = None):
        if max_batch_size < 1:
            raise KtransError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if chunk_size < max_batch_size:
            raise KtransError(f"chunk_size ({chunk_size}) must be >= max_batch_size ({max_batch_size}) "
                              f"so that every running request can decode in each step")
        if max_queue is not None and max_queue < 1:
            raise KtransError(f"max_queue must be >= 1 (or unset for no limit), got {max_queue}")
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.chunk_size = chunk_size
        # A request never grows beyond this (the engine finishes it with "length" there).
        self.max_context = min(max_context, pool.capacity_tokens)
        self.max_queue = max_queue
        if states is not None and prefix_cache:
            raise KtransError("the prefix cache cannot serve a model with recurrent layers (a cached page "
                              "carries no recurrent state); run it with prefix_cache off")
        self.prefix_cache = prefix_cache
        self.states = states                   # recurrent-state slots (models with linear-attention layers)
        self.num_cached_tokens = 0             # prompt tokens whose prefill the prefix cache saved
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []       # in admission order
        self._free_slots = list(range(max_batch_size - 1, -1, -1))

    # -- requests in and out -------------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """KtransError with both numbers if a prompt cannot fit the context (with one new token)."""
        if num_prompt_tokens < 1:
            raise KtransError("the prompt is empty; expected at least one token")
        if num_prompt_tokens + 1 > self.max_context:
            raise KtransError(f"prompt is {num_prompt_tokens} tokens, but the context holds at most "
                              f"{self.max_context} tokens (prompt + at least 1 generated)")

    def add(self, request: Request) -> None:
        self.check_prompt(request.num_prompt_tokens)
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        request.status = Status.WAITING
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and free its KV pages and slot (idempotent)."""
        if request in self.running:
            self.running.remove(request)
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.chunk_size
        decoding = [r for r in self.running if r.num_pending_tokens == 1]
        prefilling = [r for r in self.running if r.num_pending_tokens > 1]
        scheduled: set[int] = set()
        for req in decoding + prefilling:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:      # preempted earlier in this step
                continue
            n = self._fit_running(req, min(req.num_pending_tokens, budget), scheduled, out)
            if n:
                budget -= self._take(req, n, out, scheduled)
        while self.waiting and self._free_slots and budget > 0:
            n = self._admit(self.waiting[0], budget)
            if not n:
                break                                    # FCFS: nobody overtakes the head
            budget -= self._take(self.waiting.popleft(), n, out, scheduled)
        return out

    def _fit_running(self, req: Request, n: int, scheduled: set[int], out: SchedulerOutput) -> int:
        """Grow req's pages for n more tokens, preempting later requests if needed; 0 if req itself
        had to be preempted."""
        while not self.pool.grow(req, req.num_computed_tokens + n):
            victim = next((r for r in reversed(self.running) if id(r) not in scheduled), None)
            self._preempt(victim, out)
            if victim is req:
                return 0
        return n

    def _admit(self, req: Request, budget: int) -> int:
        """Tokens the queue head can run now (0 = it must wait): its whole pending prompt must fit
        the free pages, so admission never forces a preemption. Cached prefix pages are attached
        first; their tokens count as computed."""
        cached = self.pool.attach_prefix(req, req.token_ids(0, req.num_tokens)) if self.prefix_cache else 0
        if not self.pool.can_grow(req, req.num_tokens) or (self.states is not None and not self.states.alloc(req)):
            self.pool.free(req)
            return 0
        req.num_computed_tokens = cached
        req.num_cached_tokens = max(req.num_cached_tokens, min(cached, req.num_prompt_tokens))
        self.num_cached_tokens += cached
        n = min(req.num_pending_tokens, budget)
        self.pool.grow(req, req.num_computed_tokens + n)
        req.status = Status.RUNNING
        req.slot = self._free_slots.pop()
        self.running.append(req)
        return n

    def _take(self, req: Request, n: int, out: SchedulerOutput, scheduled: set[int]) -> int:
        start = req.num_computed_tokens
        req.num_computed_tokens += n
        out.scheduled.append(ScheduledRequest(req, start, n, sample=req.num_computed_tokens == req.num_tokens))
        scheduled.add(id(req))
        return n

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _release(self, req: Request) -> None:
        self.pool.free(req)
        if self.states is not None:
            self.states.free(req)
        if req.slot is not None:
            self._free_slots.append(req.slot)
            req.slot = None
