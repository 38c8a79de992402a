"""Rule mechanics on a toy tree: first match, recursion, counts, devices, layers, class matching,
and that what apply builds is exactly what the plan (and explain's table) said."""

from __future__ import annotations

import pytest
import torch
from rules_toy import VOCAB, ToyLinear, ToyMLPOp, ToyModel, meta_toy

from ktrans.errors import KtransError
from ktrans.rules.apply import apply_plan
from ktrans.rules.explain import explain_rows, index_ranges, notes
from ktrans.rules.plan import plan_model
from ktrans.rules.schema import parse_rules
from ktrans.rules.state_dict import StateDictSource


def _plan(text, model=None, **kw):
    model = model if model is not None else meta_toy()
    kw.setdefault("default_device", "cpu")
    return model, plan_model(model, parse_rules(text, source="t.yaml"), **kw)


def _reference(num_layers=4):
    ref = ToyModel(num_layers)
    return ref, StateDictSource(ref.state_dict())


RULES = r"""
- match: {name: '^model\.layers\.\d+\.mlp$'}
  replace: {class: toy_mlp}
- match: {class: Linear, layers: '0:2'}
  replace: {class: toy_linear, kwargs: {scale: 1.0}}
- match: {name: 'down$'}
  replace: {class: toy_linear}
- match: {name: '^model\.embed$'}
  replace: {class: default, device: cpu}
"""


def test_first_match_wins_and_counts_per_rule():
    _, plan = _plan(RULES)
    # rule 2 takes every Linear of layers 0-1 (attn, up, down = 3 each); rule 3 only the `down`
    # of layers 2-3, since rule 2 already placed layers 0-1's.
    assert plan.counts_per_rule() == {1: 4, 2: 6, 3: 2, 4: 1}
    assert plan.entry("model.layers.0.mlp.down").rule.index == 2
    assert plan.entry("model.layers.0.mlp.down").also_matched == (3,)
    assert plan.entry("model.layers.3.mlp.down").rule.index == 3
    assert plan.entry("model.layers.3.mlp.up").op == "default"
    assert plan.entry("lm_head").rule is None


def test_recursive_false_hides_children():
    text = r"""
- match: {name: '^model\.layers\.\d+\.mlp$'}
  replace: {class: default, device: cpu}
  recursive: false
- match: {name: 'up$'}
  replace: {class: toy_linear}
"""
    _, plan = _plan(text.replace("'up$'", "'^model\\.layers\\.\\d+\\.attn$'"))
    paths = {e.path for e in plan.entries}
    assert "model.layers.1.mlp" in paths and "model.layers.1.mlp.up" not in paths
    # without recursive: false the children are visited and placed by their own rules
    _, plan2 = _plan(text.replace("  recursive: false\n", ""))
    assert plan2.counts_per_rule() == {1: 4, 2: 4}
    # a rule whose only matches sit under a recursive: false module is reported as such
    with pytest.raises(KtransError, match=r"t.yaml:5: rule 2 .*inside a module an earlier rule replaced with recursive: false"):
        _plan(text)


def test_unmatched_modules_get_default_device_and_file_default_wins():
    _, plan = _plan(RULES, default_device="cuda:0")
    assert plan.entry("lm_head").device == "cuda:0"
    assert plan.entry("model.embed").device == "cpu"
    _, plan = _plan("default_device: cuda:1\nrules:\n" + "\n".join("  " + ln for ln in RULES.strip().splitlines()),
                    default_device="cuda:0")
    assert plan.entry("lm_head").device == "cuda:1"


def test_device_map_retargets_rule_devices():
    text = r"""
- match: {name: '^model\.layers\.[01]\.'}
  replace: {device: cuda:0}
- match: {name: '^model\.layers\.[23]\.'}
  replace: {device: 'cuda:1'}
"""
    _, plan = _plan(text, default_device="cuda", device_map={"cuda": "cpu", "cuda:1": "cuda:0"})
    assert plan.entry("model.layers.0.attn").device == "cpu"
    assert plan.entry("model.layers.3.attn").device == "cuda:0"       # exact entry beats the wildcard
    assert plan.entry("lm_head").device == "cpu"
    _, plan = _plan(text, default_device="cuda:0", device_map="cpu")
    assert set(plan.bytes_per_device()) == {"cpu"}
    assert plan.transfer_map == {}
    _, plan = _plan(text.replace("[01]", "[012]").replace("[23]", "3"), default_device="cuda:0")
    assert plan.entry("model.layers.3.norm").device == "cuda:1"


@pytest.mark.parametrize("layers,expect", [
    ("'0:2'", [0, 1]), ("'2:'", [2, 3, 4]), ("':50%'", [0, 1]), ("'50%:'", [2, 3, 4]),
    ("'1,3'", [1, 3]), ("-1", [4]), ("'0:1, 4:'", [0, 4]), ("2", [2]),
])
def test_layer_ranges(layers, expect):
    _, plan = _plan(f"- match: {{name: 'attn$', layers: {layers}}}\n  replace: {{class: toy_linear}}\n",
                    model=meta_toy(5))
    assert sorted(int(e.path.split(".")[2]) for e in plan.entries if e.op == "toy_linear") == expect


