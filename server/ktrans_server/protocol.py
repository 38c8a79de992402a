"""Request parsing and validation for the OpenAI and Ollama APIs.

Bodies are plain JSON objects; unknown fields are ignored (clients send many platform extras),
but a known parameter this server cannot honour is a 400 naming it. Each invalid value raises a
400 naming the parameter. The result is a `GenerationSpec`: the prompt (chat messages or raw
text) plus the engine's SamplingParams and the output options.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ktrans.engine.request import SamplingParams
from ktrans_server import options
from ktrans_server.errors import bad_request
from ktrans_server.options import ToolChoice

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class GenerationSpec:
    messages: list[dict[str, Any]] | None   # chat: normalised messages (content as str)
    prompt: str | None                      # completions / generate: raw text, no template
    params: SamplingParams
    max_tokens_given: bool                  # False: cap to the remaining context
    stream: bool
    include_usage: bool = False
    think: bool | None = None               # None: the model's default
    echo: bool = False
    return_token_ids: bool = False          # vLLM's extension: token ids beside the text
    extra_template_kwargs: dict[str, Any] = field(default_factory=dict)
    n: int = 1                              # independent choices for the one prompt
    tools: list[dict[str, Any]] | None = None   # function tools, rendered by the chat template
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    schema: dict[str, Any] | None = None    # the answer must be JSON following this schema
    schema_param: str = "response_format"   # the request field the schema came from


# Parameters of the OpenAI API this server does not implement: asking for them is a 400.
UNSUPPORTED_CHAT = {
    "audio": "this server produces text only.",
    "prediction": "predicted outputs are not implemented.",
    "web_search_options": "this server has no web search.",
    "functions": "use 'tools' (the legacy 'functions' parameter is not implemented).",
    "function_call": "use 'tool_choice' (the legacy 'function_call' parameter is not implemented).",
}
UNSUPPORTED_COMPLETION = {
    "suffix": "fill-in-the-middle is not implemented; send the whole prompt.",
}


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    return body


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False,
            default: Any = None, lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        kind = "an integer" if integer else "a number"
        raise bad_request(f"'{name}' must be {kind}, got {json.dumps(v)}.", param=name)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise bad_request(f"'{name}' must be in {left}{lo}, {hi}], got {v}.", param=name)
    return int(v) if integer else float(v)


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean (true or false), got {json.dumps(v)}.", param=name)
    return v


def _stop(v: Any, name: str = "stop") -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return [s for s in v if s]
    raise bad_request(f"'{name}' must be a string or a list of strings.", param=name)


def _text_of(content: Any, where: str) -> str:
    """Message content as text: a string, null, or an array of parts ({type: text, text})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_audio", "image", "file"):
                raise bad_request(f"{where}.content[{i}]: '{part.get('type')}' parts are not supported "
                                  "by this text-only model.", param="messages")
            else:
                raise bad_request(f"{where}.content[{i}] must be a text part "
                                  "({\"type\": \"text\", \"text\": ...}).", param="messages")
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string, null or an array of text parts.", param="messages")


