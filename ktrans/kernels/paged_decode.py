"""Decode attention over the paged KV cache: one query token per request, split-KV
("flash-decoding"), for GQA and for DeepSeek's absorbed MLA.

What it computes, per request b and query head h (kv head g = h // group):
    out[b, h] = softmax_j(scale * (q_a[b, h] · k_a[j, g] + q_b[b, h] · k_b[j, g])) · v[j, g]
over the request's first seq_lens[b] tokens j (the last `window` of them on a sliding layer),
whose KV slot is page_table[b, j // page] * page + j % page. With sinks (gpt-oss), one more
logit sinks[h] per query head joins the softmax's denominator (it has no value).
- GQA: q_a = q [B, Hq, D], k_a = K cache [slots, Hkv, D], v = V cache, no q_b/k_b.
- MLA (absorbed): q_a = q_nope · W_UK [B, H, r], q_b = rotated q_pe [B, H, dr]; the cache row is
  [latent (r) | k_pe (dr)] with one "kv head": k_a = v = latent, k_b = k_pe (strided views of the
  same buffer, nothing copied).

Layout and work split: grid (B, Hkv x head blocks, NUM_SPLITS). Each program takes up to BLOCK_H
query heads sharing one kv head and 1/NUM_SPLITS of the request's tokens (rounded to BLOCK_N),
keeps a running max / sum / weighted V in f32 (online softmax), and writes a partial result and
its log-sum-exp; a second kernel merges the splits (and adds the sink's exp to the denominator).
A window moves the range the splits share to the last `window` tokens. Every length is read on the device
(seq_lens, page_table), and the grid depends only on B and the model, so a launch can be captured
in a CUDA graph once and replayed for any sequence lengths.

Differences from the torch oracle (the operators' forward_native / masked_attention): f32
accumulation in another order, and probabilities rounded to the cache dtype before the P·V
product (as flash attention does); no padded gather of K/V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktrans.kernels import next_pow2


@triton.jit
def _decode_split_kernel(
    QA, QB, KA, KB, V, PT, SL, MID, LSE,
    s_qa_b, s_qa_h, s_qb_b, s_qb_h,
    s_ka_slot, s_ka_head, s_kb_slot, s_kb_head, s_v_slot, s_v_head,
    s_pt_b, s_mid_b, s_mid_h, s_mid_s, s_lse_b, s_lse_h,
    scale, num_q_heads, group, head_blocks, window,
    DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // head_blocks
    hblock = tl.program_id(1) % head_blocks
    split = tl.program_id(2)

    in_group = hblock * BLOCK_H + tl.arange(0, BLOCK_H)                    # [BH] index inside the group
    heads = kv_head * group + in_group                                      # [BH] query heads
    hmask = (in_group < group) & (heads < num_q_heads)
    da = tl.arange(0, BLOCK_DA)
    dv = tl.arange(0, BLOCK_DV)
    q_a = tl.load(QA + b * s_qa_b + heads[:, None] * s_qa_h + da[None, :],
                  mask=hmask[:, None] & (da[None, :] < DA), other=0.0)     # [BH, DA]
    if DB > 0:
        db = tl.arange(0, BLOCK_DB)
        q_b = tl.load(QB + b * s_qb_b + heads[:, None] * s_qb_h + db[None, :],
                      mask=hmask[:, None] & (db[None, :] < DB), other=0.0)  # [BH, DB]

    seq_len = tl.load(SL + b)
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)          # first visible token
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)                                   # [BN]
        tmask = toks < end
        page = tl.load(PT + b * s_pt_b + toks // PAGE, mask=tmask, other=0)
        slots = (page * PAGE + toks % PAGE).to(tl.int64)                    # [BN]
        k_a = tl.load(KA + slots[:, None] * s_ka_slot + kv_head * s_ka_head + da[None, :],
                      mask=tmask[:, None] & (da[None, :] < DA), other=0.0)  # [BN, DA]
        qk = tl.dot(q_a, tl.trans(k_a))                                     # [BH, BN] f32
        if DB > 0:
            k_b = tl.load(KB + slots[:, None] * s_kb_slot + kv_head * s_kb_head + db[None, :],
                          mask=tmask[:, None] & (db[None, :] < DB), other=0.0)
            qk += tl.dot(q_b, tl.trans(k_b))
        qk = tl.where(tmask[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])                                     # [BH, BN]
        v = tl.load(V + slots[:, None] * s_v_slot + kv_head * s_v_head + dv[None, :],
                    mask=tmask[:, None] & (dv[None, :] < DV), other=0.0)    # [BN, DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # NOTE: a split past the end of the sequence holds no token: l_i == 0, its lse is -inf and
    # the merge gives it weight 0 (split 0 always holds a token, since seq_len >= 1).
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MID + b * s_mid_b + heads[:, None] * s_mid_h + split * s_mid_s + dv[None, :], out,
             mask=hmask[:, None] & (dv[None, :] < DV))
    tl.store(LSE + b * s_lse_b + heads * s_lse_h + split, lse, mask=hmask)


@triton.jit
def _merge_splits_kernel(MID, LSE, OUT, SINKS, s_mid_b, s_mid_h, s_mid_s, s_lse_b, s_lse_h, s_out_b, s_out_h,
                         DV: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE + b * s_lse_b + h * s_lse_h + s)                      # [S]
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32)
        m = tl.maximum(m, sink)
    w = tl.exp(lse - m)                                                     # [S], 0 for empty splits
    mid = tl.load(MID + b * s_mid_b + h * s_mid_h + s[:, None] * s_mid_s + dv[None, :],
                  mask=(w[:, None] > 0) & (dv[None, :] < DV), other=0.0)    # [S, DV]
    den = tl.sum(w, 0)
    if HAS_SINKS:
        den += tl.exp(sink - m)
    out = tl.sum(mid * w[:, None], 0) / den
    tl.store(OUT + b * s_out_b + h * s_out_h + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)


def num_splits_for(batch: int, kv_programs: int, sm_count: int = 132) -> int:
    """Splits per request so that batch x kv programs x splits fills the GPU about twice over
    (a power of two, 1..32). Depends on the batch and the model only, never on sequence
    lengths, so a CUDA graph captured for a batch size stays valid for any lengths."""
    want = -(-2 * sm_count // max(1, batch * kv_programs))
    return max(1, min(32, next_pow2(want)))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def paged_decode_attention(q_a: torch.Tensor, k_a: torch.Tensor, v: torch.Tensor, page_table: torch.Tensor,
                           seq_lens: torch.Tensor, page_size: int, scale: float,
                           q_b: torch.Tensor | None = None, k_b: torch.Tensor | None = None,
                           num_splits: int | None = None, window: int | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """out [B, Hq, DV] (q_a's dtype) — see the module docstring.

    q_a [B, Hq, DA], q_b [B, Hq, DB] (optional); k_a [slots, Hkv, DA], k_b [slots, Hkv, DB],
    v [slots, Hkv, DV] (any strides with a unit last stride: views into one cache buffer are
    fine); page_table [B, max_pages] int32/int64; seq_lens [B] int32/int64, each >= 1;
    window: attend over the last `window` tokens only (sliding layers); sinks [Hq]: gpt-oss's
    per-head sink logits."""
    bsz, hq, da = q_a.shape
    hkv, dvd = v.shape[1], v.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not split into {hkv} kv heads")
    group = hq // hkv
    for name, t in (("q_a", q_a), ("k_a", k_a), ("v", v), ("q_b", q_b), ("k_b", k_b)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"paged_decode_attention: {name} needs a unit last stride")
    db = 0 if q_b is None else q_b.shape[-1]
    block_h = max(16, min(64, next_pow2(group)))
    head_blocks = -(-group // block_h)
    if num_splits is None:
        num_splits = num_splits_for(bsz, hkv * head_blocks, _sm_count(q_a.device))
    dev = q_a.device
    mid = torch.empty(bsz, hq, num_splits, dvd, dtype=torch.float32, device=dev)
    lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=dev)
    out = torch.empty(bsz, hq, dvd, dtype=q_a.dtype, device=dev)
    qb, kb = (q_b, k_b) if db else (q_a, k_a)          # unused pointers when DB == 0
    block_da, block_dv = max(16, next_pow2(da)), max(16, next_pow2(dvd))
    big = block_da + block_dv >= 512                   # MLA: r = 512 per token and head
    block_n = 16 if big else 32
    _decode_split_kernel[(bsz, hkv * head_blocks, num_splits)](
        q_a, qb, k_a, kb, v, page_table, seq_lens, mid, lse,
        q_a.stride(0), q_a.stride(1), qb.stride(0), qb.stride(1),
        k_a.stride(0), k_a.stride(1), kb.stride(0), kb.stride(1), v.stride(0), v.stride(1),
        page_table.stride(0), mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0), lse.stride(1),
        float(scale), hq, group, head_blocks, int(window or 0),
        DA=da, DB=db, DV=dvd, BLOCK_DA=block_da, BLOCK_DB=max(16, next_pow2(db)), BLOCK_DV=block_dv,
        PAGE=int(page_size), BLOCK_H=block_h, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        num_warps=8 if big else 4, num_stages=1 if big else 2)
    if sinks is not None and (sinks.shape != (hq,) or sinks.device != dev):
        raise ValueError(f"paged_decode_attention: sinks must be [{hq}] on {dev}, got {list(sinks.shape)} on {sinks.device}")
    _merge_splits_kernel[(bsz, hq)](
        mid, lse, out, sinks if sinks is not None else lse, mid.stride(0), mid.stride(1), mid.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), DV=dvd, BLOCK_DV=block_dv,
        NUM_SPLITS=num_splits, HAS_SINKS=sinks is not None, num_warps=4)
    return out
