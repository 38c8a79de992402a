"""The three tokenizers a generated model can be served with agree, for every architecture (and
Kimi-K2's preset, whose tokenizer is not DeepSeek-V3's).

`AutoTokenizer.from_pretrained(dir)` (whatever class transformers picks for the model_type, e.g.
Qwen2Tokenizer, which re-applies Qwen2's own split regex + NFC), the raw tokenizer.json, and the
single-file rebuild from GGUF metadata must encode, decode and render chat prompts identically;
and the split each one uses must be the real model family's (digits, CJK), not GPT-2's for all.
Gemma 3's vocabulary is sentencepiece's (no split: spaces are '▁', digits single pieces, bytes
for what it lacks), lossless like the byte-level ones.
"""

from __future__ import annotations

import random
import unicodedata

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ktrans.config.arch import ARCHS
from ktrans.weights.gguf_reader import GGUFReader
from ktrans.weights.single_file import tokenizer_from_gguf
from tests.seeds import py_rng

# What convert_hf_to_gguf writes for the real models (Mixtral's stand-in BPE uses GPT-2's split),
# and how each split cuts a digit run: Qwen2 one digit per piece, DeepSeek-V3 groups of 1-3,
# DeepSeek LLM whole runs, GPT-2 whole runs with the leading space.
PRE = {"deepseek_v3": "deepseek-v3", "deepseek_v2": "deepseek-llm", "qwen3_moe": "qwen2",
       "qwen2_moe": "qwen2", "qwen2": "qwen2", "mixtral": "gpt-2", "llama": "llama-bpe", "gpt_oss": "gpt-4o",
       "glm4_moe": "glm4", "minimax_m2": "minimax-m2", "gemma3": "default", "qwen3_next": "qwen2",
       "qwen3_5_moe": "qwen35", "deepseek_v3/kimi-k2-tiny": "kimi-k2"}
MODELS = sorted(ARCHS) + ["deepseek_v3/kimi-k2-tiny"]      # arch, or arch/preset
DIGIT_PIECES = {"qwen2": ["x", "=", "1", "2", "3", "4", "5", "6", "7"],
                "qwen35": ["x", "=", "1", "2", "3", "4", "5", "6", "7"],
                "deepseek-v3": ["x", "=", "123", "456", "7"],
                "deepseek-llm": ["x", "=", "1234567"],
                "gpt-2": ["x", "=", "1234567"],
                "llama-bpe": ["x", "=", "123", "456", "7"],
                "gpt-4o": ["x", "=", "123", "456", "7"],
                "glm4": ["x", "=", "123", "456", "7"],
                "minimax-m2": ["x", "=", "123", "456", "7"],
                "kimi-k2": ["x", "=", "123", "456", "7"]}
NFC_CLASS = {"qwen2": True, "qwen35": True,
             "deepseek-v3": False, "deepseek-llm": False, "gpt-2": False, "llama-bpe": False,
             "gpt-4o": False, "glm4": False, "minimax-m2": False, "kimi-k2": False, "default": False}

