"""docs/rules.md stays true: its walkthrough example runs end to end, and its reference tables
name exactly the keys, operators and KTransformers classes the code knows."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from test_shipped_rules import CONFIGS, _weights

from ktrans.cli.main import main
from ktrans.config.arch import build_meta_model
from ktrans.operators.registry import get_operator, operator_names
from ktrans.rules import compat
from ktrans.rules import prepare_model
from ktrans.rules.explain import notes
from ktrans.rules.plan import plan_model
from ktrans.rules.schema import FILE_KEYS, MATCH_KEYS, REPLACE_KEYS, RULE_KEYS, load_rules

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


def _example() -> str:
    text = DOC.read_text()
    m = re.search(r"<!-- example: custom-rules -->\n```yaml\n(.*?)```", text, re.S)
    assert m, "docs/rules.md lost its custom-rules example"
    return m.group(1)


def test_walkthrough_example_explains_and_applies(tmp_path, capsys):
    rules = tmp_path / "my-rules.yaml"
    rules.write_text(_example())
    config = CONFIGS["qwen3_moe"]()                         # 5 layers: 0-3 on the GPU, 4 on the CPU
    config.save_pretrained(tmp_path / "model")
    assert main(["rules", "explain", "--model_path", str(tmp_path / "model"), "--optimize_config_path", str(rules)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\.layers\.\{0-3\}\.mlp\.experts .*torch_experts .*cuda:0 .*#1 ", out)
    assert re.search(r"model\.layers\.4\.mlp\.experts .*cpu_experts .*cpu .*#2 ", out)
    assert "overlap: rule 2 also matches 4 module(s) placed by rule 1" in out
    # end to end on this machine: every CUDA device mapped to the CPU, real weights loaded
    model, plan = prepare_model(config, _weights(config), rules_path=rules, device_map="cpu")
    assert plan.counts_per_rule()[1] == 4
    assert [type(model.model.layers[i].mlp.experts).__name__ for i in range(5)] == ["TorchExperts"] * 4 + ["CPUExperts"]
    assert all(t.device == torch.device("cpu") for t in model.parameters())


def test_walkthrough_slip_rule_order_is_reported_as_shadowed(tmp_path):
    blocks = _example().split("  # ")
    swapped = blocks[0] + "  # " + blocks[2] + "  # " + blocks[1] + "".join("  # " + b for b in blocks[3:])
    path = tmp_path / "swapped.yaml"
    path.write_text(swapped)
    config = CONFIGS["qwen3_moe"]()
    plan = plan_model(build_meta_model(config), load_rules(path), config=config)
    assert any(n.startswith("shadowed: rule 2") for n in notes(plan))


def _table_keys(heading: str) -> set[str]:
    section = DOC.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.M))


def test_reference_table_lists_every_key():
    keys = _table_keys("### Reference of every key")
    want = set(FILE_KEYS) | set(RULE_KEYS) | {f"match.{k}" for k in MATCH_KEYS} | {f"replace.{k}" for k in REPLACE_KEYS}
    assert keys == want


def test_operator_table_lists_the_registry():
    builtin = {n for n in operator_names() if get_operator(n).__module__.startswith("ktrans.operators.")}
    assert _table_keys("## Operators") - {"replace.class"} == builtin | {"default"}


def test_ktransformers_table_covers_the_translation():
    section = DOC.read_text().split("## KTransformers rule files", 1)[1].split("\n## ", 1)[0]
    for key in compat.KT_OPERATORS:
        cls = key.split(".")[1]
        assert (cls if cls != "*" else key.split(".")[0] + ".*") in section, key
    for kt, ours in compat.KT_BACKENDS.items():
        assert f"`{kt}` → `{ours}`" in section


def test_python_example_runs(tiny_model, capsys):
    code = re.search(r"## In Python\n\n```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    gguf = tiny_model("deepseek_v3") / "model.gguf"
    scope: dict = {}
    exec(code.replace('"model.gguf"', repr(str(gguf))), scope)
    model, plan = scope["model"], scope["plan"]
    assert "placement plan" in capsys.readouterr().out
    assert type(model.model.layers[1].mlp.experts).__name__ == "CPUExperts"
    assert set(plan.bytes_per_device()) == {"cpu"}
