"""Rule files: YAML text -> validated `Rule`s, every error naming the file and line.

A rule file is a YAML list of rules, or a mapping `{default_device: ..., rules: [...]}`:

    - match: {name: '^model\\.layers\\..*\\.mlp\\.experts$', class: ..., layers: '0:4'}
      replace: {class: cpu_experts, device: cpu, kwargs: {backend: auto}}
      recursive: false

The YAML is composed into nodes first so that each key keeps its line (`node.start_mark`);
values are then built with PyYAML's safe constructor (no Python tags).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import yaml

from ktrans.errors import KtransError
from ktrans.rules import compat
from ktrans.rules.devices import normalize_device
from ktrans.rules.matcher import ClassMatcher, LayerRange, class_matcher, import_attr, layer_range

FILE_KEYS = ("default_device", "rules")
RULE_KEYS = ("match", "replace", "recursive")
MATCH_KEYS = ("class", "layers", "name")
REPLACE_KEYS = ("class", "device", "kwargs")


class RuleError(KtransError):
    """A rule file that cannot be loaded or planned."""


@dataclass(frozen=True)
class Rule:
    index: int                              # 1-based position in its file
    where: str                              # "file:line" of the rule
    name: re.Pattern | None                 # match.name, re.search'ed in the full module path
    cls: ClassMatcher | None                # match.class
    layers: LayerRange | None               # match.layers
    op: str                                 # operator registry name, or "default"
    op_class: type | None                   # the operator class (None for default)
    device: str | None                      # normalized; None = the plan's default device
    kwargs: dict = field(default_factory=dict)    # operator constructor kwargs
    recursive: bool = True                  # visit children of a matched module
    transfer_map: dict | None = None        # KTransformers layer -> device switch points
    notes: tuple[str, ...] = ()             # KTransformers keys accepted but not used
    kt_class: str | None = None             # the KTransformers class this rule was written for

    @property
    def label(self) -> str:
        return f"rule {self.index} ({self.where})"

    def describe_match(self) -> str:
        parts = []
        if self.name is not None:
            parts.append(f"name={self.name.pattern!r}")
        if self.cls is not None:
            parts.append(f"class={self.cls.text}")
        if self.layers is not None:
            parts.append(f"layers={self.layers.text}")
        return " ".join(parts)


@dataclass(frozen=True)
class RuleSet:
    path: str                               # file the rules came from ("<string>" for text)
    rules: tuple[Rule, ...]
    default_device: str | None = None       # file-level default for unmatched modules


def load_rules(path: str | os.PathLike, *, trust_rules: bool = False) -> RuleSet:
    """Load and validate a rule file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RuleError(f"cannot read rule file '{path}': {e.strerror}") from None
    return parse_rules(text, source=path, trust_rules=trust_rules)


