"""One client request's generation: its n choices run as n engine requests of the same prompt
(the prefix cache shares the prompt's KV pages), merged into one stream of (choice index, Delta)
events, with None ticks while all of them are silent (for keep-alive pings during a long
prefill). Closing the run, or leaving its event stream, aborts every unfinished choice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ktrans_server.errors import APIError
from ktrans_server.outputs import Delta
from ktrans_server.protocol import GenerationSpec
from ktrans_server.service import Prepared, RequestStats, Service

log = logging.getLogger("ktrans.server")


class Run:
    def __init__(self, service: Service, prep: Prepared, spec: GenerationSpec):
        self.service, self.prep, self.spec = service, prep, spec
        self.stats = RequestStats(prompt_tokens=len(prep.prompt_ids))
        self.processors = [service.processor(prep, spec) for _ in range(spec.n)]
        self.params = prep.choice_params
        self.finished = [False] * spec.n
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._admission_error: APIError | None = None

    def request_id(self, index: int) -> str:
        return self.prep.request_id if self.spec.n == 1 else f"{self.prep.request_id}-{index}"

    async def start(self) -> None:
        """Submit every choice now, so that admission errors (queue full, bad parameters)
        surface before any response header is sent; all or none of the choices run."""
        for i in range(self.spec.n):
            self._tasks.append(asyncio.ensure_future(self._pump(i)))
        # NOTE: one pass of the loop runs each pump up to its first await, and the engine admits
        # (or refuses) a request before that.
        await asyncio.sleep(0)
        if self._admission_error is not None:
            self.close()
            raise self._admission_error

    async def _pump(self, i: int) -> None:
        got_output = False
        try:
            async for out in self.service.generate(self.request_id(i), self.prep.prompt_ids, self.params[i],
                                                   self.stats):
                got_output = True
                self._queue.put_nowait((i, out))
        except APIError as e:
            if not got_output and self._admission_error is None:
                self._admission_error = e
            self._queue.put_nowait((i, e))
        except asyncio.CancelledError:
            raise
        except Exception as e:      # a bug must reach the client as an error, not a hang
            log.exception("choice %d of %s failed", i, self.prep.request_id)
            self._queue.put_nowait((i, APIError(500, f"Internal error: {type(e).__name__}: {e}",
                                                type="server_error")))

    async def events(self, interval: float | None = None) -> AsyncIterator[tuple[int, Delta] | None]:
        try:
            while not all(self.finished):
                try:
                    i, item = await asyncio.wait_for(self._queue.get(), interval)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if isinstance(item, APIError):
                    raise item
                self._check(i, item)
                delta = self.processors[i].feed(item)
                self.finished[i] = item.finished
                yield i, delta
        finally:
            self.close()

    def _check(self, i: int, out) -> None:
        if out.error:
            raise APIError(500, f"Generation failed: {out.error}", type="server_error")
        if out.finished and out.finish_reason == "abort":
            raise APIError(503, "The generation was stopped by the server (it is shutting down).",
                           type="server_error", code="aborted")
        constraint = self.params[i].constraint
        if out.finished and constraint is not None and constraint.error:
            raise APIError(500, f"Structured output failed: {constraint.error}", type="server_error")

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        engine = self.service.engine
        if engine is not None:
            for i, done in enumerate(self.finished):
                if not done:
                    engine.abort(self.request_id(i))


async def run_until_disconnect(request, coro):
    """Run `coro` unless the HTTP client disconnects first (then cancel it and return None).

    Starlette cancels only streaming responses when the client goes away; plain handlers need
    this race, or a closed connection keeps generating and holding KV pages.
    """
    async def wait_disconnect():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, APIError):
        pass
    return None
