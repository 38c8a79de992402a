"""The CPU half of the memop hand-off (csrc/common/cuda_host.cpp), on any machine: an armed task
is a pool job that waits for its start flag, clears it, runs the MoE forward and sets its done
flag. Here the test writes the start flag and waits for done, the part the GPU's stream write and
stream wait play on CUDA (tests/operators/test_experts_gpu.py runs that with a GPU). Also the
KTRANS_HANDOFF setting."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ktrans.errors import KtransError
from ktrans.operators.experts import _np, handoff_mode
from tests.operators.test_experts import make, nmse, routing
from tests.tolerances import MOE_NMSE


def _wait(flags, timeout=30.0):
    t0 = time.monotonic()
    while flags[1] != 1:
        assert time.monotonic() - t0 < timeout, "the armed job never set its done flag"
        time.sleep(1e-4)


def test_armed_job_waits_for_start_runs_once_and_signals_done():
    config, hf, op = make("qwen3_moe", backend="gguf")
    t = 4
    x = torch.randn(t, config.hidden_size)
    ids, w = routing(config, hf, t)
    out = torch.full_like(x, float("nan"))
    task = op._moe.stream_task(_np(x), _np(ids.contiguous()), _np(w.contiguous()), _np(out), False)
    flags = np.zeros(2, np.uint32)
    task.set_flags(flags)
    for _ in range(3):                                   # re-armed for every run, as before each replay
        x.copy_(torch.randn(t, config.hidden_size))
        out.fill_(float("nan"))
        task.arm()
        time.sleep(0.02)
        assert flags[1] == 0 and torch.isnan(out).all()  # nothing runs before the start flag
        flags[0] = 1                                     # the GPU's stream write
        _wait(flags)
        assert flags[0] == 0                             # the job cleared start before running
        assert nmse(out, op.forward_native(x, ids, w)) < MOE_NMSE["q4_k"]
        flags[1] = 0                                     # the GPU's clearing write after its wait
    assert task.take_error() == ""


def test_set_flags_and_arm_checks():
    config, hf, op = make("qwen3_moe", backend="gguf")
    x = torch.randn(1, config.hidden_size)
    ids, w = routing(config, hf, 1)
    task = op._moe.stream_task(_np(x), _np(ids.contiguous()), _np(w.contiguous()), _np(torch.empty_like(x)), False)
    with pytest.raises(RuntimeError, match="set_flags first"):
        task.arm()
    with pytest.raises(ValueError, match="uint32 array of 2"):
        task.set_flags(np.zeros(1, np.uint32))
    with pytest.raises(TypeError):
        task.set_flags(np.zeros(2, np.float64))


def test_handoff_setting(monkeypatch):
    monkeypatch.delenv("KTRANS_HANDOFF", raising=False)
    assert handoff_mode() == "hostfn"
    monkeypatch.setenv("KTRANS_HANDOFF", "carrier-pigeon")
    with pytest.raises(KtransError, match="KTRANS_HANDOFF must be one of hostfn, memop"):
        handoff_mode()
    if not torch.cuda.is_available():                    # no CUDA driver loaded: falls back, one warning
        monkeypatch.setenv("KTRANS_HANDOFF", "memop")
        assert handoff_mode() == "hostfn"
