"""Stream-ordered CPU experts between GPU ops: a GPU op, the CPU MoE (host functions on the
stream), another GPU op, with no host sync; then the same step captured in a CUDA graph and
replayed on new inputs. CUDA batches above the stream limit (synchronous copies), and the error
of a failed stream-ordered call, raised by the next call."""

from __future__ import annotations

import pytest
import torch

from tests.operators.test_experts import make, routing
from tests.tolerances import F32_ATOL, F32_RTOL

pytestmark = pytest.mark.gpu


def reference(hf, x, ids, w):
    a = x.cpu() * 2 + 1
    with torch.no_grad():
        return hf(a, ids.cpu(), w.cpu()) * 3 + a.sin()


def test_stream_ordered_and_cuda_graph():
    config, hf, op = make("qwen3_moe", backend="gguf")
    dev = torch.device("cuda")
    t = 5
    x = torch.randn(t, config.hidden_size, device=dev)
    ids, w = (v.to(dev) for v in routing(config, hf, t))

    def step():
        a = x * 2 + 1                                  # GPU op before
        handle = op.submit(a, ids, w)                  # CPU MoE, ordered on the stream
        shared = a.sin()                               # GPU work overlapping the CPU
        return op.sync(handle) * 3 + shared            # GPU op after

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                         # first call allocates the pinned buffers
        stream.synchronize()
        torch.cuda.set_sync_debug_mode("error")        # any host sync inside step() raises
        try:
            out = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), reference(hf, x, ids, w), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        new_ids, new_w = routing(config, hf, t)
        x.copy_(torch.randn(t, config.hidden_size))
        ids.copy_(new_ids)
        w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out.cpu(), reference(hf, x, ids, w), rtol=F32_RTOL * 10,
                                   atol=F32_ATOL * 10)


@pytest.mark.parametrize("t", [1, 128, 129, 300])
def test_cuda_inputs_above_the_stream_limit_take_the_synchronous_copy(t):
    """Up to _STREAM_MAX_T (128) tokens the work is stream-ordered on pinned buffers; above it the
    inputs are copied to the CPU synchronously and the result back. Both give transformers'
    result, on the input's device and in its dtype."""
    from ktrans.operators.experts import _STREAM_MAX_T

    config, hf, op = make("qwen3_moe", backend="gguf")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(t, config.hidden_size)
        ids, w = routing(config, hf, t)
        got = op.sync(op.submit(x.to("cuda", dtype), ids.cuda(), w.cuda()))
        torch.cuda.synchronize()
        assert got.device.type == "cuda" and got.dtype == dtype
        # stream-ordered calls keep a StreamTask per (T, k, dtype); the synchronous copy none
        assert ((t, ids.shape[1], dtype) in op._stream) == (t <= _STREAM_MAX_T)
        with torch.no_grad():
            ref = hf(x.to(dtype).float(), ids, w)
        tol = dict(rtol=F32_RTOL * 10, atol=F32_ATOL * 10) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.float().cpu(), ref, **tol)


def test_stream_task_error_is_raised_by_the_next_call_then_cleared():
    """A stream-ordered call cannot raise where it fails (a host function on the stream): the
    error (here an expert id out of range) is kept and raised as a KtransError by the next call
    of that layer; the call after that works again."""
    from ktrans.errors import KtransError

    config, hf, op = make("qwen3_moe", backend="gguf")
    t = 4
    x = torch.randn(t, config.hidden_size)
    ids, w = routing(config, hf, t)
    bad = ids.clone()
    bad[1, 0] = 99
    op.sync(op.submit(x.cuda(), bad.cuda(), w.cuda()))
    torch.cuda.synchronize()
    with pytest.raises(KtransError, match=r"earlier stream-ordered MoE call failed: .*expert id 99"):
        op.submit(x.cuda(), ids.cuda(), w.cuda())
    got = op.sync(op.submit(x.cuda(), ids.cuda(), w.cuda()))
    torch.cuda.synchronize()
    with torch.no_grad():
        torch.testing.assert_close(got.cpu(), hf(x, ids, w), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("handoff", ["hostfn", "memop"])
def test_stream_ordered_and_cuda_graph_each_handoff(handoff, monkeypatch):
    """The same GPU op / CPU MoE / GPU op step, eager then captured and replayed, under each
    KTRANS_HANDOFF (host functions; stream writes and waits on pinned flags)."""
    monkeypatch.setenv("KTRANS_HANDOFF", handoff)
    config, hf, op = make("qwen3_moe", backend="gguf")
    dev = torch.device("cuda")
    t = 3
    x = torch.randn(t, config.hidden_size, device=dev)
    ids, w = (v.to(dev) for v in routing(config, hf, t))

    def step():
        a = x * 2 + 1
        handle = op.submit(a, ids, w)
        shared = a.sin()
        return op.sync(handle) * 3 + shared

    from ktrans.operators.experts import arm_tasks, captured_tasks

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = step()
        stream.synchronize()
        assert op._handoff == handoff
        torch.testing.assert_close(out.cpu(), reference(hf, x, ids, w), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
        graph = torch.cuda.CUDAGraph()
        with captured_tasks() as tasks:
            with torch.cuda.graph(graph):
                static_out = step()
        assert len(tasks) == (1 if handoff == "memop" else 0)
    for _ in range(3):
        new_ids, new_w = routing(config, hf, t)
        x.copy_(torch.randn(t, config.hidden_size))
        ids.copy_(new_ids)
        w.copy_(new_w)
        arm_tasks(tasks)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out.cpu(), reference(hf, x, ids, w), rtol=F32_RTOL * 10,
                                   atol=F32_ATOL * 10)
