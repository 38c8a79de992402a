"""The machine profile: what `ktrans probe` measured once, cached as JSON under the ktrans cache
directory, and re-measured when the hardware changes (its fingerprint differs).

Memory figures come in two kinds: totals (part of the fingerprint) and what is free now. Free
RAM and free VRAM change from minute to minute, so `with_live_memory()` refreshes them from the
OS and the driver (cheap reads) before every placement; the measured rates (bandwidths, FLOP/s)
are kept from the probe. Every field below is plain data, so placement logic can be tested on
synthetic profiles (`Profile(...)` with made-up numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ktrans.errors import KtransError

# Bumped when a field changes meaning: an older cached file is then re-probed, not misread.
SCHEMA = 1
PROFILE_FILE = "machine-profile.json"


@dataclass
class NumaNode:
    id: int                       # node number in sysfs (/sys/devices/system/node/nodeN)
    cores: int                    # physical cores of this process's affinity on the node
    mem_total: int                # bytes of RAM attached to the node
    mem_free: int                 # bytes free on the node (live: refreshed before placement)


@dataclass
class GpuInfo:
    index: int                    # CUDA device index (cuda:N)
    name: str                     # torch.cuda.get_device_name: part of the fingerprint
    mem_total: int                # bytes
    mem_free: int                 # bytes free for this process (live: cudaMemGetInfo)
    h2d_gbs: float | None = None  # pinned host -> device copy, GB/s: streams expert weights
    matmul_tflops: float | None = None  # bf16 dense matmul: the GPU side of the prefill choice


@dataclass
class Profile:
    cpu_model: str                # /proc/cpuinfo "model name"
    isa: str                      # best ISA level of ktrans's kernels here (ktrans.cpu.best_isa)
    physical_cores: int           # cores the expert thread pool can use
    logical_cpus: int             # hardware threads in this process's affinity
    ram_total: int                # bytes (MemTotal)
    ram_available: int            # bytes (MemAvailable; live)
    numa_nodes: list[NumaNode] = field(default_factory=list)
    gpus: list[GpuInfo] = field(default_factory=list)
    read_gbs: float | None = None         # host memory read bandwidth, all cores: decode's floor
    cpu_moe_tflops: dict[str, float] = field(default_factory=dict)  # MoE kernel at prefill sizes, per format
    probed_at: str = ""           # ISO time of the measurement
    probe_seconds: float = 0.0    # how long the probe took
    fingerprint: str = ""         # hardware identity; a mismatch re-probes

    def gpu(self, index: int = 0) -> GpuInfo | None:
        return next((g for g in self.gpus if g.index == index), None)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"profile schema {data.get('schema')!r}, expected {SCHEMA}")
        data = {k: v for k, v in data.items() if k != "schema"}
        data["numa_nodes"] = [NumaNode(**n) for n in data.get("numa_nodes", [])]
        data["gpus"] = [GpuInfo(**g) for g in data.get("gpus", [])]
        return cls(**data)


def fingerprint(cpu_model: str, physical_cores: int, ram_total: int, numa_nodes: int,
                gpus: list[tuple[str, int]]) -> str:
    """Hardware identity: CPU model, cores, RAM (whole GiB, so a kernel reserving a few MiB more
    does not count as new hardware), NUMA node count and each GPU's name and memory."""
    parts = [cpu_model, str(physical_cores), str(round(ram_total / 2**30)), str(numa_nodes)]
    parts += [f"{name}/{round(total / 2**30)}" for name, total in gpus]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def profile_path(cache: Path | None = None) -> Path:
    if cache is None:
        from ktrans.cli.model_args import cache_dir

        cache = cache_dir()
    return Path(cache) / PROFILE_FILE


def load_cached(path: Path) -> Profile | None:
    """The cached profile, or None when there is none or it cannot be read (then re-probe)."""
    try:
        return Profile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save(profile: Profile, path: Path) -> None:
    """Write atomically: a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise KtransError(f"cannot write the machine profile {path}: {e.strerror}") from None
