"""The paged split-KV decode kernel (ktrans.kernels.paged_decode) vs a float64 torch reference
that gathers each request's K/V through its page table: GQA (grouped heads) and MLA's absorbed
form (one kv head whose key is [latent | k_pe] and whose value is the latent), pages in any
order, lengths from one token to several pages, every split count. On a CPU-only machine the
kernel runs under Triton's interpreter (tests/conftest.py), on CUDA compiled, in bf16 too."""

from __future__ import annotations

import pytest
import torch

from ktrans.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def reference(q_a, k_a, v, page_table, seq_lens, page, scale, q_b=None, k_b=None) -> torch.Tensor:
    bsz, hq, _ = q_a.shape
    kv_head = torch.arange(hq) // (hq // v.shape[1])                      # [Hq]
    outs = []
    for b in range(bsz):
        n = int(seq_lens[b])
        j = torch.arange(n)
        slots = page_table[b].long().cpu()[j // page] * page + j % page    # [L]
        s = torch.einsum("hd,lhd->hl", q_a[b].double().cpu(), k_a[slots].double().cpu()[:, kv_head])
        if q_b is not None:
            s = s + torch.einsum("hd,lhd->hl", q_b[b].double().cpu(), k_b[slots].double().cpu()[:, kv_head])
        p = torch.softmax(s * scale, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", p, v[slots].double().cpu()[:, kv_head]))
    return torch.stack(outs)


def _case(bsz, hq, hkv, d, db, mla, page, num_pages, dtype):
    slots = num_pages * page
    if mla:
        cache = torch.randn(slots, d + db, device=DEV, dtype=dtype)
        k_a, k_b = cache[:, None, :d], cache[:, None, d:]
        v = k_a
    else:
        k_a = torch.randn(slots, hkv, d, device=DEV, dtype=dtype)
        v = torch.randn(slots, hkv, d, device=DEV, dtype=dtype)
        k_b = None
    q_a = torch.randn(bsz, hq, d, device=DEV, dtype=dtype)
    q_b = torch.randn(bsz, hq, db, device=DEV, dtype=dtype) if db else None
    per_req = num_pages // bsz
    page_table = torch.randperm(num_pages)[: bsz * per_req].view(bsz, per_req).int().to(DEV)
    seq_lens = torch.randint(1, per_req * page + 1, (bsz,), dtype=torch.int32)
    seq_lens[0] = 1                                                        # the shortest case
    return q_a, k_a, v, page_table, seq_lens.to(DEV), q_b, k_b


CASES = [  # (B, Hq, Hkv, D, DB, mla)
    (3, 8, 2, 32, 0, False),     # GQA, group 4
    (2, 4, 4, 24, 0, False),     # MHA, head dim not a power of two
    (2, 16, 1, 64, 16, True),    # MLA: 16 heads on one latent
    (1, 5, 1, 32, 8, True),      # MLA, odd head count, narrow rope part
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_paged_decode_matches_reference(case, num_splits):
    from ktrans.kernels.paged_decode import paged_decode_attention

    bsz, hq, hkv, d, db, mla = case
    page = 8
    q_a, k_a, v, pt, sl, q_b, k_b = _case(bsz, hq, hkv, d, db, mla, page, 12, torch.float32)
    out = paged_decode_attention(q_a, k_a, v, pt, sl, page, 0.3, q_b=q_b, k_b=k_b, num_splits=num_splits)
    ref = reference(q_a, k_a, v, pt, sl, page, 0.3, q_b, k_b)
    # NOTE: on CUDA tl.dot of f32 runs in tf32 (10-bit mantissa), so the bound is tf32's.
    tol = 2e-2 if ON_GPU else 1e-5
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(4, 128, 1, 512, 64, True), (8, 32, 4, 128, 0, False)])
def test_paged_decode_bf16_on_gpu(case):
    """bf16 inputs (the model's dtype on CUDA), the real MLA (512 + 64) and Qwen3 GQA shapes."""
    from ktrans.kernels.paged_decode import paged_decode_attention

    bsz, hq, hkv, d, db, mla = case
    q_a, k_a, v, pt, sl, q_b, k_b = _case(bsz, hq, hkv, d, db, mla, 64, 8 * bsz, torch.bfloat16)
    scale = (d + db) ** -0.5
    out = paged_decode_attention(q_a, k_a, v, pt, sl, 64, scale, q_b=q_b, k_b=k_b)
    ref = reference(q_a, k_a, v, pt, sl, 64, scale, q_b, k_b)
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e}"


def reference_window_sinks(q, k, v, page_table, seq_lens, page, scale, window, sinks) -> torch.Tensor:
    """The GQA reference over the last `window` tokens, with one sink logit per head."""
    bsz, hq, _ = q.shape
    kv_head = torch.arange(hq) // (hq // v.shape[1])
    outs = []
    for b in range(bsz):
        n = int(seq_lens[b])
        j = torch.arange(max(0, n - window) if window else 0, n)
        slots = page_table[b].long().cpu()[j // page] * page + j % page
        s = torch.einsum("hd,lhd->hl", q[b].double().cpu(), k[slots].double().cpu()[:, kv_head]) * scale
        if sinks is not None:
            s = torch.cat([s, sinks.double().cpu()[:, None]], dim=-1)
        p = torch.softmax(s, dim=-1)[:, : len(j)]
        outs.append(torch.einsum("hl,lhd->hd", p, v[slots].double().cpu()[:, kv_head]))
    return torch.stack(outs)


@pytest.mark.parametrize("window", [None, 1, 5, 20])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_window_and_sinks(window, with_sinks, num_splits):
    """gpt-oss's sliding layers and attention sinks (sinks large enough to take real mass)."""
    from ktrans.kernels.paged_decode import paged_decode_attention

    page = 8
    q, k, v, pt, sl, _, _ = _case(3, 8, 2, 32, 0, False, page, 12, torch.float32)
    sl[1] = 4 * page                                                       # a request longer than every window
    sinks = torch.randn(8, device=DEV) * 2 if with_sinks else None
    out = paged_decode_attention(q, k, v, pt, sl, page, 0.3, num_splits=num_splits, window=window, sinks=sinks)
    ref = reference_window_sinks(q, k, v, pt, sl, page, 0.3, window, sinks)
    tol = 2e-2 if ON_GPU else 1e-5
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
