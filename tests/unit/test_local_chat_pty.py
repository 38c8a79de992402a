"""local_chat.py / `ktrans chat` driven through a pseudo-terminal as a person would use it: the
README's first command (no flags: the demo model is generated and a reply comes back), multi-turn
history, \"\"\" multi-line input, the commands, Ctrl+C mid-reply, and the stats line."""

from __future__ import annotations

import os
import platform
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from ktrans.cli.chat import THINK_STYLE, HarmonyPieces, ThinkSplitter, reply_splitter
from tests.seeds import py_rng

ROOT = Path(__file__).resolve().parents[2]
# read, poll, select, pselect6, ppoll: what readline sleeps in while it waits for a key
_READ_SYSCALLS = {"x86_64": {"0", "7", "23", "270", "271"}, "aarch64": {"63", "72", "73"}}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
STATS = re.compile(r"\[ prompt (\d+) tok(?: \(\d+ cached\))? \| prefill [\d.]+ tok/s \| "
                   r"decode [\d.]+ tok/s \((\d+) tok\) \| TTFT [\d.]+ s \]")


class Terminal:
    """A child process on a pty; `expect` waits for a regex in its ANSI-stripped output."""

    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                   # child: the pty is its terminal
            os.chdir(ROOT)
            # NOTE: as from a terminal, Ctrl+C must not stay ignored when this process inherited an
            # ignored SIGINT (a shell's background job, e.g. a CI runner): exec keeps "ignored".
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        self.text = ""
        self.pos = 0                                        # expect() searches from here

    def _read(self, timeout: float) -> None:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            self.text += ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n")

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        rx = re.compile(pattern)
        end = time.time() + timeout
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.text[-3000:]}")
            self._read(0.2)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait_reading(self, timeout: float = 60) -> None:
        """Wait until the child's main thread sleeps in a terminal read (read/poll/select family,
        /proc/PID/syscall), i.e. readline is waiting for a key and a SIGINT is handled at once."""
        waiting = _READ_SYSCALLS.get(platform.machine())
        if waiting is None:
            pytest.skip(f"syscall numbers of terminal reads not known for {platform.machine()}")
        end = time.time() + timeout
        while time.time() < end:
            try:
                nr = Path(f"/proc/{self.pid}/syscall").read_text().split()[0]
            except (OSError, IndexError):
                nr = ""
            if nr in waiting:
                return
            self._read(0.01)
        raise AssertionError(f"the chat never waited for input; output so far:\n{self.text[-3000:]}")

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def wait(self, timeout: float = 60) -> int:
        end = time.time() + timeout
        while time.time() < end:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the chat did not exit; output:\n{self.text[-3000:]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # KTRANS_CACHE keeps the demo model out of ~/.cache; one torch thread keeps 2-core CI fast.
    return dict(os.environ, KTRANS_CACHE=str(tmp_path_factory.mktemp("ktrans-cache")),
                OMP_NUM_THREADS="1", COLUMNS="200", TERM="xterm")


def _reply(term: Terminal, message: str) -> tuple[int, int]:
    term.expect(r">>> ")
    term.line(message)
    m = term.expect(STATS.pattern)
    return int(m.group(1)), int(m.group(2))


def test_readme_first_command_reaches_a_reply(env):
    term = Terminal([sys.executable, "local_chat.py", "--max_new_tokens", "8"], env)
    term.expect(r"RANDOM weights.*--gguf_path", timeout=300)   # first run generates the model
    term.expect(r"Loaded in [\d.]+ s: deepseek_v3")
    n_prompt, n_out = _reply(term, "Hello!")
    assert n_prompt > 2 and 1 <= n_out <= 8
    term.expect(r">>> ")
    term.line("/exit")
    assert term.wait() == 0


def test_multi_turn_commands_and_multiline(env, tmp_path):
    term = Terminal([sys.executable, "-m", "ktrans", "chat", "--max_new_tokens", "4", "--temperature", "0"], env)
    first, _ = _reply(term, "hello")
    second, _ = _reply(term, "hello")
    assert second > first + 2                                 # the first turn is in the prompt
    term.line("/clear")
    term.expect(r"conversation cleared")
    assert _reply(term, "hello")[0] == first
    term.line("/system You answer in one word.")
    term.expect(r"system prompt set")
    with_system, _ = _reply(term, "hello")
    assert with_system > first
    term.line("/system")
    term.expect(r"system prompt: You answer in one word\.")
    term.line("/help")
    term.expect(r"/clear.*\n.*/system.*\n.*/exit")
    term.line("/nonsense")
    term.expect(r"unknown command /nonsense")
    term.expect(r">>> ")
    term.line('"""first line')
    term.expect(r"\.\.\. ")
    term.line("second line")
    term.expect(r"\.\.\. ")
    term.line('third line"""')
    multi, _ = [int(g) for g in term.expect(STATS.pattern).groups()]
    assert multi > with_system                               # all three lines went into one message
    (tmp_path / "question.txt").write_text("a question\nfrom a file\n")
    term.expect(r">>> ")
    term.line(str(tmp_path / "question.txt"))                # a line naming a file sends the file
    term.expect(r"sending the contents of .*question\.txt, 23 characters")
    term.expect(STATS.pattern)
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00")
    term.expect(r">>> ")
    term.line(str(tmp_path / "binary.bin"))
    term.expect(r"cannot read .*binary\.bin")
    term.expect(r">>> ")
    term.send("\x04")                                         # Ctrl+D leaves
    assert term.wait() == 0


def _interrupt(term: Terminal, message: str) -> int:
    """Send a message, press Ctrl+C once the reply streams; returns the prompt token count."""
    term.expect(r">>> ")
    term.line(message)
    term.expect(re.escape(message) + r"\n.+", timeout=120)  # the reply has started streaming
    t0 = time.time()
    term.send("\x03")
    term.expect(r"\(stopped\)")
    n_prompt, n_out = [int(g) for g in term.expect(STATS.pattern).groups()]
    assert n_out < 1000 and time.time() - t0 < 30
    return n_prompt


def test_ctrl_c_stops_the_reply_not_the_program(env):
    term = Terminal([sys.executable, "local_chat.py", "--max_new_tokens", "1000", "--ignore_eos",
                     "--force_think"], env)
    first = _interrupt(term, "tell me a long story")
    assert "story\n<think>\n" in term.text                  # --force_think: the reply opens thinking
    assert _interrupt(term, "and another one") > first       # still chatting, history kept
    # Ctrl+C twice at the prompt leaves. NOTE: each ^C waits until readline shows the prompt and
    # sleeps reading the terminal: a SIGINT landing just before input() starts reading stays
    # pending until the next keystroke (CPython's readline), which no user types that fast.
    for hint in (None, r"Ctrl\+C again"):
        if hint:
            term.expect(hint)
        term.expect(r">>> ")
        term.wait_reading()
        term.send("\x03")
    assert term.wait() == 0


def test_think_splitter_styles_thinking_across_chunk_boundaries():
    rng = py_rng()
    text = "intro <think>\nweighing 🙂 options</think>\nThe answer <thi is 42.<think>more</think> done"
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        splitter = ThinkSplitter(thinking=False)
        pieces = [p for c in chunks for p in splitter.feed(c)] + splitter.flush()
        assert "".join(t for t, _ in pieces) == text
        thought = "".join(t for t, style in pieces if style == THINK_STYLE)
        assert thought == "\nweighing 🙂 optionsmore"
        assert splitter.answer == "intro \nThe answer <thi is 42. done"


def test_harmony_reply_styles_analysis_as_thinking(tiny_model):
    """gpt-oss: the reply is decoded with its markers (special tokens) and split by channel; only
    the final channel goes into the history."""
    import transformers

    from ktrans.engine.detokenizer import IncrementalDetokenizer
    from ktrans.engine.request import SamplingParams

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model("gpt_oss", "f32", with_safetensors=False))
    splitter, params = reply_splitter(tok, SamplingParams(), thinking=False)
    assert isinstance(splitter, HarmonyPieces) and not params.skip_special_tokens
    reply = ("<|channel|>analysis<|message|>weighing 🙂 options<|end|><|start|>assistant<|channel|>final"
             "<|message|>The answer is 42.<|return|>")
    detok = IncrementalDetokenizer(tok, tok.encode("<|start|>assistant", add_special_tokens=False),
                                   skip_special_tokens=params.skip_special_tokens)
    pieces = [p for i in tok.encode(reply, add_special_tokens=False) for p in splitter.feed(detok.add(i))]
    pieces += splitter.feed(detok.flush()) + splitter.flush()
    assert "".join(t for t, style in pieces if style == THINK_STYLE) == "weighing 🙂 options"
    assert "".join(t for t, style in pieces if style is None) == splitter.answer == "The answer is 42."
    other, same = reply_splitter(transformers.AutoTokenizer.from_pretrained(
        tiny_model("qwen3_moe", "f32", with_safetensors=False)), params, thinking=True)
    assert isinstance(other, ThinkSplitter) and other.thinking and same is params