@pytest.mark.parametrize("cls", ["Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"])
def test_class_match_by_name_and_safe_dotted_path(cls):
    _, plan = _plan(f"- match: {{class: {cls}}}\n  replace: {{class: toy_linear}}\n")
    assert plan.counts_per_rule() == {1: 4 * 3 + 1}


def test_class_match_by_base_class_name_and_trusted_import():
    # a short name matches by class name without importing; a dotted path outside torch.nn and
    # transformers is imported only with trust_rules
    _, plan = _plan("- match: {class: ToyMLP}\n  replace: {class: toy_mlp}\n")
    assert plan.counts_per_rule() == {1: 4}
    with pytest.raises(KtransError, match="needs --trust-rules"):
        _plan("- match: {class: rules_toy.ToyMLP}\n  replace: {class: toy_mlp}\n")
    model = meta_toy()
    plan = plan_model(model, parse_rules("- match: {class: rules_toy.ToyMLP}\n  replace: {class: rules_toy.ToyMLPOp}\n",
                                         trust_rules=True), default_device="cpu")
    assert plan.counts_per_rule() == {1: 4} and plan.entry("model.layers.0.mlp").op == "toy_mlp"


def test_overlaps_and_shadowed_rules_are_reported():
    text = r"""
- match: {class: Linear}
  replace: {class: toy_linear}
- match: {name: 'attn$'}
  replace: {device: cpu}
"""
    _, plan = _plan(text)
    assert plan.shadowed and plan.shadowed[0].index == 2
    lines = notes(plan)
    assert any("overlap: rule 2 also matches 4 module(s) placed by rule 1" in ln and
               "model.layers.{0-3}.attn" in ln for ln in lines)
    assert any(ln.startswith("shadowed: rule 2 (t.yaml:4)") for ln in lines)


def test_apply_builds_what_explain_shows_and_matches_reference():
    ref, weights = _reference()
    model, plan = _plan(RULES)
    rows = explain_rows(plan)
    apply_plan(model, plan, weights)
    for row in rows:
        for path in row.paths:
            mod = model.get_submodule(path)
            if row.op == "toy_linear":
                assert isinstance(mod, ToyLinear) and mod.device == torch.device(row.device)
            elif row.op == "toy_mlp":
                assert isinstance(mod, ToyMLPOp)
            else:
                assert type(mod).__name__ == row.module_class
        held = sum(t.numel() * t.element_size() for p in row.paths
                   for t in list(model.get_submodule(p).parameters(recurse=False)) +
                   list(model.get_submodule(p).buffers(recurse=False)))
        assert held == row.total_bytes, row.group
    # deepest first: the MLP operator was built over already-swapped children (layers 0-1)
    assert model.get_submodule("model.layers.0.mlp").children_at_build == ("ToyLinear", "ToyLinear")
    assert model.get_submodule("model.layers.3.mlp").children_at_build == ("Linear", "ToyLinear")
    assert not any(t.is_meta for t in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)


def test_operator_kwargs_reach_the_operator():
    ref, weights = _reference()
    model, plan = _plan("- match: {name: '^lm_head$'}\n  replace: {class: toy_linear, kwargs: {scale: 2.0}}\n")
    apply_plan(model, plan, weights)
    assert model.lm_head.scale == 2.0
    ids = torch.randint(0, VOCAB, (1, 4))
    torch.testing.assert_close(model(ids), 2.0 * ref(ids))


def test_explain_rows_collapse_layers():
    _, plan = _plan(RULES)
    groups = {r.group: r for r in explain_rows(plan)}
    assert groups["model.layers.{0-1}.attn"].op == "toy_linear"
    assert groups["model.layers.{2-3}.mlp.down"].rule == "#3 t.yaml:6"
    assert groups["model.layers.{0-3}.norm"].op == "default" and len(groups["model.layers.{0-3}.norm"].paths) == 4
    assert "model.layers" not in groups                       # containers without tensors are left out
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_apply_errors_name_the_missing_piece():
    ref, _ = _reference()
    sd = ref.state_dict()
    del sd["model.layers.2.norm.weight"]
    model, plan = _plan(RULES)
    with pytest.raises(KtransError, match=r"no tensor for parameter 'model.layers.2.norm.weight'"):
        apply_plan(model, plan, StateDictSource(sd))
    sd = ref.state_dict()
    sd["lm_head.weight"] = torch.zeros(3, 3)
    model, plan = _plan(RULES)
    with pytest.raises(KtransError, match=r"'lm_head.weight' has shape \[3, 3\], the model expects \[32, 8\]"):
        apply_plan(model, plan, StateDictSource(sd))
    model, plan = _plan("- match: {name: '^lm_head$'}\n  replace: {class: toy_lazy}\n")
    with pytest.raises(KtransError, match=r"still on the meta device .*lm_head.weight.*\(lm_head\) did not load"):
        apply_plan(model, plan, StateDictSource(ref.state_dict()))
