"""The engine for concurrent callers (the HTTP server): an LLMEngine stepped by one background
thread, with one asyncio queue per request carrying its RequestOutputs back to the event loop.

Requests join the running batch at the next step and leave it the moment they finish, so the
batch changes every step (continuous batching). The model runs in the background thread, so the
event loop keeps serving HTTP while a forward is in progress.

Leaving `generate()` early (breaking out of the loop, closing the generator, or cancelling its
task, e.g. on a client disconnect) aborts the request and frees its KV pages at once.
Wrap the iteration in `contextlib.aclosing(...)` to make closing immediate rather than left to
garbage collection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from ktrans.engine.llm_engine import LLMEngine
from ktrans.engine.request import RequestOutput, SamplingParams
from ktrans.errors import KtransError

log = logging.getLogger("ktrans.engine")

# How long the idle loop sleeps between checks for shutdown when no request arrives.
_IDLE_WAIT_S = 0.5


def name_os_thread(name: str) -> None:
    """Name the calling thread for the OS too (`top -H`, `ps -L`, py-spy, /proc/PID/task/TID/comm),
    where Python's own thread names are not seen; Linux keeps 15 bytes. Elsewhere: nothing."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._queues_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_args(cls, *, max_batch_size: int = 4, chunk_size: int = 256, max_queue: int | None = None,
                  **runner_kwargs) -> "AsyncEngine":
        """Load the model (ModelRunner keyword arguments; blocking) and wrap it."""
        return cls(LLMEngine.from_args(max_batch_size=max_batch_size, chunk_size=chunk_size,
                                       max_queue=max_queue, **runner_kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def stats(self) -> dict:
        return self.engine.stats()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ktrans-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop after the current step; unfinished requests end with "abort"."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        with self._queues_lock:
            pending = list(self._queues)
        for rid in pending:
            self.abort(rid)

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced, the last with finished=True.
        Raises QueueFullError when the queue is at its limit, KtransError for a bad prompt or
        parameter (before anything is yielded)."""
        if self._thread is None:
            await self.start()
        queue: asyncio.Queue = asyncio.Queue()
        with self._queues_lock:
            if request_id in self._queues:
                raise KtransError(f"request id '{request_id}' is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        added = finished = False
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
            added = True
            self._wake.set()
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
        finally:
            with self._queues_lock:
                self._queues.pop(request_id, None)
            if added and not finished:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request from any thread; its generator ends with finish_reason "abort"."""
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver([out])

    # -- background loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        name_os_thread("ktrans-engine")
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:           # an engine bug: fail what is in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                outputs = self._fail_all()
            self._deliver(outputs)

    def _fail_all(self) -> list[RequestOutput]:
        outs = []
        for rid in list(self.engine.requests):
            out = self.engine.abort(rid)
            if out is not None:
                out.finish_reason, out.error = "error", "internal engine error (see the server log)"
                outs.append(out)
        return outs

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._queues_lock:
                target = self._queues.get(out.request_id)
            if target is None:
                continue                # its consumer has gone; the request was aborted
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:        # that event loop is closed
                self.engine.abort(out.request_id)
