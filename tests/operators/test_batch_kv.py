"""ForwardBatch validation, the scoped forward context, and paged KV write/gather."""

from __future__ import annotations

import pytest
import torch

from ktrans.engine.batch import ForwardBatch, current_forward, forward_context
from ktrans.errors import KtransError
from ktrans.kv_cache.storage import KVStorage


def _batch(num_computed, num_new, pages_per_req, page_size):
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(num_computed, num_new)])
    perm = torch.randperm(64)  # pages handed out in arbitrary order
    rows, k = [], 0
    width = max(pages_per_req)
    for n in pages_per_req:
        row = torch.full((width,), -1, dtype=torch.int32)
        row[:n] = perm[k:k + n].int()
        k += n
        rows.append(row)
    t = sum(num_new)
    return ForwardBatch(input_ids=torch.randint(0, 100, (t,)), positions=positions,
                        seq_ids=list(range(len(num_new))), num_computed=list(num_computed),
                        num_new=list(num_new), page_table=torch.stack(rows),
                        logits_indices=torch.tensor([t - 1]))


def test_context_is_scoped_and_slots_follow_pages():
    page_size = 4
    kv = KVStorage(num_layers=2, num_pages=64, page_size=page_size, mla=True, dims=(6,),
                   dtype=torch.float32, device="cpu")
    batch = _batch([0, 5, 9], [7, 1, 3], [2, 2, 3], page_size)
    with pytest.raises(KtransError, match="no forward in progress"):
        current_forward()
    with forward_context(batch, kv) as ctx:
        assert current_forward() is ctx
        assert ctx.query_start == [0, 7, 8, 11] and ctx.seq_lens == [7, 6, 12]
        # each slot lies in the page the page table gives for that position
        req = [0] * 7 + [1] + [2] * 3
        for i, slot in enumerate(ctx.slot_mapping.tolist()):
            pos = int(batch.positions[i])
            assert slot // page_size == int(batch.page_table[req[i], pos // page_size])
            assert slot % page_size == pos % page_size
    with pytest.raises(KtransError, match="no forward in progress"):
        current_forward()


def test_batch_validation_names_the_problem():
    kv = KVStorage(num_layers=1, num_pages=8, page_size=4, mla=True, dims=(2,), dtype=torch.float32, device="cpu")
    bad = _batch([0], [9], [2], 4)  # 9 tokens need 3 pages of 4
    with pytest.raises(KtransError, match="needs 3 KV pages"):
        with forward_context(bad, kv):
            pass
    bad = _batch([0, 0], [3, 2], [1, 1], 4)
    bad.num_new = [3, 3]
    with pytest.raises(KtransError, match="sum to T"):
        bad.validate(4)


@pytest.mark.parametrize("mla", [True, False])
def test_paged_write_then_gather_returns_tokens_in_order(mla):
    page_size = 4
    dims = (5,) if mla else (2, 3, 3)
    kv = KVStorage(num_layers=2, num_pages=64, page_size=page_size, mla=mla, dims=dims,
                   dtype=torch.float32, device="cpu")
    # request 0: 6 tokens then 3 more; request 1: 10 tokens at once
    shape = dims if mla else dims[:2]  # GQA: [n_kv, head_dim] per token (head_dim == v_dim here)
    full = [torch.randn(9, *shape), torch.randn(10, *shape)]
    first = _batch([0, 0], [6, 10], [3, 3], page_size)
    with forward_context(first, kv) as ctx:
        vals = torch.cat([full[0][:6], full[1]])
        kv.write(1, ctx.slot_mapping, *([vals] if mla else [vals, -vals]))
    second = _batch([6], [3], [3], page_size)
    second.page_table = first.page_table[:1]
    with forward_context(second, kv) as ctx:
        kv.write(1, ctx.slot_mapping, *([full[0][6:]] if mla else [full[0][6:], -full[0][6:]]))
    got0 = kv.gather(1, first.page_table[0].long(), 9)
    got1 = kv.gather(1, first.page_table[1].long(), 10)
    torch.testing.assert_close(got0[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(got1[0], full[1], rtol=0, atol=0)
    padded = kv.gather_padded(1, first.page_table.long(), 10)
    torch.testing.assert_close(padded[0][0, :9], full[0], rtol=0, atol=0)
    torch.testing.assert_close(padded[0][1], full[1], rtol=0, atol=0)
    if not mla:
        torch.testing.assert_close(got0[1], -full[0], rtol=0, atol=0)
    assert not kv.layers[0][0].any()  # layer 0 untouched
