"""Byte-level BPE tokenizer for generated models, with each family's special tokens and chat template.

The BPE is trained with the `tokenizers` library on a small embedded multilingual text. Being
byte-level, it encodes any Unicode text and decodes it back exactly, so tests can round-trip
ASCII, CJK and emoji. Training is deterministic: the same text gives the same vocab.

Each architecture splits text as its real tokenizer does (Qwen2's regex + NFC, DeepSeek-V3's and
DeepSeek LLM's split sequences, GPT-2's regex for Mixtral's stand-in BPE): the pre-tokenizer is
the one single-file mode rebuilds from the GGUF `tokenizer.ggml.pre` name written beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ktrans.weights.tokenizer_gguf import hf_pre_tokenizer

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts; the rest of the model stays dense. Attention, normalization, embeddings and the output
head run on the GPU while the routed experts run on the CPU. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42
100 2024 3.14159 1e-6. Punctuation: (a, b) [c; d] {e: f} <g/> "quoted" 'single' ? ! - _ = + * / \\ |.
def forward(self, hidden_states):\n    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
for i in range(10):\n\tprint(f"token {i}")  # comment
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is.
人工智能正在改变世界。大型语言模型可以回答问题、写代码和翻译文本。专家混合模型只激活一部分参数。
你好，世界！今天天气很好。我们一起去公园散步吧。中文、日本語、한국어。
こんにちは、世界。これは日本語のテスト文です。機械学習とニューラルネットワーク。
안녕하세요, 세계. 이것은 한국어 문장입니다. 언어 모델은 텍스트를 생성합니다.
Привет, мир! Это тестовое предложение на русском языке. Модель генерирует текст.
مرحبا بالعالم. هذه جملة اختبار باللغة العربية.
Bonjour le monde ! Ceci est une phrase en français. ¿Qué tal? Ça va très bien, merci.
Grüße aus München: Größe, Straße, Übung. Emoji: 😀 😃 🚀 🔥 👍 🎉 ❤️ 🤖 🌍 ✨ 👨‍👩‍👧 🇫🇷
Math: ∑ ∫ √ π ∞ ≈ ≠ ≤ ≥ α β γ δ λ μ σ ω. Arrows → ← ↑ ↓. Box ■ □ ● ○ ★ ☆.
"""

# GLM-4.5's chat format: "[gMASK]<sop>", the tools block in a system turn, "<|role|>\n" headers
# with nothing closing a turn (the next header does: <|user|> and <|observation|> end generation),
# each assistant turn opening with its reasoning ("<think>...</think>", kept only after the last
# user turn, empty otherwise), tool calls as <tool_call>NAME then <arg_key>/<arg_value> pairs,
# tool results in one <|observation|> turn, and enable_thinking=false as "/nothink" on user
# turns plus an empty think block after the generation prompt. Written for this generator; it
# renders string-content conversations as GLM-4.5's template does.
_GLM_TOOLS = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
_GLM_CALL_FORMAT = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
_GLM_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}{{- '" + _GLM_TOOLS + "' -}}"
    "{%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) + '\n' -}}{%- endfor -%}"
    "{{- '" + _GLM_CALL_FORMAT + "' -}}{%- endif -%}"
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
_MINIMAX_TOOLS = (
    "\n\n# Tools\nYou may call one or more tools to assist with the user query.\nHere are the tools available in "
    "JSONSchema format:\n\n<tools>\n")
_MINIMAX_CALL_FORMAT = (
    "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n<minimax:tool_call>\n"
    "<invoke name=\"tool-name-1\">\n<parameter name=\"param-key-1\">param-value-1</parameter>\n"
    "<parameter name=\"param-key-2\">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>")
