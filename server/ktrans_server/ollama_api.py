"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show,
/api/version, /api/ps, and `GET /` — what Open WebUI, Continue, Copilot BYOK and Tabby call.

Ollama's conventions differ from OpenAI's: streaming is the default, durations are nanoseconds,
errors are `{"error": "..."}`, and model names carry a tag (`name:latest`). Prompts go through
the model's own chat template (unlike the prior art, which flattened messages to "role: text").
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ktrans_server.errors import APIError, bad_request
from ktrans_server.protocol import GenerationSpec, _sampling, _stop, parse_json, parse_messages
from ktrans_server.reasoning import ThinkSplitter
from ktrans_server.service import OutputStream, RequestStats, Service, run_until_disconnect

# Ollama API level reported to clients (Copilot BYOK refuses servers below 0.6.4).
OLLAMA_API_VERSION = "0.12.0"
_OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "seed": "seed", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _spec(body: dict, service: Service, messages: list | None, prompt: str | None) -> GenerationSpec:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'options' must be an object.", param="options")
    flat = {ours: opts[theirs] for theirs, ours in _OPTION_NAMES.items() if theirs in opts}
    num_predict = opts.get("num_predict")
    if num_predict is not None and (isinstance(num_predict, bool) or not isinstance(num_predict, int)):
        raise bad_request("'options.num_predict' must be an integer.", param="options.num_predict")
    given = num_predict is not None and num_predict > 0
    max_new = num_predict if given else service.settings.max_new_tokens
    params = _sampling(flat, max_new, _stop(opts.get("stop"), "options.stop"), max_new)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    think = body.get("think")
    return GenerationSpec(messages=messages, prompt=prompt, params=params, max_tokens_given=given,
                          stream=stream, think=think if isinstance(think, bool) else None)


def _details(service: Service) -> dict[str, Any]:
    engine = service.engine
    family = getattr(getattr(engine, "config", None), "model_type", "") if engine else ""
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else [],
            "parameter_size": "", "quantization_level": ""}


