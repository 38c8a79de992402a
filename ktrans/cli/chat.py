"""`ktrans chat` and local_chat.py: a terminal chat with a model, streamed, multi-turn.

The conversation is kept as chat messages and rendered with the model's chat template each turn.
Replies stream as they are generated; text inside <think>...</think> (gpt-oss: its harmony
`analysis` channel) is shown dimmed and is not fed back into the history. After each reply one line gives the prompt tokens, prefill and decode
speed and the time to the first token. Ctrl+C stops the current reply (the program goes on);
at the prompt, Ctrl+C twice or Ctrl+D leaves.

The chat is one client of the same LLMEngine the server uses, stepped synchronously here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

from ktrans.cli import model_args
from ktrans.cli.generate import add_sampling_args, chat_prompt, encode, run_request, sampling_params
from ktrans.engine.harmony import HarmonySplitter, is_harmony
from ktrans.errors import KtransError, UsageError
from ktrans.fit import counts as expert_counts

HELP = '''Commands:
  /help, /?            this help
  /clear               forget the conversation (the system prompt stays)
  /system <text>       set the system prompt and start over; /system alone shows it
  /exit, /quit, /bye   leave (Ctrl+D too)
Multi-line input: begin with """ and end with """. A line naming an existing file sends that
file; an empty line sends --prompt_file when given. Ctrl+C stops the current reply.'''

THINK_STYLE, TAG_STYLE, STATS_STYLE = "dim italic", "dim", "dim cyan"


class ThinkSplitter:
    """Splits streamed text into (text, inside_think) pieces; a tag split across chunks is held
    back until it is complete."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self._pending = ""
        self.answer = ""               # text outside <think>: what goes into the history

    def feed(self, text: str) -> list[tuple[str, str | None]]:
        """Pieces with their rich style (None = plain answer text)."""
        self._pending += text
        out: list[tuple[str, str | None]] = []
        while True:
            tag = self.CLOSE if self.thinking else self.OPEN
            i = self._pending.find(tag)
            if i < 0:
                keep = next((n for n in range(min(len(tag) - 1, len(self._pending)), 0, -1)
                             if self._pending.endswith(tag[:n])), 0)
                self._emit(self._pending[:len(self._pending) - keep], out)
                self._pending = self._pending[len(self._pending) - keep:]
                return out
            self._emit(self._pending[:i], out)
            out.append((tag, TAG_STYLE))
            self._pending = self._pending[i + len(tag):]
            self.thinking = not self.thinking

    def flush(self) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        self._emit(self._pending, out)
        self._pending = ""
        return out

    def _emit(self, text: str, out: list) -> None:
        if text:
            out.append((text, THINK_STYLE if self.thinking else None))
            if not self.thinking:
                self.answer += text


class HarmonyPieces:
    """gpt-oss's harmony reply as the chat shows it: the analysis channel styled as thinking, the
    final channel as the answer (the only part kept in the history), headers and markers dropped."""

    def __init__(self):
        self._split = HarmonySplitter()
        self.answer = ""

    def feed(self, text: str) -> list[tuple[str, str | None]]:
        return self._pieces(*self._split.feed(text))

    def flush(self) -> list[tuple[str, str | None]]:
        return self._pieces(*self._split.flush())

    def _pieces(self, reasoning: str, content: str) -> list[tuple[str, str | None]]:
        self.answer += content
        return [(t, style) for t, style in ((reasoning, THINK_STYLE), (content, None)) if t]


def reply_splitter(tokenizer, params, thinking: bool):
    """(splitter, sampling params) of one reply: harmony's for gpt-oss (decoded with its markers,
    which are special tokens), else the <think> splitter."""
    if is_harmony(tokenizer.get_vocab()):
        return HarmonyPieces(), dataclasses.replace(params, skip_special_tokens=False)
    return ThinkSplitter(thinking), params


