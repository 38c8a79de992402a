"""Shapes shared by the OpenAI routes: usage, tool calls, and logprobs in both the chat form
(`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`) and the legacy completions form
(`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`)."""

from __future__ import annotations

import json
from typing import Any, Callable

from ktrans_server.service import RequestStats
from ktrans_server.tools import ToolCall


# Characters JSON leaves unescaped that many line readers (Python's str.splitlines, and so
# httpx's iter_lines) take for line breaks: one event or NDJSON object would arrive in pieces.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
_LINE_BREAK_TABLE = str.maketrans(_LINE_BREAKS)


def one_line_json(obj: Any) -> str:
    """Compact JSON (UTF-8 text kept as is) that is one line for every line reader."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.translate(_LINE_BREAK_TABLE) if any(c in text for c in _LINE_BREAKS) else text


def usage(stats: RequestStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def tool_call(call: ToolCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _token(token_bytes: Callable[[int], bytes], tid: int, lp: float) -> dict[str, Any]:
    b = token_bytes(tid)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}


def chat_logprobs(entries: list[tuple], token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
    content = []
    for tid, lp, alts in entries:
        item = _token(token_bytes, tid, lp)
        item["top_logprobs"] = [_token(token_bytes, a, alp) for a, alp in alts]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[tuple], token_bytes: Callable[[int], bytes],
                        offset: int, hidden: set[int] = frozenset()) -> dict[str, Any]:
    """Legacy shape; `offset` is the text offset of the first token (text before it included).
    Tokens in `hidden` (special tokens the text leaves out) count as "", so offsets match the text."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, lp, alts in entries:
        text = "" if tid in hidden else token_bytes(tid).decode("utf-8", errors="replace")
        tokens.append(text)
        lps.append(lp)
        top: dict[str, float] = {}
        for a, alp in alts:      # most likely first: a string two tokens share keeps the higher
            top.setdefault(token_bytes(a).decode("utf-8", errors="replace"), alp)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
