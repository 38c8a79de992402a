"""Each decoder layer's kind, as the KV cache and the attention operators read it.

A layer's kind is a property of the model (transformers' `config.layer_types`, or a model-wide
`sliding_window` for Mixtral-style configs), never of the engine step: the KV storage holds one
LayerKind per layer (KVStorage.kinds) and attention asks it which keys a query may see. Kinds:

  full      causal attention over every cached token of the request
  sliding   causal attention over the last `window` tokens, the query's own included (gpt-oss's
            even layers: key j is visible to the query at position p iff p - window < j <= p)
  linear    no attention over cached tokens: a linear-attention layer (Qwen3-Next's and
            Qwen3.5's Gated DeltaNet) keeps a fixed-size recurrent state per request instead of
            KV pages (kv_cache/state.py). Its layer holds no pages; prefix caching cannot serve a
            model with such layers (a cached page has no state to go with it).

NOTE: a sliding layer's pages are kept for the whole sequence, like a full layer's (one page
table serves every layer); only the attention skips the tokens that left the window.
"""

from __future__ import annotations

from dataclasses import dataclass

from ktrans.errors import KtransError

FULL = "full"
SLIDING = "sliding"
LINEAR = "linear"
# transformers' layer_types spellings
_HF_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING, "linear_attention": LINEAR}


@dataclass(frozen=True)
class LayerKind:
    attention: str              # FULL | SLIDING | LINEAR
    window: int | None = None   # SLIDING: how many most recent tokens a query sees (itself included)

    @property
    def sliding(self) -> bool:
        return self.attention == SLIDING

    @property
    def recurrent(self) -> bool:
        """The layer keeps a per-request state instead of KV pages."""
        return self.attention == LINEAR


def layer_kinds(config) -> list[LayerKind]:
    """One LayerKind per decoder layer of a transformers config."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        # NOTE: Mixtral-style configs: one window for every layer (none when sliding_window is null).
        if window and config.model_type == "mixtral":
            return [LayerKind(SLIDING, int(window))] * n
        return [LayerKind(FULL)] * n
    if len(types) != n:
        raise KtransError(f"config.layer_types lists {len(types)} layers, but num_hidden_layers is {n}")
    out = []
    for i, t in enumerate(types):
        kind = _HF_TYPES.get(t)
        if kind is None:
            raise KtransError(f"layer {i} is a '{t}' layer; ktrans runs {', '.join(_HF_TYPES)} layers")
        if kind == SLIDING and not window:
            raise KtransError(f"layer {i} is a sliding_attention layer but config.sliding_window is {window!r}")
        out.append(LayerKind(kind, int(window)) if kind == SLIDING else LayerKind(kind))
    return out
