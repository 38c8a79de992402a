"""Generated tiny models wearing each family's tool-calling chat template.

The templates follow the real checkpoints' (Qwen2.5's hermes <tool_call>, DeepSeek-V3's tool-call
tokens, Llama 3.1's JSON with the ipython role, Mistral's [AVAILABLE_TOOLS]/[TOOL_CALLS]), cut to
what tools need: they render `tools`, assistant `tool_calls` and `tool` results. GLM-4.5's and
MiniMax-M2's are the ones gen-model writes for glm4_moe / minimax_m2 (their markers are special
tokens there); MiniMax-M2's generation prompt opens the reasoning block, which random weights never
close (a forced call's grammar starts after it), so here it does not. The tiny
vocabularies have no single tokens for the markers, so the markers are plain text here; the
server handles both (a marker that is a special token is matched by id). The server takes them
with --chat-template, as a user would for a GGUF whose own template renders no tools.
"""

from __future__ import annotations

from pathlib import Path

from ktrans.genmodel.tokenizer import chat_template

HERMES = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant."
    "{% endif %}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) "
    "or (m.role == 'assistant' and not m.tool_calls) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{% if m.content %}{{ m.content }}\n{% endif %}"
    "{%- for tc in m.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

DEEPSEEK = (
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.system }}"
    "{% if tools %}\n\n## Tools\nYou have access to the following tools:\n{% for tool in tools %}\n"
    "### {{ tool.function.name }}\nDescription: {{ tool.function.description }}\n"
    "Parameters: {{ tool.function.parameters | tojson }}\n{% endfor %}\n"
    "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\n"
    "tool_call_arguments\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m.tool_calls %}<｜Assistant｜>{{ m['content'] or '' }}"
    "<｜tool▁calls▁begin｜>{% for tc in m.tool_calls %}<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
    "{{ tc.function.name }}\n```json\n{{ tc.function.arguments | tojson }}\n```<｜tool▁call▁end｜>"
    "{% endfor %}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{{ m['content'] }}"
    "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")

LLAMA3 = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond "
    "with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}. Do not use variables.\n\n{% for t in tools %}{{ t | tojson }}\n\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% for tc in m.tool_calls %}{\"name\": "
    "\"{{ tc.function.name }}\", \"parameters\": {{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>"
    "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}"
    "{% if loop.last and tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST] {{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS] "
    "{{ m.tool_calls | map(attribute='function') | list | tojson }}{{ eos_token }}"
    "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {\"content\": {{ m.content | tojson }}}[/TOOL_RESULTS]"
    "{% endif %}{% endfor %}")

def _no_reasoning_prompt(template: str) -> str:
    opened = "{{- ']~b]ai\\n<think>\\n' -}}"
    assert opened in template, "MiniMax-M2's generation prompt changed"
    return template.replace(opened, "{{- ']~b]ai\\n' -}}")


# family -> (generated architecture, template)
FAMILIES = {
    "hermes": ("qwen3_moe", HERMES),
    "deepseek": ("deepseek_v3", DEEPSEEK),
    "llama3": ("llama", LLAMA3),
    "mistral": ("mixtral", MISTRAL),
    "glm": ("glm4_moe", chat_template("glm4_moe")),
    "minimax": ("minimax_m2", _no_reasoning_prompt(chat_template("minimax_m2"))),
}


def template_file(folder: Path, family: str) -> Path:
    """The family's template written to a file, for `ktrans serve --chat-template`."""
    path = folder / f"{family}.jinja"
    path.write_text(FAMILIES[family][1], encoding="utf-8")
    return path
