"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Streams are SSE framed exactly as the openai SDK parses them: `data: {json}\\n\\n` per chunk,
`data: [DONE]\\n\\n` at the end, a usage chunk (with `"choices": []`) only when
stream_options.include_usage is set, comment pings while the model is silent (long prefill), and
a `data: {"error": ...}` event if the request fails mid-stream. Thinking goes to
`reasoning_content` and `reasoning` (clients read one or the other), never into `content`; tool
calls go to `tool_calls` (streamed whole, each with its index) with finish_reason "tool_calls".
This module only renders: the work is in service.py, run.py and outputs.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ktrans_server import render
from ktrans_server.errors import APIError
from ktrans_server.http_guard import read_json
from ktrans_server.outputs import Delta
from ktrans_server.protocol import GenerationSpec, parse_chat, parse_completion
from ktrans_server.run import Run, run_until_disconnect
from ktrans_server.service import Service

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj: Any) -> str:
    return f"data: {render.one_line_json(obj)}\n\n"


def router(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def list_models():
        ctx = service.engine.max_context if service.ready else None
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": int(service.started_at), "owned_by": "ktrans",
             "max_model_len": ctx} for n in service.names()]}

    @r.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in service.names():
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves "
                                f"{', '.join(service.names())}.", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": int(service.started_at), "owned_by": "ktrans",
                "max_model_len": service.engine.max_context if service.ready else None}

    @r.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, service.settings.limits)
        spec = parse_chat(body, service.settings.max_new_tokens)
        return await _serve(service, request, spec, chat=True)

    @r.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, service.settings.limits)
        spec = parse_completion(body, service.settings.max_new_tokens)
        return await _serve(service, request, spec, chat=False)

    return r


@dataclass
class _Choice:
    """A whole choice, gathered from its deltas (non-streamed answers)."""
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None

    def add(self, d: Delta) -> None:
        self.reasoning.append(d.reasoning)
        self.content.append(d.content)
        self.tool_calls += d.tool_calls
        self.logprobs += d.logprobs
        self.token_ids += d.token_ids
        self.finish = d.finish_reason or self.finish