_MINIMAX_TEMPLATE = (
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set conv = messages[1:] if has_system else messages -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in conv -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ']~!b[]~b]system\\n' + (messages[0]['content'] if has_system else 'You are a helpful assistant.') -}}"
    "{%- if tools -%}{{- '" + _MINIMAX_TOOLS.replace("\n", "\\n") + "' -}}"
    "{%- for tool in tools -%}{{- '<tool>' + (tool['function'] | tojson) + '</tool>\\n' -}}{%- endfor -%}"
    "{{- '" + _MINIMAX_CALL_FORMAT.replace("\n", "\\n").replace('"', '\\"') + "' -}}{%- endif -%}"
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

# Family -> special tokens (ids are assigned in this order, starting at 0) and roles.
_FAMILIES = {
    "deepseek": {
        "specials": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                     "<think>", "</think>", "<｜▁pad▁｜>"],
        "bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜▁pad▁｜>",
        "add_bos": True,
        "template": (
            "{% set ns = namespace(system='') %}"
            "{% for m in messages %}{% if m['role'] == 'system' %}"
            "{% set ns.system = ns.system + m['content'] %}{% endif %}{% endfor %}"
            "{{ bos_token }}{{ ns.system }}"
            "{% for m in messages %}"
            "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
            "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"),
    },
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "add_bos": False,
        "template": (
            "{% for m in messages %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    },
    "llama3": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "add_bos": True,
        "template": (
            "{{ bos_token }}"
            "{% for m in messages %}"
            "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    },
    "mistral": {
        "specials": ["<unk>", "<s>", "</s>"],
        "bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>", "add_bos": True,
        "template": (
            "{{ bos_token }}"
            "{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
            "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
            "{% endif %}{% endfor %}"),
    },
    # gpt-oss's harmony format, a compact form of the real template: the system header with the
    # reasoning effort and the channels, developer instructions, user turns, assistant turns on the
    # final channel (earlier turns' analysis is dropped, as the real template does).
    "harmony": {
        "specials": ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                     "<|constrain|>", "<|return|>", "<|call|>"],
        "bos": "<|startoftext|>", "eos": "<|return|>", "pad": "<|endoftext|>", "add_bos": False,
        "template": (
            "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n' -}}"
            "{{- 'Reasoning: ' + (reasoning_effort | default('medium')) + '\\n\\n' -}}"
            "{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' -}}"
            "{%- for m in messages -%}"
            "{%- if m['role'] in ('system', 'developer') -%}"
            "{{- '<|start|>developer<|message|># Instructions\\n\\n' + m['content'] + '<|end|>' -}}"
            "{%- elif m['role'] == 'user' -%}{{- '<|start|>user<|message|>' + m['content'] + '<|end|>' -}}"
            "{%- elif m['role'] == 'assistant' -%}"
            "{{- '<|start|>assistant<|channel|>final<|message|>' + m['content'] + '<|end|>' -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"),
    },
    "glm": {
        "specials": ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                     "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
        # NOTE: as llama.cpp's converter writes GLM files: BOS [gMASK] never added (the template
        # writes it), end-of-turn <|user|> and end-of-message <|observation|> besides EOS.
        "bos": "[gMASK]", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False,
        "eot": "<|user|>", "eom": "<|observation|>",
        "template": _GLM_TEMPLATE,
    },
    "minimax": {
        "specials": ["]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"],
        "bos": "]~!b[", "eos": "[e~[", "pad": None, "add_bos": False,
        "template": _MINIMAX_TEMPLATE,
    },
}

_ARCH_FAMILY = {"deepseek_v3": "deepseek", "deepseek_v2": "deepseek", "qwen3_moe": "chatml",
                "qwen2_moe": "chatml", "qwen2": "chatml", "mixtral": "mistral", "llama": "llama3",
                "gpt_oss": "harmony", "glm4_moe": "glm", "minimax_m2": "minimax"}

