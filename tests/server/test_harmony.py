"""gpt-oss's harmony format in the server: the `analysis` channel is the reasoning
(`reasoning_content`), the `final` channel the content, headers and markers in neither — for any
chunking of the stream, through the real tokenizer and detokenizer of a generated gpt-oss model,
and on a live server."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from ktrans.engine import RequestOutput
from ktrans.engine.detokenizer import IncrementalDetokenizer
from ktrans_server.protocol import parse_chat
from ktrans_server.reasoning import HARMONY_MARKERS, HarmonySplitter
from live import LiveServer

REPLY = ("<|channel|>analysis<|message|>User greets; 2 < 3 so answer <b>briefly</b>.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Hello — 你好 🚀!<|return|>")
REASONING, CONTENT = "User greets; 2 < 3 so answer <b>briefly</b>.", "Hello — 你好 🚀!"


def _split(text: str, cuts: list[int]) -> tuple[str, str]:
    s = HarmonySplitter()
    r, c, prev = [], [], 0
    for cut in [*cuts, len(text)]:
        a, b = s.feed(text[prev:cut])
        r.append(a)
        c.append(b)
        prev = cut
    a, b = s.flush()
    return "".join(r) + a, "".join(c) + b


def test_any_chunking():
    for _ in range(300):
        cuts = sorted(random.sample(range(1, len(REPLY)), random.randint(0, 15)))
        assert _split(REPLY, cuts) == (REASONING, CONTENT)


@pytest.mark.parametrize("text, want", [
    ("no channels at all", ("", "no channels at all")),                          # headerless text is content
    ("<|channel|>analysis<|message|>still thinking", ("still thinking", "")),      # cut off by the length limit
    ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Done.",
     ("", "Let me check.Done.")),                                                  # preambles are for the user
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>fin", ("a", "")),  # header cut off
    ("<|channel|>analysis<|message|>x<|start|>assistant<|channel|>final<|message|>y", ("x", "y")),  # no <|end|>
])
def test_channels(text, want):
    assert _split(text, []) == want


@pytest.fixture(scope="module")
def live(tiny_model):
    srv = LiveServer(tiny_model("gpt_oss", "f32", with_safetensors=False))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def test_reasoning_channel_through_the_tokenizer(live):
    """The reply as gpt-oss's tokens (markers are single special tokens), decoded token by token
    as the engine does for a chat request, through the server's output chain."""
    service = live.service
    tok = service.engine.tokenizer
    spec = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, 16)
    prep = service.prepare(spec, "chatcmpl")
    assert prep.harmony and prep.keep_specials and prep.prompt_text.endswith("<|start|>assistant")
    ids = tok.encode(REPLY, add_special_tokens=False)
    assert all(len(tok.encode(m, add_special_tokens=False)) == 1 for m in HARMONY_MARKERS)
    params = prep.choice_params[0]
    detok = IncrementalDetokenizer(tok, prep.prompt_ids, skip_special_tokens=params.skip_special_tokens)
    proc = service.processor(prep, spec)
    reasoning, content = "", ""
    for n, i in enumerate(ids):
        last = n == len(ids) - 1
        text = detok.add(i) + (detok.flush() if last else "")
        d = proc.feed(RequestOutput("r", [i], text, last, "stop" if last else None, len(prep.prompt_ids), n + 1))
        reasoning, content = reasoning + d.reasoning, content + d.content
    assert (reasoning, content) == (REASONING, CONTENT)


def test_chat_completion_keeps_markers_out(live):
    """A real (random-weight) generation: whatever channels it writes, no marker reaches the
    reply, and the streamed pieces add up to the whole message."""
    body = {"messages": [{"role": "user", "content": "Why?"}], "max_tokens": 16, "temperature": 0}
    msg = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    text = (msg.get("content") or "") + (msg.get("reasoning_content") or "")
    assert not any(m in text for m in HARMONY_MARKERS), msg
    raw = httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120).text
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in raw.split("\n\n")
              if e.startswith("data: {")]
    assert "".join(d.get("content") or "" for d in deltas) == (msg.get("content") or "")
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == (msg.get("reasoning_content") or "")
