"""Every validation error of rule files: the message names file:line and what was expected."""

from __future__ import annotations

import pytest
from rules_toy import meta_toy

from ktrans.errors import KtransError
from ktrans.rules.devices import normalize_device, parse_device_map, parse_map_flags
from ktrans.rules.plan import plan_model
from ktrans.rules.schema import load_rules, parse_rules

OK = "- match: {name: 'attn$'}\n  replace: {class: toy_linear}\n"


def _err(text, match, **kw):
    with pytest.raises(KtransError, match=match):
        parse_rules(text, source="r.yaml", **kw)


@pytest.mark.parametrize("text,match", [
    ("- match: {name: 'a'\n  replace: x\n", r"r.yaml:\d+: not valid YAML"),
    ("", r"r.yaml:1: expected a non-empty list of rules"),
    ("name: x\n", r"r.yaml:1: unknown key 'name' in the rule file; valid keys: default_device, rules"),
    ("default_device: gpu\nrules: []\n", r"r.yaml:1: invalid device 'gpu'; expected \"cpu\", \"cuda\" or \"cuda:N\""),
    ("- 3\n", r"r.yaml:1: rule 1 must be a mapping with keys match, replace, recursive"),
    (OK + "- match: {name: x}\n  replace: {}\n  recurse: false\n",
     r"r.yaml:5: unknown key 'recurse' in rule 2; valid keys: match, replace, recursive"),
    ("- match: {nam: x}\n  replace: {}\n", r"r.yaml:1: unknown key 'nam' in rule 1's match; valid keys: class, layers, name"),
    ("- match: {name: x}\n  replace: {op: linear}\n",
     r"r.yaml:2: unknown key 'op' in rule 1's replace; valid keys: class, device, kwargs"),
    ("- match: {name: x}\n", r"r.yaml:1: rule 1 has no 'replace'"),
    ("- match: {}\n  replace: {}\n", r"r.yaml:1: rule 1's match is empty; give at least one of class, layers, name"),
    ("- match: {name: x, name: y}\n  replace: {}\n", r"r.yaml:1: key 'name' given twice"),
    ("- match: {name: '(a'}\n  replace: {}\n", r"r.yaml:1: match.name '\(a' is not a valid regular expression"),
    ("- match: {name: 3}\n  replace: {}\n", r"r.yaml:1: match.name must be a regular expression string"),
    ("- match: {name: x}\n  replace: {class: cpu_expert}\n",
     r"r.yaml:2: unknown operator 'cpu_expert' \(did you mean 'cpu_experts'\?\); valid operators: .*toy_linear"),
    ("- match: {name: x}\n  replace: {class: toy_linear, kwargs: {scal: 2}}\n",
     r"r.yaml:2: toy_linear takes no kwargs scal; valid: scale"),
    ("- match: {name: x}\n  replace: {class: default, kwargs: {dtype: bf16}}\n",
     r"r.yaml:2: default takes no kwargs dtype; valid: \(none: default only places the module\)"),
    ("- match: {name: x}\n  replace: {kwargs: [1]}\n", r"r.yaml:2: replace.kwargs must be a mapping"),
    ("- match: {name: x}\n  replace: {device: 'cuda:x'}\n", r"r.yaml:2: invalid device 'cuda:x'"),
    ("- match: {name: x}\n  replace: {device: 'cpu:1'}\n", r"r.yaml:2: invalid device 'cpu:1'"),
    ("- match: {name: x}\n  replace: {device: cpu, kwargs: {generate_device: cuda}}\n",
     r"r.yaml:2: replace.device 'cpu' and kwargs.generate_device 'cuda' disagree"),
    ("- match: {name: x}\n  replace: {}\n  recursive: 'no'\n", r"r.yaml:3: recursive must be true or false"),
    ("- match: {name: x, layers: 'a:b'}\n  replace: {}\n", r"r.yaml:1: match.layers item 'a:b' is not a range"),
    ("- match: {name: x, layers: [1]}\n  replace: {}\n", r"r.yaml:1: match.layers must be a layer index or ranges"),
    ("- match: {class: os.path.Foo}\n  replace: {}\n", r"r.yaml:1: match.class 'os.path.Foo' is outside torch.nn and "
                                                       r"transformers; .* needs --trust-rules"),
    ("- match: {class: torch.nn.Linar}\n  replace: {}\n", r"r.yaml:1: cannot import 'torch.nn.Linar'"),
    ("- match: {class: torch.nn.functional.relu}\n  replace: {}\n", r"r.yaml:1: match.class .* is not a torch.nn.Module class"),
    ("- match: {name: x}\n  replace: {class: mypkg.ops.Fast}\n", r"r.yaml:2: replace.class 'mypkg.ops.Fast' is a Python "
                                                                  r"import path; .*needs --trust-rules"),
    ("- match: {name: x}\n  replace: {class: ktransformers.operators.foo.KBar}\n",
     r"r.yaml:2: KTransformers class 'ktransformers.operators.foo.KBar' has no ktrans equivalent; known: .*KTransformersExperts"),
    ("- match: {name: x}\n  replace: {class: ktransformers.operators.experts.KTransformersExperts, "
     "kwargs: {generate_op: KExpertsFoo}}\n", r"r.yaml:2: generate_op 'KExpertsFoo' has no ktrans equivalent"),
    ("- match: {name: x}\n  replace: {kwargs: {transfer_map: {a: 1}}}\n", r"r.yaml:2: transfer_map must map layer indices"),
    ("- match: {name: !!python/name:os.system ''}\n  replace: {}\n", r"r.yaml:1: could not determine a constructor"),
])
def test_schema_errors(text, match):
    _err(text, match)


