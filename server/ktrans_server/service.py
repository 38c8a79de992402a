"""The bridge between HTTP handlers and the engine: prompts, context limits, running a request.

One `Service` per server. It owns the engine once loading finishes (/health answers 503 until
then), renders chat prompts with the model's own template (tools included), refuses prompts that
do not fit the context with both numbers, builds the grammar a request's output must follow, and
runs generations (`Run`: n choices of one prompt) so that a request that ends early for any
reason (client gone, error, cancel) is aborted in the engine and its KV pages freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ktrans.engine import QueueFullError, RequestOutput
from ktrans.engine.thinking import DEFAULT_OPENER, think_opener
from ktrans.errors import KtransError
from ktrans_server.errors import bad_request, loading, overloaded
from ktrans_server.grammar import GrammarCompiler
from ktrans_server.http_guard import Limits
from ktrans_server.model_info import ModelFacts, model_facts
from ktrans_server.outputs import ChoiceProcessor
from ktrans_server.protocol import GenerationSpec
from ktrans_server.reasoning import CLOSE, HARMONY_MARKERS, OPEN, is_harmony, prompt_opens_thinking
from ktrans_server.tools import ToolFormat, detect_format, forced_grammar, markers

log = logging.getLogger("ktrans.server")


@dataclass
class Settings:
    model_name: str = "ktrans"
    served_model_names: list[str] = field(default_factory=list)
    max_new_tokens: int = 1024       # default completion length when the client sends none
    force_think: bool = False
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    ping_interval: float = 15.0      # SSE comment pings while a stream is silent (long prefill)
    limits: Limits = field(default_factory=Limits)
    chat_template: str | None = None  # replaces the model's own template (--chat-template)

    def __post_init__(self):
        self.limits.api_key = self.api_key
        self.limits.allowed_origins = list(self.cors_origins)


@dataclass
class Prepared:
    request_id: str
    prompt_text: str
    prompt_ids: list[int]
    in_thinking: bool                # the prompt ends inside <think>: output starts as reasoning
    grammar: str | None = None       # llguidance grammar every choice's output must follow
    choice_params: list = field(default_factory=list)   # SamplingParams per choice (own seed, grammar state)
    tool_format: ToolFormat | None = None
    keep_specials: bool = False      # decode special tokens (markers) and filter the rest out
    harmony: bool = False            # gpt-oss's harmony channels: `analysis` is the reasoning


@dataclass
class RequestStats:
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine: Any = None
        self.load_error: str | None = None
        self.started_at = time.time()
        self.counters: dict[str, float] = {}
        self.facts = ModelFacts()
        self.grammars: GrammarCompiler | None = None
        self.tool_format: ToolFormat | None = None
        self.special_ids: set[int] = set()
        self.special_strings: set[str] = set()
        self.harmony = False                # the vocabulary speaks harmony (gpt-oss)
        self.think_opener = DEFAULT_OPENER
        self._max_token_bytes = 1 << 10
        self._ids = itertools.count()

    # -- state -----------------------------------------------------------------------------
    def attach(self, engine) -> None:
        """Take a loaded engine (called once, in a worker thread: it reads the vocabulary)."""
        tok = engine.tokenizer
        if self.settings.chat_template is not None:
            tok.chat_template = self.settings.chat_template
        core = getattr(engine, "engine", engine)
        vocab = getattr(engine.config, "vocab_size", None) or len(tok)
        self.grammars = GrammarCompiler(tok, set(getattr(core, "eos_token_ids", ()) or ()), vocab)
        self.tool_format = detect_format(getattr(tok, "chat_template", None))
        # Every token decode(skip_special_tokens=True) leaves out: the named special tokens and the
        # added tokens flagged special (which all_special_ids may not list).
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        self.special_ids = set(tok.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        self.special_strings = {tok.convert_ids_to_tokens(i) for i in self.special_ids}
        self.harmony = is_harmony(tok.get_vocab())
        self.think_opener = think_opener(tok)        # what `think` appends: "<think>\n", GLM-4.5's "\n<think>"
        # NOTE: no token covers more UTF-8 bytes than its vocabulary string's encoding (byte-level
        # BPE spells each byte with one 1- or 2-byte character), so text longer than
        # context x this bound cannot fit and is refused before tokenizing.
        self._max_token_bytes = max((len(t.encode()) for t in tok.get_vocab()), default=1 << 10)
        runner = getattr(core, "runner", None)
        try:
            self.facts = model_facts(runner.weights) if runner is not None else ModelFacts()
        except Exception as e:       # listing facts must never keep a loaded model from serving
            log.warning("could not read the model's size and quantization: %s", e)
        self.grammars.warm_up()
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def require_engine(self):
        if self.engine is None:
            raise loading()
        return self.engine

    def names(self) -> list[str]:
        return self.settings.served_model_names or [self.settings.model_name]

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}{next(self._ids):x}"

    # -- prompts (run off the event loop: templating, tokenizing and grammars take time) -------
    async def prepare_async(self, spec: GenerationSpec, prefix: str) -> Prepared:
        self.require_engine()
        return await asyncio.to_thread(self.prepare, spec, prefix)

    def prepare(self, spec: GenerationSpec, prefix: str) -> Prepared:
        engine = self.require_engine()
        tok = engine.tokenizer
        self._refuse_oversized(spec)
        fmt = self._tool_format(spec)
        text = self._render_chat(tok, spec) if spec.messages is not None else spec.prompt or ""
        # NOTE: a rendered chat prompt already holds BOS where the template wants it; tokenizing
        # with special tokens again would add a second BOS.
        ids = tok.encode(text, add_special_tokens=spec.messages is None)
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt" if spec.messages is None else "messages")
        self._fit_context(len(ids), spec)
        in_thinking = prompt_opens_thinking(text) if spec.messages is not None else False
        prep = Prepared(self.new_id(prefix), text, ids, in_thinking, tool_format=fmt)
        prep.grammar = self._grammar(spec, fmt)
        prep.harmony = spec.messages is not None and self.harmony
        prep.keep_specials = spec.messages is not None and spec.params.skip_special_tokens and (
            fmt is not None or prep.harmony or OPEN in tok.get_vocab())
        # NOTE: here, off the event loop: building a grammar's matcher can take a while.
        prep.choice_params = [self._choice_params(prep, spec, i) for i in range(spec.n)]
        return prep

    def _refuse_oversized(self, spec: GenerationSpec) -> None:
        n_bytes = sum(len(str(m.get("content", "")).encode()) for m in spec.messages or [])
        n_bytes += len((spec.prompt or "").encode())
        n_ctx = self.engine.max_context
        at_least = -(-n_bytes // self._max_token_bytes)
        if at_least >= n_ctx:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens, but the prompt's {n_bytes} bytes "
                f"of text are at least {at_least} tokens. Shorten the prompt.",
                param="messages" if spec.messages is not None else "prompt",
                code="context_length_exceeded", n_prompt_tokens=at_least, n_ctx=n_ctx)

    def _tool_format(self, spec: GenerationSpec) -> ToolFormat | None:
        if not spec.tools or spec.tool_choice.mode == "none":
            return None
        if self.tool_format is None:
            raise bad_request("This model's chat template has no tool-call format (hermes <tool_call>, "
                              "DeepSeek tool-call tokens, Llama 3 JSON, Mistral [TOOL_CALLS], GLM's "
                              "<arg_key>/<arg_value> or MiniMax's <minimax:tool_call>), so it cannot be given "
                              "tools.", param="tools")
        return self.tool_format.for_tools(spec.tools)

    def _grammar(self, spec: GenerationSpec, fmt: ToolFormat | None) -> str | None:
        if spec.schema is not None:
            return self.grammars.from_schema(spec.schema, spec.schema_param)
        if fmt is not None and spec.tool_choice.mode == "required":
            return forced_grammar(fmt, spec.tools, spec.tool_choice.name, spec.parallel_tool_calls,
                                  self.grammars)
        return None

    def _render_chat(self, tok, spec: GenerationSpec) -> str:
        kwargs = dict(spec.extra_template_kwargs)
        if spec.think is not None:
            kwargs["enable_thinking"] = spec.think
        if spec.tools and spec.tool_choice.mode != "none":
            kwargs["tools"] = spec.tools
        try:
            text = tok.apply_chat_template(spec.messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # a template raising on odd message orders is the client's to fix
            raise bad_request(f"The model's chat template rejected these messages: {e}", param="messages") from None
        think = spec.think if spec.think is not None else self.settings.force_think
        if think and OPEN in tok.get_vocab() and not prompt_opens_thinking(text):
            text += self.think_opener
        return text

    def _fit_context(self, n_prompt: int, spec: GenerationSpec) -> None:
        n_ctx = self.engine.max_context
        if n_prompt >= n_ctx:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens, but the prompt has {n_prompt} "
                f"tokens. Shorten the prompt.", param="messages" if spec.messages is not None else "prompt",
                code="context_length_exceeded", n_prompt_tokens=n_prompt, n_ctx=n_ctx)
        room = n_ctx - n_prompt
        if spec.max_tokens_given and spec.params.max_new_tokens > room:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt} tokens "
                f"and max_tokens asks for {spec.params.max_new_tokens} more (at most {room} fit).",
                param="max_tokens", code="context_length_exceeded", n_prompt_tokens=n_prompt, n_ctx=n_ctx)
        if not spec.max_tokens_given:
            spec.params.max_new_tokens = min(spec.params.max_new_tokens, room)
        vocab = getattr(self.engine.config, "vocab_size", None)
        bad = [t for t in spec.params.logit_bias if vocab and t >= vocab]
        if bad:
            raise bad_request(f"'logit_bias' token id {bad[0]} is outside the vocabulary [0, {vocab}).",
                              param="logit_bias")
        try:
            spec.params.validate()
        except KtransError as e:
            raise bad_request(str(e)) from None

    # -- choices -------------------------------------------------------------------------------
    def processor(self, prep: Prepared, spec: GenerationSpec) -> ChoiceProcessor:
        """The output chain of one choice: chat output splits reasoning and parses tool calls."""
        if spec.messages is None:
            return ChoiceProcessor(in_thinking=None, tool_format=None)
        strip = None
        if prep.keep_specials:
            keep = {OPEN, CLOSE, *(markers(prep.tool_format) if prep.tool_format else []),
                    *(HARMONY_MARKERS if prep.harmony else [])}
            strip = self.special_strings - keep
        return ChoiceProcessor(in_thinking=prep.in_thinking, tool_format=prep.tool_format, strip_specials=strip,
                               harmony=prep.harmony)

    def _choice_params(self, prep: Prepared, spec: GenerationSpec, index: int):
        """Sampling parameters of choice `index`: its own seed and its own grammar state."""
        p = dataclasses.replace(spec.params, stop=list(spec.params.stop),
                                stop_token_ids=list(spec.params.stop_token_ids))
        if p.seed is not None and index:
            p.seed = (p.seed + index) % (2**63)
        if prep.keep_specials:
            p.skip_special_tokens = False
        if prep.grammar is not None:
            vocab = self.engine.tokenizer.get_vocab()
            start_after = vocab.get(CLOSE) if prep.in_thinking else None
            p.constraint = self.grammars.constraint(prep.grammar, start_after)
        return p

    # -- running ---------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params,
                       stats: RequestStats) -> AsyncIterator[RequestOutput]:
        """Engine outputs for one choice; the request is aborted however this iterator ends.
        Counts: admitted (started), refused by a full queue (rejected), ended early (aborted)."""
        engine = self.require_engine()
        refused, counted, finished = False, False, False
        try:
            async for out in engine.generate(request_id, prompt_ids, params):
                if not counted:
                    counted = True
                    self._count_start(len(prompt_ids))
                self._count_progress(out, stats)
                finished = out.finished
                yield out
        except QueueFullError:
            refused = True
            self.count("requests_rejected")
            raise overloaded() from None
        except KtransError as e:
            refused = True
            raise bad_request(str(e)) from None
        finally:
            if not refused and not counted:
                self._count_start(len(prompt_ids))     # admitted, then left before any output
            if not refused and not finished:
                # NOTE: synchronous on purpose: under cancellation (client gone) an await here
                # would be cancelled again before it ran.
                engine.abort(request_id)
                self.count("requests_aborted")

    def _count_start(self, n_prompt: int) -> None:
        self.count("requests_started")
        self.count("prompt_tokens", n_prompt)

    def _count_progress(self, out: RequestOutput, stats: RequestStats) -> None:
        if stats.first_token is None and out.num_output_tokens > 0:
            stats.first_token = time.monotonic()
            self.count("ttft_seconds_sum", stats.first_token - stats.start)
            self.count("ttft_count")
        n = len(out.new_token_ids)
        self.count("generation_tokens", n)
        stats.completion_tokens += n
        if out.finished:
            stats.finish_reason = out.finish_reason

    def log_request(self, endpoint: str, prep: Prepared | None, stats: RequestStats, status: int) -> None:
        now = time.monotonic()
        ttft = f"{(stats.first_token - stats.start) * 1000:.0f}ms" if stats.first_token else "-"
        gen_s = now - (stats.first_token or now)
        tps = f"{(stats.completion_tokens - 1) / gen_s:.1f}" if gen_s > 0 and stats.completion_tokens > 1 else "-"
        log.info("%s %s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s tok/s=%s finish=%s total=%.0fms",
                 endpoint, prep.request_id if prep else "-", status, stats.prompt_tokens,
                 stats.completion_tokens, ttft, tps, stats.finish_reason or "-", (now - stats.start) * 1000)
