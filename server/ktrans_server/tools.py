"""Tool calls: each model family's output format, found from its chat template, parsed from the
stream, and (for tool_choice "required" or a named function) forced by a grammar.

| format   | families                      | a call in the output                                        |
|----------|-------------------------------|-------------------------------------------------------------|
| hermes   | Qwen2.5, Qwen3, Hermes        | <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> |
| deepseek | DeepSeek-V3, R1 (and V3.1)    | <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜> |
| llama3   | Llama 3.1 / 3.2 / 3.3          | {"name": ..., "parameters": {...}} as the whole answer      |
| mistral  | Mistral, Mixtral              | [TOOL_CALLS][{"name": ..., "arguments": {...}}]             |
| glm      | GLM-4.5 / 4.6                 | <tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...</tool_call> |
| minimax  | MiniMax-M2                    | <minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="K">V</parameter>\\n...</invoke>\\n...</minimax:tool_call> |

The tools themselves are rendered by the model's own template (its `tools` variable); a template
that knows none of these formats cannot take tools, and the request is refused with that reason.
GLM's and MiniMax-M2's templates write string arguments as they are and every other value as
JSON, so their parsers read the request's tool schemas (ToolFormat.for_tools) to tell "42" the
string from 42.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ktrans_server.grammar import GrammarCompiler, json_schema_lark

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str                  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def arguments_obj(self) -> dict[str, Any]:
        return json.loads(self.arguments)


def _call(name: Any, args: Any) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _json_objects(text: str) -> list[Any] | None:
    """Every JSON value in `text`, separated by whitespace, ';' or ',' (None if anything else)."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return out
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(v)


def _hermes_body(body: str) -> list[ToolCall] | None:
    objs = _json_objects(body)
    calls = [_call(o.get("name"), o.get("arguments", o.get("parameters")))
             for o in objs or [] if isinstance(o, dict)]
    return calls if objs and all(calls) and len(calls) == len(objs) else None


def _llama3_body(body: str) -> list[ToolCall] | None:
    return _hermes_body(body.replace(PYTHON_TAG, " "))


_DS_V3 = re.compile(r"^\s*(?:function)?" + re.escape(DS_SEP) + r"(.+?)\n```(?:json)?\n(.*)\n```\s*$", re.S)
_DS_V31 = re.compile(r"^\s*([^\n]+?)" + re.escape(DS_SEP) + r"(.*)$", re.S)


def _deepseek_body(body: str) -> list[ToolCall] | None:
    m = _DS_V3.match(body)
    call = _call(m.group(1).strip(), m.group(2)) if m else None
    if call is None:
        m = _DS_V31.match(body)
        call = _call(m.group(1).strip(), m.group(2).strip()) if m else None
    return [call] if call else None


def _array_prefix(text: str) -> list[Any]:
    """The complete elements at the start of a JSON array cut short (a reply that hit max_tokens)."""
    dec, i, out = json.JSONDecoder(), 1, []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return out
        out.append(v)


def _mistral_body(body: str) -> list[ToolCall] | None:
    body = body.strip()
    if body.startswith("["):
        objs = _json_objects(body)
        items = objs[0] if objs and isinstance(objs[0], list) else _array_prefix(body)
        calls = [_call(o.get("name"), o.get("arguments")) for o in items if isinstance(o, dict)]
        return calls if calls and all(calls) else None
    calls = []                                # newer format: NAME[ARGS]{...}[TOOL_CALLS]NAME[ARGS]{...}
    for part in body.split("[TOOL_CALLS]"):
        name, sep, args = part.partition("[ARGS]")
        call = _call(name.strip(), args) if sep else None
        if call is None:
            return None
        calls.append(call)
    return calls or None


GLM_KEY, GLM_KEY_END, GLM_VALUE, GLM_VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
_GLM_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _text_schema(schema: Any) -> bool:
    """A parameter GLM's template writes as raw text: a string, or an enum of strings."""
    if not isinstance(schema, dict):
        return False
    enum = schema.get("enum")
    return schema.get("type") == "string" or (isinstance(enum, list) and bool(enum)
                                              and all(isinstance(v, str) for v in enum))


def _text_params(tools: list[dict]) -> dict[str, set[str]]:
    """Function name -> its parameters written as raw text."""
    out = {}
    for t in tools or []:
        fn = t.get("function", {})
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name")] = {k for k, v in props.items() if _text_schema(v)}
    return out


def _xml_value(value: str, text: bool) -> Any:
    if text:
        return value
    try:
        return json.loads(value)
    except ValueError:                    # a value the model wrote as plain text after all
        return value


