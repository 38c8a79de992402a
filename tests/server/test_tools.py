"""Tool calling: each family's output format parsed from any chunking of the stream, and the
forced paths (tool_choice "required" or a named function) through the official openai client on
generated models wearing each family's template. Random weights cannot choose a tool by
themselves, so the free ("auto") path is checked through the parsers, and end to end only for
what it must not break."""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest

from families import FAMILIES, template_file
from live import LiveServer
from ktrans_server.outputs import ToolCallParser
from ktrans_server.protocol import parse_messages
from ktrans_server.tools import FORMATS, detect_format

WEATHER = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping", "description": "Check the line",
                                           "parameters": {"type": "object", "properties": {},
                                                          "additionalProperties": False}}}]

# family -> (text the model writes, expected [(name, arguments)])
SAMPLES = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}\n'
               '</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
               "Let me check.\n\n", [("get_weather", {"unit": "c", "days": 2}), ("ping", {})]),
    "deepseek": ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                 '{"unit": "f", "days": 3}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>ping\n'
                 "```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                 "Sure.", [("get_weather", {"unit": "f", "days": 3}), ("ping", {})]),
    "llama3": ('<|python_tag|>{"name": "get_weather", "parameters": {"unit": "c", "days": 1}}',
               "", [("get_weather", {"unit": "c", "days": 1})]),
    "mistral": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"unit": "c", "days": 5}}, '
                '{"name": "ping", "arguments": {}}]', "", [("get_weather", {"unit": "c", "days": 5}), ("ping", {})]),
    # (arguments without the request's schemas: every value read as JSON where it parses)
    "glm": ("Let me check.\n<tool_call>get_weather\n<arg_key>unit</arg_key>\n<arg_value>c</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n<tool_call>ping\n</tool_call>",
            "Let me check.\n\n", [("get_weather", {"unit": "c", "days": 2}), ("ping", {})]),
    "minimax": ('Let me check.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="unit">c</parameter>\n'
                '<parameter name="days">2</parameter>\n</invoke>\n<invoke name="ping">\n</invoke>\n</minimax:tool_call>',
                "Let me check.\n", [("get_weather", {"unit": "c", "days": 2}), ("ping", {})]),
}


def _parse_in_chunks(fmt, text: str, cuts: list[int]):
    p = ToolCallParser(fmt)
    content, calls, prev = [], [], 0
    for cut in cuts + [len(text)]:
        c, k = p.feed(text[prev:cut])
        content.append(c)
        calls += k
        prev = cut
    c, k = p.finish()
    return "".join(content) + c, calls + k


@pytest.mark.parametrize("family", sorted(SAMPLES))
def test_parser_any_chunking(family):
    text, content, expected = SAMPLES[family]
    rng = random.Random(family)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 15)))
        got_content, calls = _parse_in_chunks(FORMATS[family], text, cuts)
        assert got_content == content
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected


def test_parser_keeps_text_that_is_not_a_call():
    hermes = FORMATS["hermes"]
    assert _parse_in_chunks(hermes, "a <tool_call>not json</tool_call> b", [3, 9]) == \
        ("a <tool_call>not json</tool_call> b", [])
    assert _parse_in_chunks(hermes, "cut <tool_call>\n{\"name\": \"x\", \"argu", [5]) == \
        ("cut <tool_call>\n{\"name\": \"x\", \"argu", [])
    llama = FORMATS["llama3"]
    assert _parse_in_chunks(llama, '{"answer": 42}', [2]) == ('{"answer": 42}', [])
    assert _parse_in_chunks(llama, "Plain text {x}", [1]) == ("Plain text {x}", [])
    v31 = "<｜tool▁call▁begin｜>ping<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
    _, calls = _parse_in_chunks(FORMATS["deepseek"], v31, [7])
    assert [(c.name, c.arguments) for c in calls] == [("ping", "{}")]


_XML_CALLS = {   # family -> (a call of f with s="42", n=42, o={"a": [1]}, e="1"; text that is not a call)
    "glm": ("<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>42</arg_value>\n<arg_key>n</arg_key>\n<arg_value>42"
            "</arg_value>\n<arg_key>o</arg_key>\n<arg_value>{\"a\": [1]}</arg_value>\n<arg_key>e</arg_key>\n"
            "<arg_value>1</arg_value>\n</tool_call>",
            ["<tool_call>f\nstray<arg_key>s</arg_key><arg_value>x</arg_value></tool_call>",
             "<tool_call>\n</tool_call>", "<tool_call>f <arg_key>s</arg_key></tool_call>"]),
    "minimax": ('<minimax:tool_call>\n<invoke name="f">\n<parameter name="s">42</parameter>\n<parameter name="n">42'
                '</parameter>\n<parameter name="o">{"a": [1]}</parameter>\n<parameter name="e">1</parameter>\n'
                "</invoke>\n</minimax:tool_call>",
                ['<minimax:tool_call>\n<invoke name="f">\nstray</invoke>\n</minimax:tool_call>',
                 "<minimax:tool_call>\n</minimax:tool_call>",
                 '<minimax:tool_call><invoke name="f"></invoke> tail</minimax:tool_call>']),
}


