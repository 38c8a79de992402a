"""Tokenizers for generated models, with each family's special tokens and chat template.

The BPE is trained with the `tokenizers` library on a small embedded multilingual text. Being
byte-level (or sentencepiece with byte fallback, tokenizer_spm.py: Gemma 3), it encodes any
Unicode text and decodes it back exactly, so tests can round-trip ASCII, CJK and emoji. Training
is deterministic: the same text gives the same vocab.

Each architecture splits text as its real tokenizer does (Qwen2's regex + NFC, DeepSeek-V3's and
DeepSeek LLM's split sequences, GPT-2's regex for Mixtral's stand-in BPE): the pre-tokenizer is
the one single-file mode rebuilds from the GGUF `tokenizer.ggml.pre` name written beside it. A
preset of a model whose tokenizer is not its architecture's (Kimi-K2, a DeepSeek-V3 model with
its own regex) picks its own family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ktrans.genmodel.chat_templates import GEMMA_TEMPLATE, GLM_TEMPLATE, KIMI_TEMPLATE, MINIMAX_TEMPLATE
from ktrans.genmodel.tokenizer_spm import build_spm
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
        "template": GLM_TEMPLATE,
    },
    "minimax": {
        "specials": ["]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"],
        "bos": "]~!b[", "eos": "[e~[", "pad": None, "add_bos": False,
        "template": MINIMAX_TEMPLATE,
    },
    # Gemma 3: a sentencepiece vocabulary (tokenizer_spm.py), BOS added, <end_of_turn> ending a
    # turn. NOTE: as llama.cpp's converter writes Gemma files: no eot id in the GGUF (llama.cpp
    # and single-file mode know <end_of_turn> by its text).
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>", "add_bos": True,
        "eot": "<end_of_turn>", "eot_by_text": True, "spm": True,
        "template": GEMMA_TEMPLATE,
    },
    # Kimi-K2: byte-level BPE split by its own regex (llama.cpp's pre-tokenizer "kimi-k2"), turns
    # closed by <|im_end|>, which llama.cpp knows by its text (no eot id in the GGUF).
    "kimi": {
        "specials": ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                     "<|im_middle|>", "[UNK]", "[PAD]"],
        "bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]", "add_bos": False,
        "eot": "<|im_end|>", "eot_by_text": True,
        "template": KIMI_TEMPLATE,
    },
}

_ARCH_FAMILY = {"deepseek_v3": "deepseek", "deepseek_v2": "deepseek", "qwen3_moe": "chatml",
                "qwen2_moe": "chatml", "qwen2": "chatml", "mixtral": "mistral", "llama": "llama3",
                "gpt_oss": "harmony", "glm4_moe": "glm", "minimax_m2": "minimax", "gemma3": "gemma",
                "qwen3_next": "chatml", "qwen3_5_moe": "chatml"}
# Presets of a model that shares its architecture but not its tokenizer: (arch, preset) -> family.
_PRESET_FAMILY = {("deepseek_v3", "kimi-k2"): "kimi", ("deepseek_v3", "kimi-k2-tiny"): "kimi"}

# Arch -> llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`), as convert_hf_to_gguf writes for the
# real models. NOTE: real Mixtral files hold a sentencepiece ("llama") vocab; ours is a byte-level
# BPE stand-in, so it names the split it really uses (GPT-2's).
_ARCH_PRE = {"deepseek_v3": "deepseek-v3", "deepseek_v2": "deepseek-llm", "qwen3_moe": "qwen2",
             "qwen2_moe": "qwen2", "qwen2": "qwen2", "mixtral": "gpt-2", "llama": "llama-bpe", "gpt_oss": "gpt-4o",
             "glm4_moe": "glm4", "minimax_m2": "minimax-m2", "gemma3": "default", "qwen3_next": "qwen2",
             "qwen3_5_moe": "qwen35"}
_FAMILY_PRE = {"kimi": "kimi-k2"}       # a preset's own family names its own split

# tokenizer_config.json's class by split: what the real checkpoints name where transformers builds
# the same pipeline from our files (Qwen2Tokenizer always applies Qwen2's regex + NFC, which we
# train with; Qwen3_5Tokenizer Qwen3.5's regex, which keeps combining marks with their letters).
_CLASS = {"qwen2": "Qwen2Tokenizer", "qwen35": "Qwen3_5Tokenizer"}

VOCAB_TARGET = 1024


@dataclass
class TokenizerInfo:
    """What config.json and the GGUF tokenizer metadata need from the tokenizer."""
    tokens: list[str]           # id -> token string (byte-level alphabet, or sentencepiece pieces)
    pre: str                    # llama.cpp pre-tokenizer name (tokenizer.ggml.pre)
    merges: list[str]           # "a b" BPE merges, in rank order (none for a sentencepiece vocabulary)
    special_ids: list[int]      # ids of control tokens
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str
    eot_id: int | None = None   # end of turn (GLM: <|user|>, Gemma: <end_of_turn>)
    eom_id: int | None = None   # end of message, tokenizer.ggml.eom_token_id (GLM: <|observation|>)
    eot_in_gguf: bool = True    # write tokenizer.ggml.eot_token_id (False: llama.cpp finds it by text)
    model: str = "gpt2"         # tokenizer.ggml.model: gpt2 (byte-level BPE) | llama (sentencepiece)
    scores: list[float] | None = None   # llama: one score per piece
    types: list[int] | None = None      # llama: llama.cpp token type per piece

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


def _family(arch: str, preset: str | None) -> str:
    return _PRESET_FAMILY.get((arch, preset), _ARCH_FAMILY[arch])


def _pre(arch: str, preset: str | None) -> str:
    return _FAMILY_PRE.get(_family(arch, preset), _ARCH_PRE[arch])


def chat_template(arch: str, preset: str | None = None) -> str:
    """The chat template build_tokenizer writes for `arch` (and `preset`)."""
    return _FAMILIES[_family(arch, preset)]["template"]


def trained_vocab_size(arch: str, preset: str | None = None) -> int:
    """Size of the tokenizer build_tokenizer writes for `arch` (the tiny/small presets' vocab)."""
    import tempfile

    fam = _FAMILIES[_family(arch, preset)]
    if fam.get("spm"):
        with tempfile.TemporaryDirectory() as d:
            return len(build_spm(fam, _CORPUS, VOCAB_TARGET, Path(d))[0])
    return _train(fam["specials"], _pre(arch, preset)).get_vocab_size()


def _write_config(fam: dict, pre: str, out_dir: Path) -> None:
    tcfg = {
        "tokenizer_class": _CLASS.get(pre, "PreTrainedTokenizerFast"),
        "bos_token": fam["bos"], "eos_token": fam["eos"], "pad_token": fam["pad"],
        "unk_token": fam.get("unk"), "add_bos_token": fam["add_bos"], "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "chat_template": fam["template"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


def build_tokenizer(arch: str, out_dir: Path, preset: str | None = None) -> TokenizerInfo:
    """Train the tokenizer for `arch`'s family (or `preset`'s own) and write tokenizer.json +
    tokenizer_config.json."""
    from tokenizers import processors

    family = _family(arch, preset)
    fam = _FAMILIES[family]
    _write_config(fam, _pre(arch, preset), out_dir)
    extra: dict = {}
    if fam.get("spm"):
        tokens, scores, types = build_spm(fam, _CORPUS, VOCAB_TARGET, out_dir)
        merges, extra = [], {"model": "llama", "scores": scores, "types": types}
    else:
        tok = _train(fam["specials"], _pre(arch, preset))
        if fam["add_bos"]:
            bos = fam["bos"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        tok.save(str(out_dir / "tokenizer.json"))
        model = json.loads(tok.to_str())["model"]
        vocab = model["vocab"]
        tokens = [""] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {t: tokens.index(t) for t in fam["specials"]}
    return TokenizerInfo(
        tokens=tokens, pre=_pre(arch, preset), merges=merges, special_ids=sorted(ids.values()),
        bos_id=ids.get(fam["bos"]), eos_id=ids[fam["eos"]], pad_id=ids.get(fam["pad"]),
        unk_id=ids.get(fam.get("unk")), add_bos=fam["add_bos"], chat_template=fam["template"],
        eot_id=ids.get(fam.get("eot")), eom_id=ids.get(fam.get("eom")), eot_in_gguf=not fam.get("eot_by_text"),
        **extra)
