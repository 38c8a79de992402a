"""The bridge between HTTP handlers and the engine: prompts, context limits, running a request.

One `Service` per server. It owns the engine once loading finishes (/health answers 503 until
then), renders chat prompts with the model's own template, refuses prompts that do not fit the
context with both numbers, and runs generations so that a request that ends early for any reason
(client gone, error, cancel) is aborted in the engine and its KV pages freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ktrans.engine import QueueFullError, RequestOutput
from ktrans.errors import KtransError
from ktrans_server.errors import APIError, bad_request, loading, overloaded
from ktrans_server.protocol import GenerationSpec
from ktrans_server.reasoning import prompt_opens_thinking

log = logging.getLogger("ktrans.server")


@dataclass
class Settings:
    model_name: str = "ktrans"
    served_model_names: list[str] = field(default_factory=list)
    max_new_tokens: int = 1024       # default completion length when the client sends none
    force_think: bool = False
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    ping_interval: float = 15.0      # SSE comment pings while a stream is silent (long prefill)


@dataclass
class Prepared:
    request_id: str
    prompt_text: str
    prompt_ids: list[int]
    in_thinking: bool                # the prompt ends inside <think>: output starts as reasoning


@dataclass
class RequestStats:
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine: Any = None
        self.load_error: str | None = None
        self.started_at = time.time()
        self.counters: dict[str, float] = {}
        self._ids = itertools.count()

    # -- state -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None

    def require_engine(self):
        if self.engine is None:
            raise loading()
        return self.engine

    def names(self) -> list[str]:
        return self.settings.served_model_names or [self.settings.model_name]

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    # -- prompts ---------------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}{next(self._ids):x}"

    def prepare(self, spec: GenerationSpec, prefix: str) -> Prepared:
        engine = self.require_engine()
        tok = engine.tokenizer
        if spec.messages is not None:
            text = self._render_chat(tok, spec)
        else:
            text = spec.prompt or ""
        # NOTE: a rendered chat prompt already holds BOS where the template wants it; tokenizing
        # with special tokens again would add a second BOS.
        ids = tok.encode(text, add_special_tokens=spec.messages is None)
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt" if spec.messages is None else "messages")
        self._fit_context(len(ids), spec)
        return Prepared(self.new_id(prefix), text, ids, prompt_opens_thinking(text))

    def _render_chat(self, tok, spec: GenerationSpec) -> str:
        kwargs = dict(spec.extra_template_kwargs)
        if spec.think is not None:
            kwargs["enable_thinking"] = spec.think
        try:
            text = tok.apply_chat_template(spec.messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # a template raising on odd message orders is the client's to fix
            raise bad_request(f"The model's chat template rejected these messages: {e}", param="messages") from None
        think = spec.think if spec.think is not None else self.settings.force_think
        if think and "<think>" in tok.get_vocab() and not prompt_opens_thinking(text):
            text += "<think>\n"
        return text

    def _fit_context(self, n_prompt: int, spec: GenerationSpec) -> None:
        n_ctx = self.engine.max_context
        if n_prompt >= n_ctx:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens, but the prompt has {n_prompt} "
                f"tokens. Shorten the prompt.", param="messages" if spec.messages is not None else "prompt",
                code="context_length_exceeded", n_prompt_tokens=n_prompt, n_ctx=n_ctx)
        room = n_ctx - n_prompt
        if spec.max_tokens_given and spec.params.max_new_tokens > room:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt} tokens "
                f"and max_tokens asks for {spec.params.max_new_tokens} more (at most {room} fit).",
                param="max_tokens", code="context_length_exceeded", n_prompt_tokens=n_prompt, n_ctx=n_ctx)
        if not spec.max_tokens_given:
            spec.params.max_new_tokens = min(spec.params.max_new_tokens, room)
        try:
            spec.params.validate()
        except KtransError as e:
            raise bad_request(str(e)) from None

    # -- running ---------------------------------------------------------------------------
    async def generate(self, prep: Prepared, spec: GenerationSpec,
                       stats: RequestStats) -> AsyncIterator[RequestOutput]:
        """Engine outputs for one request; the request is aborted however this iterator ends."""
        engine = self.require_engine()
        stats.prompt_tokens = len(prep.prompt_ids)
        self.count("requests_started")
        self.count("prompt_tokens", len(prep.prompt_ids))
        try:
            it = engine.generate(prep.request_id, prep.prompt_ids, spec.params)
            async for out in it:
                if stats.first_token is None and out.num_output_tokens > 0:
                    stats.first_token = time.monotonic()
                    self.count("ttft_seconds_sum", stats.first_token - stats.start)
                    self.count("ttft_count")
                self.count("generation_tokens", out.num_output_tokens - stats.completion_tokens)
                stats.completion_tokens = out.num_output_tokens
                if out.finished:
                    stats.finish_reason = out.finish_reason
                yield out
        except QueueFullError:
            self.count("requests_rejected")
            raise overloaded() from None
        except KtransError as e:
            raise bad_request(str(e)) from None
        finally:
            # NOTE: synchronous on purpose: under cancellation (client gone) an await here would
            # be cancelled again before it ran.
            if stats.finish_reason is None:
                engine.abort(prep.request_id)
                self.count("requests_aborted")

    def log_request(self, endpoint: str, prep: Prepared | None, stats: RequestStats, status: int) -> None:
        now = time.monotonic()
        ttft = f"{(stats.first_token - stats.start) * 1000:.0f}ms" if stats.first_token else "-"
        gen_s = now - (stats.first_token or now)
        tps = f"{(stats.completion_tokens - 1) / gen_s:.1f}" if gen_s > 0 and stats.completion_tokens > 1 else "-"
        log.info("%s %s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s tok/s=%s finish=%s total=%.0fms",
                 endpoint, prep.request_id if prep else "-", status, stats.prompt_tokens,
                 stats.completion_tokens, ttft, tps, stats.finish_reason or "-", (now - stats.start) * 1000)
        self.count(f"responses_{status}")


class OutputStream:
    """Engine outputs of one request, with None ticks every `interval` seconds of silence
    (for SSE/NDJSON keep-alives); closing it aborts the request if it has not finished."""

    def __init__(self, service: Service, prep: Prepared, spec: GenerationSpec, stats: RequestStats):
        self.service, self.prep, self.stats = service, prep, stats
        self._it = service.generate(prep, spec, stats).__aiter__()
        self._task: asyncio.Future | None = None

    async def start(self) -> None:
        """Submit the request now, so that admission errors (queue full, bad parameters)
        surface before any response header is sent."""
        self._task = asyncio.ensure_future(self._it.__anext__())
        await asyncio.sleep(0)  # NOTE: the engine admits (or refuses) before its first await
        if self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None and not isinstance(exc, StopAsyncIteration):
                self._task = None
                raise exc

    async def ticks(self, interval: float) -> AsyncIterator[RequestOutput | None]:
        try:
            while True:
                if self._task is None:
                    self._task = asyncio.ensure_future(self._it.__anext__())
                done, _ = await asyncio.wait({self._task}, timeout=interval)
                if not done:
                    yield None
                    continue
                task, self._task = self._task, None
                try:
                    yield task.result()
                except StopAsyncIteration:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.stats.finish_reason is None and self.service.engine is not None:
            self.service.engine.abort(self.prep.request_id)


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