def parse_rules(text: str, *, source: str = "<string>", trust_rules: bool = False) -> RuleSet:
    """Validate rule-file text; `source` names it in messages."""
    loader = yaml.SafeLoader(text)
    loader.name = source  # NOTE: marks are made while scanning, after this, so they carry the path
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}" if mark else "?"
        raise RuleError(f"{source}:{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    default_device = None
    if isinstance(root, yaml.MappingNode):
        fields = _fields(root, FILE_KEYS, "the rule file", source, loader)
        if "default_device" in fields:
            dnode = fields["default_device"]
            default_device = normalize_device(_value(dnode, loader), _at(source, dnode))
        root = fields.get("rules")
    if not isinstance(root, yaml.SequenceNode) or not root.value:
        where = _at(source, root) if root is not None else f"{source}:1"
        raise RuleError(f"{where}: expected a non-empty list of rules (each with match/replace), "
                        f"or a mapping with keys {', '.join(FILE_KEYS)}")
    rules = tuple(_rule(node, i + 1, source, loader, trust_rules) for i, node in enumerate(root.value))
    return RuleSet(source, rules, default_device)


def _at(source: str, node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _value(node, loader):
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        raise RuleError(f"{node.start_mark.name}:{node.start_mark.line + 1}: {getattr(e, 'problem', e)}") from None


def _fields(node, valid: tuple[str, ...], what: str, source: str, loader) -> dict:
    """Key -> value node of a mapping node; unknown or repeated keys are errors."""
    if not isinstance(node, yaml.MappingNode):
        raise RuleError(f"{_at(source, node)}: {what} must be a mapping with keys {', '.join(valid)}")
    out = {}
    for knode, vnode in node.value:
        key = _value(knode, loader)
        if key not in valid:
            raise RuleError(f"{_at(source, knode)}: unknown key {key!r} in {what}; valid keys: {', '.join(valid)}")
        if key in out:
            raise RuleError(f"{_at(source, knode)}: key '{key}' given twice in {what}")
        out[key] = vnode
    return out


def _rule(node, index: int, source: str, loader, trust_rules: bool) -> Rule:
    where = _at(source, node)
    fields = _fields(node, RULE_KEYS, f"rule {index}", source, loader)
    for key in ("match", "replace"):
        if key not in fields:
            raise RuleError(f"{where}: rule {index} has no '{key}'; a rule needs match and replace")
    match = _fields(fields["match"], MATCH_KEYS, f"rule {index}'s match", source, loader)
    if not match:
        raise RuleError(f"{_at(source, fields['match'])}: rule {index}'s match is empty; give at least one "
                        f"of {', '.join(MATCH_KEYS)}")
    name = cls = layers = None
    if "name" in match:
        name = _regex(_value(match["name"], loader), _at(source, match["name"]))
    if "class" in match:
        cls = class_matcher(_value(match["class"], loader), _at(source, match["class"]), trust_rules)
    if "layers" in match:
        layers = layer_range(_value(match["layers"], loader), _at(source, match["layers"]))
    recursive = True
    if "recursive" in fields:
        recursive = _value(fields["recursive"], loader)
        if not isinstance(recursive, bool):
            raise RuleError(f"{_at(source, fields['recursive'])}: recursive must be true or false, got {recursive!r}")
    replace = _replace(fields["replace"], index, source, loader, trust_rules)
    if replace["kt_class"] and recursive and replace["op"] in compat.KT_SUBTREE_OPS:
        # KTransformers operators loaded their children themselves; ktrans's equivalents own them.
        recursive = False
        replace["notes"] += (f"recursive: false implied: {replace['op']} loads the whole subtree itself",)
    return Rule(index, where, name, cls, layers, recursive=recursive, **replace)


def _regex(pattern, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise RuleError(f"{where}: match.name must be a regular expression string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RuleError(f"{where}: match.name {pattern!r} is not a valid regular expression: {e}") from None


def _replace(node, index: int, source: str, loader, trust_rules: bool) -> dict:
    """Fields of Rule that come from `replace`: op, op_class, device, kwargs, transfer_map, notes."""
    fields = _fields(node, REPLACE_KEYS, f"rule {index}'s replace", source, loader)
    where = _at(source, fields.get("class", node))
    cls_text = _value(fields["class"], loader) if "class" in fields else "default"
    if not isinstance(cls_text, str) or not cls_text:
        raise RuleError(f"{where}: replace.class must be an operator name or 'default', got {cls_text!r}")
    kwargs = _value(fields["kwargs"], loader) if "kwargs" in fields else {}
    if not isinstance(kwargs, dict):
        raise RuleError(f"{_at(source, fields['kwargs'])}: replace.kwargs must be a mapping, got {kwargs!r}")
    device = _value(fields["device"], loader) if "device" in fields else None
    kt = compat.is_kt_class(cls_text) and not trust_rules
    op, op_class = _operator(cls_text, where, trust_rules)
    op, device, kwargs, transfer_map, notes = compat.translate_kwargs(op, kwargs, device, where, kt)
    if op_class is None and op != "default":
        op_class = _operator(op, where, trust_rules)[1]
    dwhere = _at(source, fields.get("device", fields.get("kwargs", node)))
    device = normalize_device(device, dwhere) if device is not None else None
    kwargs = _check_kwargs(op, op_class, kwargs, _at(source, fields.get("kwargs", node)), kt, notes)
    if transfer_map is not None:
        transfer_map = _transfer_map(transfer_map, dwhere)
    return dict(op=op, op_class=op_class, device=device, kwargs=kwargs, transfer_map=transfer_map,
                notes=tuple(notes), kt_class=cls_text if kt else None)


def _operator(text: str, where: str, trust_rules: bool):
    """(operator name, class) named by replace.class."""
    from ktrans.operators.base import Operator
    from ktrans.operators.registry import get_operator

    if text == "default":
        return "default", None
    if "." not in text:
        try:
            return text, get_operator(text)
        except KtransError as e:
            raise RuleError(f"{where}: {e}") from None
    if compat.is_kt_class(text) and not trust_rules:
        return compat.kt_operator(text, where), None
    if not trust_rules:
        raise RuleError(f"{where}: replace.class '{text}' is a Python import path; rule files name ktrans "
                        f"operators (see `ktrans rules list`), and importing a class named by a rule file "
                        f"needs --trust-rules (trust_rules=True)")
    cls = import_attr(text, where)
    if not (isinstance(cls, type) and issubclass(cls, Operator)):
        raise RuleError(f"{where}: replace.class '{text}' is not a subclass of ktrans.operators.Operator")
    return cls.name or text, cls


def _check_kwargs(op: str, op_class, kwargs: dict, where: str, kt: bool, notes: list[str]) -> dict:
    """Reject kwargs the operator does not take (a KTransformers rule drops them with a note)."""
    if op == "default":
        valid: list[str] = []
    else:
        valid = op_class.accepted_kwargs()
    unknown = sorted(k for k in kwargs if k not in valid)
    if not unknown:
        return kwargs
    if kt:
        notes.extend(f"{k} '{kwargs[k]}' ignored: {op} takes no such option" for k in unknown)
        return {k: v for k, v in kwargs.items() if k in valid}
    if valid:
        expected = ", ".join(valid)
    else:
        expected = "(none: default only places the module)" if op == "default" else "(none)"
    raise RuleError(f"{where}: {op} takes no kwargs {', '.join(unknown)}; valid: {expected}")


def _transfer_map(value, where: str) -> dict[int, str]:
    if not isinstance(value, dict) or not all(isinstance(k, int) and k >= 0 for k in value):
        raise RuleError(f"{where}: transfer_map must map layer indices to devices, e.g. {{30: 'cuda:1'}}, got {value!r}")
    return {k: normalize_device(v, where) for k, v in sorted(value.items())}
