"""`ktrans probe`: measure this machine once (CPU, NUMA, RAM, bandwidth, kernel throughput, GPUs)
and cache the profile that `--fit` places models with; `--experts` also counts which experts a
model uses on a built-in calibration text (the hot experts `--fit` puts in spare VRAM).
"""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("probe", help="measure this machine (cached) for automatic placement",
                       description="Measure this machine once and cache the profile that automatic "
                                   "placement (--fit) uses: CPU, ISA, cores, NUMA nodes and their memory, "
                                   "read bandwidth, the MoE kernels' throughput, each GPU's free memory, "
                                   "pinned host->GPU bandwidth and matmul rate. A cached profile is reused "
                                   "until the hardware changes.")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached profile matches")
    p.add_argument("--experts", metavar="MODEL", help="also run MODEL (a GGUF file or directory, or an HF "
                   "directory) over a built-in calibration text and save how often each expert was chosen")
    p.add_argument("--model_path", metavar="DIR", help="with --experts: the HF directory when MODEL is a GGUF "
                   "without config")
    p.add_argument("--device", default="auto", help="with --experts: cuda, cpu or auto (default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ktrans.fit.probe import get_profile
    from ktrans.fit.profile import profile_path

    say = lambda msg: print(msg, file=sys.stderr)   # noqa: E731
    profile, fresh = get_profile(refresh=args.refresh, say=say)
    if args.experts:
        from ktrans.fit.calibrate import calibrate_experts

        calibrate_experts(args.experts, model_path=args.model_path, device=args.device, say=say)
    if args.json:
        print(json.dumps(profile.to_json(), indent=2))
        return 0
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(profile_table(profile))
    state = "measured now" if fresh else f"cached from {profile.probed_at}; --refresh measures again"
    console.print(f"profile: {profile_path()} ({state})", highlight=False, markup=False)
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def profile_table(p):
    from rich.table import Table

    t = Table(title="this machine", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("CPU", f"{p.cpu_model} ({p.isa} kernels)")
    t.add_row("cores", f"{p.physical_cores} physical, {p.logical_cpus} logical")
    t.add_row("RAM", f"{_gib(p.ram_available)} available of {_gib(p.ram_total)}")
    for n in p.numa_nodes:
        t.add_row(f"NUMA node {n.id}", f"{n.cores} cores, {_gib(n.mem_free)} free of {_gib(n.mem_total)}")
    t.add_row("read bandwidth", f"{p.read_gbs:.1f} GB/s" if p.read_gbs else "not measured")
    for fmt, r in p.cpu_moe_tflops.items():
        t.add_row(f"CPU MoE {fmt}", f"{r * 1e3:.0f} GFLOP/s (prefill-sized calls, {p.physical_cores} threads)")
    if not p.gpus:
        t.add_row("GPU", "none visible to torch")
    for g in p.gpus:
        rates = []
        if g.h2d_gbs:
            rates.append(f"host->GPU {g.h2d_gbs:.1f} GB/s pinned")
        if g.matmul_tflops:
            rates.append(f"bf16 matmul {g.matmul_tflops:.0f} TFLOP/s")
        t.add_row(f"cuda:{g.index}", f"{g.name}, {_gib(g.mem_free)} free of {_gib(g.mem_total)}"
                  + (f"; {', '.join(rates)}" if rates else ""))
    return t
