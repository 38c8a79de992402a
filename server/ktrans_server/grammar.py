"""Structured output enforced during sampling, with llguidance (a Rust grammar engine on PyPI).

Each step, a request's grammar says which tokens may come next; the sampler sets the others to
-inf (ktrans.engine.sampler.TokenConstraint), so the answer follows the JSON schema (or the tool-
call format) by construction, with no retries. JSON is compact (no free whitespace): a model
cannot wander off into endless blanks, and every client parses it the same.

With a thinking model whose prompt opens <think>, the grammar starts after </think>: the model
reasons freely, then answers in the required shape.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np
import torch

from ktrans_server.errors import bad_request

log = logging.getLogger("ktrans.server")
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Grammars for one model's tokenizer (llguidance's view of it is built once, lazily)."""

    def __init__(self, tokenizer, eos_ids: set[int], vocab_size: int):
        self.tokenizer = tokenizer
        self.eos_ids = sorted(eos_ids)
        self.vocab_size = vocab_size
        self._ll = None
        self._lock = threading.Lock()

        self._error: str | None = None

    def warm_up(self) -> None:
        """Build llguidance's view of the vocabulary now (about a second for a large one)."""
        try:
            self.ll_tokenizer
        except Exception as e:      # noqa: BLE001 — structured output is then refused, with this reason
            self._error = f"{type(e).__name__}: {e}"
            log.warning("structured output and tool_choice \"required\" are unavailable: %s", self._error)

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._error is not None:
                raise bad_request(f"Structured output is unavailable for this model's tokenizer: {self._error}")
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=max(self.vocab_size, len(self.tokenizer)),
                                                        eos_token=self.eos_ids or None)
            return self._ll

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (part of a UTF-8 character, possibly)."""
        if self._error is not None:     # without llguidance: the token's own text
            return self.tokenizer.decode([token_id]).encode()
        b = self.ll_tokenizer.decode_bytes([token_id])
        return b[1:] if b[:1] == b"\xff" else b    # llguidance marks special tokens with 0xFF

    def literal(self, text: str) -> str:
        """`text` as a Lark terminal: a special token by id where the vocabulary has one for it
        (text never matches a special token), else the string."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.ll_tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def from_schema(self, schema: dict[str, Any], param: str) -> str:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise bad_request(f"'{param}' is not a usable JSON schema: {e}", param=param) from None
        return self._checked(grammar, param)

    def from_lark(self, lark: str, param: str) -> str:
        import llguidance

        return self._checked(llguidance.LLMatcher.grammar_from_lark(lark), param)

    def _checked(self, grammar: str, param: str) -> str:
        import llguidance

        err = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if err and not err.startswith("WARNING"):
            raise bad_request(f"'{param}' cannot be enforced: {err}", param=param)
        return grammar

    def constraint(self, grammar: str, start_after: int | None = None) -> "GrammarConstraint":
        import llguidance

        return GrammarConstraint(llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0),
                                 self.eos_ids, start_after)


def json_schema_lark(schema: dict[str, Any]) -> str:
    """A Lark rule body holding a compact-JSON schema (for grammars that embed JSON)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class GrammarConstraint:
    """One request's grammar state (engine TokenConstraint)."""

    def __init__(self, matcher, eos_ids: list[int], start_after: int | None):
        self.matcher = matcher
        self.eos_ids = eos_ids
        self.active = start_after is None
        self.start_after = start_after
        self.error: str | None = None

    def allowed(self) -> torch.Tensor | None:
        if not self.active:
            return None
        if self.matcher.is_error():
            return self._only_eos(self.matcher.get_error())
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.from_numpy(bits.astype(bool))
        if not bool(mask.any()):
            return self._only_eos("the grammar allows no further token")
        return mask

    def _only_eos(self, why: str) -> torch.Tensor:
        # NOTE: never an empty mask (the sampler would have nothing to choose from): end the
        # request instead, and keep the reason for the response.
        if self.error is None:
            self.error = why
            log.warning("structured output stopped: %s", why)
        mask = torch.zeros(max(self.eos_ids, default=0) + 1, dtype=torch.bool)
        mask[self.eos_ids] = True
        return mask

    def accept(self, token_id: int) -> None:
        if not self.active:
            self.active = token_id == self.start_after
            return
        if self.error is None and not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        return self.active and (self.matcher.is_stopped() or self.error is not None)
