"""Operators: drop-in nn.Modules that replace parts of a HuggingFace model, found by name.

`Operator` (base.py) is the interface; `register_operator` / `get_operator` (registry.py) map the
names used in YAML rules to classes. Each other submodule holds built-in operators and is
imported on the first registry lookup.
"""

from ktrans.operators.base import Operator
from ktrans.operators.registry import get_operator, operator_names, register_operator

__all__ = ["Operator", "get_operator", "operator_names", "register_operator"]
