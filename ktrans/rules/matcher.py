"""What a rule's `match` tests: the module path (regex), the module class, the layer index.

Classes are resolved without running code from the rule file: a short name (`DeepseekV3MoE`,
`Linear`) matches any module whose class or base class has that name; a dotted path is imported
only from `torch.nn` or `transformers` (anything else needs trust_rules); KTransformers' own
modeling classes are matched by their transformers-5 names (compat.KT_MATCH_ALIASES).
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass

import torch

from ktrans.errors import KtransError
from ktrans.rules import compat

_SAFE_PREFIXES = ("torch.nn", "transformers")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(path: str) -> int | None:
    """Decoder layer index of a module path (`model.layers.7.mlp` -> 7), None outside layers."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ClassMatcher:
    text: str                       # as written in the rule
    names: tuple[str, ...] = ()     # match by class name anywhere in the module's MRO
    cls: type | None = None         # match by isinstance (imported class)

    def matches(self, module: torch.nn.Module) -> bool:
        if self.cls is not None:
            return isinstance(module, self.cls)
        return any(k.__name__ in self.names for k in type(module).__mro__)


def import_attr(path: str, where: str):
    """Import `a.b.c.Name` (longest importable module prefix, then attributes)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise KtransError(f"{where}: cannot import '{path}' (no such module or attribute)")


def class_matcher(text, where: str, trust_rules: bool) -> ClassMatcher:
    """Resolve a rule's `match.class`."""
    if not isinstance(text, str) or not text.strip():
        raise KtransError(f"{where}: match.class must be a class name such as 'Linear' or "
                          f"'DeepseekV3MoE', got {text!r}")
    text = text.strip()
    if "." not in text:
        return ClassMatcher(text, names=(text,))
    if compat.is_kt_class(text) and not trust_rules:
        return ClassMatcher(text, names=compat.kt_match_names(text))
    if not (trust_rules or text.split(".")[0] == "transformers" or text.startswith("torch.nn.")):
        raise KtransError(f"{where}: match.class '{text}' is outside {' and '.join(_SAFE_PREFIXES)}; "
                          f"importing it would run code named by the rule file, which needs --trust-rules "
                          f"(trust_rules=True). A short class name (e.g. '{text.rsplit('.', 1)[-1]}') "
                          f"matches by name without importing")
    cls = import_attr(text, where)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise KtransError(f"{where}: match.class '{text}' is not a torch.nn.Module class")
    return ClassMatcher(text, cls=cls)


@dataclass(frozen=True)
class LayerRange:
    """`match.layers`: Python-slice ranges of layer indices, bounds as ints or percentages of
    the layer count, e.g. "0:4", "4:", ":50%", "50%:", "0:2,10:12", or one index (3)."""

    text: str
    spans: tuple[tuple[str | None, str | None], ...]

    @functools.lru_cache(maxsize=None)
    def indices(self, num_layers: int) -> frozenset[int]:
        out: set[int] = set()
        for lo, hi in self.spans:
            start, stop = _bound(lo, num_layers, 0), _bound(hi, num_layers, num_layers)
            out.update(range(num_layers)[slice(start, stop)])
        return frozenset(out)


def _bound(text: str | None, num_layers: int, default: int) -> int:
    if text is None:
        return default
    if text.endswith("%"):
        # NOTE: floor, so ":50%" and "50%:" split an odd layer count without overlap or gap.
        return int(num_layers * float(text[:-1]) // 100)
    return int(text)


_BOUND = r"-?\d+|\d+(?:\.\d+)?%"
_SPAN_RE = re.compile(rf"^(?P<lo>{_BOUND})?:(?P<hi>{_BOUND})?$")
_INDEX_RE = re.compile(r"^-?\d+$")


def layer_range(value, where: str) -> LayerRange:
    """Parse `match.layers`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise KtransError(f"{where}: match.layers must be a layer index or ranges like '0:4', '4:', "
                          f"':50%', '0:2,10:12', got {value!r}")
    items = [str(value)] if isinstance(value, int) else value.split(",")
    return LayerRange(str(value), tuple(_span(item.replace(" ", ""), where) for item in items))


def _span(item: str, where: str) -> tuple[str | None, str | None]:
    if _INDEX_RE.match(item):               # one index i is the slice i:i+1 (-1: the last layer)
        return item, (None if item == "-1" else str(int(item) + 1))
    m = _SPAN_RE.match(item)
    if not m:
        raise KtransError(f"{where}: match.layers item '{item}' is not a range; expected START:STOP (either "
                          f"may be empty or a percentage, e.g. '0:4', '50%:') or one index")
    return m["lo"], m["hi"]
