"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Streams are SSE framed exactly as the openai SDK parses them: `data: {json}\\n\\n` per chunk,
`data: [DONE]\\n\\n` at the end, a usage chunk (with `"choices": []`) only when
stream_options.include_usage is set, comment pings while the model is silent (long prefill), and
a `data: {"error": ...}` event if the request fails mid-stream. Thinking goes to
`reasoning_content` and `reasoning` (clients read one or the other), never into `content`.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ktrans_server.errors import APIError
from ktrans_server.protocol import GenerationSpec, parse_chat, parse_completion, parse_json
from ktrans_server.reasoning import ThinkSplitter
from ktrans_server.service import OutputStream, Prepared, RequestStats, Service, run_until_disconnect

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(stats: RequestStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


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
        spec = parse_chat(parse_json(await request.body()), service.settings.max_new_tokens)
        return await _serve(service, request, spec, chat=True)

    @r.post("/v1/completions")
    async def completions(request: Request):
        spec = parse_completion(parse_json(await request.body()), service.settings.max_new_tokens)
        return await _serve(service, request, spec, chat=False)

    return r


async def _serve(service: Service, request: Request, spec: GenerationSpec, *, chat: bool):
    prep = service.prepare(spec, "chatcmpl" if chat else "cmpl")
    model = service.names()[0]
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    stats = RequestStats()
    if spec.stream:
        outputs = OutputStream(service, prep, spec, stats)
        try:
            await outputs.start()
        except APIError as e:
            service.log_request(endpoint, prep, stats, e.status)
            raise
        body = (_stream_chat if chat else _stream_text)(service, outputs, spec, model)
        return StreamingResponse(_logged(service, endpoint, prep, stats, body), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        result = await run_until_disconnect(request, _collect(service, prep, spec, stats))
    except APIError as e:
        service.log_request(endpoint, prep, stats, e.status)
        raise
    if result is None:  # client went away; nothing to answer
        service.log_request(endpoint, prep, stats, 499)
        return JSONResponse({}, status_code=499)
    reasoning, content, finish, token_ids = result
    ids = {"prompt_token_ids": prep.prompt_ids, "token_ids": token_ids} if spec.return_token_ids else {}
    service.log_request(endpoint, prep, stats, 200)
    base = {"id": prep.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model}
    if chat:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            msg["reasoning_content"] = msg["reasoning"] = reasoning
        return {**base, "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish, **ids}],
                "usage": _usage(stats)}
    text = (prep.prompt_text + content) if spec.echo else content
    return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, **ids}],
            "usage": _usage(stats)}


async def _collect(service: Service, prep: Prepared, spec: GenerationSpec, stats: RequestStats):
    split = ThinkSplitter(prep.in_thinking) if spec.messages is not None else None
    reasoning, content, finish, token_ids = [], [], None, []
    async for out in service.generate(prep, spec, stats):
        if out.error:
            raise APIError(500, f"Generation failed: {out.error}", type="server_error")
        token_ids += out.new_token_ids
        if split:
            r, c = split.feed(out.new_text)
            reasoning.append(r)
            content.append(c)
        else:
            content.append(out.new_text)
        if out.finished:
            finish = _finish(out.finish_reason)
    if split:
        r, c = split.flush()
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content), finish, token_ids


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _stream_chat(service: Service, outputs: OutputStream, spec, model: str) -> AsyncIterator[str]:
    prep, stats = outputs.prep, outputs.stats
    base = {"id": prep.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(delta: dict, finish: str | None = None, **ids) -> str:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                          **ids}], "usage": None})

    def parts(r: str, c: str, token_ids: list[int] | None = None) -> list[str]:
        # With return_token_ids every generated token is reported (on the last part, or on an
        # empty delta when its text is still held back).
        deltas = ([{"reasoning_content": r, "reasoning": r}] if r else []) + ([{"content": c}] if c else [])
        if token_ids and not deltas:
            deltas = [{"content": ""}]
        ids = {"token_ids": token_ids} if token_ids else {}
        return [chunk(d, **(ids if i == len(deltas) - 1 else {})) for i, d in enumerate(deltas)]

    split = ThinkSplitter(prep.in_thinking)
    yield chunk({"role": "assistant", "content": ""},
                **({"prompt_token_ids": prep.prompt_ids} if spec.return_token_ids else {}))
    async for out in outputs.ticks(service.settings.ping_interval):
        if out is None:
            yield ": ping\n\n"
            continue
        if out.error:
            yield _sse({"error": {"message": f"Generation failed: {out.error}", "type": "server_error",
                                  "param": None, "code": None}})
            return
        for s in parts(*split.feed(out.new_text), out.new_token_ids if spec.return_token_ids else None):
            yield s
        if out.finished:
            for s in parts(*split.flush()):
                yield s
            yield chunk({}, _finish(out.finish_reason))
    if spec.include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(stats)})
    yield "data: [DONE]\n\n"


async def _stream_text(service: Service, outputs: OutputStream, spec, model: str) -> AsyncIterator[str]:
    prep, stats = outputs.prep, outputs.stats
    base = {"id": prep.request_id, "object": "text_completion", "created": int(time.time()), "model": model}

    def chunk(text: str, finish: str | None = None, **ids) -> str:
        return _sse({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                          **ids}], "usage": None})

    prompt_ids = {"prompt_token_ids": prep.prompt_ids} if spec.return_token_ids else {}
    if spec.echo or prompt_ids:
        yield chunk(prep.prompt_text if spec.echo else "", **prompt_ids)
    async for out in outputs.ticks(service.settings.ping_interval):
        if out is None:
            yield ": ping\n\n"
            continue
        if out.error:
            yield _sse({"error": {"message": f"Generation failed: {out.error}", "type": "server_error",
                                  "param": None, "code": None}})
            return
        if spec.return_token_ids and out.new_token_ids:
            yield chunk(out.new_text, token_ids=out.new_token_ids)    # a token whose text is held back too
        elif out.new_text:
            yield chunk(out.new_text)
        if out.finished:
            yield chunk("", _finish(out.finish_reason))
    if spec.include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(stats)})
    yield "data: [DONE]\n\n"


async def _logged(service: Service, endpoint: str, prep: Prepared, stats: RequestStats,
                  body: AsyncIterator[str]):
    status = 200
    try:
        async for s in body:
            yield s
    except APIError as e:  # after the headers went out, errors travel as an SSE error event
        status = e.status
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
    finally:
        service.log_request(endpoint, prep, stats, status if stats.finish_reason or status != 200 else 499)
