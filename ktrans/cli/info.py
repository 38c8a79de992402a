"""`ktrans info`: what this machine offers ktrans (CPU ISA variant, cores, GPUs)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="show the CPU kernel variant selected and the GPUs seen",
                       description="Show the CPU ISA variant the kernels use, the CPU features "
                                   "behind that choice, physical cores, and the CUDA GPUs torch sees.")
    p.set_defaults(func=run)


def describe() -> list[str]:
    from ktrans import cpu

    lines = [f"CPU kernels: {cpu.selected_isa()} (best supported: {cpu.best_isa()}; "
             f"force a lower one with KTRANS_ISA={'|'.join(cpu.ISA_LEVELS)})",
             f"physical cores: {cpu.physical_cores()}"]
    feats = [k for k, v in cpu.cpu_features().items() if v and not k.startswith("os_")]
    lines.append("CPU features: " + (" ".join(feats) or "(none of interest)"))
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"GPU cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
        else:
            lines.append(f"GPUs: none seen by torch {torch.__version__} (everything runs on the CPU)")
    except ImportError:
        lines.append("GPUs: torch is not installed")
    return lines


def run(args) -> int:
    print("\n".join(describe()))
    return 0
