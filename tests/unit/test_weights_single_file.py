"""Single-file GGUF mode on gen-model files of every architecture: the config rebuilt from GGUF
metadata equals config.json; the tokenizer rebuilt from GGUF metadata encodes/decodes mixed text
(ASCII, CJK, emoji, special tokens) and renders the chat template exactly like the tokenizer files
it came from. Real pre-tokenizers (qwen2, deepseek-v3, llama-bpe) against tokenizers built from
their HF definitions; clear errors for what single-file mode cannot rebuild."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast, Qwen2Tokenizer

from gguf_testutil import write_gguf
from ktrans.config.arch import ARCHS, build_meta_model
from ktrans.errors import KtransError
from ktrans.weights import open_weights
from ktrans.weights.gguf_reader import GGUFReader
from ktrans.weights.gguf_source import GGUFSource
from ktrans.weights.single_file import config_from_gguf, tokenizer_from_gguf

SPECIALS = {  # a few special tokens of each generated family, mixed into the text
    "deepseek_v3": "<｜User｜>hi<｜Assistant｜><think>x</think><｜end▁of▁sentence｜>",
    "deepseek_v2": "<｜User｜>hi<｜Assistant｜><｜end▁of▁sentence｜>",
    "qwen3_moe": "<|im_start|>user\nhi<|im_end|><think>y</think>",
    "qwen2_moe": "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "qwen2": "<|im_start|>user\nhi<|im_end|>",
    "mixtral": "<s>[INST] hi [/INST]</s><unk>",
    "llama": "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|end_of_text|>",
    "gpt_oss": "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>x<|return|>",
    "glm4_moe": "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think>x</think>\n<tool_call>f<|observation|><|endoftext|>",
    "minimax_m2": "]~!b[]~b]user\nhi[e~[\n]~b]ai\n<think>\nx\n</think>\n\n<minimax:tool_call>[e~[",
    "gemma3": "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nx<end_of_turn><eos><pad>",
    "qwen3_next": "<|im_start|>user\nhi<|im_end|><think>y</think><|endoftext|>",
    "qwen3_5_moe": "<|im_start|>user\nhi\u0301 e\u0308<|im_end|><think>y</think><|endoftext|>",
    "deepseek_v3/kimi-k2-tiny": "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>[EOS]",
}
MIXED = ("Hello, World! It's 2024-06-01: 3.14159 × 42 = ?\n\tIndented   spaces  "
         "你好，世界！人工智能。こんにちは、世界。한국어 Привет 🚀🔥😀 👨‍👩‍👧 🇫🇷 ∑∫√ ")
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好 🚀 what's 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks! ありがとう"}]


def _assert_same_tokenizer(ours, ref, text: str):
    ids = ref(text)["input_ids"]
    assert ours(text)["input_ids"] == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("arch", sorted(ARCHS) + ["deepseek_v3/kimi-k2-tiny"])
def test_config_and_tokenizer_from_gguf_match_hf_files(tiny_model, arch):
    name, _, preset = arch.partition("/")
    d = tiny_model(name, preset=preset or "tiny")
    r = GGUFReader(str(d / "model.gguf"))
    ours, ref = config_from_gguf(r), AutoConfig.from_pretrained(d)
    a, b = ours.to_dict(), ref.to_dict()
    a.pop("_name_or_path"), b.pop("_name_or_path")
    assert a == b
    shapes = lambda c: {n: tuple(p.shape) for n, p in build_meta_model(c).named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(ref)

    tok, ref_tok = tokenizer_from_gguf(r), PreTrainedTokenizerFast.from_pretrained(d)
    _assert_same_tokenizer(tok, ref_tok, MIXED + SPECIALS[arch] + MIXED[::-1])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token)
    for gen in (False, True):
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert text == ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert tok(text, add_special_tokens=False)["input_ids"] == ref_tok(text, add_special_tokens=False)["input_ids"]


def test_single_file_source_and_gguf_only_directory(tiny_model, tmp_path):
    d = tiny_model("qwen3_moe")
    src = open_weights(None, str(d / "model.gguf"))
    assert isinstance(src, GGUFSource) and src.hf_dir is None
    assert src.config().model_type == "qwen3_moe" and src.tokenizer().eos_token == "<|im_end|>"
    assert src.tensor("model.norm.weight").shape == (src.config().hidden_size,)
    shutil.copy(d / "model.gguf", tmp_path / "model.gguf")
    only = open_weights(str(tmp_path), None)              # a directory holding just GGUF files
    assert isinstance(only, GGUFSource) and only.names() == src.names()
    with_dir = open_weights(str(d), str(d / "model.gguf"))  # --model_path wins for config/tokenizer
    assert with_dir.config().to_dict() | {"_name_or_path": ""} == src.config().to_dict() | {"_name_or_path": ""}


# ---- real pre-tokenizers: rebuilt tokenizer vs one defined the way the HF files define it ----

CORPUS = [MIXED, "The quick brown fox 123456789 jumps!!! over 'the' lazy dog's back.\r\n", "数字１２３ と カタカナ ひらがな",
          "def f(x):\n    return x ** 2  # square\n", "Ünïcödé café naïve résumé e\u0301 ﬁ"] * 3
HF_SPLITS = {  # the pre_tokenizer "Split" patterns of the published tokenizer.json files
    "llama-bpe": ["(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                  "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "deepseek-v3": ["\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"],
}
SPECIAL = ["<|bos|>", "<|eos|>", "<|user|>"]


def _train(splits, nfc=False, corpus=CORPUS):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), "isolated") for s in splits]
                                                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _gguf_of(tok: Tokenizer, pre: str, path):
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [3 if t in SPECIAL else 1 for t in tokens],
            "tokenizer.ggml.eos_token_id": model["vocab"]["<|eos|>"], "tokenizer.chat_template": "{{ messages }}"}
    return GGUFReader(str(write_gguf(path, {"token_embd.weight": np.zeros((len(tokens), 32))}, metadata=meta)))


@pytest.mark.parametrize("pre", sorted(HF_SPLITS))
def test_real_pre_tokenizers(tmp_path, pre):
    tok = _train(HF_SPLITS[pre])
    ref = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    ours = tokenizer_from_gguf(_gguf_of(tok, pre, tmp_path / "t.gguf"))
    for text in CORPUS[:5] + ["<|user|>hi 1234567 <|eos|>"]:
        _assert_same_tokenizer(ours, ref, text)


def test_qwen2_pre_tokenizer_against_transformers_qwen2_tokenizer(tmp_path):
    """transformers' Qwen2Tokenizer applies Qwen2's own split regex and NFC: an independent oracle."""
    tok = _train(["(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                  "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"], nfc=True)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ref = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|eos|>", unk_token=None, pad_token=None)
    assert len(ref) == len(model["vocab"])
    ref.add_special_tokens({"additional_special_tokens": SPECIAL})
    ours = tokenizer_from_gguf(_gguf_of(tok, "qwen2", tmp_path / "t.gguf"))
    for text in CORPUS[:5] + ["<|user|>hi 1234567 <|eos|>"]:
        _assert_same_tokenizer(ours, ref, text)


def test_qwen35_pre_tokenizer_against_transformers_qwen3_5_tokenizer(tmp_path):
    """transformers' Qwen3_5Tokenizer applies Qwen3.5's own split (combining marks stay with their
    letters) and NFC: an independent oracle for the "qwen35" rebuild, on text whose marks split
    differently under Qwen2's regex."""
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    marks = "नमस्ते दुनिया ক্ষ a\u0301\u0302b x\u20dd"       # Devanagari/Bengali vowel signs, stacked marks
    tok = _train(["(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
                  "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"], nfc=True,
                 corpus=CORPUS + [marks] * 3)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ref = Qwen3_5Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|eos|>", unk_token=None, pad_token=None)
    ref.add_special_tokens({"additional_special_tokens": SPECIAL})
    ours = tokenizer_from_gguf(_gguf_of(tok, "qwen35", tmp_path / "t.gguf"))
    qwen2 = tokenizer_from_gguf(_gguf_of(tok, "qwen2", tmp_path / "q2.gguf"))
    assert ours(marks)["input_ids"] != qwen2(marks)["input_ids"]            # the marks split otherwise there
    for text in CORPUS[:5] + [marks, "<|user|>hi 1234567 <|eos|>"]:
        _assert_same_tokenizer(ours, ref, text)