def _ollama_error(e: APIError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


def router(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/")
    async def root():
        return PlainTextResponse("Ollama is running")

    @r.head("/")
    async def root_head():
        return Response(status_code=200)

    @r.get("/api/version")
    async def version():
        return {"version": OLLAMA_API_VERSION}

    def model_entry(name: str) -> dict[str, Any]:
        return {"name": _tagged(name), "model": _tagged(name), "modified_at": _now(), "size": 0,
                "digest": "", "details": _details(service)}

    @r.get("/api/tags")
    async def tags():
        return {"models": [model_entry(n) for n in service.names()]}

    @r.get("/api/ps")
    async def ps():
        if not service.ready:
            return {"models": []}
        far = "2099-01-01T00:00:00Z"
        return {"models": [{**model_entry(n), "expires_at": far, "size_vram": 0} for n in service.names()]}

    @r.post("/api/show")
    async def show(request: Request):
        try:
            body = parse_json(await request.body())
            engine = service.require_engine()
        except APIError as e:
            return _ollama_error(e)
        arch = getattr(engine.config, "model_type", "unknown")
        caps = ["completion"] + (["thinking"] if "<think>" in engine.tokenizer.get_vocab() else [])
        template = getattr(engine.tokenizer, "chat_template", None) or ""
        name = body.get("model") or body.get("name") or service.names()[0]
        return {"modelfile": f"FROM {name}\n", "parameters": f"num_ctx {engine.max_context}",
                "template": template, "details": _details(service), "capabilities": caps,
                "model_info": {"general.architecture": arch, "general.basename": service.names()[0],
                               f"{arch}.context_length": engine.max_context}}

    @r.post("/api/chat")
    async def chat(request: Request):
        return await _generate(service, request, chat=True)

    @r.post("/api/generate")
    async def generate(request: Request):
        return await _generate(service, request, chat=False)

    return r


async def _generate(service: Service, request: Request, *, chat: bool):
    try:
        body = parse_json(await request.body())
        model = body.get("model") or _tagged(service.names()[0])
        messages, prompt = _inputs(body, chat)
        if (chat and not messages) or (not chat and not prompt):
            service.require_engine()
            return {"model": model, "created_at": _now(), **({"message": {"role": "assistant", "content": ""}}
                    if chat else {"response": ""}), "done": True, "done_reason": "load"}
        spec = _spec(body, service, messages, prompt)
        prep = service.prepare(spec, "ollama")
    except APIError as e:
        return _ollama_error(e)
    stats = RequestStats()
    key = "message" if chat else "response"

    def line(text: str, thinking: str = "") -> dict[str, Any]:
        if chat:
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            return {"model": model, "created_at": _now(), key: msg, "done": False}
        out = {"model": model, "created_at": _now(), key: text, "done": False}
        if thinking:
            out["thinking"] = thinking
        return out

    def final(reason: str | None) -> dict[str, Any]:
        end = time.monotonic()
        first = stats.first_token or end
        d = line("")
        d.update(done=True, done_reason="length" if reason == "length" else "stop",
                 total_duration=int((end - stats.start) * 1e9), load_duration=0,
                 prompt_eval_count=stats.prompt_tokens, prompt_eval_duration=int((first - stats.start) * 1e9),
                 eval_count=stats.completion_tokens, eval_duration=int((end - first) * 1e9))
        return d

    split = ThinkSplitter(prep.in_thinking) if (chat or not body.get("raw")) else None
    outputs = OutputStream(service, prep, spec, stats)
    try:
        await outputs.start()
    except APIError as e:
        return _ollama_error(e)

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for out in outputs.ticks(service.settings.ping_interval):
            if out is None:
                continue
            if out.error:
                yield {"error": f"Generation failed: {out.error}"}
                return
            r, c = split.feed(out.new_text) if split else ("", out.new_text)
            if out.finished and split:
                r2, c2 = split.flush()
                r, c = r + r2, c + c2
            if r or c:
                yield line(c, r)
            if out.finished:
                yield final(out.finish_reason)

    endpoint = "/api/chat" if chat else "/api/generate"
    if spec.stream:
        async def ndjson():
            try:
                async for d in lines():
                    yield json.dumps(d, ensure_ascii=False) + "\n"
            except APIError as e:
                yield json.dumps({"error": e.message}) + "\n"
            finally:
                service.log_request(endpoint, prep, stats, 200 if stats.finish_reason else 499)
        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    async def collect():
        parts, thinking, last = [], [], None
        async for d in lines():
            if "error" in d:
                raise APIError(500, d["error"], type="server_error")
            if d.get("done"):
                last = d
            elif chat:
                parts.append(d[key]["content"])
                thinking.append(d[key].get("thinking", ""))
            else:
                parts.append(d[key])
                thinking.append(d.get("thinking", ""))
        return parts, thinking, last

    try:
        result = await run_until_disconnect(request, collect())
    except APIError as e:
        service.log_request(endpoint, prep, stats, e.status)
        return _ollama_error(e)
    finally:
        outputs.close()
    if result is None:
        service.log_request(endpoint, prep, stats, 499)
        return JSONResponse({}, status_code=499)
    parts, thinking, last = result
    service.log_request(endpoint, prep, stats, 200)
    text, think = "".join(parts), "".join(thinking)
    if chat:
        last[key] = {"role": "assistant", "content": text, **({"thinking": think} if think else {})}
    else:
        last[key] = text
        if think:
            last["thinking"] = think
    return last


def _inputs(body: dict, chat: bool) -> tuple[list | None, str | None]:
    if chat:
        msgs = body.get("messages")
        return (parse_messages(msgs) if msgs else []), None
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string.", param="prompt")
    if body.get("raw") or not prompt:
        return None, prompt
    messages = []
    if isinstance(body.get("system"), str) and body["system"]:
        messages.append({"role": "system", "content": body["system"]})
    messages.append({"role": "user", "content": prompt})
    return messages, None
