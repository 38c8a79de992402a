"""`ktrans probe`: the profile's schema (a real measurement on this machine), the cache and its
re-probe on new hardware or --refresh, facts from a simulated /proc and /sys (two NUMA nodes)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ktrans.cli.main import main
from ktrans.fit import probe
from ktrans.fit.profile import SCHEMA, GpuInfo, Profile, load_cached, profile_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTRANS_CACHE", str(tmp_path))
    return tmp_path


def test_probe_json_schema_and_cache(cache, capsys):
    assert main(["probe", "--json"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert "Probing this machine (no profile yet)" in out.err
    assert data["schema"] == SCHEMA and data["fingerprint"] == probe.facts().fingerprint
    assert data["physical_cores"] >= 1 and data["logical_cpus"] >= data["physical_cores"]
    assert 0 < data["ram_available"] <= data["ram_total"]
    assert data["numa_nodes"] and all(n["mem_total"] > 0 for n in data["numa_nodes"])
    assert data["read_gbs"] > 0 and data["cpu_moe_tflops"]["q4_k"] > 0
    assert 0 < data["probe_seconds"] < 60
    for g in data["gpus"]:                                                 # absent here; filled on a GPU machine
        assert g["mem_free"] <= g["mem_total"] and g["h2d_gbs"] > 0 and g["matmul_tflops"] > 0
    assert Profile.from_json(data) == load_cached(profile_path())
    assert main(["probe"]) == 0                                            # the table, from the cache
    out = capsys.readouterr()
    assert "read bandwidth" in out.out and "cached from" in out.out and "Probing" not in out.err


def test_reprobe_on_new_hardware_or_refresh(cache, monkeypatch):
    calls = []
    fake = Profile(cpu_model="x", isa="avx2", physical_cores=2, logical_cpus=2, ram_total=1 << 34,
                   ram_available=1 << 33, read_gbs=10.0)

    def measure(root=None):
        calls.append(1)
        return replace(fake, fingerprint=probe.facts().fingerprint)

    monkeypatch.setattr(probe, "measure", measure)
    p, fresh = probe.get_profile()
    assert fresh and len(calls) == 1 and p.read_gbs == 10.0
    p, fresh = probe.get_profile()
    assert not fresh and len(calls) == 1
    assert p.ram_available == probe.ram()[1]                               # memory is read live
    _, fresh = probe.get_profile(refresh=True)
    assert fresh and len(calls) == 2
    real = probe.facts
    monkeypatch.setattr(probe, "facts", lambda root=None: replace(real(), fingerprint="another machine"))
    said = []
    _, fresh = probe.get_profile(say=said.append)
    assert fresh and "the hardware changed" in said[0]
    profile_path().write_text("{not json")
    _, fresh = probe.get_profile()                                         # unreadable: measured again
    assert fresh


def _sysfs(root, nodes):
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Test Xeon 9999\n")
    total = sum(nodes)
    (root / "proc/meminfo").write_text(f"MemTotal:       {total} kB\nMemFree:        1 kB\n"
                                       f"MemAvailable:   {total // 2} kB\n")
    for i, kb in enumerate(nodes):
        d = root / f"sys/devices/system/node/node{i}"
        d.mkdir(parents=True)
        (d / "meminfo").write_text(f"Node {i} MemTotal:       {kb} kB\nNode {i} MemFree:        {kb // 4} kB\n"
                                   f"Node {i} FilePages:      {kb // 4} kB\n")
    (root / "sys/devices/system/node/possible").write_text("0-1\n")


def test_facts_from_a_simulated_two_node_machine(tmp_path):
    _sysfs(tmp_path, [64 << 20, 32 << 20])
    assert probe.cpu_model(tmp_path) == "Test Xeon 9999"
    assert probe.ram(tmp_path) == (96 << 30, 48 << 30)
    nodes = probe.numa_nodes(tmp_path, {0: 8, 1: 8})
    assert [(n.id, n.cores, n.mem_total, n.mem_free) for n in nodes] == \
        [(0, 8, 64 << 30, 32 << 30), (1, 8, 32 << 30, 16 << 30)]
    empty = tmp_path / "bare"
    (empty / "proc").mkdir(parents=True)
    (empty / "proc/meminfo").write_text("MemTotal: 1024 kB\nMemAvailable: 512 kB\n")
    assert [(n.mem_total, n.mem_free) for n in probe.numa_nodes(empty)] == [(1 << 20, 1 << 19)]


def test_table_shows_gpus_and_live_memory(capsys):
    from rich.console import Console

    from ktrans.cli.probe import profile_table

    p = replace(probe.facts(), gpus=[GpuInfo(0, "Test GPU", 80 << 30, 70 << 30, 25.0, 700.0)], read_gbs=99.0)
    Console(width=200).print(profile_table(p))
    out = capsys.readouterr().out
    assert "Test GPU, 70.0 GiB free of 80.0 GiB; host->GPU 25.0 GB/s pinned, bf16 matmul 700 TFLOP/s" in out
    assert "99.0 GB/s" in out
    live = probe.with_live_memory(replace(p, ram_available=1))
    assert live.ram_available > 1 and live.gpus[0].mem_free == 70 << 30    # no CUDA here: kept as measured
