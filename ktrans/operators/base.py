"""Operator: the base of every ktrans module that replaces part of a HuggingFace model tree.

A rule file names operators by their registry name (`cpu_experts`, `mla_attention`, ...). The rule
engine builds the HF model on the meta device, then for each module a rule replaces it constructs

    Cls(key="model.layers.3.mlp.experts", orig_module=<the HF module>, config=<HF config>,
        device=torch.device("cpu"), **rule_kwargs)

swaps it into the tree and, once every swap is done, calls `load_weights(weights)`.

Contract for subclasses:
- `__init__` takes its own options as keyword arguments with defaults and passes the rest to
  `super().__init__(**rest)`; `accepted_kwargs()` reads those signatures, so a rule with an unknown
  kwarg is rejected while planning (with the valid ones listed), before anything is built.
- Swaps happen deepest module first: when an operator is constructed, the children of
  `orig_module` that rules replaced are already operators. An operator whose rule is
  `recursive: true` must keep the children it still uses under the same attribute names, because
  the rule engine loads kept (`default`) children by their dotted path after the swap.
- Children it loads itself (rather than keeping them for rules to place) are listed in
  `owned_children`, so the plan neither places nor counts them twice.
- `orig_module` lives on the meta device: read shapes, attributes and children from it, never data.
  It is not stored by the base class (its meta tensors would otherwise appear in
  `named_parameters()`).
- `load_weights` materialises every tensor the operator owns on `self.device` (no meta tensor may
  remain; the rule engine checks).
- `planned_bytes` returns what `load_weights` will hold per device, from config and tensor infos
  only; `ktrans rules explain` sums it. It counts only tensors the operator loads itself; children
  still visited by rules are counted by their own plan entries.
- `forward_native` is the plain-torch oracle of `forward` used by tests.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ktrans.errors import KtransError

if TYPE_CHECKING:
    from ktrans.weights.source import WeightSource

# Constructor arguments every operator receives from the rule engine (not rule kwargs).
CORE_ARGS = ("key", "orig_module", "config", "device")


class Operator(torch.nn.Module):
    """Base class of ktrans operators (see the module docstring for the contract)."""

    #: registry name used in YAML rules; set by `register_operator`
    name: ClassVar[str] = ""
    #: children of `orig_module` whose tensors this operator loads itself (e.g. a MoE block's
    #: "gate"), or ("*",) for all of them; rules do not visit them even when the operator's rule
    #: is `recursive: true`
    owned_children: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, key: str, orig_module: torch.nn.Module, config: Any, device, **kwargs):
        super().__init__()
        if kwargs:
            raise KtransError(
                f"operator '{self.name or type(self).__name__}' at '{key}': unknown kwargs "
                f"{', '.join(sorted(kwargs))}; valid: {', '.join(self.accepted_kwargs()) or '(none)'}"
            )
        self.key = key            # dotted path this operator occupies in the model tree
        self.config = config      # the HF config the model was built from
        self.device = torch.device(device)

    def load_weights(self, weights: "WeightSource") -> None:
        """Read this operator's tensors from `weights` (by transformers-5 parameter name) onto
        `self.device`."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_weights()")

    def forward_native(self, *args, **kwargs):
        """Plain-torch reference of `forward`, the oracle tests compare against."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_native()")

    @classmethod
    def planned_bytes(cls, *, key: str, orig_module: torch.nn.Module, config: Any, device,
                      kwargs: dict, weights: "WeightSource | None") -> dict[str, int]:
        """Bytes each device ("cpu", "cuda:0", ...) will hold once `load_weights` has run.

        The base estimate is the direct parameters and buffers of `orig_module` in their meta
        dtype, all on `device`; operators that store weights differently (quantized, repacked,
        split across devices) override it, usually from `weights.info(name).nbytes`.
        """
        tensors = list(orig_module.parameters(recurse=False)) + list(orig_module.buffers(recurse=False))
        total = sum(t.numel() * t.element_size() for t in tensors)
        return {str(torch.device(device)): total} if total else {}

    @classmethod
    def accepted_kwargs(cls) -> list[str]:
        """Rule kwargs this operator's constructors accept (walks the MRO while each `__init__`
        forwards **kwargs to its parent)."""
        names: list[str] = []
        for klass in cls.__mro__:
            if "__init__" not in vars(klass):
                continue
            if klass is Operator:
                break
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            for p in params:
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" \
                        and p.name not in CORE_ARGS and p.name not in names:
                    names.append(p.name)
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return sorted(names)
