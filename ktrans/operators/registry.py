"""Operator registry: YAML rules name operators by string, never by import path.

`@register_operator("cpu_experts")` on an `Operator` subclass makes it available to rule files.
The built-in operators live in the submodules of `ktrans.operators`; they are imported (and so
registered) the first time a name is looked up, which keeps `import ktrans` light.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from ktrans.errors import KtransError
from ktrans.operators.base import Operator

_REGISTRY: dict[str, type[Operator]] = {}
_builtins_loaded = False

# Submodules of ktrans.operators that hold no operators (skipped by the built-in import).
_NOT_OPERATOR_MODULES = {"base", "registry"}


def register_operator(name: str):
    """Class decorator: register an Operator subclass under `name` (the YAML `replace.class`)."""
    if not isinstance(name, str) or not name.isidentifier() or name == "default":
        raise KtransError(f"operator name must be an identifier other than 'default', got {name!r}")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise KtransError(f"@register_operator('{name}') needs an Operator subclass, got {cls!r}")
        prev = _REGISTRY.get(name)
        # NOTE: re-registering the same class (same module and qualified name, e.g. a module
        # reloaded by a test runner) replaces it; a different class under a taken name is a clash.
        if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
            raise KtransError(f"operator name '{name}' is already registered by "
                              f"{prev.__module__}.{prev.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    """Import every operator module shipped in ktrans.operators (registration is a side effect)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    import ktrans.operators as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _NOT_OPERATOR_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _builtins_loaded = True


def get_operator(name: str) -> type[Operator]:
    """The operator class registered as `name`; a wrong name lists the valid ones."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise KtransError(f"unknown operator '{name}'{hint}; valid operators: "
                      f"{', '.join(operator_names()) or '(none registered)'}, or 'default' to keep the HF module")


def operator_names() -> list[str]:
    """Registered operator names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)
