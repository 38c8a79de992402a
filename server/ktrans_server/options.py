"""Parsing of the request options beyond sampling: tools and tool_choice, response_format (and
Ollama's `format`), logprobs, logit_bias, n, and the parameters this server refuses.

A parameter the server cannot honour is a 400 naming it, never silently ignored: a client that
asks for, say, a suffix (fill-in-the-middle) or images must learn that it did not get them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ktrans_server.errors import bad_request

MAX_TOP_LOGPROBS = 20          # OpenAI's limit for chat; the legacy completions API allows 5


@dataclass
class ToolChoice:
    mode: str = "auto"            # "none" | "auto" | "required" (a named function is "required")
    name: str | None = None       # the one function the model must call


def refuse_unsupported(body: dict, names: dict[str, str], *, prefix: str = "") -> None:
    """400 for the first parameter in `names` that is present with a meaningful value."""
    for name, why in names.items():
        v = body.get(name)
        if v is None or v is False or v == "" or v == [] or v == {}:
            continue
        raise bad_request(f"'{prefix}{name}' is not supported by this server: {why}", param=prefix + name)


def parse_tools(v: Any, param: str = "tools") -> list[dict[str, Any]] | None:
    """OpenAI/Ollama tool definitions, normalised to {"type": "function", "function": {...}}."""
    if v is None or v == []:
        return None
    if not isinstance(v, list):
        raise bad_request(f"'{param}' must be an array of tool definitions.", param=param)
    out, seen = [], set()
    for i, t in enumerate(v):
        where = f"{param}[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}; "
                              "only function tools are supported.", param=param)
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{where}.function.name must be a non-empty string.", param=param)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON schema object.", param=param)
        if fn["name"] in seen:
            raise bad_request(f"{where}: the function name '{fn['name']}' is defined twice.", param=param)
        seen.add(fn["name"])
        clean = {"name": fn["name"], "parameters": params}
        if isinstance(fn.get("description"), str):
            clean["description"] = fn["description"]
        out.append({"type": "function", "function": clean})
    return out


def parse_tool_choice(v: Any, tools: list[dict] | None) -> ToolChoice:
    if v is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise bad_request(f"'tool_choice' must be \"none\", \"auto\", \"required\" or "
                              f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got {json.dumps(v)}.",
                              param="tool_choice")
        choice = ToolChoice(v)
    elif isinstance(v, dict) and isinstance((v.get("function") or {}).get("name"), str):
        choice = ToolChoice("required", v["function"]["name"])
    else:
        raise bad_request("'tool_choice' must be a string or {\"type\": \"function\", \"function\": "
                          "{\"name\": ...}}.", param="tool_choice")
    if choice.mode != "none" and not tools:
        raise bad_request(f"'tool_choice' is \"{choice.mode}\" but no 'tools' were given.", param="tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    if choice.name is not None and choice.name not in names:
        raise bad_request(f"'tool_choice' names the function '{choice.name}', which is not among the tools "
                          f"({', '.join(names)}).", param="tool_choice")
    return choice


def parse_response_format(v: Any) -> dict[str, Any] | None:
    """The JSON schema the answer must follow ({"type": "object"} for json_object), or None."""
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad_request("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}.",
                          param="response_format")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = v.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema object.",
                              param="response_format")
        return schema
    raise bad_request(f"'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"; "
                      f"got {json.dumps(kind)}.", param="response_format")


def parse_ollama_format(v: Any) -> dict[str, Any] | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema object."""
    if v is None or v == "":
        return None
    if v == "json":
        return {"type": "object"}
    if isinstance(v, dict):
        return v
    raise bad_request(f"'format' must be \"json\" or a JSON schema object; got {json.dumps(v)}.", param="format")


def parse_logit_bias(v: Any, vocab_size: int | None = None) -> dict[int, float]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to a bias in [-100, 100].",
                          param="logit_bias")
    out = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise bad_request(f"'logit_bias' keys must be token ids; got {json.dumps(k)}.", param="logit_bias") from None
        if tid < 0:
            raise bad_request(f"'logit_bias' token id {tid} is negative.", param="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad_request(f"'logit_bias' value for token {tid} must be a number in [-100, 100]; "
                              f"got {json.dumps(b)}.", param="logit_bias")
        out[tid] = float(b)
    return out


def parse_chat_logprobs(body: dict) -> int | None:
    """Chat: `logprobs: true` plus `top_logprobs: 0..20` -> the number of alternatives (None: off)."""
    want = body.get("logprobs")
    top = body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad_request(f"'logprobs' must be a boolean; got {json.dumps(want)}.", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]; got {json.dumps(top)}.",
                              param="top_logprobs")
        if not want:
            raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    return (top or 0) if want else None


def parse_completion_logprobs(body: dict) -> int | None:
    """Completions: `logprobs: 0..5` alternatives per token (None: off)."""
    v = body.get("logprobs")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 5:
        raise bad_request(f"'logprobs' must be an integer in [0, 5]; got {json.dumps(v)}.", param="logprobs")
    return v


def parse_n(body: dict, *, best_of: bool = False) -> int:
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise bad_request(f"'n' must be an integer in [1, 16]; got {json.dumps(n)}.", param="n")
    if best_of:
        b = body.get("best_of")
        if b is not None and b != n:
            raise bad_request("'best_of' other than n is not supported: this server does not rank "
                              "candidates; ask for n choices instead.", param="best_of")
    return n
