"""Plan: which operator and device each module of a meta-device model gets, and which rule said so.

Planning is pure: it reads the module tree (on the meta device), the config and, optionally, the
tensor infos of a WeightSource, and changes nothing. The walk is depth-first from the root's
children; for each module the rules are tried in file order and the first match wins; a matched
rule with `recursive: false` hides the module's children; unmatched modules are kept (`default`)
on the default device. Every rule must place at least one module.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ktrans.rules.devices import map_device, normalize_device, parse_device_map
from ktrans.rules.matcher import layer_of
from ktrans.rules.schema import Rule, RuleError, RuleSet


@dataclass(frozen=True)
class PlanEntry:
    path: str                     # dotted module path in the HF tree
    module_class: str             # class name of the HF module it replaces or keeps
    op: str                       # operator name, or "default" (HF module kept, only placed)
    device: str                   # where it goes, after the device map
    kwargs: dict                  # operator kwargs
    rule: Rule | None             # the rule that placed it; None = default device
    nbytes: dict[str, int]        # planned weight bytes per device
    also_matched: tuple[int, ...] = ()   # later rules that match this module too (overlaps)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


@dataclass
class Plan:
    entries: list[PlanEntry]              # depth-first order
    rules: RuleSet
    config: object
    default_device: str
    device_map: dict[str, str]
    dtype: torch.dtype | None             # kept modules' float dtype; None = auto per device
    transfer_map: dict[int, str]          # decoder layer -> device it runs on, where that changes
    shadowed: list[Rule] = field(default_factory=list)  # rules every one of whose modules an earlier rule took
    notes: list[str] = field(default_factory=list)       # findings that are not errors (explain prints them)

    def entry(self, path: str) -> PlanEntry:
        return self._by_path()[path]

    def _by_path(self) -> dict[str, PlanEntry]:
        # NOTE: rebuilt when `entries` is replaced (a runner may rewrite entries' kwargs).
        if getattr(self, "_index_of", None) is not self.entries:
            self._index, self._index_of = {e.path: e for e in self.entries}, self.entries
        return self._index

    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.entries:
            for dev, n in e.nbytes.items():
                out[dev] += n
        return dict(sorted(out.items()))

    def counts_per_rule(self) -> dict[int, int]:
        """Rule index -> number of modules it placed."""
        out: dict[int, int] = defaultdict(int)
        for e in self.entries:
            if e.rule is not None:
                out[e.rule.index] += 1
        return dict(out)

    def overlaps(self) -> dict[tuple[int, int], list[str]]:
        """(winning rule, other matching rule) -> module paths both match."""
        out: dict[tuple[int, int], list[str]] = defaultdict(list)
        for e in self.entries:
            for other in e.also_matched:
                out[(e.rule.index, other)].append(e.path)
        return dict(out)


def auto_dtype(device: str) -> torch.dtype:
    """Float dtype of kept modules when none is given: bf16 on CUDA, f32 on the CPU (where torch's
    bf16 matmuls are slow and f32 keeps results comparable with transformers in CI)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def num_layers_of(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_hidden_layers", 0) or 0)


def plan_model(model: torch.nn.Module, rules: RuleSet, *, config=None, weights=None,
               default_device: str = "cuda:0", device_map=None, dtype: torch.dtype | None = None) -> Plan:
    """Match `rules` against `model` (a meta-device HF model) and return the plan."""
    config = config if config is not None else getattr(model, "config", None)
    dmap = parse_device_map(device_map)
    default = map_device(rules.default_device or normalize_device(default_device, "default device"), dmap)
    n_layers = num_layers_of(config) if config is not None else 0
    entries: list[PlanEntry] = []
    candidates: dict[int, int] = defaultdict(int)     # rule index -> modules it matches (visited)
    stack = list(reversed(list(model.named_children())))
    while stack:
        path, module = stack.pop()
        matched = [r for r in rules.rules if _matches(r, path, module, n_layers)]
        for r in matched:
            candidates[r.index] += 1
        entry = _entry(path, module, matched, default, dmap, config, weights, dtype)
        entries.append(entry)
        if not matched or matched[0].recursive:
            owned = matched[0].op_class.owned_children if matched and matched[0].op_class else ()
            kids = [(f"{path}.{name}", child) for name, child in module.named_children()
                    if name not in owned and "*" not in owned]
            stack.extend(reversed(kids))
    plan = Plan(entries, rules, config, default, dmap, dtype, {})
    counts = plan.counts_per_rule()
    plan.notes = _check_every_rule_matches(rules, candidates, model, n_layers)
    plan.shadowed = [r for r in rules.rules if candidates[r.index] and not counts.get(r.index)]
    plan.transfer_map = _transfer_map(plan, rules, dmap, n_layers)
    return plan


def _matches(rule: Rule, path: str, module, n_layers: int) -> bool:
    if rule.name is not None and not rule.name.search(path):
        return False
    if rule.cls is not None and not rule.cls.matches(module):
        return False
    if rule.layers is not None:
        layer = layer_of(path)
        if layer is None or layer not in rule.layers.indices(n_layers):
            return False
    return True


def _entry(path, module, matched, default, dmap, config, weights, dtype) -> PlanEntry:
    rule = matched[0] if matched else None
    op = rule.op if rule else "default"
    device = map_device(rule.device, dmap) if rule and rule.device else default
    kwargs = dict(rule.kwargs) if rule else {}
    if op == "default":
        nbytes = _kept_bytes(module, device, dtype)
    else:
        nbytes = rule.op_class.planned_bytes(key=path, orig_module=module, config=config,
                                             device=torch.device(device), kwargs=kwargs, weights=weights)
    return PlanEntry(path, type(module).__name__, op, device, kwargs, rule,
                     {k: v for k, v in nbytes.items() if v}, tuple(r.index for r in matched[1:]))


def _kept_bytes(module: torch.nn.Module, device: str, dtype) -> dict[str, int]:
    """Bytes of a kept module's own tensors once loaded: floats in the load dtype."""
    size = torch.empty(0, dtype=dtype or auto_dtype(device)).element_size()
    total = 0
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return {device: total} if total else {}


def _check_every_rule_matches(rules: RuleSet, candidates, model, n_layers: int) -> list[str]:
    """A rule that places nothing is a mistake in the file: say which, and what is near.

    NOTE: a KTransformers rule whose modules an operator loads itself (its MoEGate rule under
    moe_block) is only noted: it was meaningful there and is harmless here.
    """
    dead = [r for r in rules.rules if not candidates[r.index]]
    modules = list(model.named_modules())[1:]
    notes = []
    for r in [r for r in dead if r.kt_class and any(_matches(r, p, m, n_layers) for p, m in modules)]:
        notes.append(f"{r.label}: no effect: the modules it matches ({r.kt_class}) are loaded by the "
                     f"operator above them")
        dead.remove(r)
    if not dead:
        return notes
    lines = [_why_unmatched(r, modules, rules.rules, n_layers) for r in dead]
    raise RuleError(f"{len(dead)} rule(s) in {rules.path} match no module of {type(model).__name__}:\n  "
                    + "\n  ".join(lines))


def _why_unmatched(rule: Rule, modules, all_rules, n_layers: int) -> str:
    msg = f"{rule.where}: rule {rule.index} ({rule.describe_match()}) matches no module"
    hidden = [p for p, m in modules if _matches(rule, p, m, n_layers)]
    if hidden:
        return msg + f" visited by the walk: its matches (e.g. '{hidden[0]}') are inside a module an " \
                     f"earlier rule replaced with recursive: false, or one its operator loads itself"
    paths = [p for p, _ in modules]
    if rule.name is not None:
        probe = re.sub(r"\\(.)", r"\1", re.sub(r"[\^\$]|\(\?[!=].*?\)", "", rule.name.pattern))
        near = difflib.get_close_matches(probe, paths, n=5, cutoff=0.3)
        named = [p for p in paths if rule.name.search(p)]
        msg += f"; {len(named)} module path(s) match the name" if named else \
            f"; nearest module names: {', '.join(near) or '(none close)'}"
    if rule.cls is not None:
        classes = sorted({type(m).__name__ for _, m in modules})
        near = difflib.get_close_matches(rule.cls.text.rsplit(".", 1)[-1], classes, n=5, cutoff=0.4)
        msg += f"; nearest classes in the model: {', '.join(near) or ', '.join(classes[:8])}"
    if rule.layers is not None:
        picked = sorted(rule.layers.indices(n_layers))
        msg += f"; layers '{rule.layers.text}' select {picked[:8] or 'none'} of the model's {n_layers} layers"
    return msg


def _transfer_map(plan: Plan, rules: RuleSet, dmap, n_layers: int) -> dict[int, str]:
    """Layer -> device switch points: a rule's explicit `transfer_map` (KTransformers), else where
    the device of a layer's input norm (the first op on its hidden states) changes."""
    for rule in rules.rules:
        if rule.transfer_map:
            return {k: map_device(v, dmap) for k, v in rule.transfer_map.items()}
    out, prev = {}, None
    for i in range(n_layers):
        e = plan._by_path().get(f"model.layers.{i}.input_layernorm")
        if e is None:
            continue
        if prev is not None and e.device != prev:
            out[i] = e.device
        prev = e.device
    return out
