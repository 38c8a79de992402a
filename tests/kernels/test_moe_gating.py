"""C++ MoE layer with gpt-oss's expert MLP — clamped SwiGLU (alpha, limit) and gate/up/down biases
— against a dense torch reference on the dequantized weights: mxfp4 and float formats, every ISA
variant, the vec_dot and GEMM paths, the packed amx backend, the NUMA split layout; and the bad
arguments the binding rejects."""

from __future__ import annotations

import pytest
import torch

from ktrans import _C, cpu
from tests.kernels.test_moe import Experts, nmse, routing, run
from tests.tolerances import MOE_NMSE, MOE_PACKED_NMSE

E, H, I, K = 8, 256, 256, 3
ALPHA, LIMIT = 1.702, 7.0


def oai_reference(x, ids, w, gate, up, down, bg, bu, bd) -> torch.Tensor:
    """transformers' GptOssExperts math: (down(act(g + bg, u + bu)) + bd) * w, summed over slots."""
    x = x.float()
    g = torch.einsum("th,eih->tei", x, gate) + bg                                         # [T, E, I]
    u = torch.einsum("th,eih->tei", x, up) + bu
    g, u = g.clamp(max=LIMIT), u.clamp(-LIMIT, LIMIT)
    h = g * torch.sigmoid(ALPHA * g) * (u + 1)
    y = torch.einsum("tei,ehi->teh", h, down) + bd                                        # [T, E, H]
    route = torch.zeros(x.shape[0], gate.shape[0])                                        # [T, E]
    route.scatter_add_(1, ids.clamp(min=0), w * (ids >= 0))
    return torch.einsum("te,teh->th", route, y)


class OaiExperts(Experts):
    """Random experts with biases (inputs scaled by 4 in the tests, so gate/up outputs pass the clamp)."""

    def __init__(self, qtype: str, e: int = E):
        super().__init__(qtype, e=e)
        self.bias = [torch.randn(e, I) * 0.5, torch.randn(e, I) * 0.5, torch.randn(e, H) * 0.1]

    def layer(self, pool, isa: str = "", numa: str = "replicate", backend: str = "gguf", gemm_min_tokens: int = -1):
        moe = _C.MoeLayer(pool, E, H, I, [self.qtype] * 3, numa=numa, isa=isa, backend=backend,
                          gemm_min_tokens=gemm_min_tokens, act="swiglu_oai", alpha=ALPHA, limit=LIMIT)
        for p in range(3):
            moe.load(p, 0, self.raw[p])
            moe.load_bias(p, self.bias[p].numpy())
        return moe

    def reference(self, x, ids, w):
        return oai_reference(x, ids, w, *self.deq, *self.bias)


@pytest.fixture(scope="module")
def pool():
    return _C.ThreadPool(2)


@pytest.mark.parametrize("isa", cpu.supported_isas())
@pytest.mark.parametrize("qtype", ["mxfp4", "f32", "q8_0"])
def test_oai_gating_against_torch(pool, qtype, isa):
    ex = OaiExperts(qtype)
    moe = ex.layer(pool, isa=isa)
    clamped = 0
    for t in (1, 5, 40):
        ids, w = routing(t)
        x = (torch.randn(t, H) * 4).bfloat16()
        ref = ex.reference(x, ids, w)
        g = torch.einsum("th,eih->tei", x.float(), ex.deq[0]) + ex.bias[0]
        clamped += int((g > LIMIT).sum())
        for dtype in (torch.float32, torch.bfloat16):
            err = nmse(run(moe, x.to(dtype), ids, w).float(), ref)
            assert err < MOE_NMSE[qtype], f"{qtype} {isa} T={t} {dtype}: NMSE {err:.2e}"
    assert clamped > 0                                                                    # the clamp was exercised


@pytest.mark.parametrize("isa", cpu.supported_isas())
def test_oai_gating_gemm_path(pool, isa):
    ex = OaiExperts("mxfp4")
    moe = ex.layer(pool, isa=isa, gemm_min_tokens=8)
    t = 64
    ids = torch.multinomial(torch.tensor([16.0, 8, 4, 2, 1, 1, 0.5, 0.5]).expand(t, E), K)
    w = torch.rand(t, K)
    x = torch.randn(t, H) * 4
    assert nmse(run(moe, x, ids, w), ex.reference(x, ids, w)) < MOE_NMSE["mxfp4"]


@pytest.mark.amx
@pytest.mark.parametrize("backend", list(MOE_PACKED_NMSE))
def test_oai_gating_packed_backend(pool, backend):
    """Repacked from mxfp4 (gpt-oss-amx.yaml: amx_int8); T=300 puts M >= 16 rows on AMX tiles."""
    ex = OaiExperts("mxfp4")
    moe = ex.layer(pool, isa="amx", backend=backend)
    for t in (5, 300):
        ids, w = routing(t)
        x = torch.randn(t, H) * 4
        err = nmse(run(moe, x, ids, w), ex.reference(x, ids, w))
        assert err < MOE_PACKED_NMSE[backend], f"{backend} T={t}: NMSE {err:.2e}"


def test_oai_gating_numa_split_adds_down_bias_once():
    ex = OaiExperts("mxfp4")
    ids, w = routing(9)
    x = torch.randn(9, H) * 4
    moe = ex.layer(_C.ThreadPool(2, 2), numa="split")
    assert nmse(run(moe, x, ids, w), ex.reference(x, ids, w)) < MOE_NMSE["mxfp4"]


def test_silu_layer_with_biases_and_bad_arguments(pool):
    ex = Experts("f32")
    moe = _C.MoeLayer(pool, E, H, I, ["f32"] * 3)
    for p in range(3):
        moe.load(p, 0, ex.raw[p])
    bd = torch.randn(E, H)
    moe.load_bias(2, bd.numpy())                                                          # down bias only
    ids, w = routing(4)
    x = torch.randn(4, H)
    g, u = (torch.einsum("th,eih->tei", x, m) for m in ex.deq[:2])
    y = torch.einsum("tei,ehi->teh", torch.nn.functional.silu(g) * u, ex.deq[2]) + bd
    route = torch.zeros(4, E).scatter_add_(1, ids.clamp(min=0), w * (ids >= 0))
    assert nmse(run(moe, x, ids, w), torch.einsum("te,teh->th", route, y)) < MOE_NMSE["f32"]
    with pytest.raises(ValueError, match="activation"):
        _C.MoeLayer(pool, E, H, I, ["f32"] * 3, act="gelu")
    with pytest.raises(ValueError, match="limit"):
        _C.MoeLayer(pool, E, H, I, ["f32"] * 3, act="swiglu_oai", limit=0.0)
    with pytest.raises(ValueError, match=r"\[8, 256\]"):
        moe.load_bias(0, torch.zeros(E, H + 1).numpy())