PIECES = ["Hello, world!", " 12345", " 3.14", "  ", "\n\n", "\t", "人工智能正在改变世界。", "こんにちは",
          "안녕하세요", "😀🚀", "👨‍👩‍👧", " café", " e\u0301", "ﬁ", "don't", "   trailing  ", "Ω K ώ ι",
          "x=1234567", "\r\n", "Привет", "(a, b) [c; d]"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2 = ? 你好 😀"},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "  and 3.14 * 12345?"}]


def _texts(specials: list[str], rng: random.Random) -> list[str]:
    """Fixed edge cases plus fresh random mixes of the pieces and the special tokens."""
    fixed = ["".join(PIECES), " ".join(PIECES), specials[0] + "hi" + specials[-1], "", " ", "12345 3.14"]
    mixes = ["".join(rng.choice(PIECES + specials) for _ in range(rng.randint(1, 12))) for _ in range(20)]
    return fixed + mixes


def _model(tiny_model, name: str):
    arch, _, preset = name.partition("/")
    return tiny_model(arch, preset=preset or "tiny")


def _three(d):
    r = GGUFReader(str(d / "model.gguf"))
    return AutoTokenizer.from_pretrained(d), Tokenizer.from_file(str(d / "tokenizer.json")), tokenizer_from_gguf(r), r


def _specials(r: GGUFReader) -> list[str]:
    tokens, types = r.get("tokenizer.ggml.tokens"), r.get("tokenizer.ggml.token_type")
    return [tokens[i] for i, t in enumerate(types) if int(t) == 3]


@pytest.mark.parametrize("arch", MODELS)
def test_encode_decode_agree(tiny_model, arch):
    auto, raw, gguf, r = _three(_model(tiny_model, arch))
    assert r.get("tokenizer.ggml.pre") == PRE[arch]
    specials = _specials(r)
    assert len(specials) >= 3
    rng = py_rng()
    for text in _texts(specials, rng):
        for add in (True, False):
            ids = auto(text, add_special_tokens=add)["input_ids"]
            assert raw.encode(text, add_special_tokens=add).ids == ids, (arch, text)
            assert gguf(text, add_special_tokens=add)["input_ids"] == ids, (arch, text)
        for skip in (False, True):
            want = auto.decode(ids, skip_special_tokens=skip)
            assert gguf.decode(ids, skip_special_tokens=skip) == want, (arch, text)
            assert raw.decode(ids, skip_special_tokens=skip) == want, (arch, text)
        # byte-level BPE (and sentencepiece with byte fallback) is lossless up to the family's normalization
        norm = unicodedata.normalize("NFC", text) if NFC_CLASS[PRE[arch]] else text
        assert auto.decode(ids) == norm, (arch, text)
    for s in specials:                      # each control token is one id, never split
        assert auto(s, add_special_tokens=False)["input_ids"] == [auto.convert_tokens_to_ids(s)]
        assert gguf(s, add_special_tokens=False)["input_ids"] == [auto.convert_tokens_to_ids(s)]


@pytest.mark.parametrize("arch", MODELS)
def test_split_is_the_real_familys(tiny_model, arch):
    auto, raw, gguf, _ = _three(_model(tiny_model, arch))
    pre = PRE[arch]
    for which, backend in (("auto", auto.backend_tokenizer), ("json", raw), ("gguf", gguf.backend_tokenizer)):
        if pre == "default":                # sentencepiece: no split; '▁' spaces; digits one piece each
            assert backend.pre_tokenizer is None, (arch, which)
            pieces = backend.encode(" x=1234567", add_special_tokens=False).tokens
            assert pieces[0].startswith("\u2581") and pieces[-7:] == list("1234567"), (arch, which, pieces)
            continue
        pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("x=1234567")]
        assert pieces == DIGIT_PIECES[pre], (arch, which)
        assert (backend.normalizer is not None) == NFC_CLASS[pre]
    if pre in ("qwen2", "qwen35"):                        # as for the real Qwen checkpoints
        assert type(auto).__name__ == {"qwen2": "Qwen2Tokenizer", "qwen35": "Qwen3_5Tokenizer"}[pre]


@pytest.mark.parametrize("arch", MODELS)
def test_chat_template_agrees(tiny_model, arch):
    auto, _, gguf, _ = _three(_model(tiny_model, arch))
    chat = CHAT if arch != "mixtral" else CHAT[1:]
    for gen in (False, True):
        text = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert gguf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == text
        assert "12345" in text and "你好" in text
        ids = auto.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert gguf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False) == ids
        assert auto(text, add_special_tokens=False)["input_ids"] == gguf(text, add_special_tokens=False)["input_ids"]


# Kimi-K2's split as its tokenizer (tiktoken) defines it, matched by the `regex` module (its V1
# syntax has the class intersection `&&`): the independent oracle of the kimi-k2 pre-tokenizer.
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])
# Han next to kana, hangul and Latin; camelCase and ALLCAPS words; contractions in both cases;
# digit runs; full-width punctuation; combining marks
KIMI_PIECES = ["GPU加速计算", "漢字かな交じり文", "中文English混合", "helloWorld", "iPhone15Pro", "HTTPServer",
               "DON'T", "we're", "1234567", " 2024年6月1日", "，。！", "한국어漢字", "e\u0301t\u00e9", "  ", "\n\n",
               "x=3.14159", "カタカナ中文ひらがな", "Ünïcödé", "😀🚀", "\t", "ΑΒΓαβγ"]


def test_kimi_k2_split_is_its_regex(tiny_model):
    """tokenizer.ggml.pre = kimi-k2: the three tokenizers of the Kimi-K2 preset cut fresh random
    mixes of Han, kana, hangul, Latin (camelCase, contractions), digits and symbols where the
    regex module applying Kimi-K2's pattern cuts them, and encode each piece on its own (no token
    crosses a cut)."""
    import regex

    pattern = regex.compile(KIMI_PATTERN, flags=regex.V1)
    auto, raw, gguf, r = _three(_model(tiny_model, "deepseek_v3/kimi-k2-tiny"))
    assert r.get("tokenizer.ggml.pre") == "kimi-k2"
    rng = py_rng()
    texts = ["".join(KIMI_PIECES)] + ["".join(rng.choice(KIMI_PIECES) for _ in range(rng.randint(2, 10)))
                                      for _ in range(30)]
    for text in texts:
        want = pattern.findall(text)
        assert "".join(want) == text
        for which, backend in (("auto", auto.backend_tokenizer), ("json", raw), ("gguf", gguf.backend_tokenizer)):
            pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
            assert [raw.decoder.decode([p]) for p in pieces] == want, (which, text)
        ids = gguf(text, add_special_tokens=False)["input_ids"]
        assert ids == [i for p in want for i in gguf(p, add_special_tokens=False)["input_ids"]], text
    # Han runs stand alone: never joined with kana, hangul or Latin letters
    assert pattern.findall("中文English漢字かな") == ["中文", "English", "漢字", "かな"]
