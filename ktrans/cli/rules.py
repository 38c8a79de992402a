"""`ktrans rules`: inspect rule files before loading anything.

`ktrans rules explain` plans a model from its config and tensor infos (no weight is read) and
prints which operator and device each module group gets, the rule that placed it, the KV cache
and the bytes per device. With --quant (and --arch/--preset, --config or a config-only
--model_path) it needs no weight file at all: the tensor infos are those ktrans gen-model would
write (ktrans.genmodel.planned). `ktrans rules list` shows the shipped rule files and the
registered operators.
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
                                    "files (nothing is loaded), or from a config and --quant with no "
                                    "weight file at all, and print module groups -> operator -> device -> "
                                    "bytes, the rule behind each, the KV cache and the bytes per device.")
    e.add_argument("--model_path", help="HF model directory (config.json; safetensors weights optional)")
    e.add_argument("--gguf_path", help="GGUF file, first file of a split set, or directory of GGUF files")
    e.add_argument("--config", help="a config.json file (instead of --model_path)")
    e.add_argument("--arch", help="plan a gen-model preset instead of files: architecture (with --preset, --quant)")
    e.add_argument("--preset", help="gen-model preset of --arch, e.g. deepseek-v3 (ktrans gen-model --help lists them)")
    e.add_argument("--quant", help="plan without weight files: the tensor types ktrans gen-model --quant writes "
                                   "(q4_k_m = llama.cpp's mix) for the config of --arch/--preset, --config or "
                                   "--model_path")
    e.add_argument("--cache_lens", type=int, default=4096, metavar="TOKENS",
                   help="KV cache size in tokens, counted on the devices of the attention (default 4096, "
                        "as ktrans chat; ktrans serve uses 16384)")
    e.add_argument("--page_size", type=int, default=None, metavar="TOKENS", help="KV page size (default: the runner's)")
    e.add_argument("--max_batch_size", type=int, default=1, metavar="N",
                   help="requests run at once: models with linear-attention layers (Qwen3-Next, Qwen3.5) keep "
                        "a recurrent state per request beside the KV cache (default 1, as ktrans chat; "
                        "ktrans serve runs 4 unless told)")
    e.add_argument("--optimize_config_path", help="rule file (default: the architecture's shipped file)")
    e.add_argument("--variant", default="", help="shipped rule variant when no file is given: "
                                                 "cpu, 2gpu, amx, gpu-experts (default: experts on CPU, rest on GPU)")
    e.add_argument("--device", default="cuda:0",
                   help='default device of unmatched modules; "cpu" also maps every CUDA device to the CPU')
    e.add_argument("--map-device", action="append", metavar="SRC=DST",
                   help="re-target a device named by the rules, e.g. cuda:1=cpu (repeatable)")
    e.add_argument("--trust-rules", action="store_true",
                   help="allow the rule file to import Python classes (runs code named in the file)")
    f = e.add_argument_group("automatic placement (--fit)")
    f.add_argument("--fit", action="store_true", help="fit the model to this machine (as chat/serve do by default "
                   "on a GPU), write the chosen rules and explain them; refused with the numbers if it cannot fit")
    f.add_argument("--gpu_memory", type=float, metavar="GB", help="with --fit: use at most this many GiB of the "
                   "GPU; where no GPU is visible, plan for a GPU with this much free memory")
    f.add_argument("--ram", type=float, metavar="GB", help="with --fit: plan for this much available RAM "
                   "instead of this machine's")
    f.add_argument("--numa_nodes", type=int, metavar="N", help="with --fit: plan for RAM split over N NUMA nodes")
    f.add_argument("--chunk_size", type=int, default=2048, metavar="TOKENS",
                   help="with --fit: prefill chunk whose working memory is kept free on the GPU (default 2048)")
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

        from ktrans.config.arch import text_model_config

        try:
            config = text_model_config(AutoConfig.from_pretrained(model_path))
        except (OSError, ValueError) as e:
            raise UsageError(f"--model_path '{model_path}': cannot read config.json: {e}") from None
    return config, weights


def _has_weight_files(path: str | None) -> bool:
    if not path or not os.path.isdir(path):
        return bool(path)
    return any(f.endswith((".safetensors", ".gguf")) for f in os.listdir(path))


def model_inputs(args):
    """(config, WeightSource or None) from explain's flags: weight files (tensor infos read), or a
    PlannedSource when the model is --arch/--preset or a config with --quant (no file read)."""
    from ktrans.genmodel.planned import PlannedSource

    given = [f for f, v in (("--model_path", args.model_path), ("--gguf_path", args.gguf_path),
                            ("--config", args.config)) if v]
    if args.arch or args.preset:
        _check_preset_flags(args, given)
        src = PlannedSource.from_preset(args.arch, args.preset, args.quant)
        return src.config(), src
    if args.config and len(given) > 1:
        raise UsageError(f"--config names the model, so {' and '.join(given[1:])} cannot; give one of them")
    if args.quant:
        _check_quant_flags(args, given)
        config = _config_file(args.config) if args.config else load_config_and_weights(args.model_path, None)[0]
        return config, PlannedSource(config, args.quant)
    if args.config:
        return _config_file(args.config), None
    return load_config_and_weights(args.model_path, args.gguf_path)


def _check_quant_flags(args, given: list[str]) -> None:
    from ktrans.genmodel.planned import check_quant

    check_quant(args.quant)
    if not given:
        raise UsageError("--quant needs a model to plan: --arch with --preset, --config FILE or "
                         "--model_path DIR (with config.json)")
    if args.model_path and not os.path.isdir(args.model_path):
        raise UsageError(f"--model_path '{args.model_path}' is not a directory (expected an HF model "
                         f"directory with config.json)")
    if args.gguf_path or _has_weight_files(args.model_path):
        what = f"--gguf_path '{args.gguf_path}'" if args.gguf_path else f"--model_path '{args.model_path}'"
        raise UsageError(f"--quant plans weights that do not exist yet, but {what} holds weight files "
                         f"(their stored types are planned as they are); drop --quant or the weights")


def _check_preset_flags(args, given: list[str]) -> None:
    from ktrans.genmodel.planned import check_quant
    from ktrans.genmodel.presets import preset_names

    if not args.arch:
        raise UsageError(f"--preset '{args.preset}' needs --arch (the architecture it belongs to)")
    presets = preset_names(args.arch)             # an unknown --arch lists the valid ones
    if not args.preset:
        raise UsageError(f"--arch {args.arch} needs --preset, one of: {', '.join(presets)}")
    if given:
        raise UsageError(f"--arch/--preset name the model, so {' and '.join(given)} cannot; give one of them")
    if not args.quant:
        from ktrans.genmodel.presets import QUANT_CHOICES

        raise UsageError(f"--arch/--preset plan weights that do not exist yet: add --quant, one of: "
                         f"{', '.join(QUANT_CHOICES)}")
    check_quant(args.quant)


def _config_file(path: str):
    from transformers import AutoConfig

    from ktrans.config.arch import text_model_config

    if not os.path.isfile(path):
        raise UsageError(f"--config '{path}': no such file (expected a model's config.json)")
    try:
        return text_model_config(AutoConfig.from_pretrained(path))
    except Exception as e:  # transformers' validators raise several unrelated exception types
        raise UsageError(f"--config '{path}': not a valid transformers config "
                         f"({str(e).strip().splitlines()[-1]})") from None


def run_explain(args) -> int:
    from ktrans.config.arch import arch_from_config, build_meta_model
    from ktrans.engine.model_runner import DEFAULT_PAGE_SIZE
    from ktrans.kv_cache.sizing import plan_kv_cache
    from ktrans.rules.devices import parse_map_flags
    from ktrans.rules.explain import render_plan
    from ktrans.rules.files import shipped_rules
    from ktrans.rules.plan import plan_model
    from ktrans.rules.schema import load_rules

    config, weights = model_inputs(args)
    page_size = DEFAULT_PAGE_SIZE if args.page_size is None else args.page_size
    fitted = _fit(args, config, weights, page_size) if args.fit else None
    path = fitted.path if fitted else \
        args.optimize_config_path or shipped_rules(arch_from_config(config).name, args.variant)
    rules = load_rules(path, trust_rules=args.trust_rules)
    device_map = parse_map_flags(args.map_device)
    default = args.device
    if str(args.device).strip().lower() == "cpu":
        device_map.setdefault("cuda", "cpu")
    plan = plan_model(build_meta_model(config), rules, config=config, weights=weights,
                      default_device=default, device_map=device_map)
    kv = plan_kv_cache(plan, cache_lens=args.cache_lens, page_size=page_size, state_slots=args.max_batch_size)
    plan.notes.extend(_weight_notes(plan, weights))
    if fitted:
        plan.notes.extend(f"fit: {line}" for line in fitted.notes)
        plan.notes.append(f"fit: rules written to {fitted.path} (keep or edit it; load it with "
                          f"--optimize_config_path)")
    render_plan(plan, _console(), kv=kv)
    if fitted:
        fitted.check()
    return 0


def _fit(args, config, weights, page_size: int):
    """The fitted rule file for explain --fit, with the what-if flags applied to this machine."""
    from ktrans.cli.model_args import cache_dir
    from ktrans.fit.counts import load, model_id
    from ktrans.fit.fit import FITTED_DIR, fit_rules, what_if
    from ktrans.fit.load import current_profile, gib_flag, gpu_index
    from ktrans.fit.placement import FitOptions

    named = [f for f, v in (("--optimize_config_path", args.optimize_config_path), ("--variant", args.variant),
                            ("--map-device", args.map_device)) if v]
    if named:
        raise UsageError(f"--fit chooses the rules itself; drop {' and '.join(named)}")
    if args.numa_nodes is not None and args.numa_nodes < 1:
        raise UsageError(f"--numa_nodes {args.numa_nodes}: expected at least 1")
    gpu_memory = gib_flag(args.gpu_memory, "--gpu_memory")
    device = str(args.device).strip().lower()
    profile, _ = current_profile(set() if device == "cpu" else {gpu_index(device)})
    profile = what_if(profile, gpu_memory=gpu_memory, ram=gib_flag(args.ram, "--ram"), numa_nodes=args.numa_nodes)
    opts = FitOptions(gpu_index=gpu_index(device), gpu_memory=gpu_memory, use_gpu=device != "cpu")
    mid = model_id(args.model_path, args.gguf_path)
    label = os.path.basename(mid.rstrip("/")) if mid else f"{args.arch or config.model_type}-{args.preset or 'config'}"
    return fit_rules(config, weights, profile=profile, opts=opts, cache_lens=args.cache_lens, page_size=page_size,
                     chunk_size=args.chunk_size, counts=load(mid), out_dir=cache_dir() / FITTED_DIR,
                     label=f"{label}-{args.quant}" if args.quant else label, key=mid,
                     state_slots=args.max_batch_size)


def _weight_notes(plan, weights) -> list[str]:
    """Where the bytes come from: planned tensor types, and projections this machine would not
    keep in their GGUF format on the GPU."""
    from ktrans.genmodel.planned import PlannedSource
    from ktrans.kernels import triton_available
    from ktrans.rules.explain import human_bytes

    out = []
    if isinstance(weights, PlannedSource):
        out.append(f"{weights.path}: no weight file read; tensor types as `ktrans gen-model --quant "
                   f"{weights.quant}` writes them ({human_bytes(weights.total_bytes())} of GGUF data)")
    # NOTE: operators plan what they would load here; without Triton a GPU projection is dequantized.
    if weights is not None and any(d.startswith("cuda") for d in plan.bytes_per_device()) and not triton_available():
        out.append("Triton does not import here, so quantized projections on the GPU are counted dequantized "
                   "(as this machine would load them); where Triton runs they keep their GGUF blocks and take "
                   "several times less")
    return out


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