def _glm_body(body: str, text_params: dict[str, set[str]] | None = None) -> list[ToolCall] | None:
    head, _, _ = body.partition(GLM_KEY)
    name, rest = head.strip(), body[len(head):]
    if not name or "\n" in name or "<" in name:
        return None
    args, pos = {}, 0
    while (m := _GLM_ARG.match(rest, pos)) is not None:
        key = m.group(1).strip()
        args[key] = _xml_value(m.group(2), key in (text_params or {}).get(name, ()))
        pos = m.end()
    if rest[pos:].strip():
        return None
    return [ToolCall(name, json.dumps(args, ensure_ascii=False))]


MM_CALLS, MM_CALLS_END = "<minimax:tool_call>", "</minimax:tool_call>"
_MM_INVOKE = re.compile(r'\s*<invoke name="([^"<>\n]+)">(.*?)</invoke>', re.S)
_MM_PARAM = re.compile(r'\s*<parameter name="([^"<>\n]+)">(.*?)</parameter>', re.S)


def _minimax_body(body: str, text_params: dict[str, set[str]] | None = None) -> list[ToolCall] | None:
    calls, pos = [], 0
    while (m := _MM_INVOKE.match(body, pos)) is not None:
        name, inner, args, at = m.group(1).strip(), m.group(2), {}, 0
        while (p := _MM_PARAM.match(inner, at)) is not None:
            args[p.group(1)] = _xml_value(p.group(2), p.group(1) in (text_params or {}).get(name, ()))
            at = p.end()
        if inner[at:].strip():
            return None
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        pos = m.end()
    rest = body[pos:].strip()
    # NOTE: a block cut short (max_tokens) keeps its whole invokes; the last, unfinished one is dropped.
    cut = (rest.startswith("<invoke") or "<invoke".startswith(rest)) and "</invoke>" not in rest
    return calls if calls and (not rest or cut) else None


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str                          # marker opening a call (or the calls)
    end: str | None                     # marker closing one call; None: the calls run to the end
    parse_body: Callable[[str], list[ToolCall] | None]
    at_start_only: bool = False         # calls only as the whole answer (Llama 3's JSON)
    drop: tuple[str, ...] = ()          # markers around the calls that carry nothing
    typed: bool = False                 # parse_body(body, text_params) reads the tools' schemas (GLM)

    def for_tools(self, tools: list[dict]) -> "ToolFormat":
        """This format for a request with these tools (GLM's parser learns which arguments are text)."""
        if not self.typed:
            return self
        return dataclasses.replace(self, parse_body=functools.partial(self.parse_body, text_params=_text_params(tools)),
                                   typed=False)


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>", _hermes_body),
    "deepseek": ToolFormat("deepseek", DS_CALL_BEGIN, DS_CALL_END, _deepseek_body,
                           drop=(DS_CALLS_BEGIN, DS_CALLS_END)),
    "llama3": ToolFormat("llama3", "{", None, _llama3_body, at_start_only=True),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", None, _mistral_body),
    "glm": ToolFormat("glm", "<tool_call>", "</tool_call>", _glm_body, typed=True),
    "minimax": ToolFormat("minimax", MM_CALLS, MM_CALLS_END, _minimax_body, typed=True),
}


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format the model's chat template teaches it, or None (no tool support)."""
    t = chat_template or ""
    if MM_CALLS in t:
        return FORMATS["minimax"]
    if "<tool_call>" in t and GLM_KEY in t:          # GLM writes <tool_call> too, with XML arguments
        return FORMATS["glm"]
    if "<tool_call>" in t:
        return FORMATS["hermes"]
    if "tool▁calls▁begin" in t or "tool_calls_begin" in t:
        return FORMATS["deepseek"]
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if PYTHON_TAG in t or ("ipython" in t and "<|eot_id|>" in t):
        return FORMATS["llama3"]
    return None


def markers(fmt: ToolFormat) -> list[str]:
    """Strings the parser must see even when they are special tokens."""
    extra = {"llama3": [PYTHON_TAG], "mistral": ["[ARGS]"], "glm": [GLM_KEY, GLM_KEY_END, GLM_VALUE, GLM_VALUE_END]}
    extra = extra.get(fmt.name, [])
    return [m for m in (fmt.start, fmt.end, DS_SEP if fmt.name == "deepseek" else None, *fmt.drop, *extra) if m]


def _function_schema(tool: dict, args_key: str) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
            "required": ["name", args_key], "additionalProperties": False}


