"""Fit a model to a machine: plan its bytes, decide the placement, write the rule file, check it.

    result = fit_rules(config, weights, profile=..., cache_lens=..., page_size=..., out_dir=...)
    result.path       # an ordinary rule file: load it, explain it, edit it
    result.notes      # what was decided and why, one line each

`check_plan_fits` is the refusal every load goes through (fitted or not): the planned bytes per
device against what is free now, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ktrans.errors import KtransError
from ktrans.fit.model_bytes import ModelBytes, model_bytes
from ktrans.fit.placement import FitOptions, Placement, check_fits, decide
from ktrans.fit.prefill import describe_prefill, prefill_crossover
from ktrans.fit.profile import GpuInfo, NumaNode, Profile
from ktrans.fit.rulegen import describe, render_rules
from ktrans.rules.matcher import layer_of

GiB = 2**30
FITTED_DIR = "fitted-rules"


@dataclass
class FitResult:
    path: Path                   # the rule file written
    placement: Placement
    model: ModelBytes
    totals: dict[str, int]       # bytes per device of that file's plan (weights + KV cache)
    notes: list[str]             # the decisions, one line each
    label: str                   # the model, as messages name it

    def check(self) -> None:
        """FitError (with the numbers) when the written plan exceeds the usable memory."""
        check_fits(self.totals, self.placement.available, self.label)


def rules_in_layers(plan, start: int) -> set[int]:
    """Indices of the rules that place modules off the CPU in layers >= start."""
    return {e.rule.index for e in plan.entries
            if e.rule is not None and e.device != "cpu" and (layer_of(e.path) or -1) >= start}


def what_if(profile: Profile, *, gpu_memory: int | None = None, ram: int | None = None,
            numa_nodes: int | None = None) -> Profile:
    """The profile as explain's what-if flags describe it: a GPU of `gpu_memory` bytes where none
    is visible, `ram` bytes available, RAM split evenly over `numa_nodes` nodes."""
    p = dataclasses.replace(profile)
    if gpu_memory is not None and not p.gpus:
        p.gpus = [GpuInfo(0, "GPU of --gpu_memory (none visible here)", gpu_memory, gpu_memory)]
    if ram is not None:
        p.ram_available = ram
        p.ram_total = max(p.ram_total, ram)
    if numa_nodes is not None or ram is not None:
        k = numa_nodes or len(p.numa_nodes) or 1
        cores = max(1, p.physical_cores // k)
        p.numa_nodes = [NumaNode(i, cores, p.ram_total // k, p.ram_available // k) for i in range(k)]
    return p


def _header(profile: Profile, opts: FitOptions, label: str, cache_lens: int) -> list[str]:
    gpu = profile.gpu(opts.gpu_index)
    machine = f"{profile.cpu_model}, {profile.physical_cores} cores, {profile.ram_available / GiB:.1f} GiB RAM available"
    if gpu is not None and opts.use_gpu:
        cap = f" (capped at {opts.gpu_memory / GiB:.1f} GiB)" if opts.gpu_memory is not None else ""
        machine += f"; cuda:{gpu.index} {gpu.name}, {gpu.mem_free / GiB:.1f} GiB free{cap}"
    return [f"Placement fitted by ktrans for this machine ({time.strftime('%Y-%m-%d %H:%M')}): {label}",
            f"machine: {machine}", f"KV cache: {cache_lens} tokens"]


def fitted_path(out_dir: Path, label: str, key: str) -> Path:
    """<out_dir>/<label>-<hash of key>.yaml: one file per model (`key`: its full path)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(label).name)[:60] or "model"
    return Path(out_dir) / f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.yaml"


def fit_rules(config, weights, *, profile: Profile, opts: FitOptions = FitOptions(), cache_lens: int,
              page_size: int, chunk_size: int = 2048, counts=None, out_dir: Path, label: str,
              key: str | None = None, state_slots: int = 1) -> FitResult:
    """Decide the placement of `config` (tensor infos from `weights`) on `profile`'s machine and
    write it as a rule file under `out_dir` (named after `label`, unique per `key`, default the
    label); `.check()` the result before loading it. `state_slots`: requests run at once (their
    recurrent-state rows count with the KV cache in models with linear-attention layers)."""
    from ktrans.config.arch import arch_from_config
    from ktrans.rules.files import shipped_rules

    shipped = shipped_rules(arch_from_config(config).name)
    gpu = f"cuda:{opts.gpu_index}"
    mb, shipped_plan = model_bytes(config, weights, rules_path=shipped, cache_lens=cache_lens, page_size=page_size,
                                   chunk_size=chunk_size, gpu=gpu, state_slots=state_slots)
    placement = decide(mb, profile, opts, counts)
    notes = describe(placement, mb)
    if placement.gpu and mb.moe_layers():
        notes.append(describe_prefill(prefill_crossover(mb, profile, gpu_index=opts.gpu_index), placement.gpu))
    header = _header(profile, opts, label, cache_lens) + notes + [
        "Keep or edit this file, then load with --optimize_config_path FILE (a named rule file turns --fit off);",
        "check it with: ktrans rules explain --optimize_config_path FILE ... Format: docs/rules.md"]
    text = render_rules(placement, mb, shipped.read_text(), copy_rules=rules_in_layers(shipped_plan, placement.gpu_layers),
                        header=header)
    path = fitted_path(out_dir, label, key or label)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise KtransError(f"cannot write the fitted rule file {path}: {e.strerror}") from None
    totals = planned_totals(config, weights, path, placement.gpu, cache_lens=cache_lens, page_size=page_size,
                            state_slots=state_slots)
    return FitResult(path, placement, mb, totals, notes, label)


def planned_totals(config, weights, rules_path, gpu: str | None, *, cache_lens: int, page_size: int,
                   state_slots: int = 1) -> dict[str, int]:
    """Bytes per device (weights + KV cache) of `config` planned under `rules_path`."""
    from ktrans.config.arch import build_meta_model
    from ktrans.kv_cache.sizing import plan_kv_cache
    from ktrans.rules.explain import device_totals
    from ktrans.rules.plan import plan_model
    from ktrans.rules.schema import load_rules

    plan = plan_model(build_meta_model(config), load_rules(rules_path), config=config, weights=weights,
                      default_device=gpu or "cpu", device_map=None if gpu else "cpu")
    return device_totals(plan, plan_kv_cache(plan, cache_lens=cache_lens, page_size=page_size, state_slots=state_slots))


def check_plan_fits(plan, *, cache_lens: int, page_size: int, what: str, opts: FitOptions | None = None,
                    state_slots: int = 1) -> None:
    """Refuse a plan whose weights and KV cache exceed the memory free now on any device.

    NOTE: refusal uses only the fixed reserves (no margin): a plan that fits tightly is let
    through, one that cannot fit never starts loading."""
    from ktrans.fit.probe import gpus_now, ram
    from ktrans.kv_cache.sizing import plan_kv_cache
    from ktrans.rules.explain import device_totals

    opts = opts or FitOptions(margin=0.0)
    totals = device_totals(plan, plan_kv_cache(plan, cache_lens=cache_lens, page_size=page_size, state_slots=state_slots))
    available = {"cpu": max(0, ram()[1] - opts.ram_reserve)}
    used = {int(d.split(":")[1]) for d in totals if d.startswith("cuda:")}
    if used:
        for g in gpus_now(free_of=used):
            available[f"cuda:{g.index}"] = max(0, g.mem_free - opts.gpu_reserve)
    check_fits(totals, available, what)
