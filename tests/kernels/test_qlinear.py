"""C++ CPU linear layer (csrc/linear/) against torch on the weights dequantized by gguf-py (not by
our own dequantizers): every weight format, every ISA level this machine runs (generic, AVX2 —
also forced with KTRANS_ISA=avx2 for a whole run —, AVX-512, AMX), the dots path at T in
{1, 3, 17} and the AMX bf16 GEMM path at prefill sizes; per-token results independent of T;
bias; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktrans import _C, cpu
from ktrans.operators.linear_cpu import KERNEL_QTYPES, QuantWeight, gguf_dequantize
from ktrans.weights import quant
from ktrans.weights.source import RawTensor
from tests.tolerances import MOE_PACKED_NMSE, VEC_DOT_ISA_NMSE, VEC_DOT_NMSE

ISAS = cpu.supported_isas()
N, K = 72, 512          # rows not a multiple of the row block; K two K-quant super-blocks


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))


@pytest.fixture(scope="module")
def pool():
    return _C.ThreadPool(2)


def weights(qtype: str, n: int = N, k: int = K) -> tuple[np.ndarray, torch.Tensor]:
    """Random rows stored as `qtype` and their values as gguf-py dequantizes them [n, k]."""
    raw = quant.quantize((torch.randn(n, k) / k**0.5).numpy(), qtype).reshape(-1)
    return raw, gguf_dequantize(RawTensor(qtype, (n, k), raw.reshape(n, -1)))


def run(lin, x: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], lin.N)
    lin.forward(x.numpy(), y.numpy())
    return y


@pytest.mark.parametrize("qtype", KERNEL_QTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_dots_every_format_and_isa_vs_torch(pool, qtype, isa):
    raw, w = weights(qtype)
    b = torch.randn(N)
    lin = _C.Linear(pool, qtype, N, K, raw, b.numpy(), isa, 0)
    for t in (1, 3, 17):
        x = torch.randn(t, K)
        ref = F.linear(x.double(), w.double(), b.double())
        assert nmse(run(lin, x), ref) < VEC_DOT_NMSE[qtype], (qtype, isa, t)


@pytest.mark.parametrize("qtype", [q for q in KERNEL_QTYPES if q not in ("f32", "f16", "bf16")])
def test_every_isa_matches_the_generic_reference(pool, qtype):
    raw, _ = weights(qtype)
    x = torch.randn(5, K)
    ref = run(_C.Linear(pool, qtype, N, K, raw, None, "generic", 0), x)
    for isa in ISAS[1:]:
        assert nmse(run(_C.Linear(pool, qtype, N, K, raw, None, isa, 0), x), ref) < VEC_DOT_ISA_NMSE, isa


@pytest.mark.parametrize("qtype", ["q4_0", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k"])
def test_a_tokens_result_does_not_depend_on_t(pool, qtype):
    """The dots path gives row t of a T-token call exactly what a one-token call gives (the
    engine's batching invariance rests on it)."""
    raw, _ = weights(qtype)
    lin = _C.Linear(pool, qtype, N, K, raw, None, "", 0)
    x = torch.randn(19, K)
    whole = run(lin, x)
    for t in (0, 8, 18):
        assert torch.equal(run(lin, x[t:t + 1])[0], whole[t])


@pytest.mark.amx
@pytest.mark.parametrize("qtype", ["q8_0", "q5_0", "q4_k", "q6_k", "iq4_xs"])
def test_amx_gemm_path_vs_torch(pool, qtype):
    raw, w = weights(qtype, n=200, k=768)
    b = torch.randn(200)
    lin = _C.Linear(pool, qtype, 200, 768, raw, b.numpy(), "amx")
    assert lin.uses_gemm(64) and not lin.uses_gemm(1)
    for t in (lin.gemm_min_tokens, 64, 300):
        x = torch.randn(t, 768)
        assert nmse(run(lin, x), F.linear(x.double(), w.double(), b.double())) < MOE_PACKED_NMSE["amx_bf16"]


def test_float_rows_never_take_the_bf16_gemm(pool):
    raw = torch.randn(N, K).numpy().view(np.uint8).reshape(-1)
    lin = _C.Linear(pool, "f32", N, K, raw, None, "", 1)
    assert not lin.uses_gemm(512)


def test_quant_weight_reads_in_place_and_its_oracle(pool):
    raw, w = weights("q4_k")
    qw = QuantWeight(RawTensor("q4_k", (N, K), raw.reshape(N, -1)), torch.randn(N), pool, "test")
    assert np.shares_memory(qw.raw.data, raw)
    x = torch.randn(2, 3, K)                                                              # any leading dims
    out = qw(x)
    assert out.shape == (2, 3, N) and nmse(out, qw.native(x)) < VEC_DOT_NMSE["q4_k"]
    assert torch.equal(qw.dequantized(), w)


def test_bad_input_is_named(pool):
    raw, _ = weights("q4_k")
    with pytest.raises(ValueError, match=r"\[73, 512\] needs 21024 weight bytes, got 20736"):
        _C.Linear(pool, "q4_k", N + 1, K, raw)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        _C.Linear(pool, "q4_k", N, 320, raw)
    with pytest.raises(ValueError, match="unknown weight format"):
        _C.Linear(pool, "q8_k", N, K, raw)
    with pytest.raises(ValueError, match="bias"):
        _C.Linear(pool, "q4_k", N, K, raw, np.zeros(3, np.float32))
    lin = _C.Linear(pool, "q4_k", N, K, raw)
    with pytest.raises(ValueError, match=r"float32 \[T, 512\]"):
        lin.forward(np.zeros((2, K), np.float64), np.zeros((2, N), np.float32))
    with pytest.raises(ValueError, match=r"output must be .*\[2, 72\]"):
        lin.forward(np.zeros((2, K), np.float32), np.zeros((3, N), np.float32))
