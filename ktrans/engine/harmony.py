"""gpt-oss's harmony output format, split into reasoning and what the user sees.

After the prompt's `<|start|>assistant` gpt-oss writes messages
`<|channel|>NAME<|message|>BODY<|end|>`, the next opened by `<|start|>assistant` again, the last
ended by `<|return|>` (or `<|call|>`). The `analysis` channel is its reasoning; `final` (and
`commentary`, its preambles) is what the user sees. `HarmonySplitter` routes each message's body
by its channel and drops the headers; markers may arrive split across deltas, so a tail that
could start one is held back until it is decided. The server's output chain and the terminal
chat both use it (the text must be decoded with special tokens kept: the markers are special
tokens in gpt-oss's vocabulary).
"""

from __future__ import annotations

H_START, H_CHANNEL, H_MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
H_ENDS = ("<|end|>", "<|return|>", "<|call|>")
HARMONY_MARKERS = (H_START, H_CHANNEL, H_MESSAGE, "<|constrain|>", *H_ENDS)
REASONING_CHANNEL = "analysis"


def is_harmony(vocab) -> bool:
    """True when the vocabulary has harmony's channel and message markers (gpt-oss)."""
    return H_CHANNEL in vocab and H_MESSAGE in vocab


def held_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class HarmonySplitter:
    """Harmony output (the text after `<|start|>assistant`, markers kept) -> (reasoning, content).

    A message's header (role, `<|channel|>NAME`, recipient, `<|constrain|>...`) is held until its
    `<|message|>`; the body then goes to reasoning (analysis channel) or content (any other) up
    to an end marker or a new `<|start|>`. Text the model writes without any header is content.
    """

    def __init__(self):
        self._buf = ""
        self._in_body = False
        self._to_reasoning = False

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = [], []
        while self._step(reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def _step(self, reasoning: list[str], content: list[str]) -> bool:
        """Consume what can be decided now; True to go on."""
        if not self._in_body:
            i = self._buf.find(H_MESSAGE)
            if i < 0:
                return False                                   # header not complete: hold
            header, self._buf = self._buf[:i], self._buf[i + len(H_MESSAGE):]
            channel = header.split(H_CHANNEL, 1)[1] if H_CHANNEL in header else ""
            self._to_reasoning = channel.split()[0:1] == [REASONING_CHANNEL] if channel else False
            self._in_body = True
            return True
        out = reasoning if self._to_reasoning else content
        ends = [(j, m) for m in (*H_ENDS, H_START) if (j := self._buf.find(m)) >= 0]
        if not ends:
            keep = max(held_tail(self._buf, m) for m in (*H_ENDS, H_START))
            out.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        j, m = min(ends)
        out.append(self._buf[:j])
        self._buf = self._buf[j + (0 if m == H_START else len(m)):]
        self._in_body = False
        return True

    def flush(self) -> tuple[str, str]:
        """What is left: a body in progress goes to its channel; a header that never reached
        `<|message|>` is content unless it holds a harmony marker (then it was a cut-off header)."""
        rest, self._buf = self._buf, ""
        if self._in_body:
            return (rest, "") if self._to_reasoning else ("", rest)
        if any(m in rest for m in HARMONY_MARKERS):
            return "", ""
        return "", rest
