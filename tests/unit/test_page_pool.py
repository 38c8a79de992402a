"""KV page pool: all-or-nothing growth, exact coverage of token counts, freeing, and the
partition invariant under random use."""

from __future__ import annotations

import random

import pytest

from ktrans.errors import KtransError
from ktrans.kv_cache import PagePool


def test_grow_covers_tokens_and_free_returns_pages():
    pool = PagePool(num_pages=8, page_size=16)
    assert pool.capacity_tokens == 128
    assert pool.grow("a", 1) and len(pool.pages("a")) == 1
    assert pool.grow("a", 16) and len(pool.pages("a")) == 1      # still fits the first page
    assert pool.grow("a", 17) and len(pool.pages("a")) == 2
    assert pool.grow("b", 40) and len(pool.pages("b")) == 3
    assert pool.num_used == 5 and pool.num_free == 3
    assert not set(pool.pages("a")) & set(pool.pages("b"))
    assert pool.free("a") == 2 and pool.pages("a") == [] and pool.num_free == 5
    assert pool.free("a") == 0                                     # idempotent
    pool.check()


def test_failed_grow_changes_nothing():
    pool = PagePool(num_pages=4, page_size=4)
    assert pool.grow("a", 8)
    before = pool.pages("a")
    assert not pool.can_grow("a", 8 + 3 * 4)
    assert not pool.grow("a", 8 + 3 * 4)                          # needs 3 more, only 2 free
    assert pool.pages("a") == before and pool.num_free == 2
    assert pool.extra_pages_needed("a", 13) == 2 and pool.grow("a", 13) and pool.num_free == 0
    pool.check()


def test_bad_sizes_are_refused():
    with pytest.raises(KtransError, match="num_pages"):
        PagePool(0, 16)
    with pytest.raises(KtransError, match="page_size"):
        PagePool(4, 0)


def test_random_use_keeps_pages_partitioned():
    rng = random.Random()
    pool = PagePool(num_pages=rng.randint(8, 40), page_size=rng.choice([1, 4, 16]))
    lengths: dict[int, int] = {}
    for _ in range(2000):
        owner = rng.randrange(12)
        if rng.random() < 0.2:
            pool.free(owner)
            lengths.pop(owner, None)
        else:
            want = lengths.get(owner, 0) + rng.randint(1, 3 * pool.page_size)
            if pool.grow(owner, want):
                lengths[owner] = want
        pool.check()
        for o, n in lengths.items():
            assert len(pool.pages(o)) == pool.pages_for(n)
    for o in list(lengths):
        pool.free(o)
    assert pool.num_free == pool.num_pages