class ChatSession:
    def __init__(self, engine, console, args):
        self.engine = engine
        self.console = console
        self.args = args
        self.params = sampling_params(args)
        self.system: str | None = args.system
        self.history: list[dict] = []
        self._interrupted = False

    # -- input ---------------------------------------------------------------------------------

    def read_message(self) -> str | None:
        """The next message or command; None to leave."""
        ctrl_c = False
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                return None
            except KeyboardInterrupt:
                if ctrl_c:
                    return None
                ctrl_c = True
                self.console.print("\n(Ctrl+C again, Ctrl+D or /exit to leave)", style=TAG_STYLE)
                continue
            ctrl_c = False
            if line.lstrip().startswith('"""'):
                try:
                    return self._read_multiline(line.lstrip()[3:])
                except KeyboardInterrupt:
                    self.console.print("\n(message discarded)", style=TAG_STYLE)
                    continue
            path = self.args.prompt_file if not line.strip() else os.path.expanduser(line.strip())
            if path and os.path.isfile(path):
                text = self._read_file(path)
                if text is not None:
                    return text
            elif line.strip():
                return line

    @staticmethod
    def _read_multiline(first: str) -> str:
        if first.rstrip().endswith('"""'):
            return first.rstrip()[:-3]
        lines = [first] if first else []
        while True:
            line = input("... ")
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)

    def _read_file(self, path: str) -> str | None:
        """A file's text to send, or None (and a message) if it cannot be read as UTF-8 text."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            self.console.print(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", style="red", markup=False)
            return None
        self.console.print(f"(sending the contents of {path}, {len(text)} characters)", style=TAG_STYLE,
                           markup=False)
        return text

    # -- commands ------------------------------------------------------------------------------

    def command(self, text: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, rest = text.strip().partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self.console.print(HELP, markup=False, highlight=False)
        elif name == "/clear":
            self.history.clear()
            self.console.print("(conversation cleared)", style=TAG_STYLE)
        elif name == "/system":
            if rest.strip():
                self.system = rest.strip()
                self.history.clear()
                self.console.print("(system prompt set; conversation cleared)", style=TAG_STYLE)
            else:
                self.console.print(f"(system prompt: {self.system or 'none'})", style=TAG_STYLE, markup=False)
        else:
            self.console.print(f"unknown command {name}; /help lists the commands", style="yellow", markup=False)
        return True

    # -- one turn ------------------------------------------------------------------------------

    def _prompt_ids(self, user: str) -> tuple[list[int], bool] | None:
        """Token ids of the conversation + this message, dropping the oldest turns if the context
        would overflow; None if even the message alone does not fit."""
        tok = self.engine.tokenizer
        sys_msgs = [{"role": "system", "content": self.system}] if self.system else []
        dropped = 0
        while True:
            messages = sys_msgs + self.history + [{"role": "user", "content": user}]
            text, thinking = chat_prompt(tok, messages, self.args.force_think)
            ids = encode(tok, text, templated=True)
            if len(ids) + 1 <= self.engine.max_context:
                break
            if not self.history:
                self.console.print(f"message too long: the prompt is {len(ids)} tokens, the context holds "
                                   f"{self.engine.max_context} (raise --cache_lens)", style="red", markup=False)
                return None
            self.history = self.history[2:]
            dropped += 1
        if dropped:
            self.console.print(f"(dropped the {dropped} oldest turn(s) to fit the context)", style=TAG_STYLE)
        return ids, thinking

    def reply(self, user: str) -> None:
        """One turn. Ctrl+C sets a flag (checked between engine steps) instead of raising, from
        before anything is printed until the stats line is out."""
        self._interrupted = False
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._reply(user)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _reply(self, user: str) -> None:
        prepared = self._prompt_ids(user)
        if prepared is None:
            return
        ids, thinking = prepared
        splitter, params = reply_splitter(self.engine.tokenizer, self.params, thinking)
        if thinking and isinstance(splitter, ThinkSplitter):
            self._show([(ThinkSplitter.OPEN + "\n", TAG_STYLE)])
        gen = run_request(self.engine, ids, params, on_text=lambda s: self._show(splitter.feed(s)),
                          should_stop=lambda: self._interrupted)
        self._show(splitter.flush())
        self.console.print()
        if gen.finish_reason == "abort":
            self.console.print("(stopped)", style=TAG_STYLE)
        elif gen.finish_reason == "error":
            self.console.print(f"generation failed: {gen.error}", style="red", markup=False)
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": splitter.answer.strip()}]
        self.console.print(f"[ {gen.stats_line()} ]", style=STATS_STYLE, markup=False, highlight=False)

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True

    def _show(self, pieces) -> None:
        for text, style in pieces:
            self.console.print(text, style=style, end="", markup=False, highlight=False, soft_wrap=True)

    def loop(self) -> int:
        self.console.print('Type a message, /help for commands, """ for multi-line input.', style=TAG_STYLE)
        while True:
            text = self.read_message()
            if text is None:
                return 0
            if text.startswith("/") and not text.startswith("//"):
                if not self.command(text):
                    return 0
                continue
            self.reply(text)


def add_chat_args(p) -> None:
    p.add_argument("--prompt_file", "--prompt-file", dest="prompt_file",
                   help="file sent when you press Enter on an empty line")
    p.add_argument("--system", help="system prompt")
    model_args.add_model_args(p)
    add_sampling_args(p)


DESCRIPTION = ("Chat with a model in the terminal. With no model flags, a tiny random-weight "
               "DeepSeek-V3-architecture model is generated once and used (its replies are noise).")


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal", description=DESCRIPTION,
                       epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from ktrans.engine import LLMEngine

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        raise UsageError(f"--prompt_file {args.prompt_file}: no such file")
    console = Console(highlight=False)
    say = lambda msg: console.print(msg, style="yellow", markup=False)   # noqa: E731
    model_args.use_demo_model(args, say)
    kwargs = model_args.runner_kwargs(args, say=say)
    console.print(f"Loading {args.gguf_path or args.model_path} on {kwargs['device']} ...",
                  style=TAG_STYLE, markup=False)
    t0 = time.perf_counter()
    engine = LLMEngine.from_args(**model_args.engine_kwargs(args), **kwargs)
    console.print(f"Loaded in {time.perf_counter() - t0:.1f} s: {engine.config.model_type}, "
                  f"{engine.config.num_hidden_layers} layers, context {engine.max_context} tokens.",
                  style=TAG_STYLE, markup=False)
    try:
        return ChatSession(engine, console, args).loop()
    finally:                                   # what this chat's router chose feeds the next --fit
        expert_counts.save_collected(engine.runner.model, expert_counts.model_id(args.model_path, args.gguf_path))


def main(argv: list[str] | None = None) -> int:
    """local_chat.py's entry point (KTransformers-compatible flags)."""
    parser = argparse.ArgumentParser(prog="local_chat.py", description=DESCRIPTION, epilog=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KtransError as e:
        print(f"local_chat.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