def test_single_file_errors(tmp_path, tiny_model):
    embd = {"token_embd.weight": np.zeros((4, 32))}
    cases = [
        (write_gguf(tmp_path / "q3.gguf", embd, arch="qwen3", metadata={"qwen3.block_count": 1}),
         config_from_gguf, "architecture 'qwen3' is not supported in single-file mode"),
        (write_gguf(tmp_path / "ll.gguf", {**embd, "rope_freqs.weight": np.ones(4)}, arch="llama",
                    metadata={"llama.block_count": 1}),
         config_from_gguf, "rope_freqs.weight, Llama 3.1-style rope scaling"),
        (write_gguf(tmp_path / "nokey.gguf", embd, arch="qwen2", metadata={"qwen2.block_count": 1}),
         config_from_gguf, "lacks the hidden_size key of 'qwen2'"),
        (write_gguf(tmp_path / "notok.gguf", embd, arch="qwen2"), tokenizer_from_gguf, "no tokenizer metadata"),
        (write_gguf(tmp_path / "spm.gguf", embd, metadata={"tokenizer.ggml.model": "bert"}), tokenizer_from_gguf,
         "tokenizer model 'bert' is not supported"),
        (write_gguf(tmp_path / "pre.gguf", embd, metadata={"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "xyz",
                                                           "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}),
         tokenizer_from_gguf, "pre-tokenizer 'xyz' is not known"),
    ]
    moe = {"token_embd.weight": np.zeros((4, 32)), "blk.0.attn_q.weight": np.zeros((32, 32)),
           "blk.1.ffn_gate_inp.weight": np.zeros((3, 32))}
    base = {"qwen2moe.block_count": 2, "qwen2moe.embedding_length": 32, "qwen2moe.attention.head_count": 4,
            "qwen2moe.expert_count": 3}
    for i, (key, value, msg) in enumerate([("qwen2moe.block_count", 4000000000, "says 4000000000 layers, but the "
                                            "tensors cover blk.0 .. blk.1"),
                                           ("qwen2moe.embedding_length", 64, "says hidden size 64, but token_embd"),
                                           ("qwen2moe.expert_count", 1 << 30, f"says {1 << 30} experts, but "
                                            "blk.1.ffn_gate_inp.weight has shape")]):
        path = write_gguf(tmp_path / f"sizes{i}.gguf", moe, arch="qwen2moe", metadata={**base, key: value})
        cases.append((path, config_from_gguf, msg))
    for path, fn, msg in cases:
        with pytest.raises(KtransError, match=msg) as e:
            fn(GGUFReader(str(path)))
        assert str(path) in str(e.value)


def _spm_gguf(path):
    """A llama.cpp 'llama' (sentencepiece BPE) vocabulary: <unk>/<s>/</s>, 256 byte pieces, pieces
    trained on a small corpus (score = -rank, as sentencepiece orders them), a user-defined token."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.train_from_iterator([c for c in CORPUS if "数" not in c],
                            trainers.BpeTrainer(vocab_size=500, show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    meta = {"llama.block_count": 1, "llama.expert_count": 2, "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                                       "{% endfor %}"}
    return write_gguf(path, {"token_embd.weight": np.zeros((len(tokens), 32))}, arch="llama", metadata=meta)


def test_sentencepiece_vocabulary_against_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF tokenizer loader is an independent implementation of the same format.
    NOTE: it uses the non-legacy Metaspace prefix; llama.cpp and Mixtral's tokenizer.json prepend
    '▁' to every text segment (also after a special token) as ktrans does, so the texts compared
    here start with a non-space and hold no special tokens."""
    from transformers import AutoTokenizer

    path = _spm_gguf(tmp_path / "spm.gguf")
    ours, ref = tokenizer_from_gguf(GGUFReader(str(path))), AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in [CORPUS[1], CORPUS[3], CORPUS[4], MIXED.strip(), "def f(x):\n    return x ** 2  # 你好 🚀"]:
        _assert_same_tokenizer(ours, ref, text)
    assert ours("hi")["input_ids"][0] == 1 and ours.decode(ours("hi")["input_ids"]) == "<s> hi"
    ids = ours("<|user|>hi there</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == ours.convert_tokens_to_ids("<|user|>") and ids[-1] == 2
    assert ours.convert_ids_to_tokens(ids)[1] == "▁"          # legacy: '▁' prepended after a special token
    assert ours.decode(ids) == "<|user|> hi there</s>" and ours.decode(ids, skip_special_tokens=True) == "<|user|> hi there"
    assert ours.apply_chat_template(CHAT[1:2], tokenize=False) == ref.apply_chat_template(CHAT[1:2], tokenize=False)


@pytest.mark.parametrize("case", ["default", "period", "array", "no_window", "27b", "scale_key"])
def test_gemma3_metadata_as_llama_cpp_reads_it(tmp_path, case):
    """What a gemma3 file leaves out, rebuilt as llama.cpp assumes it: every 6th layer global
    unless attention.sliding_window_pattern says otherwise (a period or one bool per layer), no
    local layers without a window, query_pre_attn_scalar = head_dim (hidden / heads at 62 layers,
    Gemma 3 27B) unless attention.scale is stored, the local rope base, <end_of_turn> ending a
    generation when no eot id is stored."""
    from ktrans.weights.single_file import config_dict_from_gguf

    n = 62 if case == "27b" else 8
    meta = {"gemma3.block_count": n, "gemma3.embedding_length": 64, "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 2, "gemma3.attention.key_length": 32, "gemma3.attention.value_length": 32,
            "gemma3.attention.sliding_window": 16, "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1234.0,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<end_of_turn>", "a"],
            "tokenizer.ggml.eos_token_id": 1}
    if case == "period":
        meta["gemma3.attention.sliding_window_pattern"] = 3
    if case == "array":
        meta["gemma3.attention.sliding_window_pattern"] = [True, False] * 4
    if case == "no_window":
        del meta["gemma3.attention.sliding_window"]
    if case == "scale_key":
        meta["gemma3.attention.scale"] = 24.0 ** -0.5
    path = write_gguf(tmp_path / "g.gguf", {"token_embd.weight": np.zeros((5, 64))}, arch="gemma3", metadata=meta)
    cfg = config_dict_from_gguf(GGUFReader(str(path)))
    period = {"default": 6, "period": 3, "27b": 6, "scale_key": 6}.get(case)
    slides = {"array": [True, False] * 4, "no_window": [False] * n}.get(case) or [i % period < period - 1
                                                                                 for i in range(n)]
    assert cfg["layer_types"] == ["sliding_attention" if s else "full_attention" for s in slides]
    assert cfg.get("sliding_window") == (None if case == "no_window" else 16)
    assert cfg["query_pre_attn_scalar"] == {"27b": 16, "scale_key": 24}.get(case, 32)
    assert cfg["rope_local_base_freq"] == 1234.0 and cfg["rope_theta"] == 1e6
    assert cfg["eos_token_id"] == [1, 3] and cfg["hidden_activation"] == "gelu_pytorch_tanh"
    config = config_from_gguf(GGUFReader(str(path)))
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1234.0
