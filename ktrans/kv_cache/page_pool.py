"""Bookkeeping of the paged KV cache: which pages are free, which belong to which sequence, and
which hold a reusable prompt prefix.

The KV tensors themselves live with the model runner (one pool of `num_pages` pages of
`page_size` tokens per layer, on the GPU or CPU). This module only hands out page ids: a sequence
owns an ordered list of pages, where token position p sits in page `pages[p // page_size]` at
offset `p % page_size`. The scheduler grows a sequence's list before each step and frees it the
moment the sequence ends, errors or is aborted.

Prefix cache: a full page whose KV has been computed is registered under a key that chains the
tokens of every page up to it (so a key names a whole prefix, not one page). When its owner
frees it, the page is kept "idle" with its contents instead of returning to the free list; a
later sequence whose tokens start with the same prefix attaches those pages and skips their
prefill (multi-turn chat, shared system prompts). Idle pages count as free: the least recently
used is reused when no plain free page is left. A page can be attached by several sequences at
once; it is only ever read by them (a sequence writes at positions past its attached pages).

NOTE: growth is all-or-nothing. `grow()` either covers the requested token count or changes
nothing, so a failed allocation never leaves a sequence holding a partial set of pages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from ktrans.errors import KtransError

_ROOT_KEY = 0    # chain key before the first page


class PagePool:
    """Free list of KV pages, each owner's ordered page list, and the prefix cache."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise KtransError(f"KV page pool needs num_pages >= 1 and page_size >= 1, "
                              f"got num_pages={num_pages}, page_size={page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Popped from the end: low page ids are handed out first, which keeps small runs compact.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._owned: dict[Hashable, list[int]] = {}
        self._refs: dict[int, int] = {}                      # page -> owners holding it
        self._chain: dict[Hashable, list[int]] = {}          # owner -> prefix keys of its cached pages
        self._key_of: dict[int, int] = {}                    # cached page -> prefix key
        self._page_of: dict[int, int] = {}                   # prefix key -> cached page
        self._idle: OrderedDict[int, None] = OrderedDict()   # cached pages nobody holds, LRU first

    @property
    def num_free(self) -> int:
        """Pages that can be handed out (plain free + idle cached ones)."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages holding a registered prefix (held or idle)."""
        return len(self._key_of)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds (the longest sequence it could ever serve)."""
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def pages(self, owner: Hashable) -> list[int]:
        """The owner's pages in position order (empty if it holds none)."""
        return list(self._owned.get(owner, ()))

    def extra_pages_needed(self, owner: Hashable, num_tokens: int) -> int:
        """Pages `owner` must still get so that its list covers `num_tokens` tokens."""
        return max(0, self.pages_for(num_tokens) - len(self._owned.get(owner, ())))

    def can_grow(self, owner: Hashable, num_tokens: int) -> bool:
        return self.extra_pages_needed(owner, num_tokens) <= self.num_free

    def grow(self, owner: Hashable, num_tokens: int) -> bool:
        """Extend `owner`'s pages to cover `num_tokens` tokens; False (and no change) if the pool
        has too few free pages."""
        need = self.extra_pages_needed(owner, num_tokens)
        if need > self.num_free:
            return False
        if need:
            mine = self._owned.setdefault(owner, [])
            for _ in range(need):
                page = self._take()
                self._refs[page] = 1
                mine.append(page)
        return True

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        page, _ = self._idle.popitem(last=False)               # evict the least recently used
        del self._page_of[self._key_of.pop(page)]
        return page

    def free(self, owner: Hashable) -> int:
        """Release all of `owner`'s pages; returns how many it held (0 if none). Cached pages
        nobody else holds stay idle (reusable); the others return to the free list."""
        pages = self._owned.pop(owner, [])
        self._chain.pop(owner, None)
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                del self._refs[page]
                if page in self._key_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)
        return len(pages)

    # -- prefix cache --------------------------------------------------------------------------

    def cache_pages(self, owner: Hashable, num_computed: int, token_ids: Callable[[int, int], list[int]]) -> None:
        """Register `owner`'s full pages among its first `num_computed` tokens (their KV is
        written); `token_ids(start, end)` gives its tokens. Cheap when no new page is full."""
        pages = self._owned.get(owner, [])
        chain = self._chain.setdefault(owner, [])
        for i in range(len(chain), min(num_computed // self.page_size, len(pages))):
            key = hash((chain[-1] if chain else _ROOT_KEY,
                        tuple(token_ids(i * self.page_size, (i + 1) * self.page_size))))
            chain.append(key)
            page = pages[i]
            if page not in self._key_of and key not in self._page_of:
                self._key_of[page] = key
                self._page_of[key] = page

    def attach_prefix(self, owner: Hashable, token_ids: list[int]) -> int:
        """Give a sequence that holds no pages the cached pages matching the start of its tokens;
        returns how many tokens they cover. At least the last token is left to compute (its
        logits are needed)."""
        if self._owned.get(owner):
            return 0
        key, matched, keys = _ROOT_KEY, [], []
        for i in range((len(token_ids) - 1) // self.page_size):
            key = hash((key, tuple(token_ids[i * self.page_size:(i + 1) * self.page_size])))
            page = self._page_of.get(key)
            if page is None:
                break
            matched.append(page)
            keys.append(key)
        if matched:
            for page in matched:
                self._refs[page] = self._refs.get(page, 0) + 1
                self._idle.pop(page, None)
            self._owned[owner] = matched
            self._chain[owner] = keys
        return len(matched) * self.page_size

    def owners(self) -> list[Hashable]:
        return list(self._owned)

    def check(self) -> None:
        """Assert the invariants: every page is free, idle or held (never two of these); the
        reference counts match the owners' lists; the cache maps are each other's inverse."""
        held = [p for pages in self._owned.values() for p in pages]
        refs: dict[int, int] = {}
        for p in held:
            refs[p] = refs.get(p, 0) + 1
        everything = sorted(list(refs) + self._free + list(self._idle))
        problems = []
        if everything != list(range(self.num_pages)):
            problems.append(f"{len(refs)} held + {len(self._free)} free + {len(self._idle)} idle pages "
                            f"do not partition {self.num_pages} pages")
        if refs != self._refs:
            problems.append("reference counts disagree with the owners' page lists")
        if any(self._page_of.get(k) != p for p, k in self._key_of.items()) or len(self._page_of) != len(self._key_of):
            problems.append("prefix-cache maps are inconsistent")
        if any(p not in self._key_of for p in self._idle):
            problems.append("an idle page is not cached")
        if problems:
            raise AssertionError("KV page pool corrupted: " + "; ".join(problems))
