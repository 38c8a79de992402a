"""`ktrans probe`'s measurements: read the machine's facts (cheap) and measure its rates (a few
seconds, each measurement bounded), then cache the result (ktrans.fit.profile).

Facts: CPU model, ISA, cores, NUMA nodes and their memory (sysfs), RAM, GPUs and their memory.
Rates: host read bandwidth (a streaming torch sum over a buffer far larger than the caches), the
CPU's MoE throughput at prefill sizes from ktrans's own kernels (the operator the experts really
run on), and per GPU the pinned host->device bandwidth and the bf16 matmul rate.

`root` (default "/") lets tests read a simulated /proc and /sys tree.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path

from ktrans.fit.profile import GpuInfo, NumaNode, Profile, fingerprint, load_cached, profile_path, save

# Bounds that keep the probe to a few seconds on any machine.
_BW_BYTES = 1 << 30           # bandwidth buffer (capped at RAM/16): far beyond any L3
_REPS = 3                     # best-of: a shared or virtual machine has noisy neighbours
_MOE_SHAPE = dict(E=8, H=2048, I=1024, T=128)   # all 8 experts hit by every token (k = E)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _meminfo(text: str) -> dict[str, int]:
    """Bytes per field of a /proc/meminfo (or a node's meminfo: 'Node 0 MemFree: N kB')."""
    out = {}
    for m in re.finditer(r"^(?:Node \d+ )?(\w+):\s+(\d+)(?: kB)?$", text, re.M):
        out[m.group(1)] = int(m.group(2)) * 1024
    return out


def cpu_model(root: Path = Path("/")) -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _read(root / "proc/cpuinfo"), re.M)
    if m:
        return m.group(1).strip()
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def ram(root: Path = Path("/")) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes; sysconf when /proc is unreadable."""
    info = _meminfo(_read(root / "proc/meminfo"))
    if "MemTotal" in info:
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def numa_nodes(root: Path = Path("/"), cores_per_node: dict[int, int] | None = None) -> list[NumaNode]:
    """Nodes with memory from sysfs; one node holding all RAM where sysfs has none."""
    base = root / "sys/devices/system/node"
    nodes = []
    for d in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        info = _meminfo(_read(d / "meminfo"))
        if info.get("MemTotal"):
            nid = int(d.name[4:])
            nodes.append(NumaNode(nid, (cores_per_node or {}).get(nid, 0), info["MemTotal"],
                                  info.get("MemFree", 0) + info.get("FilePages", 0)))
    if not nodes:
        total, avail = ram(root)
        nodes = [NumaNode(0, sum((cores_per_node or {}).values()), total, avail)]
    return nodes


def _cores_per_node() -> dict[int, int]:
    from ktrans import _C

    out: dict[int, int] = {}
    for _, node in _C.physical_cores():
        out[node] = out.get(node, 0) + 1
    return out


def gpus_now(free_of: set[int] | None = None) -> list[GpuInfo]:
    """Every CUDA device with its memory; [] without CUDA. Free memory is read for the devices in
    `free_of` (None: all), others report their total. NOTE: reading free memory creates a CUDA
    context on that device (~0.5 GB), so a load reads only the GPU it uses."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free = torch.cuda.mem_get_info(i)[0] if free_of is None or i in free_of else props.total_memory
        out.append(GpuInfo(i, props.name, int(props.total_memory), int(free)))
    return out


def facts(root: Path = Path("/"), free_of: set[int] | None = None) -> Profile:
    """Everything but the rates: instant, and enough to check that a model fits (free memory of
    the GPUs in `free_of`, None: all)."""
    from ktrans import cpu

    total, avail = ram(root)
    nodes = numa_nodes(root, _cores_per_node())
    gpus = gpus_now(free_of)
    model = cpu_model(root)
    cores = cpu.physical_cores()
    return Profile(cpu_model=model, isa=cpu.best_isa(), physical_cores=cores,
                   logical_cpus=len(os.sched_getaffinity(0)), ram_total=total, ram_available=avail,
                   numa_nodes=nodes, gpus=gpus,
                   fingerprint=fingerprint(model, cores, total, len(nodes), [(g.name, g.mem_total) for g in gpus]))


def with_live_memory(profile: Profile, root: Path = Path("/"), free_of: set[int] | None = None) -> Profile:
    """The profile with free RAM (per node) and free VRAM (of the GPUs in `free_of`) read now."""
    _, avail = ram(root)
    free_by_node = {n.id: n.mem_free for n in numa_nodes(root)}
    nodes = [replace(n, mem_free=free_by_node.get(n.id, n.mem_free)) for n in profile.numa_nodes]
    live = {g.index: g for g in gpus_now(free_of) if free_of is None or g.index in free_of}
    gpus = [replace(g, mem_free=live[g.index].mem_free) if g.index in live else g for g in profile.gpus]
    return replace(profile, ram_available=avail, numa_nodes=nodes, gpus=gpus)


