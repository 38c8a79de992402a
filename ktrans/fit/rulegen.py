"""Write a placement (ktrans.fit.placement) as an ordinary rule file: the architecture's shipped
rules, preceded by the rules that differ for this machine, so the user can read, keep and edit it.

Generated rules, first match wins:
1. experts on the GPU: `hybrid_experts` on the GPU for layers with GPU experts — one rule for each
   run of layers holding all their experts (`gpu_experts: all`), one per layer holding a chosen few;
2. layers that run on the CPU (their dense part did not fit): a copy of each shipped rule that
   places something there, restricted to those layers (`layers: 'N:'`) and moved to the CPU (and,
   after every other rule, a catch-all for what no rule names there);
3. the shipped rules, with the NUMA layout added to the CPU experts' kwargs (and, when nothing goes
   to the GPU, every device set to the CPU).
"""

from __future__ import annotations

import copy

import yaml

from ktrans.fit.model_bytes import ModelBytes
from ktrans.fit.placement import Placement
from ktrans.rules.explain import index_ranges

CPU_KWARGS = ("backend", "cpu_infer", "numa", "numa_nodes", "max_chunk")


def base_rules(text: str) -> tuple[list[dict], str | None]:
    """(rules, default_device) of a rule file's text (already validated by the rule loader)."""
    data = yaml.safe_load(text)
    if isinstance(data, dict):
        return list(data["rules"]), data.get("default_device")
    return list(data), None


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def _emit(rule: dict, comment: str = "") -> str:
    lines = [f"  # {comment}"] if comment else []
    lines.append(f"  - match: {_flow(rule['match'])}")
    lines.append(f"    replace: {_flow(rule.get('replace', {}))}")
    if "recursive" in rule:
        lines.append(f"    recursive: {'true' if rule['recursive'] else 'false'}")
    return "\n".join(lines)


def _experts_rule(rules: list[dict]) -> dict | None:
    """The shipped rule of the routed experts (None for a dense model)."""
    return next((r for r in rules if r.get("replace", {}).get("class") == "cpu_experts"), None)


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs as (first, last)."""
    out: list[tuple[int, int]] = []
    for i in layers:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _gpu_expert_rules(p: Placement, mb: ModelBytes, experts: dict, numa: dict) -> list[str]:
    match = {k: v for k, v in experts["match"].items() if k != "layers"}
    cpu_kw = {k: v for k, v in experts["replace"].get("kwargs", {}).items() if k in CPU_KWARGS}
    whole = p.whole_layers(mb)
    out = []
    for a, b in _runs(whole):
        rule = {"match": {**match, "layers": f"{a}:{b + 1}"},
                "replace": {"class": "hybrid_experts", "device": p.gpu,
                            "kwargs": {"gpu_experts": "all", **cpu_kw, **numa}}, "recursive": False}
        out.append(_emit(rule, f"layers {a}-{b}: every routed expert on {p.gpu}"))
    for i, ids in p.gpu_experts.items():
        if i in whole:
            continue
        rule = {"match": {**match, "layers": i},
                "replace": {"class": "hybrid_experts", "device": p.gpu,
                            "kwargs": {"gpu_experts": list(ids), **cpu_kw, **numa}}, "recursive": False}
        share = f", {p.hit_rate[i]:.0%} of its routed work in the counts" if p.counted else ""
        out.append(_emit(rule, f"layer {i}: {len(ids)} of {mb.layers[i].num_experts} experts on {p.gpu}{share}"))
    return out


def _cpu_layer_rules(p: Placement, rules: list[dict], copy_rules: set[int], n_layers: int) -> tuple[list[str], str]:
    """(copies of the shipped rules for the CPU layers, the catch-all that goes after everything)."""
    start = p.gpu_layers
    out = []
    for index, r in enumerate(rules, 1):
        if index not in copy_rules or "layers" in r["match"]:
            continue
        c = copy.deepcopy(r)
        c["match"]["layers"] = f"{start}:"
        c.setdefault("replace", {})["device"] = "cpu"
        out.append(_emit(c, f"layers {start}-{n_layers - 1} run on the CPU: shipped rule {index}, moved there"))
    catch = {"match": {"name": r"^model\.layers\.\d+(\.|$)", "layers": f"{start}:"},
             "replace": {"class": "default", "device": "cpu"}}
    return out, _emit(catch, f"anything else in layers {start}-{n_layers - 1} (no rule above) on the CPU too")


def render_rules(p: Placement, mb: ModelBytes, shipped_text: str, *, copy_rules: set[int],
                 header: list[str]) -> str:
    """The rule file's text. `copy_rules`: indices (1-based) of shipped rules that place modules
    in the layers that now run on the CPU (from the shipped plan)."""
    rules, _ = base_rules(shipped_text)
    experts = _experts_rule(rules)
    # NOTE: numa_nodes too, so that planned bytes (and the pool's thread groups) follow the profile.
    numa = {"numa": p.numa.mode, "numa_nodes": p.numa.nodes} if p.numa.mode else {}
    body, tail = [], []
    if p.gpu and p.gpu_experts:
        body += _gpu_expert_rules(p, mb, experts, numa)
    if p.gpu:
        if p.gpu_layers < len(mb.layers):
            copies, catch = _cpu_layer_rules(p, rules, copy_rules, len(mb.layers))
            body, tail = body + copies, [catch]
    for r in rules:
        r = copy.deepcopy(r)
        rep = r.setdefault("replace", {})
        if rep.get("class") == "cpu_experts" and numa:
            rep["kwargs"] = {**rep.get("kwargs", {}), **numa}
        if not p.gpu and str(rep.get("device", "")).startswith("cuda"):
            rep["device"] = "cpu"
        body.append(_emit(r))
    body += tail
    head = "\n".join(f"# {h}" if h else "#" for h in header)
    return f"{head}\ndefault_device: {p.gpu or 'cpu'}\nrules:\n" + "\n".join(body) + "\n"


def describe(p: Placement, mb: ModelBytes) -> list[str]:
    """One line per decision, for the file's header and explain's notes."""
    gib = 2**30
    n = len(mb.layers)
    if not p.gpu:
        lines = ["everything on the CPU (no GPU, or not even one layer fits on it)"]
    else:
        layers = "every layer" if p.gpu_layers == n else f"layers 0-{p.gpu_layers - 1} (the rest on the CPU)"
        lines = [f"{p.gpu}: the parts outside the routed experts and the KV cache of {layers}"]
        whole = p.whole_layers(mb)
        if whole:
            lines.append(f"{p.gpu}: every routed expert of layer(s) {index_ranges(whole)}")
        part = {i: ids for i, ids in p.gpu_experts.items() if i not in whole}
        if part:
            how = "the most used by the counts" if p.counted else "in id order (no activation counts yet)"
            lines.append(f"{p.gpu}: {sum(map(len, part.values()))} routed expert(s) of layer(s) "
                         f"{index_ranges(sorted(part))}, {how}")
        moe = mb.moe_layers()
        if moe and p.gpu_experts:
            share = sum(p.hit_rate.get(lb.index, 0.0) for lb in moe) / len(moe)
            lines.append(f"expected share of all routed experts' work done on {p.gpu}: {share:.0%}")
    for dev in sorted(p.needed):
        lines.append(f"{dev}: {p.needed[dev] / gib:.1f} GiB needed, {p.available[dev] / gib:.1f} GiB usable")
    return lines + p.notes
