"""A transformers tokenizer rebuilt from GGUF tokenizer metadata (single-file mode).

GGUF carries the vocabulary (`tokenizer.ggml.tokens`, token types), the BPE merges, the special
token ids, the add-BOS/EOS flags, the chat template, and the *name* of the pre-tokenizer
(`tokenizer.ggml.pre`) — not its definition. PRE_TOKENIZERS below maps the names to the split
regexes of the HF tokenizers they stand for, so the rebuilt tokenizer splits text exactly as the
original tokenizer.json did. An unknown name is an error, never a silent guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from ktrans.errors import KtransError
from ktrans.weights.gguf_reader import GGUFReader

# llama.cpp token types (llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
SPACE = "\u2581"   # sentencepiece's visible space

_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
# Qwen3.5 (llama.cpp's "qwen35"): Qwen2's split with combining marks kept in letter runs.
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# o200k (gpt-oss's o200k_harmony, GPT-4o; llama.cpp's "gpt-4o"): cased word pieces with an optional
# contraction, digit runs of up to 3, punctuation runs (with trailing newlines and slashes).
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
]

# Kimi-K2 (llama.cpp's "kimi-k2"): runs of Han characters on their own; cased word pieces as
# GPT-4o's but of letters other than Han (class intersection, onig's `&&`), so kana, hangul and
# Latin never join a Han run; digit runs of up to 3; punctuation runs with trailing newlines.
_KIMI_K2 = (r"[\p{Han}]+"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek LLM / V2 (llama.cpp's "deepseek-llm"): newlines alone, then letter runs of these cased-letter
# ranges, ASCII/fullwidth punctuation runs, trailing whitespace, CJK/Hangul runs, digit runs.
# NOTE: the classes are written as regex escapes (\x{...}, onig syntax), ASCII only: several of these
# code points (U+1F7D, U+1FBE, U+2126, U+212A, ...) have canonical equivalents that NFC (an editor,
# a copy) would silently substitute, and the tokenizers library cannot print long non-ASCII patterns.
_DS_LETTERS = (
    r"A-Za-z\x{b5}\x{c0}-\x{d6}\x{d8}-\x{f6}\x{f8}-\x{1ba}\x{1bc}-\x{1bf}\x{1c4}-\x{293}"
    r"\x{295}-\x{2af}\x{370}-\x{373}\x{376}\x{377}\x{37b}-\x{37d}\x{37f}\x{386}\x{388}-\x{38a}\x{38c}"
    r"\x{38e}-\x{3a1}\x{3a3}-\x{3f5}\x{3f7}-\x{481}\x{48a}-\x{52f}\x{531}-\x{556}\x{10a0}-\x{10c5}"
    r"\x{13a0}-\x{13f5}\x{13f8}-\x{13fd}\x{1c90}-\x{1cba}\x{1cbd}-\x{1cbf}\x{1d00}-\x{1d2b}"
    r"\x{1d6b}-\x{1d77}\x{1d79}-\x{1d9a}\x{1e00}-\x{1f15}\x{1f18}-\x{1f1d}\x{1f20}-\x{1f45}"
    r"\x{1f48}-\x{1f4d}\x{1f50}-\x{1f57}\x{1f59}\x{1f5b}\x{1f5d}\x{1f5f}-\x{1f7d}\x{1f80}-\x{1fb4}"
    r"\x{1fb6}-\x{1fbc}\x{1fbe}\x{1fc2}-\x{1fc4}\x{1fc6}-\x{1fcc}\x{1fd0}-\x{1fd3}\x{1fd6}-\x{1fdb}"
    r"\x{1fe0}-\x{1fec}\x{1ff2}-\x{1ff4}\x{1ff6}-\x{1ffc}\x{2102}\x{2107}\x{210a}-\x{2113}\x{2115}"
    r"\x{2119}-\x{211d}\x{2124}\x{2126}\x{2128}\x{212a}-\x{212d}\x{212f}-\x{2134}\x{2139}"
    r"\x{213c}-\x{213f}\x{2145}-\x{2149}\x{214e}\x{2183}\x{2184}\x{2c00}-\x{2c7b}\x{2c7e}-\x{2ce4}"
    r"\x{2ceb}-\x{2cee}\x{2cf2}\x{2cf3}\x{a640}-\x{a66d}\x{a680}-\x{a69b}\x{a722}-\x{a76f}"
    r"\x{a771}-\x{a787}\x{a78b}-\x{a78e}\x{ab70}-\x{abbf}\x{fb00}-\x{fb06}\x{fb13}-\x{fb17}"
    r"\x{ff21}-\x{ff3a}\x{ff41}-\x{ff5a}\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}"
    r"\x{10c80}-\x{10cb2}\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}")
_DEEPSEEK_LLM = [
    r"[\r\n]",
    r"\s?[" + _DS_LETTERS + "]+",
    r"\s?[!-/:-~\x{ff01}-\x{ff0f}\x{ff1a}-\x{ff5e}\x{2018}-\x{201f}\x{3000}-\x{3002}]+",
    r"\s+$",
    r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+",
    r"\p{N}+",
]


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...] | None   # regexes applied in turn (isolated); None: GPT-2's own regex
    nfc: bool = False                # HF tokenizer applies NFC normalization first (Qwen2)
    ignore_merges: bool = False      # whole-word vocab hits skip BPE merges (Llama 3)


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(None),
    "gpt-2": PreTokenizer(None),
    "gpt2": PreTokenizer(None),
    "qwen2": PreTokenizer((_QWEN2,), nfc=True),
    "qwen35": PreTokenizer((_QWEN35,), nfc=True),
    "llama-bpe": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "llama3": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "deepseek-v3": PreTokenizer(tuple(_DEEPSEEK_V3)),
    "deepseek-llm": PreTokenizer(tuple(_DEEPSEEK_LLM)),
    "gpt-4o": PreTokenizer((_GPT4O,)),
    # GLM-4 / GLM-4.5 (llama.cpp's "glm4"): Llama 3's split (llama.cpp spells the contractions'
    # case-insensitivity out per letter), whole-word vocabulary hits skip the merges.
    "glm4": PreTokenizer((_LLAMA3,), ignore_merges=True),
    # MiniMax-M2: its tokenizer.json splits with GPT-4o's (o200k) regex.
    "minimax-m2": PreTokenizer((_GPT4O,)),
    # Kimi-K2 (a DeepSeek-V3 model): its tiktoken tokenizer's regex; the GGUF's merges were
    # recovered from tiktoken's ranks by the converter.
    "kimi-k2": PreTokenizer((_KIMI_K2,)),
}


def hf_pre_tokenizer(name: str):
    """(normalizer or None, pre-tokenizer) of the HF byte-level BPE tokenizer that GGUF's
    `tokenizer.ggml.pre = name` stands for; None when ktrans does not know the name."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    spec = PRE_TOKENIZERS.get(name)
    if spec is None:
        return None
    if spec.splits is None:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False) for rx in spec.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return (normalizers.NFC() if spec.nfc else None), pre


