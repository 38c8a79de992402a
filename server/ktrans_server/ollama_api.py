"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show,
/api/version, /api/ps, and `GET /` — what Open WebUI, Continue, Copilot BYOK and Tabby call.

Ollama's conventions differ from OpenAI's: streaming is the default, durations are nanoseconds,
errors are `{"error": "..."}`, and model names carry a tag (`name:latest`). Prompts go through
the model's own chat template (unlike the prior art, which flattened messages to "role: text"),
`/api/generate` included unless `raw` is set. `think` splits reasoning into `thinking`, `tools`
give `message.tool_calls`, `format` ("json" or a schema) is enforced while sampling.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ktrans_server import options
from ktrans_server.errors import APIError, bad_request
from ktrans_server.http_guard import read_json
from ktrans_server.protocol import GenerationSpec, _sampling, _stop, check_combination, parse_messages
from ktrans_server.render import one_line_json
from ktrans_server.run import Run, run_until_disconnect
from ktrans_server.service import Service
from ktrans_server.webui import page_response, wants_page

# Ollama API level reported to clients (Copilot BYOK refuses servers below 0.6.4).
OLLAMA_API_VERSION = "0.12.0"
_OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "seed": "seed", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
UNSUPPORTED = {"images": "this is a text-only model.",
               "suffix": "fill-in-the-middle is not implemented; send the whole prompt."}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _spec(body: dict, service: Service, messages: list | None, prompt: str | None) -> GenerationSpec:
    options.refuse_unsupported(body, UNSUPPORTED)
    for i, m in enumerate(body.get("messages") or []):
        if isinstance(m, dict):
            options.refuse_unsupported(m, UNSUPPORTED, prefix=f"messages[{i}].")
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
    tools = options.parse_tools(body.get("tools")) if messages is not None else None
    spec = GenerationSpec(messages=messages, prompt=prompt, params=params, max_tokens_given=given,
                          stream=stream, think=think if isinstance(think, bool) else None, tools=tools,
                          tool_choice=options.parse_tool_choice(None, tools),
                          schema=options.parse_ollama_format(body.get("format")), schema_param="format")
    return check_combination(spec)


def _details(service: Service) -> dict[str, Any]:
    engine = service.engine
    family = getattr(getattr(engine, "config", None), "model_type", "") if engine else ""
    f = service.facts
    return {"parent_model": "", "format": f.format or "gguf", "family": family,
            "families": [family] if family else [], "parameter_size": f.parameter_size,
            "quantization_level": f.quantization_level}


def _known(service: Service, name: str) -> bool:
    return any(name in (n, _tagged(n)) for n in service.names())


