"""Request parsing for the OpenAI/Ollama APIs and the <think> splitter, with each template's
own way of opening the reasoning (no engine needed)."""

from __future__ import annotations

import json
import random

import pytest

from ktrans.cli.generate import chat_prompt
from ktrans.engine.thinking import think_opener
from ktrans_server.errors import APIError
from ktrans_server.protocol import parse_chat, parse_completion, parse_json
from ktrans_server.reasoning import ThinkSplitter, prompt_opens_thinking
from ktrans_server.render import one_line_json


def _err(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value


def test_malformed_json_and_non_object():
    assert "not valid JSON" in _err(parse_json, b"{oops").message
    assert "JSON object" in _err(parse_json, b"[1, 2]").message


def test_chat_accepts_what_modern_clients_send():
    spec = parse_chat({
        "model": "gpt-4o", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "user", "content": "again"}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "END",
        "stream": True, "stream_options": {"include_usage": True},
        "user": "x", "metadata": {"a": 1}, "store": False, "some_future_field": [1]}, 100)
    assert spec.messages[0] == {"role": "system", "content": "be brief"}
    assert spec.messages[1]["content"] == "hello"
    assert spec.messages[2]["content"] == "" and spec.messages[2]["tool_calls"]
    assert spec.params.max_new_tokens == 7 and spec.max_tokens_given
    assert spec.params.temperature == 0 and spec.params.top_p == 0.5 and spec.params.seed == 3
    assert spec.params.stop == ["END"] and spec.stream and spec.include_usage


def test_max_tokens_alias_and_default():
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}, 100).params.max_new_tokens == 5
    spec = parse_chat({"messages": [{"role": "user", "content": "x"}]}, 100)
    assert spec.params.max_new_tokens == 100 and not spec.max_tokens_given


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", 2.5, "'temperature' must be in [0.0, 2.0]"),
    ("temperature", "hot", "'temperature' must be a number"),
    ("top_p", 0, "'top_p' must be in (0.0, 1.0]"),
    ("max_tokens", 0, "'max_tokens' must be in [1"),
    ("max_tokens", 1.5, "'max_tokens' must be an integer"),
    ("presence_penalty", 3, "'presence_penalty' must be in [-2.0, 2.0]"),
    ("stop", 5, "'stop' must be a string or a list of strings"),
    ("n", 17, "'n' must be an integer in [1, 16]"),
    ("n", 0, "'n' must be an integer in [1, 16]"),
    ("stream", "yes", "'stream' must be a boolean"),
    ("ignore_eos", "yes", "'ignore_eos' must be a boolean"),
    ("skip_special_tokens", 0, "'skip_special_tokens' must be a boolean"),
])
def test_invalid_values_name_the_parameter(field, value, needle):
    e = _err(parse_chat, {"messages": [{"role": "user", "content": "x"}], field: value}, 10)
    assert needle in e.message
    assert e.param == field


@pytest.mark.parametrize("messages,needle", [
    (None, "non-empty array"), ([], "non-empty array"), (["hi"], "messages[0] must be an object"),
    ([{"role": "robot", "content": "x"}], "messages[0].role must be one of"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "not supported"),
    ([{"role": "user", "content": 5}], "must be a string, null or an array"),
])
def test_bad_messages(messages, needle):
    assert needle in _err(parse_chat, {"messages": messages}, 10).message


def test_special_token_flags():
    msgs = [{"role": "user", "content": "x"}]
    default = parse_chat({"messages": msgs}, 100).params
    assert default.skip_special_tokens and not default.ignore_eos
    p = parse_chat({"messages": msgs, "skip_special_tokens": False, "ignore_eos": True}, 100).params
    assert not p.skip_special_tokens and p.ignore_eos


def test_completion_prompt_forms():
    assert parse_completion({"prompt": ["abc"]}, 10).prompt == "abc"
    assert parse_completion({"prompt": "abc"}, 10).params.max_new_tokens == 16
    assert "'prompt' must be a string" in _err(parse_completion, {"prompt": 3}, 10).message


