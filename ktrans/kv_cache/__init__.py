"""Paged KV-cache bookkeeping shared by all requests (the tensors live with the model runner)."""

from ktrans.kv_cache.page_pool import PagePool

__all__ = ["PagePool"]
