"""NUMA placement of the CPU experts, checked through the kernel's own view of this process.

- Memory binding: with the real layout (no forced thread groups) each group's expert weights are
  mmap'd and mbind'ed to its node. On any Linux machine with NUMA support there is a node 0: the
  weights' mappings must carry an MPOL_BIND policy to node 0 (get_mempolicy with MPOL_F_ADDR, and
  /proc/self/numa_maps) and their pages must live there (move_pages); with a forced layout (tests'
  two groups on one node) nothing is bound.
- Thread pinning: each pool thread is allowed on exactly one physical core, the cores in
  physical_cores() order (/proc/self/task/TID/status), and not pinned with pin=False.
- Real-node grouping: threads on the same node form one group.
- numa="auto": replicate when a copy per node of every layer's experts fits in 80% of RAM, else
  split, decided on simulated topologies (node count and RAM size) and carried through to the
  layer actually built (its mode and bytes, planned_bytes, outputs).
What cannot run on a one-node machine — binding to a node other than 0, grouping across real
nodes — is left to a multi-node machine; those parts of the code are the same calls with
another node number.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import threading
from pathlib import Path

import pytest
import torch

from ktrans import _C
from ktrans.operators import experts as experts_mod
from tests.operators.hf_tiny import model_source, tiny_hf_model

KEY = "model.layers.1.mlp.experts"
MPOL_DEFAULT, MPOL_BIND, MPOL_F_ADDR = 0, 2, 1 << 1
# (get_mempolicy, move_pages) syscall numbers: x86-64, and the generic table arm64 uses
SYS_GET_MEMPOLICY, SYS_MOVE_PAGES = {"x86_64": (239, 279), "aarch64": (236, 239)}.get(platform.machine(), (-1, -1))
PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args) -> int:
    if nr < 0:
        pytest.skip(f"NUMA syscall numbers not known here for {platform.machine()}")
    _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            pytest.skip(f"the kernel refuses NUMA syscall {nr} here ({os.strerror(err)})")
        raise OSError(err, os.strerror(err))
    return ret


def mempolicy_of(addr: int) -> tuple[int, int]:
    """(mode, node mask) of the mapping holding `addr` (get_mempolicy, MPOL_F_ADDR)."""
    mode, mask = ctypes.c_int(-1), (ctypes.c_ulong * 16)()
    _syscall(SYS_GET_MEMPOLICY, ctypes.byref(mode), mask, ctypes.c_ulong(16 * 64), ctypes.c_void_p(addr),
             ctypes.c_ulong(MPOL_F_ADDR))
    return mode.value, mask[0]


def nodes_of_pages(start: int, end: int) -> set[int]:
    """The node of every page in [start, end) (move_pages without moving: status only)."""
    n = (end - start) // PAGE
    pages = (ctypes.c_void_p * n)(*[start + i * PAGE for i in range(n)])
    status = (ctypes.c_int * n)()
    _syscall(SYS_MOVE_PAGES, ctypes.c_long(0), ctypes.c_ulong(n), pages, None, status, ctypes.c_long(0))
    return set(status)


def _mappings() -> dict[int, tuple[int, str]]:
    """start -> (end, numa_maps policy) of every mapping of this process."""
    ends = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        a, b = line.split()[0].split("-")
        ends[int(a, 16)] = int(b, 16)
    policy = {}
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        start, pol = line.split()[:2]
        policy[int(start, 16)] = (ends.get(int(start, 16), 0), line)
    return policy


def _numa_kernel() -> bool:
    return Path("/proc/self/numa_maps").exists() and Path("/sys/devices/system/node/node0").exists()


needs_numa = pytest.mark.skipif(not _numa_kernel(), reason="kernel without NUMA support (no numa_maps / node0)")


def _loaded_experts(**kwargs):
    """cpu_experts on the tiny qwen3_moe layer, and the mappings it created while loading."""
    config, model = tiny_hf_model("qwen3_moe")
    hf = model.model.layers[1].mlp.experts
    op = experts_mod.CPUExperts(key=KEY, orig_module=hf, config=config, device="cpu", **kwargs)
    before = {(s, e, line.split()[1]) for s, (e, line) in _mappings().items()}
    op.load_weights(model_source(model))
    new = {s: (e, line) for s, (e, line) in _mappings().items() if (s, e, line.split()[1]) not in before}
    return config, hf, op, new


@needs_numa
def test_real_layout_binds_expert_weights_to_node_0():
    cores = _C.physical_cores()
    assert {node for _, node in cores} == {0} or len({node for _, node in cores}) > 1
    _, _, op, new = _loaded_experts(numa="replicate", cpu_infer=min(2, len(cores)))
    bound = {s: (e, line) for s, (e, line) in new.items() if " bind:" in line}
    assert bound, "no bound mapping appeared while loading the weights"
    assert sum(e - s for s, (e, _) in bound.items()) == op._moe.weight_bytes
    for start, (end, line) in bound.items():
        assert " bind:0 " in line and re.search(r" N0=\d+", line) and not re.search(r" N[1-9]\d*=", line), line
        mode, mask = mempolicy_of(start)
        assert (mode, mask) == (MPOL_BIND, 1)
        assert nodes_of_pages(start, end) == {0}          # every page present, on node 0


@needs_numa
def test_forced_layout_binds_nothing():
    _, _, op, new = _loaded_experts(numa="replicate", numa_nodes=2, cpu_infer=2)
    assert op._moe.weight_bytes > 0
    assert not [line for _, line in new.values() if " bind:" in line]
    for start, (end, line) in new.items():
        if end - start >= op._moe.weight_bytes // 6:      # the weight mappings (two copies x 3 projections)
            assert mempolicy_of(start)[0] == MPOL_DEFAULT, line


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _allowed_cpus(tid: int) -> set[int]:
    text = Path(f"/proc/self/task/{tid}/status").read_text()
    spec = re.search(r"^Cpus_allowed_list:\s*(\S+)", text, re.M).group(1)
    cpus = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@pytest.mark.parametrize("pin", [True, False])
def test_pool_threads_pinned_one_per_physical_core(pin):
    cores = [cpu for cpu, _ in _C.physical_cores()]
    n = min(2, len(cores))
    before = _threads()
    pool = _C.ThreadPool(n, 0, pin, 0)
    pool.round_trip()                       # every thread has started (and pinned itself) by now
    tids = sorted(_threads() - before)
    assert len(tids) == n
    allowed = [_allowed_cpus(t) for t in tids]
    if pin:
        assert all(len(a) == 1 for a in allowed), allowed
        assert sorted(next(iter(a)) for a in allowed) == sorted(cores[:n])
    else:
        assert all(a == os.sched_getaffinity(0) for a in allowed), allowed
    del pool


def test_idle_pool_runs_a_task_on_the_callers_thread(monkeypatch):
    """run() on an idle pool that leaves the caller a core: the task runs on the calling thread
    (no hand-off); with KTRANS_POOL_INLINE=0, or a pool holding every CPU, on the pool's queue
    thread. Callers racing on one pool each get their task run (inline or queued behind the
    inline one), none lost and no deadlock."""
    me = threading.get_native_id()
    if len(os.sched_getaffinity(0)) >= 2:
        pool = _C.ThreadPool(1, 0, False, 0)
        assert pool.run_thread_id() == me
        done = []
        workers = [threading.Thread(target=lambda: done.append(pool.run_thread_id())) for _ in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert len(done) == 4 and all(tid > 0 for tid in done)
        del pool
    monkeypatch.setenv("KTRANS_POOL_INLINE", "0")
    assert _C.ThreadPool(1, 0, False, 0).run_thread_id() != me
    monkeypatch.delenv("KTRANS_POOL_INLINE")
    assert _C.ThreadPool(len(os.sched_getaffinity(0)), 0, False, 0).run_thread_id() != me


def test_real_layout_groups_threads_by_node():
    cores = _C.physical_cores()
    n = len(cores)
    pool = _C.ThreadPool(n, 0, False, 0)
    nodes = [node for _, node in cores]
    assert pool.num_groups == len(set(nodes))
    firsts = {}
    for i, node in enumerate(nodes):                          # cores come ordered by node
        firsts.setdefault(node, pool.group_of(i))
        assert pool.group_of(i) == firsts[node]


# --- numa="auto" on simulated topologies ------------------------------------------------------

GiB = 1 << 30


def _simulate(monkeypatch, nodes: int, ram_gib: float):
    monkeypatch.setattr(experts_mod, "numa_nodes_available", lambda: nodes)
    real = os.sysconf
    fake = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": int(ram_gib * GiB) // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: fake[name] if name in fake else real(name))


class _Config:
    def __init__(self, layers):
        self.num_hidden_layers = layers


# (nodes, RAM GiB, one copy of one layer's experts GiB, layers) -> mode; 80% of RAM is the limit.
AUTO_CASES = [
    (1, 512, 5.5, 58, "replicate"),      # one node: one copy, 319 GiB <= 409.6
    (2, 1024, 5.5, 58, "replicate"),     # 638 GiB <= 819.2
    (2, 512, 5.5, 58, "split"),          # 638 GiB > 409.6: DeepSeek-V3 Q4 on a 2 x 256 GiB box
    (8, 1024, 1.0, 48, "replicate"),     # 384 GiB <= 819.2
    (8, 256, 1.0, 48, "split"),          # 384 GiB > 204.8
    (2, 100, 4.0, 10, "replicate"),      # exactly 80 GiB = 80% of 100: still fits
    (2, 99, 4.0, 10, "split"),
]


@pytest.mark.parametrize("nodes,ram,copy_gib,layers,mode", AUTO_CASES)
def test_auto_decision_on_simulated_topologies(monkeypatch, nodes, ram, copy_gib, layers, mode):
    _simulate(monkeypatch, nodes, ram)
    assert experts_mod.numa_layout("auto", None, int(copy_gib * GiB), _Config(layers)) == (mode, nodes)
    # an explicit mode or node count is taken as given
    assert experts_mod.numa_layout("split", None, int(copy_gib * GiB), _Config(layers)) == ("split", nodes)
    assert experts_mod.numa_layout("auto", 1, int(copy_gib * GiB), _Config(layers))[1] == 1


@pytest.mark.parametrize("ram_gib,mode", [(64, "replicate"), (0.0001, "split")])
def test_auto_builds_the_layer_it_decided(monkeypatch, ram_gib, mode):
    """Two thread groups (simulated nodes), RAM large or tiny: numa='auto' replicates or splits,
    holds the bytes planned_bytes promised, and computes what transformers' module computes."""
    _simulate(monkeypatch, 2, ram_gib)
    config, hf, op, _ = _loaded_experts(numa="auto", numa_nodes=2, cpu_infer=2)
    one = 8 * 3 * 32 * 64 * 4                                  # E x (gate, up, down) x I x H, f32
    assert op.numa_mode == mode
    assert op._moe.weight_bytes == (2 * one if mode == "replicate" else one)
    planned = type(op).planned_bytes(key=KEY, orig_module=hf, config=config, device="cpu",
                                     kwargs={"numa": "auto", "numa_nodes": 2}, weights=op._source)
    assert planned == {"cpu": op._moe.weight_bytes}
    x = torch.randn(9, config.hidden_size)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(9)])
    w = torch.rand(9, 2)
    with torch.no_grad():
        torch.testing.assert_close(op(x, ids, w), hf(x, ids, w), rtol=1e-4, atol=1e-5)
