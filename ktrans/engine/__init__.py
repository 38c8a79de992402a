"""The generation engine shared by local_chat and the server: requests -> scheduler (token
budget, chunked prefill, paged KV) -> model runner -> sampler -> incremental detokenizer.

Public API (see the docstrings): SamplingParams, RequestOutput, LLMEngine (synchronous steps),
AsyncEngine (background loop for concurrent callers), QueueFullError.
"""

from ktrans.engine.async_engine import AsyncEngine
from ktrans.engine.llm_engine import LLMEngine
from ktrans.engine.request import RequestOutput, SamplingParams
from ktrans.engine.scheduler import QueueFullError

__all__ = ["AsyncEngine", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams"]
