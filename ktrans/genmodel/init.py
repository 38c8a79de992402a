"""Random weights for generated models: scaled so every layer of a real-size model stays finite.

Scales (std of a zero-mean uniform distribution, chosen per parameter by its name):
  embed_tokens                       1                (token identity dominates the residual);
                                     1/sqrt(H) when tied to lm_head (logits std ~1, as untied)
  norms (RMSNorm weights)            1 +- 0.2         (~1, but not all-ones, so a mis-mapped norm shows)
  o_proj / down_proj (all MLPs)      1/sqrt(fan_in * 2L)   (GPT-2 style: the residual grows ~O(1)
                                                      over L layers instead of O(sqrt(L)))
  attention q/k/v biases             0.1
  e_score_correction_bias            0.01             (small next to sigmoid scores in (0, 1))
  everything else (incl. lm_head)    1/sqrt(fan_in)   (unit-variance outputs for unit-variance input)

Values are generated block by block, each block from its own Philox stream keyed by
(seed, tensor name, expert, block): the result depends only on the seed and shape, never on the
thread count or on the chunking of the writer, and every output type of one seed holds the same
weights. NOTE: values are rounded to bf16 precision, so f32, bf16 and f16 files of one seed
hold identical numbers (apart from f16's narrower exponent range, irrelevant at these scales).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

BLOCK_ELEMS = 1 << 22   # elements per independently seeded block (16 MiB of float32)

_OUT_PROJ = ("o_proj.weight", "down_proj.weight", "experts.down_proj", "w2.weight")


def init_std(hf_name: str, fan_in: int, num_layers: int, tied: bool = False) -> tuple[float, float]:
    """(mean, std) of the parameter named `hf_name` (a transformers-5 parameter name)."""
    if hf_name == "model.embed_tokens.weight":
        return 0.0, (1.0 / math.sqrt(fan_in) if tied else 1.0)
    if "norm" in hf_name:
        return 1.0, 0.2 / math.sqrt(3.0)     # uniform in [0.8, 1.2]
    if hf_name.endswith("e_score_correction_bias"):
        return 0.0, 0.01
    if hf_name.endswith(".bias"):
        return 0.0, 0.1
    if hf_name.endswith(_OUT_PROJ):
        return 0.0, 1.0 / math.sqrt(fan_in * 2 * num_layers)
    return 0.0, 1.0 / math.sqrt(fan_in)


def _round_bf16(x: np.ndarray) -> None:
    """Round float32 `x` in place to a nearest bf16 value (ties away from zero: two in-place
    passes, no temporaries; which of two equidistant values a random weight gets is immaterial)."""
    u = x.view(np.uint32)
    u += np.uint32(0x8000)
    u &= np.uint32(0xFFFF0000)


def _rng(seed: int, name: str, expert: int, block: int) -> np.random.Generator:
    """An independent stream per (seed, tensor, expert, block)."""
    entropy = [seed & (2**63 - 1), zlib.crc32(name.encode()), expert + 1, block]
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


def block_rows(cols: int) -> int:
    """Rows per seeded block for a matrix of `cols` columns (a function of the shape only)."""
    return max(1, BLOCK_ELEMS // max(cols, 1))


def generate(seed: int, key: str, expert: int, row0: int, shape: tuple[int, ...], mean: float,
             std: float) -> np.ndarray:
    """float32 rows [row0, row0 + shape[0]) of the matrix `key` (expert `expert`, -1 if none).

    `row0` and `shape[0]` must be multiples of block_rows(cols) except at the matrix's end.
    """
    cols = shape[-1] if len(shape) > 1 else shape[0]
    rows = shape[0] if len(shape) > 1 else 1
    per = block_rows(cols)
    assert row0 % per == 0, "chunks must start on a block boundary"
    out = np.empty((rows, cols), dtype=np.float32)
    half = std * math.sqrt(3.0)              # uniform [-h, h] has std h/sqrt(3)
    for r in range(0, rows, per):
        blk = out[r:r + per]
        _rng(seed, key, expert, (row0 + r) // per).random(out=blk, dtype=np.float32)
        blk *= 2.0 * half
        blk += mean - half
    _round_bf16(out)
    return out.reshape(shape)