@pytest.mark.parametrize("family", sorted(_XML_CALLS))
def test_xml_arguments_follow_the_schemas(family):
    """GLM and MiniMax-M2 write string arguments raw and other values as JSON: with the request's
    tools bound, a string parameter keeps "42" as text, other parameters are JSON; not a call
    stays text."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "integer"}, "o": {"type": "object"}, "e": {"enum": ["1", "2"]}}}}}]
    fmt = FORMATS[family].for_tools(tools)
    text, bad = _XML_CALLS[family]
    _, calls = _parse_in_chunks(fmt, text, [13, 40])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"s": "42", "n": 42, "o": {"a": [1]}, "e": "1"})]
    for b in bad:
        assert _parse_in_chunks(fmt, b, [5]) == (b, []), b


def test_format_found_from_the_template():
    for family, (_, template) in FAMILIES.items():
        assert detect_format(template).name == family
    assert detect_format("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_server(request, tiny_model, tmp_path_factory):
    family = request.param
    arch = FAMILIES[family][0]
    tpl = template_file(tmp_path_factory.mktemp("templates"), family)
    srv = LiveServer(tiny_model(arch, "f32", with_safetensors=False), "--chat-template", str(tpl),
                     "--cache_lens", "2048", "--max_new_tokens", "300")
    try:
        srv.wait_ready()
        yield family, srv
    finally:
        srv.close()


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _check_calls(calls, names):
    assert calls and all(c.type == "function" and c.id for c in calls)
    for c in calls:
        assert c.function.name in names
        args = json.loads(c.function.arguments)
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.function.name)
        jsonschema.validate(args, schema)


def test_forced_tool_call(family_server):
    family, srv = family_server
    client = _client(srv)
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    for seed in range(2):
        r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0.8, seed=seed, max_tokens=250)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert len(c.message.tool_calls) == 1 and not c.message.content
        _check_calls(c.message.tool_calls, {"get_weather", "ping"})
    # Parallel calls allowed: one or more whole calls (the model may go on calling until cut off).
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=250)
    c = r.choices[0]
    assert c.finish_reason in ("tool_calls", "length")
    _check_calls(c.message.tool_calls, {"get_weather", "ping"})


def test_named_tool_call_streamed(family_server):
    family, srv = family_server
    client = _client(srv)
    msgs = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice=named,
                                           parallel_tool_calls=False, temperature=0, max_tokens=250)
    calls = whole.choices[0].message.tool_calls
    _check_calls(calls, {"get_weather"})
    chunks = list(client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice=named,
                                                 parallel_tool_calls=False, temperature=0, max_tokens=250,
                                                 stream=True))
    deltas = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or [])]
    assert [d.index for d in deltas] == list(range(len(calls)))
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_round_trip_and_choice_none(family_server):
    """The assistant's call and the tool's result go back through the template; tool_choice
    "none" renders no tools (and parses none)."""
    family, srv = family_server
    client = _client(srv)
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"unit": "c", "days": 2})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
            {"role": "user", "content": "Thanks. And tomorrow?"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="m", messages=msgs[:1], tools=TOOLS, tool_choice="none",
                                          max_tokens=2, temperature=0)
    bare = client.chat.completions.create(model="m", messages=msgs[:1], max_tokens=2, temperature=0)
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens
    assert r.usage.prompt_tokens > bare.usage.prompt_tokens
    # What the server renders: the call's arguments as an object (templates print them with tojson;
    # GLM's prints each as a key/value pair).
    rendered = srv.service.engine.tokenizer.apply_chat_template(
        parse_messages(msgs), tools=TOOLS, tokenize=False, add_generation_prompt=True)
    days = {"glm": "<arg_key>days</arg_key>\n<arg_value>2</arg_value>",
            "minimax": '<parameter name="days">2</parameter>'}.get(family, '"days": 2')
    assert "Sunny, 21 C" in rendered and days in rendered and '\\"days' not in rendered


def test_ollama_tools_are_rendered(family_server):
    family, srv = family_server
    base = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], "stream": False,
            "options": {"temperature": 0, "num_predict": 2}}
    with_tools = httpx.post(srv.url + "/api/chat", json={**base, "tools": TOOLS}, timeout=120).json()
    without = httpx.post(srv.url + "/api/chat", json=base, timeout=120).json()
    assert with_tools["prompt_eval_count"] > without["prompt_eval_count"]
    show = httpx.post(srv.url + "/api/show", json={"model": srv.service.names()[0]}).json()
    assert "tools" in show["capabilities"]


@pytest.mark.parametrize("body,param,needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "only function tools"),
    ({"response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tool_choice": "sometimes"}, "tool_choice", "sometimes"),
])
def test_bad_tool_requests_are_400(family_server, body, param, needle):
    family, srv = family_server
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]


def test_model_without_tool_format_says_so(tiny_model):
    srv = LiveServer(tiny_model("qwen2", "f32", with_safetensors=False))
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert "no tool-call format" in r.json()["error"]["message"]
    finally:
        srv.close()


def test_mistral_calls_cut_short_keep_the_whole_ones():
    text = '[TOOL_CALLS] [{"name": "ping", "arguments": {}}, {"name": "get_weather", "argum'
    content, calls = _parse_in_chunks(FORMATS["mistral"], text, [20])
    assert [c.name for c in calls] == ["ping"]


def test_minimax_block_cut_short_keeps_the_whole_invokes():
    whole = '<minimax:tool_call>\n<invoke name="ping">\n</invoke>\n'
    for rest in ('<invoke name="get_weather">\n<parameter name="un', "<inv", ""):
        content, calls = _parse_in_chunks(FORMATS["minimax"], whole + rest, [25])
        assert [c.name for c in calls] == ["ping"] and content == "", rest
