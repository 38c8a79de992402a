"""The engine's per-request state and the two dataclasses its callers see.

`SamplingParams` comes in with a request, `RequestOutput` goes out after every step that produced
something for it. `Request` is the engine's own record: the scheduler reads `num_computed_tokens`
(tokens whose KV is in the cache) against `num_tokens` (prompt + generated so far); the difference
is what still has to run through the model.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ktrans.errors import KtransError


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy (argmax after penalties)
    top_p: float = 1.0                # nucleus mass kept, (0, 1]
    top_k: int = 0                    # keep the k most likely tokens; 0 = all
    min_p: float = 0.0                # drop tokens below min_p x the top probability
    repetition_penalty: float = 1.0   # HF-style, over prompt + output tokens; 1 = off
    presence_penalty: float = 0.0     # OpenAI-style, over output tokens, [-2, 2]
    frequency_penalty: float = 0.0    # OpenAI-style, over output tokens, [-2, 2]
    seed: int | None = None           # per-request generator: same seed -> same sample
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)           # stop strings (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # False: special tokens (<think>, EOS, ...) appear in the text
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to a token's logit before sampling
    logprobs: int | None = None       # report each chosen token's logprob and this many alternatives
    # Restricts which tokens may come next (a grammar, say): see ktrans.engine.sampler.TokenConstraint.
    # Stateful, so one object per request.
    constraint: Any = None

    def validate(self) -> "SamplingParams":
        """Raise KtransError naming the first bad parameter; returns self for chaining."""
        checks = [
            ("temperature", _finite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "> 0 (1 = off)"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2]"),
            ("seed", self.seed is None or _is_int(self.seed), "an integer or null"),
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list)
             and all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids >= 0"),
            ("logit_bias", isinstance(self.logit_bias, dict) and all(
                _is_int(t) and t >= 0 and _finite(b) for t, b in self.logit_bias.items()),
             "a map of token ids >= 0 to finite numbers"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             "null or an integer >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise KtransError(f"invalid sampling parameter {name}={getattr(self, name)!r}; "
                                  f"expected {expected}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]          # tokens generated since the previous output
    new_text: str                     # text released since the previous output (stop strings held back)
    finished: bool
    finish_reason: str | None         # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache (not prefilled)
    # With SamplingParams.logprobs: per new token (token id, its logprob, [(id, logprob)] of the
    # most likely alternatives), from the model's own distribution (before penalties and sampling).
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class Status(enum.Enum):
    WAITING = "waiting"     # queued, or preempted and waiting to recompute its KV
    RUNNING = "running"     # holds KV pages and a batch slot
    FINISHED = "finished"


class Request:
    """One generation: token lists, progress through the model, and its finish state."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.num_computed_tokens = 0        # tokens whose KV is in the cache
        self.num_cached_tokens = 0          # of the prompt, found in the prefix cache on admission
        self.slot: int | None = None        # batch slot while RUNNING (ForwardBatch.seq_ids)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.first_token_time: float | None = None
        # Filled by the engine: sampler RNG and incremental detokenizer of this request.
        self.generator = None
        self.detokenizer = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens: what the KV cache must hold before the next sample."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
