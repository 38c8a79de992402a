"""Sentencepiece-style vocabulary for generated models whose real tokenizer is one (Gemma 3), as
llama.cpp stores it: tokenizer.ggml.model = llama, each piece with a score, '▁' for spaces,
<0xXX> byte pieces for what the vocabulary lacks (byte fallback).

The pieces are learned by BPE on the same small corpus as the byte-level families (words split at
spaces and single digits, as sentencepiece trains with split_digits), then laid out as a
sentencepiece model: special pieces, the 256 byte pieces, the characters, then the merged pieces
in the order they were learned, scored by that order (a higher score merges first). The
tokenizer.json beside the GGUF is the pipeline llama.cpp runs on those pieces and scores
(tokenizer_gguf.spm_tokenizer: merges implied by the scores), so both sides split text alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ktrans.weights.tokenizer_gguf import SPACE, spm_tokenizer

BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def _learn(corpus: str, size: int) -> list[str]:
    """Pieces learned by BPE: the characters first, then each merge's result in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=2, show_progress=False)
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return sorted(vocab, key=vocab.get)


def build_spm(fam: dict, corpus: str, size: int, out_dir: Path):
    """(tokens, scores, types) of the family's vocabulary of about `size` pieces; writes
    tokenizer.json (tokenizer_config.json is the caller's)."""
    from tokenizers import AddedToken, processors

    specials = fam["specials"]
    learned = [p for p in _learn(corpus, size - len(specials) - len(BYTE_PIECES)) if p not in specials]
    tokens = specials + BYTE_PIECES + learned
    n = len(specials) + len(BYTE_PIECES)
    scores = [0.0] * n + [-float(i) for i in range(len(learned))]
    types = ([gguf.TokenType.UNKNOWN if t == fam.get("unk") else gguf.TokenType.CONTROL for t in specials]
             + [gguf.TokenType.BYTE] * len(BYTE_PIECES) + [gguf.TokenType.NORMAL] * len(learned))
    tok = spm_tokenizer(tokens, scores, fam.get("unk"), add_space_prefix=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if fam["add_bos"]:
        bos = fam["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    tok.save(str(out_dir / "tokenizer.json"))
    return tokens, scores, [int(t) for t in types]
