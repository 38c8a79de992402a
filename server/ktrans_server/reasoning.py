"""Split a model's streamed text into reasoning and visible content.

Reasoning models (DeepSeek-R1/V3 chat templates, Qwen3) write their thinking between <think> and
</think>. With R1-style templates the prompt already ends in "<think>\\n", so the model only
emits the closing tag: the splitter then starts inside the reasoning. Tags may arrive split
across deltas, so a tail that could be the start of a tag is held back until it is decided.

gpt-oss speaks OpenAI's harmony format instead: its `analysis` channel is the reasoning
(ktrans.engine.harmony's HarmonySplitter, shared with the terminal chat).
"""

from __future__ import annotations

from ktrans.engine.harmony import HARMONY_MARKERS, HarmonySplitter, held_tail, is_harmony

__all__ = ["CLOSE", "HARMONY_MARKERS", "OPEN", "HarmonySplitter", "ThinkSplitter", "held_tail", "is_harmony",
           "prompt_opens_thinking"]

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an open <think> block."""
    i, j = prompt_text.rfind(OPEN), prompt_text.rfind(CLOSE)
    return i >= 0 and i > j


class ThinkSplitter:
    def __init__(self, in_thinking: bool = False):
        self.in_thinking = in_thinking
        self._buf = ""
        self._seen_content = False

    def feed(self, text: str) -> tuple[str, str]:
        """Returns (reasoning_delta, content_delta) decided so far."""
        self._buf += text
        reasoning, content = [], []
        while True:
            tag = CLOSE if self.in_thinking else OPEN
            i = self._buf.find(tag)
            if i < 0:
                keep = held_tail(self._buf, tag)
                out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                (reasoning if self.in_thinking else content).append(out)
                break
            (reasoning if self.in_thinking else content).append(self._buf[:i])
            self._buf = self._buf[i + len(tag):]
            self.in_thinking = not self.in_thinking
        r, c = "".join(reasoning), "".join(content)
        if not self._seen_content:
            # NOTE: templates put a newline or two after </think>; strip them from the answer start.
            c = c.lstrip("\n")
            self._seen_content = bool(c)
        return r, c

    def flush(self) -> tuple[str, str]:
        rest, self._buf = self._buf, ""
        return (rest, "") if self.in_thinking else ("", rest)