async def _serve(service: Service, request: Request, spec: GenerationSpec, *, chat: bool):
    prep = await service.prepare_async(spec, "chatcmpl" if chat else "cmpl")
    run = Run(service, prep, spec)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    if spec.stream:
        try:
            await run.start()
        except APIError as e:
            service.log_request(endpoint, prep, run.stats, e.status)
            raise
        body = (_stream_chat if chat else _stream_text)(service, run)
        return StreamingResponse(_logged(service, endpoint, run, body), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    async def collect() -> list[_Choice]:
        await run.start()
        choices = [_Choice() for _ in range(spec.n)]
        async for ev in run.events():
            choices[ev[0]].add(ev[1])
        return choices

    try:
        choices = await run_until_disconnect(request, collect())
    except APIError as e:
        service.log_request(endpoint, prep, run.stats, e.status)
        raise
    finally:
        run.close()
    if choices is None:  # client went away; nothing to answer
        service.log_request(endpoint, prep, run.stats, 499)
        return JSONResponse({}, status_code=499)
    service.log_request(endpoint, prep, run.stats, 200)
    base = {"id": prep.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": service.names()[0]}
    render_choice = _chat_choice if chat else _text_choice
    return {**base, "choices": [render_choice(service, run, i, c) for i, c in enumerate(choices)],
            "usage": render.usage(run.stats)}


def _ids(run: Run, c: _Choice) -> dict[str, Any]:
    return {"prompt_token_ids": run.prep.prompt_ids, "token_ids": c.token_ids} if run.spec.return_token_ids else {}


def _chat_choice(service: Service, run: Run, i: int, c: _Choice) -> dict[str, Any]:
    content, reasoning = "".join(c.content), "".join(c.reasoning)
    msg: dict[str, Any] = {"role": "assistant", "content": content if content or not c.tool_calls else None}
    if reasoning:
        msg["reasoning_content"] = msg["reasoning"] = reasoning
    if c.tool_calls:
        msg["tool_calls"] = [render.tool_call(t, k) for k, t in enumerate(c.tool_calls)]
    lp = render.chat_logprobs(c.logprobs, service.grammars.token_bytes) if run.spec.params.logprobs is not None else None
    return {"index": i, "message": msg, "logprobs": lp, "finish_reason": c.finish, **_ids(run, c)}


def _hidden(service: Service, run: Run) -> set[int]:
    return service.special_ids if run.spec.params.skip_special_tokens else set()


def _text_choice(service: Service, run: Run, i: int, c: _Choice) -> dict[str, Any]:
    prefix = run.prep.prompt_text if run.spec.echo else ""
    lp = None
    if run.spec.params.logprobs is not None:
        lp = render.completion_logprobs(c.logprobs, service.grammars.token_bytes, len(prefix), _hidden(service, run))
    return {"index": i, "text": prefix + "".join(c.content), "logprobs": lp, "finish_reason": c.finish,
            **_ids(run, c)}


async def _stream_chat(service: Service, run: Run) -> AsyncIterator[str]:
    spec, prep = run.spec, run.prep
    base = {"id": prep.request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": service.names()[0]}
    want_lp = spec.params.logprobs is not None

    def chunk(i: int, delta: dict, finish: str | None = None, **extra) -> str:
        return _sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish,
                                          **extra}], "usage": None})

    calls_sent = [0] * spec.n
    for i in range(spec.n):
        yield chunk(i, {"role": "assistant", "content": ""},
                    **({"prompt_token_ids": prep.prompt_ids} if spec.return_token_ids else {}))
    async for ev in run.events(service.settings.ping_interval):
        if ev is None:
            yield ": ping\n\n"
            continue
        i, d = ev
        pieces = ([{"reasoning_content": d.reasoning, "reasoning": d.reasoning}] if d.reasoning else []) + \
                 ([{"content": d.content}] if d.content else [])
        if d.tool_calls:
            pieces.append({"tool_calls": [render.tool_call(t, calls_sent[i] + k) for k, t in enumerate(d.tool_calls)]})
            calls_sent[i] += len(d.tool_calls)
        # Tokens whose text is still held back are reported all the same (on an empty delta).
        extra = {}
        if want_lp and d.logprobs:
            extra["logprobs"] = render.chat_logprobs(d.logprobs, service.grammars.token_bytes)
        if spec.return_token_ids and d.token_ids:
            extra["token_ids"] = d.token_ids
        if extra and not pieces:
            pieces = [{"content": ""}]
        for k, p in enumerate(pieces):
            yield chunk(i, p, **(extra if k == len(pieces) - 1 else {}))
        if d.finish_reason:
            yield chunk(i, {}, d.finish_reason)
    if spec.include_usage:
        yield _sse({**base, "choices": [], "usage": render.usage(run.stats)})
    yield "data: [DONE]\n\n"


async def _stream_text(service: Service, run: Run) -> AsyncIterator[str]:
    spec, prep = run.spec, run.prep
    base = {"id": prep.request_id, "object": "text_completion", "created": int(time.time()),
            "model": service.names()[0]}

    def chunk(i: int, text: str, finish: str | None = None, logprobs=None, **extra) -> str:
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish,
                                          **extra}], "usage": None})

    offsets = [len(prep.prompt_text) if spec.echo else 0] * spec.n
    prompt_ids = {"prompt_token_ids": prep.prompt_ids} if spec.return_token_ids else {}
    if spec.echo or prompt_ids:
        for i in range(spec.n):
            yield chunk(i, prep.prompt_text if spec.echo else "", **prompt_ids)
    async for ev in run.events(service.settings.ping_interval):
        if ev is None:
            yield ": ping\n\n"
            continue
        i, d = ev
        lp = None
        if spec.params.logprobs is not None and d.logprobs:
            lp = render.completion_logprobs(d.logprobs, service.grammars.token_bytes, offsets[i],
                                            _hidden(service, run))
        offsets[i] += len(d.content)
        ids = {"token_ids": d.token_ids} if spec.return_token_ids and d.token_ids else {}
        if d.content or lp or ids:
            yield chunk(i, d.content, logprobs=lp, **ids)
        if d.finish_reason:
            yield chunk(i, "", d.finish_reason)
    if spec.include_usage:
        yield _sse({**base, "choices": [], "usage": render.usage(run.stats)})
    yield "data: [DONE]\n\n"


async def _logged(service: Service, endpoint: str, run: Run, body: AsyncIterator[str]):
    status = 200
    try:
        async for s in body:
            yield s
    except APIError as e:  # after the headers went out, errors travel as an SSE error event
        status = e.status
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
    finally:
        run.close()
        done = all(run.finished)
        service.log_request(endpoint, run.prep, run.stats, status if done or status != 200 else 499)