# Arch -> llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`), as convert_hf_to_gguf writes for the
# real models. NOTE: real Mixtral files hold a sentencepiece ("llama") vocab; ours is a byte-level
# BPE stand-in, so it names the split it really uses (GPT-2's).
_ARCH_PRE = {"deepseek_v3": "deepseek-v3", "deepseek_v2": "deepseek-llm", "qwen3_moe": "qwen2",
             "qwen2_moe": "qwen2", "qwen2": "qwen2", "mixtral": "gpt-2", "llama": "llama-bpe", "gpt_oss": "gpt-4o",
             "glm4_moe": "glm4", "minimax_m2": "minimax-m2"}

# tokenizer_config.json's class: what the real checkpoints name where transformers builds the same
# pipeline from our files (Qwen2Tokenizer always applies Qwen2's regex + NFC, which we train with).
_CLASS = {"chatml": "Qwen2Tokenizer"}

VOCAB_TARGET = 1024


@dataclass
class TokenizerInfo:
    """What config.json and the GGUF tokenizer metadata need from the tokenizer."""
    tokens: list[str]           # id -> token string (byte-level alphabet), len == trained size
    pre: str                    # llama.cpp pre-tokenizer name (tokenizer.ggml.pre)
    merges: list[str]           # "a b" BPE merges, in rank order
    special_ids: list[int]      # ids of control tokens
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str
    eot_id: int | None = None   # end of turn, llama.cpp's tokenizer.ggml.eot_token_id (GLM: <|user|>)
    eom_id: int | None = None   # end of message, tokenizer.ggml.eom_token_id (GLM: <|observation|>)

    def stop_ids(self) -> list[int]:
        """Every token that ends a generation: EOS, then end of turn / message (config's eos_token_id)."""
        return list(dict.fromkeys(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None))


def _train(specials: list[str], pre: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ktrans.weights.tokenizer_gguf import PRE_TOKENIZERS

    # NOTE: Llama 3's BPE takes a pre-token found whole in the vocab as is (ignore_merges), as
    # the tokenizer single-file mode rebuilds from `tokenizer.ggml.pre = llama-bpe` does.
    tok = Tokenizer(models.BPE(ignore_merges=PRE_TOKENIZERS[pre].ignore_merges))
    normalizer, tok.pre_tokenizer = hf_pre_tokenizer(pre)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def chat_template(arch: str) -> str:
    """The chat template build_tokenizer writes for `arch`."""
    return _FAMILIES[_ARCH_FAMILY[arch]]["template"]


def trained_vocab_size(arch: str) -> int:
    """Size of the tokenizer build_tokenizer writes for `arch` (the tiny/small presets' vocab)."""
    return _train(_FAMILIES[_ARCH_FAMILY[arch]]["specials"], _ARCH_PRE[arch]).get_vocab_size()


def build_tokenizer(arch: str, out_dir: Path) -> TokenizerInfo:
    """Train the tokenizer for `arch`'s family and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import processors

    fam = _FAMILIES[_ARCH_FAMILY[arch]]
    tok = _train(fam["specials"], _ARCH_PRE[arch])
    ids = {t: tok.token_to_id(t) for t in fam["specials"]}
    if fam["add_bos"]:
        bos = fam["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])])
    tok.save(str(out_dir / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": _CLASS.get(_ARCH_FAMILY[arch], "PreTrainedTokenizerFast"),
        "bos_token": fam["bos"], "eos_token": fam["eos"], "pad_token": fam["pad"],
        "unk_token": fam.get("unk"), "add_bos_token": fam["add_bos"], "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "chat_template": fam["template"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")

    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return TokenizerInfo(
        tokens=tokens, pre=_ARCH_PRE[arch], merges=merges, special_ids=sorted(ids.values()),
        bos_id=ids.get(fam["bos"]), eos_id=ids[fam["eos"]], pad_id=ids.get(fam["pad"]),
        unk_id=ids.get(fam.get("unk")), add_bos=fam["add_bos"], chat_template=fam["template"],
        eot_id=ids.get(fam.get("eot")), eom_id=ids.get(fam.get("eom")))
