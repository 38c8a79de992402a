"""Where the shipped rule files are: `<arch>[-<variant>].yaml` in optimize_rules/.

In a source checkout they sit in the top-level optimize_rules/; an installed wheel carries them in
ktrans/optimize_rules/ (CMakeLists.txt installs them there).
"""

from __future__ import annotations

from pathlib import Path

from ktrans.errors import KtransError

# Variant suffix -> what the file does (shown by `ktrans rules list`).
VARIANTS = {
    "": "routed experts on the CPU, everything else on cuda:0 (the default)",
    "cpu": "everything on the CPU (no GPU needed)",
    "2gpu": "layers split over cuda:0 and cuda:1, routed experts on the CPU",
    "amx": "routed experts on the CPU with the AMX backend (bf16 repack)",
    "gpu-experts": "routed experts of the first 4 layers on cuda:0 (torch), the rest on the CPU",
}


def rules_dir(package_dir: Path | None = None) -> Path:
    """The directory of shipped rule files: `<package>/optimize_rules` (installed wheel) first,
    then `<package>/../optimize_rules` (source checkout). `package_dir` defaults to ktrans's."""
    pkg = package_dir or Path(__file__).resolve().parent.parent
    for candidate in (pkg / "optimize_rules", pkg.parent / "optimize_rules"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise KtransError(f"no optimize_rules directory with rule files next to {pkg} or in {pkg.parent}; "
                      f"is ktrans installed completely?")


def shipped_rules(arch: str, variant: str = "") -> Path:
    """Path of the shipped rule file for ktrans architecture `arch` (e.g. deepseek_v3)."""
    if variant not in VARIANTS:
        raise KtransError(f"unknown rule variant '{variant}'; expected one of: "
                          f"{', '.join(v or '(default)' for v in VARIANTS)}")
    path = rules_dir() / (f"{arch}-{variant}.yaml" if variant else f"{arch}.yaml")
    if not path.is_file():
        have = sorted(p.name for p in rules_dir().glob(f"{arch}*.yaml"))
        raise KtransError(f"no shipped rule file {path.name} for architecture '{arch}'"
                          + (f"; available: {', '.join(have)}" if have else ""))
    return path


def list_shipped() -> list[Path]:
    return sorted(rules_dir().glob("*.yaml"))
