"""Incremental detokenizer against tokenizer.decode of the whole output, on mixed text (CJK,
emoji split across byte tokens, accents, code), for a byte-level BPE (GPT/Qwen/DeepSeek style)
and a Metaspace BPE with byte fallback (Llama/SentencePiece style); plus stop strings that span
tokens and are held back while they might still match."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ktrans.engine.detokenizer import IncrementalDetokenizer
from tests.seeds import py_rng

CORPUS = [
    "Hello world, 你好世界! Ünïcödé façade — naïve café 🙂🚀👍🏽 données",
    "def f(x):\n    return x**2  # 平方\n",
    "The quick brown fox jumps over the lazy dog. 日本語のテキスト。",
    "<think>\nLet me think about it.\n</think>\nThe answer is 42.",
]
PIECES = ["Hello", " world", "你好", "世界", "🙂", "🚀", "👍🏽", " café", "naïve", "\n", "  ", "def",
          " x**2", "日本語", "。", "!", " the", "<think>", "</think>", "Ω", "𝔘", " 42", "ü"]


def _byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _metaspace_byte_fallback():
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], limit_alphabet=60)
    tok.train_from_iterator(CORPUS * 10, trainer)
    # Byte tokens are ordinary vocabulary entries (as in Llama's tokenizer), not special tokens.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request):
    return _byte_level() if request.param == "byte_level" else _metaspace_byte_fallback()


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def _stream(tokenizer, prompt_ids, out_ids, stop=None, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=stop, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add(t) for t in out_ids]
    pieces.append(detok.flush())
    return pieces, detok


def test_stream_equals_decode_on_mixed_text(tokenizer):
    rng = py_rng()
    for _ in range(300):     # prompts often end in a multi-byte character split over byte tokens
        prompt = tokenizer.encode(_random_text(rng, rng.randint(1, 8)), add_special_tokens=False)
        out = tokenizer.encode(_random_text(rng, rng.randint(1, 30)), add_special_tokens=False)
        pieces, _ = _stream(tokenizer, prompt, out)
        assert "".join(pieces) == tokenizer.decode(out, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces)      # no half characters are ever shown


def test_incomplete_character_at_the_end_is_flushed_as_decode_shows_it():
    tok = _byte_level()
    ids = tok.encode("ok 🚀", add_special_tokens=False)
    cut = ids[:-1]                                        # ends inside the emoji's bytes
    pieces, _ = _stream(tok, [], cut)
    assert "".join(pieces) == tok.decode(cut)
    assert pieces[-1].endswith("\ufffd")


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False) + [tokenizer.eos_token_id]
    pieces, _ = _stream(tokenizer, [], ids)
    assert "".join(pieces) == "Hello world"
    kept, _ = _stream(tokenizer, [], ids, skip_special_tokens=False)
    assert "".join(kept) == "Hello world" + tokenizer.eos_token


def test_stop_string_spanning_tokens_is_cut_and_held_back(tokenizer):
    rng = py_rng()
    for _ in range(20):
        before, after = _random_text(rng, rng.randint(0, 10)), _random_text(rng, rng.randint(1, 5))
        stop = rng.choice(["STOP here", "世界。", "\n\n###", "🚀🚀"])
        out = tokenizer.encode(before + stop + after, add_special_tokens=False)
        stops = [stop, "never appears"]
        pieces, detok = _stream(tokenizer, [], out, stop=stops)
        text = tokenizer.decode(out)
        expected = text[:text.find(stop)]
        assert detok.stopped and "".join(pieces) == expected
        # After each token exactly the text that can no longer become a stop string is shown:
        # the whole characters decoded so far, less a tail that starts a stop string.
        shown = ""
        for n, piece in enumerate(pieces[:-1], start=1):
            shown += piece
            want = _releasable(tokenizer, out[:n], stops)
            assert shown == want, (n, shown, want)


def _releasable(tokenizer, ids: list[int], stops: list[str]) -> str:
    """What a streaming detokenizer may show after `ids`: decode() of the longest prefix of ids
    that ends on a whole character, cut at a stop string, or else less its longest tail that is
    the start of a stop string."""
    for n in range(len(ids), -1, -1):
        text = tokenizer.decode(ids[:n])
        if not text.endswith("\ufffd"):
            break
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)]
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held]


def test_partial_stop_match_is_released_when_it_fails():
    tok = _byte_level()
    detok = IncrementalDetokenizer(tok, [], stop=["world peace"])
    shown = "".join(detok.add(t) for t in tok.encode("Hello world", add_special_tokens=False))
    assert shown == "Hello "                             # "world" could still become the stop
    shown += "".join(detok.add(t) for t in tok.encode(" 42", add_special_tokens=False))
    assert shown + detok.flush() == "Hello world 42" and not detok.stopped
