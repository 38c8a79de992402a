"""Incremental detokenization: text released token by token, equal in the end to decode(all).

Two things make this harder than decoding each token alone:
- One character can span tokens (byte-level BPE splits multi-byte UTF-8, e.g. emoji and CJK), and
  a token's text can depend on its left neighbour (leading-space handling). So each step decodes a
  short window of tokens twice, with and without the new ones, and releases the difference, but
  only once it no longer ends in U+FFFD (an incomplete character).
- Stop strings can span tokens. Text that could still turn into a stop string is held back until
  it either does (the request stops; the stop string and everything after it are dropped) or
  cannot any more (the text is released).
"""

from __future__ import annotations

# Prompt tokens kept as left context so the first output token decodes as it would in place.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self._ids = self._clean_context(prompt_token_ids)
        self._prefix_offset = 0                  # window start in _ids
        self._read_offset = len(self._ids)       # first id whose text is not yet in self.text
        self.text = ""                           # decoded output text so far (stop string cut off)
        self._released = 0                       # chars of self.text handed to the caller
        self.stopped = False                     # a stop string was found

    def _clean_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The longest tail of at most _CONTEXT_TOKENS prompt tokens that decodes cleanly.
        NOTE: a tail starting inside a multi-byte character would decode to U+FFFD, and with
        byte-fallback tokenizers (Llama's <0xNN> tokens) one bad byte turns its whole run of byte
        tokens into U+FFFD, output bytes included."""
        for n in range(min(_CONTEXT_TOKENS, len(prompt_token_ids)), 0, -1):
            tail = list(prompt_token_ids[-n:])
            if "\ufffd" not in self._decode(tail):
                return tail
        return []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text that can be shown now (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held (an incomplete character decodes as
        U+FFFD, exactly as decode() of all tokens would show it)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            self.text += self._decode(self._ids[self._prefix_offset:])[len(prefix):]
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            self._find_stop()
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._partial_stop_len()
        end = max(end, self._released)
        out = self.text[self._released:end]
        self._released = end
        return out

    def _find_stop(self) -> None:
        # Only text that could contain a stop string not seen before is searched.
        start = max(0, self._released - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
