"""The synchronous engine: one `step()` = schedule -> run the model -> update the requests.

Callers add requests (token ids + SamplingParams) and call `step()` until nothing is left; every
step returns a RequestOutput for each request that produced tokens or finished. local_chat drives
it directly; the AsyncEngine drives it from a background thread.

Thread safety: `add_request` and `abort` may be called from another thread while `step()` runs.
The scheduler's state is guarded by one lock, held while scheduling and while updating, but not
while the model runs, so adding a request never waits for a forward pass. `stats()` takes no
lock: every locked section ends by publishing a fresh snapshot, which stats() copies. A server's
health check therefore never waits for the engine thread, which may hold the lock while the OS
has it off the CPU.
Models with linear-attention layers: each running request holds a recurrent-state slot
(kv_cache/state.py) beside its pages. A step writes every request's new state to the slot's other
row; only a step whose forward succeeded commits it (`_commit_states`), so a failed batch re-run
request by request starts from the same states. The prefix cache is off for such models: a
cached page holds KV, not the recurrent state at that point of the prompt.
NOTE: a request aborted during a forward keeps no pages; its rows in that forward still write KV
into pages that are free but cannot be handed out before the next schedule(), which comes after
the forward ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import torch

from ktrans.engine.detokenizer import IncrementalDetokenizer
from ktrans.engine.request import Request, RequestOutput, SamplingParams
from ktrans.engine.sampler import Sampler, make_generator
from ktrans.engine.scheduler import Scheduler, SchedulerOutput
from ktrans.errors import KtransError
from ktrans.kv_cache import PagePool
from ktrans.kv_cache.state import StatePool

log = logging.getLogger("ktrans.engine")


def eos_token_ids(*sources) -> set[int]:
    """Token ids that end a generation: every `eos_token_id` (an id or a list) among the model
    config, its generation config and the tokenizer. Chat models often end a turn with a token
    only the tokenizer or generation config names (Qwen's <|im_end|>)."""
    ids: set[int] = set()
    for src in sources:
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


class LLMEngine:
    def __init__(self, runner, *, max_batch_size: int = 4, chunk_size: int = 256,
                 max_queue: int | None = None, generation_config=None, prefix_cache: bool = True):
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.config = runner.config
        self.pool = PagePool(runner.num_pages, runner.page_size)
        self.states = StatePool(max_batch_size) if runner.reserve_states(max_batch_size) else None
        if self.states is not None and prefix_cache:
            log.info("prefix cache off: this model's linear-attention layers keep a recurrent state per request")
            prefix_cache = False
        self.scheduler = Scheduler(self.pool, max_batch_size=max_batch_size, chunk_size=chunk_size,
                                   max_context=runner.max_context, max_queue=max_queue,
                                   prefix_cache=prefix_cache, states=self.states)
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids(self.config, generation_config, self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._lock = threading.RLock()
        self.counters = {"steps": 0, "prefill_tokens": 0, "generation_tokens": 0, "requests_finished": 0,
                         "requests_failed": 0, "requests_aborted": 0, "preemptions": 0, "step_seconds": 0.0,
                         "last_step_seconds": 0.0}
        self._stats = self._read_stats()

    @classmethod
    def from_args(cls, *, max_batch_size: int = 4, chunk_size: int = 256, max_queue: int | None = None,
                  **runner_kwargs) -> "LLMEngine":
        """Load a model (ModelRunner keyword arguments) and wrap it in an engine."""
        from ktrans.engine.model_runner import ModelRunner

        runner = ModelRunner(**runner_kwargs)
        runner.warm_up()
        return cls(runner, max_batch_size=max_batch_size, chunk_size=chunk_size,
                   max_queue=max_queue, generation_config=_generation_config(runner_kwargs.get("model_path")))

    @property
    def max_context(self) -> int:
        return self.scheduler.max_context

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        params.validate()
        vocab = getattr(self.config, "vocab_size", None)
        if vocab and any(not 0 <= t < vocab for t in prompt_token_ids):
            bad = next(t for t in prompt_token_ids if not 0 <= t < vocab)
            raise KtransError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        req = Request(request_id, prompt_token_ids, params)
        req.generator = make_generator(params)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.stop,
                                                     skip_special_tokens=params.skip_special_tokens)
        elif params.stop:
            raise KtransError("stop strings need a tokenizer, and this model has none; use stop_token_ids")
        with self._locked():
            if request_id in self.requests:
                raise KtransError(f"request id '{request_id}' is already in use")
            self.scheduler.add(req)
            self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV pages; its final output (None if it is unknown/done)."""
        with self._locked():
            req = self.requests.get(request_id)
            if req is None:
                return None
            return self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        with self._locked():
            return self.scheduler.has_unfinished()

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched, batch = self._schedule()
        logits, errors = self._run(sched, batch)
        return self._update(sched, logits, errors)

    def _schedule(self):
        """The step's plan and its ForwardBatch (None when nothing runs), built under the lock so
        an abort cannot slip between planning and packing."""
        with self._locked():
            sched = self.scheduler.schedule()
            return sched, (None if sched.empty else build_forward_batch(sched, self.pool, self.states))

    def _run(self, sched: SchedulerOutput, batch) -> tuple[torch.Tensor | None, dict[Request, str]]:
        """Logits [R', V] of the sampled requests in order (rows of failed requests are
        meaningless) and the error of each failed request."""
        if batch is None:
            return None, {}
        t0 = time.perf_counter()
        try:
            logits, errors = self.runner.execute(batch), {}
        except Exception as e:      # a failed forward fails requests, never the engine
            log.exception("model forward failed for %d requests", batch.num_reqs)
            logits, errors = self._run_singly(sched, e)
        dt = time.perf_counter() - t0
        self.counters["steps"] += 1
        self.counters["step_seconds"] += dt
        self.counters["last_step_seconds"] = dt
        return logits, errors

    def _run_singly(self, sched: SchedulerOutput, error: Exception) -> tuple[torch.Tensor | None, dict[Request, str]]:
        """After a batched forward failed: run each request alone, so one request's failure (an
        out-of-memory prefill chunk, say) does not fail those batched with it.
        NOTE: re-running rewrites the same KV entries with the same values, since a request's KV
        depends on its own tokens only."""
        if len(sched.scheduled) == 1:
            return None, {sched.scheduled[0].request: _describe(error)}
        rows, errors = [], {}
        for s in sched.scheduled:
            out = None
            try:
                with self._locked():
                    batch = build_forward_batch(SchedulerOutput([s]), self.pool, self.states)
                out = self.runner.execute(batch)
            except Exception as e:
                log.exception("model forward failed for request %s alone", s.request.request_id)
                errors[s.request] = _describe(e)
            if s.sample:
                rows.append(None if out is None else out[0])
        ok = next((r for r in rows if r is not None), None)
        if ok is None:
            return None, errors
        return torch.stack([ok.new_zeros(ok.shape) if r is None else r for r in rows]), errors

    def _update(self, sched: SchedulerOutput, logits, errors: dict[Request, str]) -> list[RequestOutput]:
        with self._locked():
            return self._update_locked(sched, logits, errors)

    def _update_locked(self, sched: SchedulerOutput, logits, errors: dict[Request, str]) -> list[RequestOutput]:
        self.counters["preemptions"] += len(sched.preempted)
        self._commit_states(sched, errors)
        outputs = [self._finish(r, "error", msg) for r, msg in errors.items() if not r.finished]
        self.counters["prefill_tokens"] += sum(min(s.num_new, max(0, s.request.num_prompt_tokens - s.num_computed))
                                               for s in sched.scheduled if s.request not in errors)
        if self.scheduler.prefix_cache:
            self._cache_full_pages(sched)
        sampled = [s.request for s in sched.scheduled if s.sample]
        live = [i for i, r in enumerate(sampled) if not r.finished]   # not failed, not aborted meanwhile
        if not live:
            return outputs
        try:
            rows = logits if len(live) == len(sampled) else logits[live]
            reqs = [sampled[i] for i in live]
            tokens = self.sampler(rows, reqs)
            logprobs = self.sampler.logprobs(rows, reqs, tokens)
        except Exception as e:
            log.exception("sampling failed")
            return outputs + [self._finish(sampled[i], "error", f"sampling failed: {e}") for i in live]
        return outputs + [self._append(r, tok, lp) for r, tok, lp in zip(reqs, tokens, logprobs)]

    def _commit_states(self, sched: SchedulerOutput, errors: dict[Request, str]) -> None:
        """The recurrent states the step wrote become the ones its requests read next (a failed
        request's are dropped with it; an aborted one holds no slot any more)."""
        if self.states is not None:
            for s in sched.scheduled:
                if s.request not in errors:
                    self.states.commit(s.request)

    def _cache_full_pages(self, sched: SchedulerOutput) -> None:
        """Offer the pages this step filled to the prefix cache."""
        size = self.pool.page_size
        for s in sched.scheduled:
            if not s.request.finished and (s.num_computed + s.num_new) // size > s.num_computed // size:
                self.pool.cache_pages(s.request, s.num_computed + s.num_new, s.request.token_ids)

    def _append(self, req: Request, token: int, logprob=None) -> RequestOutput:
        """Record one sampled token, detokenize it and decide whether the request is done."""
        try:
            now = time.perf_counter()
            req.first_token_time = req.first_token_time or now
            req.output_token_ids.append(token)
            self.counters["generation_tokens"] += 1
            p = req.params
            reason = None
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                reason, text = "stop", ""
            else:
                text = req.detokenizer.add(token) if req.detokenizer else ""
                if req.detokenizer and req.detokenizer.stopped:
                    reason = "stop"
                elif p.constraint is not None and p.constraint.done:
                    reason = "stop"
                elif req.num_output_tokens >= p.max_new_tokens or req.num_tokens >= self.max_context:
                    reason = "length"
            lps = None if logprob is None else [logprob]
            if reason is None:
                return self._output(req, [token], text, lps)
            return self._finish(req, reason, new_token_ids=[token], new_text=text, logprobs=lps)
        except Exception as e:
            log.exception("request %s failed while updating", req.request_id)
            return self._finish(req, "error", f"{type(e).__name__}: {e}")

    def _finish(self, req: Request, reason: str, error: str | None = None, *,
                new_token_ids: list[int] | None = None, new_text: str = "", logprobs=None) -> RequestOutput:
        if reason in ("stop", "length") and req.detokenizer:
            new_text += req.detokenizer.flush()
            if req.detokenizer.stopped:     # a stop string seen only in the flushed text (one holding
                reason = "stop"             # U+FFFD, which an incomplete character becomes at the end)
        req.finish(reason, error)
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
        self.counters["requests_finished"] += 1
        self.counters["requests_failed"] += reason == "error"
        self.counters["requests_aborted"] += reason == "abort"
        return self._output(req, new_token_ids or [], new_text, logprobs)

    @staticmethod
    def _output(req: Request, new_token_ids: list[int], new_text: str, logprobs=None) -> RequestOutput:
        return RequestOutput(request_id=req.request_id, new_token_ids=new_token_ids, new_text=new_text,
                             finished=req.finished, finish_reason=req.finish_reason,
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_output_tokens=req.num_output_tokens, error=req.error,
                             num_cached_tokens=req.num_cached_tokens, logprobs=logprobs)

    @contextlib.contextmanager
    def _locked(self):
        """The scheduler's lock; leaving it publishes the stats snapshot of the state it guarded."""
        with self._lock:
            try:
                yield
            finally:
                self._stats = self._read_stats()

    def stats(self) -> dict:
        """Queue, KV-page and step counts as of the end of the last locked section (never blocks)."""
        return dict(self._stats)

    def _read_stats(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "state_slots_used": self.states.num_used if self.states is not None else 0,
                "kv_pages_used": self.pool.num_used, "kv_pages_total": self.pool.num_pages,
                "kv_page_size": self.pool.page_size, "kv_pages_cached": self.pool.num_cached,
                "prefix_cached_tokens": self.scheduler.num_cached_tokens, **self.counters}


def _generation_config(model_path: str | None):
    """The HF directory's generation_config.json (its eos ids), or None."""
    if not model_path or not os.path.isfile(os.path.join(model_path, "generation_config.json")):
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        log.warning("ignoring %s/generation_config.json: %s", model_path, e)
        return None


def _describe(error: Exception) -> str:
    return f"model forward failed: {type(error).__name__}: {error}"


def build_forward_batch(sched: SchedulerOutput, pool: PagePool, states: StatePool | None = None):
    """Pack the scheduled requests' new tokens, their page tables and (models with recurrent
    layers) their state rows into a ForwardBatch."""
    from ktrans.engine.batch import ForwardBatch

    ids: list[int] = []
    positions: list[int] = []
    logits_rows: list[int] = []
    tables = []
    for s in sched.scheduled:
        c, n = s.num_computed, s.num_new
        ids += s.request.token_ids(c, c + n)
        positions += range(c, c + n)
        if s.sample:
            logits_rows.append(len(ids) - 1)
        tables.append(pool.pages(s.request))
    width = max(len(t) for t in tables)
    page_table = torch.full((len(tables), width), -1, dtype=torch.int32)    # [R, max_pages]
    for i, t in enumerate(tables):
        page_table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    return ForwardBatch(input_ids=torch.tensor(ids, dtype=torch.int64),
                        positions=torch.tensor(positions, dtype=torch.int64),
                        seq_ids=[s.request.slot for s in sched.scheduled],
                        num_computed=[s.num_computed for s in sched.scheduled],
                        num_new=[s.num_new for s in sched.scheduled],
                        page_table=page_table,
                        logits_indices=torch.tensor(logits_rows, dtype=torch.int64),
                        state_rows=None if states is None else torch.tensor(
                            [states.rows(s.request) for s in sched.scheduled], dtype=torch.int64))
