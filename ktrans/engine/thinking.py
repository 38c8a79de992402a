"""How a model's chat template opens the reasoning block of a reply, read from the template.

Forcing a reply to think (the chat's --force_think, the server's `think`) appends that opener to
the rendered prompt, so the model continues inside its reasoning. Templates differ: DeepSeek-R1
and Qwen3 write "<think>\\n" before the reasoning, GLM-4.5 writes "\\n<think>" right after its
<|assistant|> header. `think_opener` renders a probe conversation whose assistant turn carries
`reasoning_content` and takes what the template writes between the generation prompt and the
reasoning; a template that renders no reasoning (or fails on the probe) gets "<think>\\n".
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
DEFAULT_OPENER = OPEN + "\n"
# Probe texts no template writes itself (invisible separators around a letter).
_REASONING, _ANSWER = "\u2063r\u2063", "\u2063a\u2063"


def think_opener(tokenizer) -> str:
    """The text that opens a reply's reasoning in this tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return DEFAULT_OPENER
    user = [{"role": "user", "content": "q"}]
    reply = {"role": "assistant", "content": _ANSWER, "reasoning_content": _REASONING}
    try:
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [reply], tokenize=False)
    except Exception:  # templates raise all sorts of errors on conversations they do not expect
        return DEFAULT_OPENER
    if not (isinstance(head, str) and isinstance(full, str) and full.startswith(head)):
        return DEFAULT_OPENER
    rest = full[len(head):]
    i = rest.find(_REASONING)
    return rest[:i] if i >= 0 and rest[:i].strip() == OPEN else DEFAULT_OPENER