def forced_grammar(fmt: ToolFormat, tools: list[dict], name: str | None, parallel: bool,
                   compiler: GrammarCompiler) -> str:
    """A Lark grammar admitting only tool calls in `fmt` (to `name` only, when given)."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    lit = compiler.literal
    many = "+" if parallel else ""
    if fmt.name == "minimax":
        calls = "\n".join(f"call_{i}: {_minimax_call(t['function'])}" for i, t in enumerate(chosen))
        call = " | ".join(f"call_{i}" for i in range(len(chosen)))
        return compiler.from_lark(f"start: \"\\n\"? {lit(MM_CALLS)} \"\\n\" call{many} {lit(MM_CALLS_END)}\n"
                                  f"call: {call}\n{calls}", "tool_choice")
    if fmt.name == "glm":
        calls = "\n".join(f"call_{i}: {_glm_call(t['function'], lit)}" for i, t in enumerate(chosen))
        call = " | ".join(f"call_{i}" for i in range(len(chosen)))
        more = ' ("\\n" call)*' if parallel else ""
        return compiler.from_lark(f"start: \"\\n\"? call{more}\ncall: {call}\n{calls}", "tool_choice")
    if fmt.name == "deepseek":
        alts = []
        for i, t in enumerate(chosen):
            fn = t["function"]
            alts.append(f"call_{i}: {lit(DS_CALL_BEGIN)} \"function\" {lit(DS_SEP)} {json.dumps(fn['name'])} "
                        f"\"\\n```json\\n\" {json_schema_lark(fn['parameters'])} \"\\n```\" {lit(DS_CALL_END)}")
        rules = "\n".join(alts)
        call = " | ".join(f"call_{i}" for i in range(len(chosen)))
        return compiler.from_lark(f"start: {lit(DS_CALLS_BEGIN)} call{many} {lit(DS_CALLS_END)}\n"
                                  f"call: {call}\n{rules}", "tool_choice")
    key = "parameters" if fmt.name == "llama3" else "arguments"
    one = {"anyOf": [_function_schema(t, key) for t in chosen]}
    if fmt.name == "hermes":
        sep = '("\\n" call)*' if parallel else ""
        lark = (f"start: call {sep}\ncall: {lit('<tool_call>')} \"\\n\" obj \"\\n\" {lit('</tool_call>')}\n"
                f"obj: {json_schema_lark(one)}")
    elif fmt.name == "mistral":
        arr = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        lark = f"start: {lit('[TOOL_CALLS]')} arr\narr: {json_schema_lark(arr)}"
    else:
        lark = f"start: obj\nobj: {json_schema_lark(one)}"
    return compiler.from_lark(lark, "tool_choice")


def _xml_args(fn: dict, arg) -> str:
    """Lark for the arguments of `fn` in the XML formats (GLM, MiniMax-M2): its parameters in declared
    order (the optional ones may be left out), text parameters raw (an enum's strings, or text
    without '<'), the rest as JSON; `arg(key, value)` is one argument's Lark."""
    params = fn.get("parameters") or {}
    required = set(params.get("required") or [])
    parts = []
    for key, schema in (params.get("properties") or {}).items():
        if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and _text_schema(schema):
            value = "(" + " | ".join(json.dumps(v) for v in schema["enum"]) + ")"
        elif _text_schema(schema):
            value = "/[^<]*/"
        else:
            value = json_schema_lark(schema if isinstance(schema, dict) else {})
        parts.append(f"({arg(key, value)})" + ("" if key in required else "?"))
    return " ".join(parts)


def _glm_call(fn: dict, lit) -> str:
    """Lark for one GLM call: <tool_call>NAME, then \\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value> per argument."""
    args = _xml_args(fn, lambda key, value: f'"\\n" {lit(GLM_KEY)} {json.dumps(key)} {lit(GLM_KEY_END)} "\\n" '
                                           f"{lit(GLM_VALUE)} {value} {lit(GLM_VALUE_END)}")
    return f"{lit('<tool_call>')} {json.dumps(fn['name'])} {args} \"\\n\" {lit('</tool_call>')}"


def _minimax_call(fn: dict) -> str:
    """Lark for one MiniMax-M2 invoke: <invoke name="NAME">, a <parameter> line per argument, </invoke>."""
    def arg(key: str, value: str) -> str:
        return " ".join([json.dumps('<parameter name="' + key + '">'), value, json.dumps("</parameter>\n")])

    head = json.dumps('<invoke name="' + fn["name"] + '">\n')
    return " ".join([head, _xml_args(fn, arg), json.dumps("</invoke>\n")])
