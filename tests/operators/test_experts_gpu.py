"""Stream-ordered CPU experts between GPU ops: a GPU op, the CPU MoE (host functions on the
stream), another GPU op, with no host sync; then the same step captured in a CUDA graph and
replayed on new inputs."""

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
