"""`ktrans rules`: inspect rule files before loading anything.

`ktrans rules explain` plans a model from its config and tensor infos (no weight is read) and
prints which operator and device each module group gets, the rule that placed it and the weight
bytes per device. `ktrans rules list` shows the shipped rule files and the registered operators.
"""

from __future__ import annotations

import os
import sys

from ktrans.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("rules", help="check and explain optimize-rule files",
                       description="Inspect optimize-rule YAML files (see docs/rules.md).")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    e = rsub.add_parser("explain", help="print the placement plan of a model under a rule file",
                        description="Plan the model from its config and the tensor infos of its weight "
                                    "files (nothing is loaded) and print module groups -> operator -> "
                                    "device -> bytes, the rule behind each, and the bytes per device.")
    e.add_argument("--model_path", help="HF model directory (config.json; safetensors weights optional)")
    e.add_argument("--gguf_path", help="GGUF file, first file of a split set, or directory of GGUF files")
    e.add_argument("--optimize_config_path", help="rule file (default: the architecture's shipped file)")
    e.add_argument("--variant", default="", help="shipped rule variant when no file is given: "
                                                 "cpu, 2gpu, amx, gpu-experts (default: experts on CPU, rest on GPU)")
    e.add_argument("--device", default="cuda:0",
                   help='default device of unmatched modules; "cpu" also maps every CUDA device to the CPU')
    e.add_argument("--map-device", action="append", metavar="SRC=DST",
                   help="re-target a device named by the rules, e.g. cuda:1=cpu (repeatable)")
    e.add_argument("--trust-rules", action="store_true",
                   help="allow the rule file to import Python classes (runs code named in the file)")
    e.set_defaults(func=run_explain)
    lst = rsub.add_parser("list", help="list shipped rule files and registered operators")
    lst.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: _help(p))


def _help(parser) -> int:
    parser.print_help()
    return 0


def _console():
    from rich.console import Console

    # NOTE: a pipe or file gets a wide table instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 200)


def load_config_and_weights(model_path: str | None, gguf_path: str | None):
    """(config, WeightSource or None) from the command-line paths; no tensor data is read."""
    from ktrans.weights.source import open_weights

    if not model_path and not gguf_path:
        raise UsageError("give --model_path (HF directory) and/or --gguf_path (GGUF file or directory)")
    weights = None
    if gguf_path or _has_weight_files(model_path):
        weights = open_weights(model_path, gguf_path)
    config = weights.config() if weights is not None else None
    if config is None:
        if not model_path:
            raise UsageError(f"'{gguf_path}' carries no model config; add --model_path with config.json")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_path)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model_path '{model_path}': cannot read config.json: {e}") from None
    return config, weights


def _has_weight_files(path: str | None) -> bool:
    if not path or not os.path.isdir(path):
        return bool(path)
    return any(f.endswith((".safetensors", ".gguf")) for f in os.listdir(path))


def run_explain(args) -> int:
    from ktrans.config.arch import arch_from_config, build_meta_model
    from ktrans.rules.devices import parse_map_flags
    from ktrans.rules.explain import render_plan
    from ktrans.rules.files import shipped_rules
    from ktrans.rules.plan import plan_model
    from ktrans.rules.schema import load_rules

    config, weights = load_config_and_weights(args.model_path, args.gguf_path)
    path = args.optimize_config_path or shipped_rules(arch_from_config(config).name, args.variant)
    rules = load_rules(path, trust_rules=args.trust_rules)
    device_map = parse_map_flags(args.map_device)
    default = args.device
    if str(args.device).strip().lower() == "cpu":
        device_map.setdefault("cuda", "cpu")
    plan = plan_model(build_meta_model(config), rules, config=config, weights=weights,
                      default_device=default, device_map=device_map)
    render_plan(plan, _console())
    return 0


def run_list(args) -> int:
    from rich.table import Table

    from ktrans.operators.registry import get_operator, operator_names
    from ktrans.rules.files import VARIANTS, list_shipped

    console = _console()
    files = Table(title="shipped rule files")
    files.add_column("file")
    files.add_column("what it does")
    for path in list_shipped():
        variant = path.stem.split("-", 1)[1] if "-" in path.stem else ""
        files.add_row(str(path), VARIANTS.get(variant, ""))
    console.print(files)
    ops = Table(title="operators (replace.class)")
    ops.add_column("name")
    ops.add_column("kwargs")
    ops.add_column("class")
    ops.add_row("default", "-", "keeps the transformers module, only places it")
    for name in operator_names():
        cls = get_operator(name)
        ops.add_row(name, ", ".join(cls.accepted_kwargs()) or "-", f"{cls.__module__}.{cls.__qualname__}")
    console.print(ops)
    return 0
