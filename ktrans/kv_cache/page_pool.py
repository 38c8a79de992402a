"""Bookkeeping of the paged KV cache: which pages are free and which belong to which sequence.

The KV tensors themselves live with the model runner (one pool of `num_pages` pages of
`page_size` tokens per layer, on the GPU or CPU). This module only hands out page ids: a sequence
owns an ordered list of pages, where token position p sits in page `pages[p // page_size]` at
offset `p % page_size`. The scheduler grows a sequence's list before each step and frees it the
moment the sequence ends, errors or is aborted.

NOTE: allocation is all-or-nothing. `grow()` either covers the requested token count or changes
nothing, so a failed allocation never leaves a sequence holding a partial set of pages.
"""

from __future__ import annotations

from collections.abc import Hashable

from ktrans.errors import KtransError


class PagePool:
    """Free list of KV pages plus each owner's ordered page list."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise KtransError(f"KV page pool needs num_pages >= 1 and page_size >= 1, "
                              f"got num_pages={num_pages}, page_size={page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Popped from the end: low page ids are handed out first, which keeps small runs compact.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._owned: dict[Hashable, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

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
        return self.extra_pages_needed(owner, num_tokens) <= len(self._free)

    def grow(self, owner: Hashable, num_tokens: int) -> bool:
        """Extend `owner`'s pages to cover `num_tokens` tokens; False (and no change) if the pool
        has too few free pages."""
        need = self.extra_pages_needed(owner, num_tokens)
        if need > len(self._free):
            return False
        if need:
            mine = self._owned.setdefault(owner, [])
            mine.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, owner: Hashable) -> int:
        """Return all of `owner`'s pages to the pool; returns how many were freed (0 if none)."""
        pages = self._owned.pop(owner, [])
        self._free.extend(reversed(pages))
        return len(pages)

    def owners(self) -> list[Hashable]:
        return list(self._owned)

    def check(self) -> None:
        """Assert the invariant: every page is either free or owned by exactly one owner."""
        owned = [p for pages in self._owned.values() for p in pages]
        everything = sorted(owned + self._free)
        if everything != list(range(self.num_pages)):
            raise AssertionError(f"KV page pool corrupted: {len(owned)} owned + {len(self._free)} "
                                 f"free pages do not partition {self.num_pages} pages exactly once")
