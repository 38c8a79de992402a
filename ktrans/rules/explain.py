"""Explain a plan: module groups -> operator -> device -> bytes, the rule behind each, totals
(weights, and with a KVPlan the KV cache as well).

Entries that differ only in their layer index collapse into one row
(`model.layers.{3-60}.mlp.experts`). Containers with no tensors of their own and kept as they
are (`model.layers.7`) are left out: they place nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ktrans.rules.matcher import layer_of
from ktrans.rules.plan import Plan, PlanEntry

_LAYER_SUB = re.compile(r"(?<=layers\.)\d+(?=\.|$)")


@dataclass(frozen=True)
class ExplainRow:
    group: str                  # path pattern, layer indices collapsed: model.layers.{3-60}.mlp.experts
    module_class: str           # HF class of the modules
    op: str                     # operator name or "default"
    device: str                 # device the rule placed them on
    nbytes: dict[str, int]      # planned bytes per device, summed over the group
    rule: str                   # "#3 file.yaml:12" (file name; the title has its path), or "-"
    paths: tuple[str, ...]      # the module paths in the group

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def explain_rows(plan: Plan) -> list[ExplainRow]:
    """The table's rows, grouped by path pattern in model order."""
    groups: dict[tuple, list[PlanEntry]] = {}
    for e in plan.entries:
        if e.op == "default" and not e.nbytes:
            continue
        key = (_LAYER_SUB.sub("#", e.path), e.module_class, e.op, e.device,
               e.rule.index if e.rule else 0, repr(sorted(e.kwargs.items())))
        groups.setdefault(key, []).append(e)
    # NOTE: rows of one path pattern stay together (layers 0-3 and 4-60 of the experts), in the
    # order each pattern first appears in the model.
    first_seen: dict[str, int] = {}
    for key in groups:
        first_seen.setdefault(key[0], len(first_seen))
    rows = []
    for (pattern, cls, op, device, _, _), entries in sorted(groups.items(), key=lambda kv: first_seen[kv[0][0]]):
        nbytes: dict[str, int] = {}
        for e in entries:
            for dev, n in e.nbytes.items():
                nbytes[dev] = nbytes.get(dev, 0) + n
        rule = entries[0].rule
        rows.append(ExplainRow(_collapse(pattern, entries), cls, op, device, nbytes,
                               f"#{rule.index} {os.path.basename(rule.where)}" if rule else "-",
                               tuple(e.path for e in entries)))
    return rows


def _collapse(pattern: str, entries: list[PlanEntry]) -> str:
    layers = sorted({layer_of(e.path) for e in entries} - {None})
    if "#" not in pattern or not layers:
        return pattern
    return pattern.replace("#", str(layers[0]) if len(layers) == 1 else "{" + index_ranges(layers) + "}", 1)


def index_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out, start, prev = [], None, None
    for v in values + [None]:
        if start is not None and (v is None or v != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ",".join(out)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def notes(plan: Plan) -> list[str]:
    """Everything a rule author should know beyond the table: overlaps, shadowed rules, ignored
    KTransformers keys, the device map and layer switch points."""
    out = []
    for (win, other), paths in plan.overlaps().items():
        by_pattern: dict[str, list[PlanEntry]] = {}
        for q in paths:
            by_pattern.setdefault(_LAYER_SUB.sub("#", q), []).append(plan.entry(q))
        pats = [_collapse(p, es) for p, es in by_pattern.items()]
        out.append(f"overlap: rule {other} also matches {len(paths)} module(s) placed by rule {win} "
                   f"(first match wins): {_summary(pats)}")
    out.extend(plan.notes)
    for r in plan.shadowed:
        out.append(f"shadowed: {r.label} places nothing; every module it matches an earlier rule placed")
    for r in plan.rules.rules:
        out.extend(f"{r.label}: {n}" for n in r.notes)
    if plan.device_map:
        out.append("device map: " + ", ".join(f"{k} -> {v}" for k, v in plan.device_map.items()))
    if plan.transfer_map:
        out.append("layer device switches: " + ", ".join(f"layer {k} -> {v}" for k, v in plan.transfer_map.items()))
    return out


def _summary(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def device_totals(plan: Plan, kv=None) -> dict[str, int]:
    """Bytes per device: the plan's weights plus, given a KVPlan, its KV cache."""
    totals = dict(plan.bytes_per_device())
    for dev, n in (kv.nbytes.items() if kv is not None else ()):
        totals[dev] = totals.get(dev, 0) + n
    return dict(sorted(totals.items()))


def _per_device(nbytes: dict[str, int]) -> str:
    return ", ".join(f"{d} {human_bytes(n)}" for d, n in nbytes.items()) or "none"


def render_plan(plan: Plan, console=None, kv=None) -> None:
    """Print the plan as a rich table, device totals and notes; `kv` (a KVPlan from
    ktrans.kv_cache.sizing) adds the KV cache's line and bytes to the totals."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"placement plan ({plan.rules.path})", show_lines=False)
    for col, kw in (("module group", {}), ("n", {"justify": "right"}), ("HF class", {}), ("operator", {}),
                    ("device", {}), ("bytes", {"justify": "right"}), ("rule", {})):
        table.add_column(col, **kw)
    for row in explain_rows(plan):
        dev = row.device if set(row.nbytes) <= {row.device} else \
            ", ".join(f"{d} {human_bytes(n)}" for d, n in row.nbytes.items())
        table.add_row(row.group, str(len(row.paths)), row.module_class, row.op, dev,
                      human_bytes(row.total_bytes), row.rule)
    console.print(table)
    totals = device_totals(plan, kv)
    gpu = sum(n for d, n in totals.items() if d.startswith("cuda"))
    summary = f"  |  GPU total {human_bytes(gpu)}, CPU RAM {human_bytes(totals.get('cpu', 0))}"
    if kv is None:
        console.print("weights per device: " + _per_device(totals) + summary)
    else:
        console.print("weights per device: " + _per_device(plan.bytes_per_device()))
        n = kv.state_slots
        state = f", recurrent state for {n} request{'s' if n != 1 else ''}" if kv.state_per_slot else ""
        console.print(f"KV cache ({kv.cache_lens} tokens: {kv.num_pages - 1} pages of {kv.page_size} + 1 scratch "
                      f"page, {'/'.join(kv.dtypes)}{state}): {_per_device(kv.nbytes)}")
        console.print("weights + KV cache per device: " + _per_device(totals) + summary)
        if kv.state_per_slot:
            console.print(f"recurrent state of the linear-attention layers (in the KV cache above, for "
                          f"--max_batch_size {kv.state_slots}): " + _per_device(kv.state_per_slot) + " per request")
    for line in notes(plan):
        console.print(f"note: {line}", highlight=False, markup=False)
