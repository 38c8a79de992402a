"""Chat templates gen-model writes for the families whose real templates are long (GLM-4.5,
MiniMax-M2, Gemma 3, Kimi-K2). Each is written for this generator: it renders string-content
conversations as the real model's template does, not a copy of it.
"""

from __future__ import annotations

# GLM-4.5's chat format: "[gMASK]<sop>", the tools block in a system turn, "<|role|>\n" headers
# with nothing closing a turn (the next header does: <|user|> and <|observation|> end generation),
# each assistant turn opening with its reasoning ("<think>...</think>", kept only after the last
# user turn, empty otherwise), tool calls as <tool_call>NAME then <arg_key>/<arg_value> pairs,
# tool results in one <|observation|> turn, and enable_thinking=false as "/nothink" on user
# turns plus an empty think block after the generation prompt. Written for this generator; it
# renders string-content conversations as GLM-4.5's template does.
GLM_TOOLS = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
GLM_CALL_FORMAT = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
GLM_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}{{- '" + GLM_TOOLS + "' -}}"
    "{%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) + '\n' -}}{%- endfor -%}"
    "{{- '" + GLM_CALL_FORMAT + "' -}}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set no_think = enable_thinking is defined and not enable_thinking -%}"
    "{%- for m in messages -%}"
    "{%- set text = m['content'] if m['content'] is string else '' -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<|user|>\n' + text -}}{{- '/nothink' if no_think and not text.endswith('/nothink') else '' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is string else '' -%}"
    "{%- if m['reasoning_content'] is not string and '</think>' in text -%}"
    "{%- set reasoning = text.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}"
    "{{- '<|assistant|>' -}}"
    "{%- if loop.index0 > ns.last_user and reasoning -%}{{- '\n<think>' + reasoning.strip() + '</think>' -}}"
    "{%- else -%}{{- '\n<think></think>' -}}{%- endif -%}"
    "{%- if text.strip() -%}{{- '\n' + text.strip() -}}{%- endif -%}"
    "{%- for tc in m['tool_calls'] or [] -%}{%- set f = tc['function'] if tc['function'] else tc -%}"
    "{{- '\n<tool_call>' + f['name'] -}}"
    "{%- for k, v in (f['arguments'] or {}).items() -%}"
    "{{- '\n<arg_key>' + k + '</arg_key>\n<arg_value>' + (v if v is string else v | tojson(ensure_ascii=False))"
    " + '</arg_value>' -}}{%- endfor -%}{{- '\n</tool_call>' -}}{%- endfor -%}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}"
    "{{- '\n<tool_response>\n' + text + '\n</tool_response>' -}}"
    "{%- elif m['role'] == 'system' -%}{{- '<|system|>\n' + text -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{{- '\n<think></think>' if no_think else '' -}}"
    "{%- endif -%}")

# MiniMax-M2's chat format: "]~!b[" then turns "]~b]ROLE\n...[e~[\n" (ai for the assistant), a
# system turn always (its default identity when the conversation has none), the tools in it as
# <tool> JSON lines, tool calls as <minimax:tool_call> with <invoke name=...> and <parameter
# name=...> elements, tool results as <response> elements of one tool turn, reasoning kept as
# "<think>\n...\n</think>\n\n" only after the last user turn, and the generation prompt opening
# the reasoning ("]~b]ai\n<think>\n"). Written for this generator; it renders string-content
# conversations as MiniMax-M2's template does.
MINIMAX_TOOLS = (
    "\n\n# Tools\nYou may call one or more tools to assist with the user query.\nHere are the tools available in "
    "JSONSchema format:\n\n<tools>\n")
MINIMAX_CALL_FORMAT = (
    "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n<minimax:tool_call>\n"
    "<invoke name=\"tool-name-1\">\n<parameter name=\"param-key-1\">param-value-1</parameter>\n"
    "<parameter name=\"param-key-2\">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>")
MINIMAX_TEMPLATE = (
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set conv = messages[1:] if has_system else messages -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in conv -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ']~!b[]~b]system\\n' + (messages[0]['content'] if has_system else 'You are a helpful assistant.') -}}"
    "{%- if tools -%}{{- '" + MINIMAX_TOOLS.replace("\n", "\\n") + "' -}}"
    "{%- for tool in tools -%}{{- '<tool>' + (tool['function'] | tojson) + '</tool>\\n' -}}{%- endfor -%}"
    "{{- '" + MINIMAX_CALL_FORMAT.replace("\n", "\\n").replace('"', '\\"') + "' -}}{%- endif -%}"
    "{{- '[e~[\\n' -}}"
    "{%- for m in conv -%}"
    "{%- set text = m['content'] if m['content'] is string else '' -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is string else '' -%}"
    "{%- if m['reasoning_content'] is not string and '</think>' in text -%}"
    "{%- set reasoning = text.split('</think>')[0].strip('\\n').split('<think>')[-1].strip('\\n') -%}"
    "{%- set text = text.split('</think>')[-1].strip('\\n') -%}{%- endif -%}"
    "{{- ']~b]ai\\n' -}}"
    "{%- if reasoning and loop.index0 > ns.last_user -%}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}{{- text -}}"
    "{%- if m['tool_calls'] -%}{{- '\\n<minimax:tool_call>\\n' -}}"
    "{%- for tc in m['tool_calls'] -%}{%- set f = tc['function'] if tc['function'] else tc -%}"
    "{{- '<invoke name=\"' + f['name'] + '\">\\n' -}}"
    "{%- if f['arguments'] is mapping -%}{%- for k, v in f['arguments'].items() -%}"
    "{{- '<parameter name=\"' + k + '\">' + (v if v is string else v | tojson) + '</parameter>\\n' -}}"
    "{%- endfor -%}{%- endif -%}{{- '</invoke>\\n' -}}{%- endfor -%}{{- '</minimax:tool_call>' -}}{%- endif -%}"
    "{{- '[e~[\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or conv[loop.index0 - 1]['role'] != 'tool' -%}{{- ']~b]tool' -}}{%- endif -%}"
    "{{- '\\n<response>' + text + '</response>' -}}"
    "{%- if loop.last or conv[loop.index0 + 1]['role'] != 'tool' -%}{{- '[e~[\\n' -}}{%- endif -%}"
    "{%- elif m['role'] == 'user' -%}{{- ']~b]user\\n' + text + '[e~[\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ']~b]ai\\n<think>\\n' -}}{%- endif -%}")

# Gemma 3's chat format: BOS, then "<start_of_turn>ROLE\n...<end_of_turn>\n" turns with the
# assistant's role named "model", each content trimmed; a leading system message has no turn of
# its own: its text and a blank line open the first turn. The generation prompt opens a model turn.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns = namespace(prefix=(messages[0]['content'] + '\\n\\n') if has_system else '') -%}"
    "{%- for m in (messages[1:] if has_system else messages) -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + ns.prefix -}}"
    "{%- set ns.prefix = '' -%}"
    "{{- (m['content'] if m['content'] is string else '') | trim -}}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}")

# Kimi-K2's chat format: turns "<|im_ROLE|>NAME<|im_middle|>...<|im_end|>" (<|im_system|> for
# system and tool messages, NAME the role, or a message's own name), a default system turn when
# the conversation opens without one; the generation prompt opens an assistant turn.
KIMI_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set tag = {'user': '<|im_user|>', 'assistant': '<|im_assistant|>'}.get(m['role'], '<|im_system|>') -%}"
    "{{- tag + (m['name'] if m['name'] is defined and m['name'] else m['role']) + '<|im_middle|>' -}}"
    "{{- (m['content'] if m['content'] is string else '') + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}")