def _pre_tokenizer(r: GGUFReader):
    name = r.get("tokenizer.ggml.pre", "default")
    parts = hf_pre_tokenizer(name)
    if parts is None:
        raise KtransError(f"{r.path}: tokenizer pre-tokenizer '{name}' is not known to ktrans (known: "
                          f"{', '.join(PRE_TOKENIZERS)}); pass --model_path with the HF tokenizer files")
    norm, pre = parts
    return PRE_TOKENIZERS[name], pre, norm


def _bpe_model(r: GGUFReader, tokens: list[str], spec: PreTokenizer):
    from tokenizers import models

    merges = r.get("tokenizer.ggml.merges")
    if merges is None:
        raise KtransError(f"{r.path}: BPE tokenizer without 'tokenizer.ggml.merges'")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise KtransError(f"{r.path}: malformed BPE merge {m!r} (expected 'left right')")
        pairs.append((left, right))
    vocab = {t: i for i, t in enumerate(tokens)}
    return models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges, fuse_unk=False)


def _token(r: GGUFReader, role: str, tokens: list[str]) -> str | None:
    tid = r.get(f"tokenizer.ggml.{role}_token_id")
    if tid is None:
        return None
    if not 0 <= int(tid) < len(tokens):
        raise KtransError(f"{r.path}: tokenizer.ggml.{role}_token_id = {tid} is outside the vocabulary "
                          f"of {len(tokens)} tokens")
    return tokens[int(tid)]


def _post_processor(r: GGUFReader, bos: str | None, eos: str | None, tokens: list[str]):
    """BOS/EOS added around encoded text, as the original tokenizer's post-processor did."""
    from tokenizers import processors

    add_bos = _add_bos(r) and bos is not None
    add_eos = bool(r.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        return None
    head, tail = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
    single = f"{head}$A{tail}"
    pair = f"{single} {head}$B{tail}"
    specials = {t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))


def _add_bos(r: GGUFReader) -> bool:
    # NOTE: llama.cpp adds BOS to sentencepiece vocabularies whose file does not say otherwise.
    return bool(r.get("tokenizer.ggml.add_bos_token", r.get("tokenizer.ggml.model") == "llama"))