def test_trusted_import_must_be_an_operator():
    _err("- match: {name: x}\n  replace: {class: torch.nn.Linear}\n", r"r.yaml:2: .* not a subclass of ktrans.operators.Operator",
         trust_rules=True)


def test_missing_file(tmp_path):
    with pytest.raises(KtransError, match=r"cannot read rule file '.*nope.yaml'"):
        load_rules(tmp_path / "nope.yaml")


def test_error_lines_point_into_a_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(OK + "# comment\n\n- match: {name: 'x'}\n  replace: {class: toy_linear, device: tpu}\n")
    with pytest.raises(KtransError, match=rf"{path}:6: invalid device 'tpu'"):
        load_rules(path)


def _plan(text):
    return plan_model(meta_toy(), parse_rules(text, source="r.yaml"), default_device="cpu")


def test_rule_matching_no_module_shows_nearest_names():
    with pytest.raises(KtransError, match=r"r.yaml:3: rule 2 \(name='\^model\\\\.layer\\\\.0\\\\.atn\$'\) matches no module; "
                                          r"nearest module names: model.layers.0.attn"):
        _plan(OK + "- match: {name: '^model\\.layer\\.0\\.atn$'}\n  replace: {}\n")


def test_rule_matching_no_module_shows_nearest_classes():
    with pytest.raises(KtransError, match=r"rule 1 \(class=LayerNrm\) matches no module; nearest classes in the model: LayerNorm"):
        _plan("- match: {class: LayerNrm}\n  replace: {}\n")


def test_rule_matching_no_layer_says_which_layers_exist():
    with pytest.raises(KtransError, match=r"layers '8:' select none of the model's 4 layers"):
        _plan("- match: {name: attn, layers: '8:'}\n  replace: {}\n")


def test_every_dead_rule_is_listed_at_once():
    with pytest.raises(KtransError, match=r"2 rule\(s\) in r.yaml match no module of ToyModel:\n  r.yaml:1: .*\n  r.yaml:3: "):
        _plan("- match: {name: nothing}\n  replace: {}\n- match: {class: Nothing}\n  replace: {}\n")


@pytest.mark.parametrize("bad,match", [
    ({"cuda:0": "tpu"}, r"invalid device 'tpu'"),
    ({"gpu": "cpu"}, r"invalid device 'gpu'"),
    (["cpu"], r"expected a mapping of device -> device"),
])
def test_device_map_errors(bad, match):
    with pytest.raises(KtransError, match=match):
        parse_device_map(bad)


def test_device_names():
    assert [normalize_device(d) for d in ("cpu", "CUDA", "cuda:3", " cuda:0 ")] == ["cpu", "cuda:0", "cuda:3", "cuda:0"]
    assert parse_map_flags(["cuda:1=cpu", "cuda=cuda:0"]) == {"cuda:1": "cpu", "cuda": "cuda:0"}
    with pytest.raises(KtransError, match=r"--map-device 'cuda:1': expected SRC=DST"):
        parse_map_flags(["cuda:1"])
