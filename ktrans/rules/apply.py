"""Apply a plan: swap modules for operators, then load every weight from a WeightSource.

Order (the operator contract in ktrans/operators/base.py relies on it):
1. swap, deepest module first, so an operator built over a module whose children rules also
   replaced sees those children already as operators;
2. load the kept (`default`) modules still in the tree, by parameter name, in their plan dtype on
   their device; buffers the weights do not hold (rotary `inv_freq`) are recomputed with
   transformers' own initialisation for that module;
3. `load_weights(weights)` of every operator, in plan order;
4. check that no meta tensor remains.
"""

from __future__ import annotations

import torch

from ktrans.errors import KtransError
from ktrans.rules.plan import Plan, PlanEntry, auto_dtype


def apply_plan(model: torch.nn.Module, plan: Plan, weights) -> torch.nn.Module:
    """Rewrite `model` (the meta-device model the plan was made from) in place and load it."""
    kept = {e.path: model.get_submodule(e.path) for e in plan.entries if e.op == "default"}
    operators = _swap(model, plan)
    tied = _tied_names(model)
    shared: dict[tuple, torch.nn.Parameter] = {}
    for e in plan.entries:
        if e.op == "default" and _still_there(model, e.path, kept[e.path]):
            _load_kept(model, e, kept[e.path], weights, plan.dtype or auto_dtype(e.device), tied, shared)
    for e in plan.entries:
        # NOTE: an operator swapped in below another operator that dropped it is not loaded.
        if e.path in operators and _still_there(model, e.path, operators[e.path]):
            operators[e.path].load_weights(weights)
    _check_no_meta(model, plan)
    return model


def _swap(model: torch.nn.Module, plan: Plan) -> dict[str, torch.nn.Module]:
    built = {}
    ops = [e for e in plan.entries if e.op != "default"]
    for e in sorted(ops, key=lambda e: e.path.count("."), reverse=True):
        orig = model.get_submodule(e.path)
        op = e.rule.op_class(key=e.path, orig_module=orig, config=plan.config,
                             device=torch.device(e.device), **e.kwargs)
        model.set_submodule(e.path, op)
        built[e.path] = op
    return built


def _still_there(model, path: str, module) -> bool:
    """A module an operator above it dropped is that operator's business."""
    try:
        return model.get_submodule(path) is module
    except AttributeError:
        return False


def _tied_names(model) -> dict[str, str]:
    """Tied parameter -> the parameter whose stored tensor it shares (lm_head -> embeddings)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = getattr(model, "_tied_weights_keys", None)
    if not getattr(text, "tie_word_embeddings", False) or not isinstance(keys, dict):
        return {}
    return dict(keys)


def _load_kept(model, e: PlanEntry, module, weights, dtype, tied, shared) -> None:
    device = torch.device(e.device)
    missing = []
    for name, b in list(module.named_buffers(recurse=False)):
        full = f"{e.path}.{name}"
        if name not in module._non_persistent_buffers_set and weights.has(full):
            module._buffers[name] = _read(weights, full, full, b, dtype if b.is_floating_point() else b.dtype, device)
        else:
            # NOTE: NaN marks "not computed yet", so _init_buffers can tell what init filled.
            fill = float("nan") if b.is_floating_point() else 0
            module._buffers[name] = torch.full_like(b, fill, device=device)
            missing.append(name)
    if missing:
        # Before the parameters are read: transformers' init also re-initialises parameters.
        _init_buffers(model, module, e.path, missing)
    for name, p in list(module.named_parameters(recurse=False)):
        full = f"{e.path}.{name}"
        src = full if weights.has(full) else tied.get(full, full)
        key = (src, str(device), dtype)
        if key not in shared:
            t = _read(weights, src, full, p, dtype if p.is_floating_point() else p.dtype, device)
            shared[key] = torch.nn.Parameter(t, requires_grad=False)
        module._parameters[name] = shared[key]


def _read(weights, src: str, full: str, like: torch.Tensor, dtype, device) -> torch.Tensor:
    if not weights.has(src):
        raise KtransError(f"{weights!r}: no tensor for parameter '{full}' of the kept module "
                          f"(shape {list(like.shape)}); do the weights belong to this model?")
    t = weights.tensor(src, dtype=dtype, device=device)
    if tuple(t.shape) != tuple(like.shape):
        raise KtransError(f"{weights!r}: tensor '{src}' has shape {list(t.shape)}, the model expects "
                          f"{list(like.shape)} for '{full}'")
    return t


def _init_buffers(model, module, path: str, names: list[str]) -> None:
    """Fill buffers the weights lack with transformers' own initialisation of that module
    (RotaryEmbedding: inv_freq from the config); a buffer it leaves unset is an error."""
    init = getattr(model, "_init_weights", None)
    if init is not None:
        with torch.no_grad():
            init(module)
    unset = [n for n in names if module._buffers[n].is_floating_point() and module._buffers[n].isnan().any()]
    if unset:
        raise KtransError(f"'{path}': buffer(s) {', '.join(unset)} are neither in the weights nor computed "
                          f"by transformers' initialisation; replace '{path}' with an operator that builds them")


def _check_no_meta(model, plan: Plan) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        owners = sorted({e.path for e in plan.entries if any(n.startswith(e.path + ".") for n in left)},
                        key=len, reverse=True)
        raise KtransError(f"{len(left)} tensor(s) still on the meta device after loading, e.g. "
                          f"{', '.join(left[:5])}; the operator or kept module that owns them "
                          f"({', '.join(owners[:3]) or 'unknown'}) did not load them")
