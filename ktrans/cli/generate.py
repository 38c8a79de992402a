"""`ktrans generate`: one completion for scripts, and the simplest way to check a model.

The prompt comes from --prompt, --prompt_file or stdin; --chat wraps it in the model's chat
template. Only the completion goes to stdout (streamed); load and speed figures go to stderr.
--json prints one JSON object instead: prompt and completion text and token ids, finish reason
and timings.

Also home of what `ktrans chat` shares with it: the sampling flags, chat-template prompts and
`run_request()`, which drives the engine for one request and measures it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

from ktrans.cli import model_args
from ktrans.engine.request import SamplingParams
from ktrans.engine.thinking import think_opener
from ktrans.errors import KtransError, UsageError
from ktrans.fit import counts as expert_counts


def add_sampling_args(parser, *, temperature: float = 0.6, top_p: float = 0.95) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help=f"0 = greedy (default {temperature})")
    g.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=top_p, metavar="P",
                   help=f"keep the most likely tokens holding P of the mass (default {top_p})")
    g.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, metavar="K",
                   help="keep the K most likely tokens (default 0 = off)")
    g.add_argument("--min_p", "--min-p", dest="min_p", type=float, default=0.0, metavar="P",
                   help="drop tokens below P x the top probability (default 0 = off)")
    g.add_argument("--repetition_penalty", "--repetition-penalty", dest="repetition_penalty",
                   type=float, default=1.0, metavar="X", help="penalise tokens already seen (default 1 = off)")
    g.add_argument("--presence_penalty", "--presence-penalty", dest="presence_penalty", type=float,
                   default=0.0, metavar="X", help="OpenAI-style, in [-2, 2] (default 0)")
    g.add_argument("--frequency_penalty", "--frequency-penalty", dest="frequency_penalty", type=float,
                   default=0.0, metavar="X", help="OpenAI-style, in [-2, 2] (default 0)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore_eos", "--ignore-eos", dest="ignore_eos", action="store_true",
                   help="keep generating past the end-of-text token")


def sampling_params(args) -> SamplingParams:
    p = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                       frequency_penalty=args.frequency_penalty, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, stop=list(args.stop), ignore_eos=args.ignore_eos)
    try:
        return p.validate()
    except KtransError as e:
        raise UsageError(str(e).replace("sampling parameter ", "flag --")) from None


def chat_prompt(tokenizer, messages: list[dict], force_think: bool = False) -> tuple[str, bool]:
    """The templated prompt text and whether the reply starts inside <think>."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:       # ChatML, the most common format, when the model ships no template
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n"
    if force_think and not text.rstrip().endswith("<think>"):
        text += think_opener(tokenizer)             # "<think>\n", or as the template opens it (GLM-4.5)
    return text, text.rstrip().endswith("<think>")


def encode(tokenizer, text: str, templated: bool) -> list[int]:
    # NOTE: a chat template already writes BOS; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=not templated)


@dataclass
class Generation:
    prompt_token_ids: list[int]
    completion_token_ids: list[int] = field(default_factory=list)
    completion: str = ""
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0   # prompt tokens the prefix cache served (not prefilled)
    ttft_s: float = 0.0          # request added -> first token (the prefill)
    decode_s: float = 0.0        # first token -> last token
    total_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens actually prefilled per second until the first token."""
        n = len(self.prompt_token_ids) - self.num_cached_tokens
        return n / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = len(self.completion_token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def stats_line(self) -> str:
        cached = f" ({self.num_cached_tokens} cached)" if self.num_cached_tokens else ""
        return (f"prompt {len(self.prompt_token_ids)} tok{cached} | prefill {self.prefill_tok_s:.1f} tok/s | "
                f"decode {self.decode_tok_s:.1f} tok/s ({len(self.completion_token_ids)} tok) | "
                f"TTFT {self.ttft_s:.2f} s")


def run_request(engine, prompt_ids: list[int], params: SamplingParams, on_text=None,
                should_stop=None, request_id: str = "cli") -> Generation:
    """Step the engine until this request ends; `on_text(str)` gets streamed text and
    `should_stop()` is polled between steps (True aborts the request, finish_reason "abort")."""
    gen = Generation(list(prompt_ids))
    t0 = time.perf_counter()
    t_first = None
    engine.add_request(request_id, prompt_ids, params)
    while gen.finish_reason is None:
        if should_stop is not None and should_stop():
            engine.abort(request_id)
            gen.finish_reason = "abort"
            break
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if out.new_token_ids and t_first is None:
                t_first = time.perf_counter()
            gen.completion_token_ids += out.new_token_ids
            gen.completion += out.new_text
            gen.num_cached_tokens = out.num_cached_tokens
            if out.new_text and on_text is not None:
                on_text(out.new_text)
            if out.finished:
                gen.finish_reason, gen.error = out.finish_reason, out.error
    t_end = time.perf_counter()
    gen.total_s = t_end - t0
    gen.ttft_s = (t_first or t_end) - t0
    gen.decode_s = t_end - (t_first or t_end)
    return gen


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate one completion (for scripts and quick checks)",
                       description="Generate one completion. The prompt comes from --prompt, --prompt_file "
                                   "or stdin; only the completion is printed (stats go to stderr).")
    src = p.add_argument_group("prompt")
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt_file", "--prompt-file", dest="prompt_file", help="read the prompt from a file")
    src.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    src.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print prompt/completion text, token ids and timings as JSON")
    model_args.add_model_args(p, max_new_tokens=256)
    add_sampling_args(p)
    p.set_defaults(func=run)


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give the prompt with either --prompt or --prompt_file, not both")
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"--prompt_file {args.prompt_file}: {e.strerror}") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: use --prompt TEXT, --prompt_file FILE, or pipe it on stdin")
    text = sys.stdin.read()
    if not text.strip():
        # NOTE: an empty pipe is almost always a mistake upstream (a failed command, a wrong file);
        # generating from nothing would hide it.
        raise UsageError("the prompt read from stdin is empty; pipe some text, or use --prompt TEXT")
    return text


def run(args) -> int:
    from ktrans.engine import LLMEngine

    text = _read_prompt(args)
    params = sampling_params(args)
    note = lambda msg: print(msg, file=sys.stderr)   # noqa: E731
    model_args.use_demo_model(args, note)
    t0 = time.perf_counter()
    engine = LLMEngine.from_args(**model_args.engine_kwargs(args), **model_args.runner_kwargs(args))
    load_s = time.perf_counter() - t0
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        text, _ = chat_prompt(engine.tokenizer, messages + [{"role": "user", "content": text}], args.force_think)
    prompt_ids = encode(engine.tokenizer, text, templated=args.chat)
    engine.scheduler.check_prompt(len(prompt_ids))
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    gen = run_request(engine, prompt_ids, params, on_text=stream)
    expert_counts.save_collected(engine.runner.model, expert_counts.model_id(args.model_path, args.gguf_path))
    if args.json:
        out = {"prompt": text, **asdict(gen), "load_s": load_s,
               "prefill_tok_s": gen.prefill_tok_s, "decode_tok_s": gen.decode_tok_s}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        note(f"[ {gen.stats_line()} | load {load_s:.1f} s | finish {gen.finish_reason} ]")
    if gen.finish_reason == "error":
        raise KtransError(f"generation failed: {gen.error}")
    return 0