def _split_all(text: str, in_thinking: bool, cuts: list[int]) -> tuple[str, str]:
    s = ThinkSplitter(in_thinking)
    r, c, prev = [], [], 0
    for cut in cuts + [len(text)]:
        a, b = s.feed(text[prev:cut])
        r.append(a)
        c.append(b)
        prev = cut
    a, b = s.flush()
    return "".join(r) + a, "".join(c) + b


def test_think_splitter_any_chunking():
    text = "<think>weigh a < b and </thi</think>\n\nThe answer is <b>42</b>."
    for _ in range(200):
        cuts = sorted(random.sample(range(1, len(text)), random.randint(0, 12)))
        r, c = _split_all(text, False, cuts)
        assert r == "weigh a < b and </thi"
        assert c == "The answer is <b>42</b>."


def test_think_splitter_prompt_opened_thinking():
    assert prompt_opens_thinking("<|User|>hi<|Assistant|><think>\n")
    assert not prompt_opens_thinking("<think>x</think> hi")
    r, c = _split_all("plan...</think>done", True, [3, 9])
    assert (r, c) == ("plan...", "done")


def test_glm_reasoning_opens_after_the_assistant_header(tiny_model):
    """GLM-4.5 writes "\n<think>REASONING</think>\nANSWER" after <|assistant|> (the prompt opens
    nothing): the split starts outside the block and drops the template's newlines; the turn,
    given back as reasoning_content + content, renders as exactly what the model wrote. With
    thinking off the prompt holds an empty block; forced thinking appends GLM's own opener."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("glm4_moe", "f32", with_safetensors=False))
    msgs = [{"role": "user", "content": "Why?"}]
    on = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert on.endswith("<|assistant|>") and not prompt_opens_thinking(on)
    assert off.endswith("Why?/nothink<|assistant|>\n<think></think>") and not prompt_opens_thinking(off)
    reply = "\n<think>weigh a < b and </thi</think>\nThe answer is <b>42</b>."
    for _ in range(100):
        cuts = sorted(random.sample(range(1, len(reply)), random.randint(0, 12)))
        assert _split_all(reply, False, cuts) == ("weigh a < b and </thi", "The answer is <b>42</b>.")
    turn = {"role": "assistant", "content": "The answer is <b>42</b>.", "reasoning_content": "weigh a < b and </thi"}
    assert tok.apply_chat_template(msgs + [turn], tokenize=False) == on + reply
    assert think_opener(tok) == "\n<think>"
    forced, thinking = chat_prompt(tok, msgs, force_think=True)
    assert thinking and forced == on + "\n<think>" and prompt_opens_thinking(forced)
    assert _split_all("plan</think>\nok", True, [2]) == ("plan", "ok")


def test_minimax_prompt_opens_the_reasoning(tiny_model):
    """MiniMax-M2's generation prompt ends inside "<think>\n": the reply starts as reasoning, and
    forcing thinking appends nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("minimax_m2", "f32", with_safetensors=False))
    msgs = [{"role": "user", "content": "Why?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("]~b]user\nWhy?[e~[\n]~b]ai\n<think>\n") and prompt_opens_thinking(text)
    assert chat_prompt(tok, msgs, force_think=True) == (text, True)
    reply = "weigh a < b</think>\n\nThe answer is 42."
    for _ in range(50):
        cuts = sorted(random.sample(range(1, len(reply)), random.randint(0, 8)))
        assert _split_all(reply, True, cuts) == ("weigh a < b", "The answer is 42.")


def test_stream_lines_survive_every_line_reader():
    """A model may write U+2028, U+2029 or U+0085, which JSON leaves raw but str.splitlines (and
    so httpx's iter_lines) breaks lines at: an SSE event or NDJSON object must stay one line."""
    obj = {"delta": {"content": "a\u2028b\u0085c\u2029d\n\re\u4e2d"}}
    text = one_line_json(obj)
    assert len(text.splitlines()) == 1 and json.loads(text) == obj
    assert "\u4e2d" in text                          # other text stays UTF-8, not escaped