# ---- rates ----

def _best_seconds(fn, reps: int = _REPS) -> float:
    fn()                                               # warm-up: page faults, lazy init
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(ram_total: int, threads: int) -> float:
    """GB/s of a streaming read on `threads` cores (torch sum of a large f32 buffer)."""
    import torch

    n = min(_BW_BYTES, ram_total // 16) // 4
    x = torch.ones(n)
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return n * 4 / _best_seconds(lambda: x.sum()) / 1e9
    finally:
        torch.set_num_threads(old)
        del x


def cpu_moe_tflops(threads: int) -> dict[str, float]:
    """TFLOP/s of ktrans's MoE kernel at a prefill size (every token hits every expert), per
    format: q4_k on the gguf backend (the usual GGUF experts) and, where AMX exists, bf16 on it."""
    import numpy as np
    import torch

    from ktrans import _C, cpu
    from ktrans.operators.experts import shared_pool
    from ktrans.weights import quant

    s = _MOE_SHAPE
    e, h, i, t = s["E"], s["H"], s["I"], s["T"]
    g = torch.Generator().manual_seed(0)
    src = [(torch.randn(e, r, c, generator=g) / c**0.5).numpy() for r, c in ((i, h), (i, h), (h, i))]
    pool = shared_pool(threads, 0)
    x = (torch.randn(t, h, generator=g) / 4).bfloat16()
    ids = torch.arange(e).repeat(t, 1)                                                  # [T, k=E]
    w = torch.full((t, e), 1.0 / e)
    out = torch.empty(t, h, dtype=torch.bfloat16)
    formats = {"q4_k": ("gguf", "q4_k")}
    if cpu.best_isa() == "amx":
        formats["amx_bf16"] = ("amx_bf16", "bf16")
    flops = 2.0 * 3 * h * i * e * t
    rates = {}
    for name, (backend, qtype) in formats.items():
        layer = _C.MoeLayer(pool, e, h, i, [qtype] * 3, backend=backend, max_chunk=t)
        for p, a in enumerate(src):
            raw = quant.quantize(a, qtype) if qtype != "bf16" else \
                torch.from_numpy(a).bfloat16().view(torch.int16).numpy().view(np.uint8)
            layer.load(p, 0, np.ascontiguousarray(raw).reshape(-1))
        u16 = lambda a: a.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
        call = lambda: layer.forward(u16(x), ids.numpy(), w.numpy(), u16(out))  # noqa: E731
        rates[name] = flops / _best_seconds(call) / 1e12
    return rates


def gpu_rates(index: int) -> tuple[float, float]:
    """(pinned host->device GB/s, bf16 matmul TFLOP/s) of cuda:index."""
    import torch

    dev = torch.device("cuda", index)
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(host, device=dev)

    def copy():
        dst.copy_(host, non_blocking=True)
        torch.cuda.synchronize(dev)

    h2d = host.numel() / _best_seconds(copy) / 1e9
    n = 4096
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)

    def mm():
        for _ in range(8):
            a @ b
        torch.cuda.synchronize(dev)

    tflops = 8 * 2.0 * n**3 / _best_seconds(mm) / 1e12
    del host, dst, a, b
    torch.cuda.empty_cache()
    return h2d, tflops


def measure(root: Path = Path("/")) -> Profile:
    """Facts plus rates: the full probe."""
    t0 = time.perf_counter()
    p = facts(root)
    threads = p.physical_cores
    p.read_gbs = read_bandwidth(p.ram_total, threads)
    p.cpu_moe_tflops = cpu_moe_tflops(threads)
    for g in p.gpus:
        g.h2d_gbs, g.matmul_tflops = gpu_rates(g.index)
    p.gpus = [replace(g, mem_free=live.mem_free) for g, live in zip(p.gpus, gpus_now())]
    p.probed_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    p.probe_seconds = time.perf_counter() - t0
    return p


def get_profile(*, refresh: bool = False, cache: Path | None = None, say=None) -> tuple[Profile, bool]:
    """(profile with live memory, whether it was measured now). Measures when there is no cached
    profile, the hardware's fingerprint changed, or `refresh`; `say` gets a one-line notice."""
    path = profile_path(cache)
    now = facts()
    cached = None if refresh else load_cached(path)
    if cached is not None and cached.fingerprint == now.fingerprint:
        return with_live_memory(cached), False
    if say is not None:
        why = "--refresh" if refresh else "no profile yet" if not path.exists() else "the hardware changed"
        say(f"Probing this machine ({why}); takes a few seconds, cached in {path}")
    prof = measure()
    save(prof, path)
    return prof, True
