"""Rules: YAML files that decide which module of a HF model runs where, with which operator.

    rules = load_rules(path)                         # schema.py: validated, errors at file:line
    model = build_meta_model(config)                 # ktrans.config.arch
    plan = plan_model(model, rules, weights=src)     # plan.py: pure and printable (explain.py)
    apply_plan(model, plan, src)                     # apply.py: swap modules, load weights

`prepare_model` does the four steps. The format is documented in docs/rules.md.
"""

from __future__ import annotations

from ktrans.rules.apply import apply_plan
from ktrans.rules.files import rules_dir, shipped_rules
from ktrans.rules.plan import Plan, PlanEntry, plan_model
from ktrans.rules.schema import Rule, RuleError, RuleSet, load_rules, parse_rules
from ktrans.rules.state_dict import StateDictSource


def prepare_model(config, weights, *, rules_path=None, variant: str = "", default_device: str = "cuda:0",
                  device_map=None, dtype=None, trust_rules: bool = False):
    """Build the meta model for `config`, plan it with `rules_path` (default: the architecture's
    shipped file of `variant`), apply the plan and load `weights`. Returns (model, plan)."""
    from ktrans.config.arch import arch_from_config, build_meta_model

    if rules_path is None:
        rules_path = shipped_rules(arch_from_config(config).name, variant)
    rules = load_rules(rules_path, trust_rules=trust_rules)
    model = build_meta_model(config)
    plan = plan_model(model, rules, config=config, weights=weights, default_device=default_device,
                      device_map=device_map, dtype=dtype)
    apply_plan(model, plan, weights)
    return model, plan


__all__ = ["Plan", "PlanEntry", "Rule", "RuleError", "RuleSet", "StateDictSource", "apply_plan",
           "load_rules", "parse_rules", "plan_model", "prepare_model", "rules_dir", "shipped_rules"]
