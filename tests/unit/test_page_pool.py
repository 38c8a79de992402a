"""KV page pool: all-or-nothing growth, exact coverage of token counts, freeing, the prefix
cache (register, attach, share, evict) and the pool invariants under random use."""

from __future__ import annotations


import pytest

from ktrans.errors import KtransError
from ktrans.kv_cache import PagePool
from tests.seeds import py_rng


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


def _tokens(seq):
    return lambda a, b: seq[a:b]


def test_prefix_cache_reuses_shares_and_evicts():
    pool = PagePool(num_pages=6, page_size=4)
    a = list(range(100, 111))                                   # 11 tokens: 2 full pages
    assert pool.grow("a", len(a))
    pool.cache_pages("a", len(a), _tokens(a))
    assert pool.num_cached == 2
    a_pages = pool.pages("a")
    pool.free("a")
    assert pool.num_used == 0 and pool.num_free == 6           # idle cached pages count as free
    # Same first 9 tokens, then different: both full pages match (at least one token is left).
    b = a[:9] + [7, 7, 7]
    assert pool.attach_prefix("b", b) == 8 and pool.pages("b") == a_pages[:2]
    c = a[:5] + [9] * 6                                         # shares only the first page
    assert pool.attach_prefix("c", c) == 4 and pool.pages("c") == a_pages[:1]
    assert pool.attach_prefix("d", a[:8]) == 4                  # 8 tokens: the last must be computed
    pool.check()
    for owner in ("b", "c", "d"):
        pool.free(owner)
    # Filling the pool evicts the idle cached pages (least recently used first).
    assert pool.grow("big", 6 * 4) and pool.num_cached == 0
    pool.free("big")
    assert pool.attach_prefix("e", a) == 0
    pool.check()


def test_prefix_keys_cover_the_whole_prefix():
    pool = PagePool(num_pages=8, page_size=2)
    x = [1, 2, 3, 4, 5]
    pool.grow("x", 5)
    pool.cache_pages("x", 4, _tokens(x))
    pool.free("x")
    # Second page's tokens equal, first page's not: nothing matches.
    assert pool.attach_prefix("y", [9, 9, 3, 4, 5]) == 0
    assert pool.attach_prefix("z", [1, 2, 3, 4, 6]) == 4


def test_random_use_keeps_pages_partitioned():
    rng = py_rng()
    pool = PagePool(num_pages=rng.randint(8, 40), page_size=rng.choice([1, 4, 16]))
    lengths: dict[int, int] = {}
    attached: dict[int, int] = {}                 # pages each owner got from the cache
    written: dict[int, tuple] = {}                # page -> the token prefix its KV stands for
    seqs = {o: [rng.randrange(3) for _ in range(400)] for o in range(12)}   # few distinct prefixes
    ps = pool.page_size
    for _ in range(2000):
        owner = rng.randrange(12)
        seq = seqs[owner]
        if rng.random() < 0.2:
            pool.free(owner)
            lengths.pop(owner, None)
            attached.pop(owner, None)
        elif owner not in lengths and rng.random() < 0.5:
            n = pool.attach_prefix(owner, seq[:rng.randint(1, 100)])
            lengths[owner], attached[owner] = n, n // ps
            for i, page in enumerate(pool.pages(owner)):   # an attached page holds this very prefix
                assert written[page] == tuple(seq[:(i + 1) * ps])
        else:
            want = lengths.get(owner, 0) + rng.randint(1, 3 * ps)
            if pool.grow(owner, want):
                for i, page in enumerate(pool.pages(owner)[attached.setdefault(owner, 0):], attached[owner]):
                    written[page] = tuple(seq[:(i + 1) * ps])
                lengths[owner] = want
                pool.cache_pages(owner, want, _tokens(seq))
        pool.check()
        for o, n in lengths.items():
            assert len(pool.pages(o)) == pool.pages_for(n)
    for o in list(lengths):
        pool.free(o)
    assert pool.num_free == pool.num_pages and pool.num_used == 0
