"""Output processors: one generated choice's engine outputs turned into what the APIs render.

Each processor is a small class with `feed(text)` and `finish()`, chained per choice:
special-token filter -> reasoning splitter (<think> tags, or gpt-oss's harmony channels:
reasoning vs content) -> tool-call parser (calls vs content). `ChoiceProcessor` runs the chain on every RequestOutput and hands back a `Delta`; the
routes only render deltas (OpenAI chunks or messages, Ollama lines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ktrans.engine import RequestOutput
from ktrans_server.reasoning import HarmonySplitter, ThinkSplitter, held_tail
from ktrans_server.tools import PYTHON_TAG, ToolCall, ToolFormat


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple] = field(default_factory=list)   # (token id, logprob, [(id, logprob)])
    finish_reason: str | None = None     # on the last delta: "stop" | "length" | "tool_calls"

    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls or self.token_ids or self.logprobs
                    or self.finish_reason)


class SpecialTokenFilter:
    """Removes special tokens' text from a stream decoded with special tokens kept (which the
    think and tool-call markers need when the vocabulary makes them special tokens)."""

    def __init__(self, strip: set[str]):
        self.strip = sorted((s for s in strip if s), key=len, reverse=True)

    def feed(self, text: str) -> str:
        for s in self.strip:
            if s in text:
                text = text.replace(s, "")
        return text


class ToolCallParser:
    """Content text in, (content, complete tool calls) out; a call is released once whole."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._buf = ""
        self._inside = False
        self._decided = False        # at_start_only formats: the answer's first text was seen
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step(content, calls):
            pass
        self.num_calls += len(calls)
        return self._clean("".join(content)), calls

    def _step(self, content: list[str], calls: list[ToolCall]) -> bool:
        """Consume what can be decided now; True to go on."""
        fmt = self.fmt
        if self._inside:
            j = self._buf.find(fmt.end) if fmt.end else -1
            if j < 0:
                return False
            body, self._buf = self._buf[:j], self._buf[j + len(fmt.end):]
            self._close(body, content, calls, closed=True)
            return True
        if fmt.at_start_only:
            return self._step_at_start(content)
        i = self._buf.find(fmt.start)
        if i < 0:
            keep = max(held_tail(self._buf, m) for m in (fmt.start, *fmt.drop))
            content.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        content.append(self._buf[:i])
        self._buf, self._inside = self._buf[i + len(fmt.start):], True
        return True

    def _step_at_start(self, content: list[str]) -> bool:
        if self._decided:
            content.append(self._buf)
            self._buf = ""
            return False
        head = self._buf.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            return False                       # not decided yet: hold
        self._decided = True
        if head.startswith((self.fmt.start, PYTHON_TAG)):
            self._buf, self._inside = head, True    # the body includes its opening brace
            return False
        return True

    def _close(self, body: str, content: list[str], calls: list[ToolCall], closed: bool) -> None:
        parsed = self.fmt.parse_body(body)
        if parsed is None:                   # not a well-formed call (or cut short): it stays text
            start = "" if self.fmt.at_start_only else self.fmt.start
            content.append(start + body + (self.fmt.end if closed and self.fmt.end else ""))
        else:
            calls.extend(parsed)
        self._inside = False

    def finish(self) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._inside:
            body, self._buf = self._buf, ""
            self._close(body, content, calls, closed=False)
        content.append(self._buf)
        self._buf = ""
        self.num_calls += len(calls)
        return self._clean("".join(content)), calls

    def _clean(self, text: str) -> str:
        for m in self.fmt.drop:
            text = text.replace(m, "")
        return text


class ChoiceProcessor:
    """The chain for one choice."""

    def __init__(self, *, in_thinking: bool | None, tool_format: ToolFormat | None,
                 strip_specials: set[str] | None = None, harmony: bool = False):
        self.filter = SpecialTokenFilter(strip_specials) if strip_specials else None
        self.think = HarmonySplitter() if harmony else ThinkSplitter(in_thinking) if in_thinking is not None else None
        self.tools = ToolCallParser(tool_format) if tool_format is not None else None

    def feed(self, out: RequestOutput) -> Delta:
        d = Delta(token_ids=list(out.new_token_ids), logprobs=list(out.logprobs or []))
        self._text(out.new_text, d)
        if out.finished:
            self._flush(d)
            calls = self.tools is not None and self.tools.num_calls > 0
            d.finish_reason = "length" if out.finish_reason == "length" else "tool_calls" if calls else "stop"
        return d

    def _text(self, text: str, d: Delta) -> None:
        if self.filter:
            text = self.filter.feed(text)
        r, c = self.think.feed(text) if self.think else ("", text)
        d.reasoning += r
        self._content(c, d)

    def _content(self, c: str, d: Delta) -> None:
        if self.tools and c:
            c, calls = self.tools.feed(c)
            d.tool_calls += calls
        d.content += c

    def _flush(self, d: Delta) -> None:
        if self.think:
            r, c = self.think.flush()
            d.reasoning += r
            self._content(c, d)
        if self.tools:
            c, calls = self.tools.finish()
            d.content += c
            d.tool_calls += calls