def router(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/")
    async def root(request: Request):
        if wants_page(request):
            return page_response(service)
        return PlainTextResponse("Ollama is running")

    @r.head("/")
    async def root_head():
        return Response(status_code=200)

    @r.get("/api/version")
    async def version():
        return {"version": OLLAMA_API_VERSION}

    def model_entry(name: str) -> dict[str, Any]:
        return {"name": _tagged(name), "model": _tagged(name), "modified_at": _now(), "size": service.facts.size,
                "digest": service.facts.digest, "details": _details(service)}

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
        body = await read_json(request, service.settings.limits)
        engine = service.require_engine()
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not _known(service, name):
            raise APIError(404, f"model '{name}' not found; this server serves "
                                f"{', '.join(_tagged(n) for n in service.names())}", type="not_found_error")
        arch = getattr(engine.config, "model_type", "unknown")
        caps = ["completion"] + (["tools"] if service.tool_format else []) + \
               (["thinking"] if "<think>" in engine.tokenizer.get_vocab() else [])
        template = getattr(engine.tokenizer, "chat_template", None) or ""
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


class _Lines:
    """Ollama's NDJSON objects for one request."""

    def __init__(self, model: str, chat: bool, run: Run):
        self.model, self.chat, self.run = model, chat, run

    def line(self, text: str, thinking: str = "", tool_calls=None) -> dict[str, Any]:
        if self.chat:
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            if tool_calls:
                msg["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_obj()}}
                                     for c in tool_calls]
            return {"model": self.model, "created_at": _now(), "message": msg, "done": False}
        out = {"model": self.model, "created_at": _now(), "response": text, "done": False}
        if thinking:
            out["thinking"] = thinking
        return out

    def final(self, reason: str | None) -> dict[str, Any]:
        stats = self.run.stats
        end = time.monotonic()
        first = stats.first_token or end
        d = self.line("")
        d.update(done=True, done_reason="length" if reason == "length" else "stop",
                 total_duration=int((end - stats.start) * 1e9), load_duration=0,
                 prompt_eval_count=stats.prompt_tokens, prompt_eval_duration=int((first - stats.start) * 1e9),
                 eval_count=stats.completion_tokens, eval_duration=int((end - first) * 1e9))
        return d

    async def stream(self, ping: float) -> AsyncIterator[dict[str, Any]]:
        async for ev in self.run.events(ping):
            if ev is None:
                continue
            d = ev[1]
            if d.reasoning or d.content or d.tool_calls:
                yield self.line(d.content, d.reasoning, d.tool_calls)
            if d.finish_reason:
                yield self.final(d.finish_reason)


async def _generate(service: Service, request: Request, *, chat: bool):
    body = await read_json(request, service.settings.limits)
    model = body.get("model") or _tagged(service.names()[0])
    messages, prompt = _inputs(body, chat)
    if messages is None and prompt is None:
        # Ollama's documented way to load a model: an empty request answers "load" at once.
        service.require_engine()
        return {"model": model, "created_at": _now(), **({"message": {"role": "assistant", "content": ""}}
                if chat else {"response": ""}), "done": True, "done_reason": "load"}
    spec = _spec(body, service, messages, prompt)
    prep = await service.prepare_async(spec, "ollama")
    run = Run(service, prep, spec)
    lines = _Lines(model, chat, run)
    endpoint = "/api/chat" if chat else "/api/generate"
    try:
        await run.start()
    except APIError as e:
        service.log_request(endpoint, prep, run.stats, e.status)
        raise
    if spec.stream:
        async def ndjson():
            try:
                async for d in lines.stream(service.settings.ping_interval):
                    yield one_line_json(d) + "\n"
            except APIError as e:
                yield json.dumps({"error": e.message}) + "\n"
            finally:
                run.close()
                service.log_request(endpoint, prep, run.stats, 200 if all(run.finished) else 499)
        return StreamingResponse(ndjson(), media_type="application/x-ndjson")
    return await _answer(service, request, lines, endpoint)


async def _answer(service: Service, request: Request, lines: _Lines, endpoint: str):
    async def collect():
        text, thinking, calls, last = [], [], [], None
        async for d in lines.stream(service.settings.ping_interval):
            if d.get("done"):
                last = d
                continue
            part = d["message"] if lines.chat else d
            text.append(part.get("content", part.get("response", "")))
            thinking.append(part.get("thinking", ""))
            calls += part.get("tool_calls", [])
        return "".join(text), "".join(thinking), calls, last

    run = lines.run
    try:
        result = await run_until_disconnect(request, collect())
    except APIError as e:
        service.log_request(endpoint, run.prep, run.stats, e.status)
        raise
    finally:
        run.close()
    if result is None:
        service.log_request(endpoint, run.prep, run.stats, 499)
        return JSONResponse({}, status_code=499)
    service.log_request(endpoint, run.prep, run.stats, 200)
    text, think, calls, last = result
    if lines.chat:
        last["message"] = {"role": "assistant", "content": text, **({"thinking": think} if think else {}),
                           **({"tool_calls": calls} if calls else {})}
    else:
        last["response"] = text
        if think:
            last["thinking"] = think
    return last


def _inputs(body: dict, chat: bool) -> tuple[list | None, str | None]:
    """(messages, raw prompt); both None for Ollama's empty "load the model" request."""
    if chat:
        msgs = body.get("messages")
        return (parse_messages(msgs) if msgs else None), None
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string.", param="prompt")
    if not prompt:
        return None, None
    if body.get("raw"):
        return None, prompt
    messages = []
    if isinstance(body.get("system"), str) and body["system"]:
        messages.append({"role": "system", "content": body["system"]})
    messages.append({"role": "user", "content": prompt})
    return messages, None