def parse_messages(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise bad_request("'messages' must be a non-empty array of messages.", param="messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'.", param="messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {json.dumps(role)}.",
                              param="messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _text_of(m.get("content"), where)}
        if role == "function":
            msg["role"] = "tool"
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = m[key]
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = _template_tool_calls(m["tool_calls"], where)
        thinking = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
        if isinstance(thinking, str) and thinking:
            msg["reasoning_content"] = thinking
        out.append(msg)
    return out


def _template_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates read them: OpenAI sends `arguments`
    as JSON text, the templates (Qwen's, DeepSeek's, Llama's) print it with `tojson`, so it is
    decoded to an object first (text that is not JSON is kept as it is)."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be an array.", param="messages")
    out = []
    for c in calls:
        if not isinstance(c, dict):
            raise bad_request(f"{where}.tool_calls entries must be objects.", param="messages")
        c = dict(c)
        fn = c.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = fn["arguments"]
            c["function"] = {**fn, "arguments": args}
        out.append(c)
    return out


def _sampling(body: dict, max_tokens: int | None, stop: list[str], default_max: int) -> SamplingParams:
    seed = _number(body, "seed", -2**63, 2**64 - 1, integer=True)
    params = SamplingParams(
        temperature=_number(body, "temperature", 0.0, 2.0, default=1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, default=1.0, lo_open=True),
        top_k=_number(body, "top_k", -1, 1 << 30, integer=True, default=0),
        min_p=_number(body, "min_p", 0.0, 1.0, default=0.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, default=1.0, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, default=0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, default=0.0),
        seed=None if seed is None else seed % (2**63),
        max_new_tokens=max_tokens if max_tokens is not None else default_max,
        stop=stop,
        stop_token_ids=_token_ids(body.get("stop_token_ids")),
        ignore_eos=_flag(body, "ignore_eos", False),
        skip_special_tokens=_flag(body, "skip_special_tokens", True),
        logit_bias=options.parse_logit_bias(body.get("logit_bias")),
    )
    if params.top_k < 0:
        params.top_k = 0
    return params


def _token_ids(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        return list(v)
    raise bad_request("'stop_token_ids' must be a list of non-negative integers.", param="stop_token_ids")


def _max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        v = _number(body, name, 1, 1 << 31, integer=True)
        if v is not None:
            return v
    return None


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    return stream, bool(opts.get("include_usage", False))


def _think_flag(body: dict) -> bool | None:
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("enable_thinking"), bool):
        return kwargs["enable_thinking"]
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        return effort != "none"
    return None


def parse_chat(body: dict, default_max: int) -> GenerationSpec:
    options.refuse_unsupported(body, UNSUPPORTED_CHAT)
    if body.get("modalities") not in (None, ["text"]):
        raise bad_request("'modalities' other than [\"text\"] are not supported: this server produces text only.",
                          param="modalities")
    messages = parse_messages(body.get("messages"))
    stream, include_usage = _stream_opts(body)
    max_tokens = _max_tokens(body)
    kwargs = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), dict) else {}
    params = _sampling(body, max_tokens, _stop(body.get("stop")), default_max)
    params.logprobs = options.parse_chat_logprobs(body)
    tools = options.parse_tools(body.get("tools"))
    spec = GenerationSpec(messages=messages, prompt=None, params=params,
                          max_tokens_given=max_tokens is not None, stream=stream,
                          include_usage=include_usage, think=_think_flag(body),
                          return_token_ids=_flag(body, "return_token_ids", False),
                          extra_template_kwargs={k: v for k, v in kwargs.items() if k != "enable_thinking"},
                          n=options.parse_n(body), tools=tools,
                          tool_choice=options.parse_tool_choice(body.get("tool_choice"), tools),
                          parallel_tool_calls=_flag(body, "parallel_tool_calls", True),
                          schema=options.parse_response_format(body.get("response_format")))
    return check_combination(spec)


def check_combination(spec: GenerationSpec) -> GenerationSpec:
    if spec.schema is not None and spec.tool_choice.mode != "none":
        raise bad_request(f"'{spec.schema_param}' cannot be combined with tools: a structured answer and a "
                          "tool call are two different outputs. Send one or the other (or tool_choice \"none\").",
                          param=spec.schema_param)
    return spec


def parse_completion(body: dict, default_max: int) -> GenerationSpec:
    options.refuse_unsupported(body, UNSUPPORTED_COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (or a list holding one string).", param="prompt")
    if not prompt:
        # NOTE: refused on every model alike; tokenizers that add BOS would otherwise turn "" into
        # a one-token prompt on some models and an empty one on others.
        raise bad_request("'prompt' is empty; send the text to continue.", param="prompt")
    n = options.parse_n(body, best_of=True)
    stream, include_usage = _stream_opts(body)
    max_tokens = _max_tokens(body)
    if max_tokens is None:
        max_tokens = 16  # the OpenAI completions API's documented default
    params = _sampling(body, max_tokens, _stop(body.get("stop")), default_max)
    params.logprobs = options.parse_completion_logprobs(body)
    return GenerationSpec(messages=None, prompt=prompt, params=params,
                          max_tokens_given=True, stream=stream, include_usage=include_usage,
                          echo=_flag(body, "echo", False),
                          return_token_ids=_flag(body, "return_token_ids", False), n=n,
                          schema=options.parse_response_format(body.get("response_format")))