def _chat_template(r: GGUFReader):
    main = r.get("tokenizer.chat_template")
    named = {k[len("tokenizer.chat_template."):]: v for k, v in r.metadata.items()
             if k.startswith("tokenizer.chat_template.")}
    if named:
        return {**({"default": main} if main else {}), **named}
    return main


def _spm_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces,
    best-scored merged piece first (sentencepiece merges the best-scored adjacent pair)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, i in ids.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                found.append((-float(scores[i]), i, ids[left], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def spm_tokenizer(tokens: list[str], scores, unk: str | None, add_space_prefix: bool):
    """The tokenizers pipeline of a sentencepiece BPE vocabulary with byte fallback (llama.cpp's
    'llama' vocabulary), as HF's Llama/Gemma tokenizer files define it: '▁' for spaces (one
    prepended with add_space_prefix: Llama 2 yes, Gemma no), <0xXX> byte pieces, merges implied
    by the scores. gen-model writes its sentencepiece vocabularies' tokenizer.json with it too."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_spm_merges(tokens, scores),
                               unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if add_space_prefix else [])
                                          + [normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def _spm_backend(r: GGUFReader, tokens: list[str]):
    """llama.cpp's 'llama' vocabulary (sentencepiece BPE with byte fallback): spm_tokenizer."""
    scores = r.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise KtransError(f"{r.path}: sentencepiece tokenizer needs one tokenizer.ggml.scores entry per token")
    return spm_tokenizer(tokens, scores, _token(r, "unknown", tokens),
                         bool(r.get("tokenizer.ggml.add_space_prefix", True)))


def _bpe_backend(r: GGUFReader, tokens: list[str]):
    """llama.cpp's 'gpt2' vocabulary: byte-level BPE with the named pre-tokenizer."""
    from tokenizers import Tokenizer, decoders

    spec, pre, norm = _pre_tokenizer(r)
    tok = Tokenizer(_bpe_model(r, tokens, spec))
    tok.pre_tokenizer = pre
    if norm is not None:
        tok.normalizer = norm
    tok.decoder = decoders.ByteLevel()
    return tok


def _not_utf8(token: str) -> bool:
    # The reader keeps undecodable bytes as lone surrogates (surrogateescape).
    try:
        token.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def tokenizer_from_gguf(r: GGUFReader):
    """transformers fast tokenizer equivalent to the one the GGUF was converted from."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    kind = r.get("tokenizer.ggml.model")
    if kind is None:
        raise KtransError(f"{r.path}: GGUF has no tokenizer metadata (tokenizer.ggml.model); pass --model_path")
    if kind not in ("gpt2", "llama"):
        raise KtransError(f"{r.path}: tokenizer model '{kind}' is not supported in single-file mode (ktrans "
                          f"rebuilds 'gpt2' byte-level BPE and 'llama' sentencepiece BPE); pass --model_path")
    tokens = list(r.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise KtransError(f"{r.path}: tokenizer.ggml.tokens is missing or empty")
    types = r.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise KtransError(f"{r.path}: {len(types)} token types for {len(tokens)} tokens")
    bad = next((i for i, t in enumerate(tokens) if not t.isprintable() and _not_utf8(t)), None)
    if bad is not None:
        raise KtransError(f"{r.path}: tokenizer.ggml.tokens[{bad}] is not valid UTF-8")
    try:
        tok = _bpe_backend(r, tokens) if kind == "gpt2" else _spm_backend(r, tokens)
    except KtransError:
        raise
    except Exception as e:  # the tokenizers library reports inconsistent vocabularies as bare Exceptions
        raise KtransError(f"{r.path}: tokenizer metadata is inconsistent ({str(e).splitlines()[0]})") from None
    special = (_CONTROL, _UNKNOWN) if kind == "llama" else (_CONTROL,)
    if types is not None:
        tok.add_tokens([AddedToken(tokens[i], special=int(t) in special, normalized=False)
                        for i, t in enumerate(types) if int(t) in (*special, _USER_DEFINED)])
    bos, eos = _token(r, "bos", tokens), _token(r, "eos", tokens)
    post = _post_processor(r, bos, eos, tokens)
    if post is not None:
        tok.post_processor = post
    ctx = r.get(f"{r.arch}.context_length") if "general.architecture" in r.metadata else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=_token(r, "unknown", tokens),
        pad_token=_token(r, "padding", tokens), chat_template=_chat_template(r),
        clean_up_tokenization_spaces=False, model_max_length=int(ctx) if ctx else int(1e30),
        add_bos_token=_add_bos(r),
        add_eos_token=bool(r.get("tokenizer.ggml.add_eos_token", False)))
