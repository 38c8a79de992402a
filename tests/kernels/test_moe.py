"""C++ MoE layer (csrc/moe/) against a dense torch reference on the dequantized weights: every
weight format, every ISA variant this machine runs, T in {1, 3, 17, 300}; negative ids, accumulate
mode, chunking, thread counts and forced two-node NUMA layouts; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktrans import _C, cpu
from ktrans.weights import quant
from tests.tolerances import MOE_GEMM_LAYOUT_NMSE, MOE_ISA_ROW_NMSE, MOE_LAYOUT_NMSE, MOE_NMSE, MOE_PACKED_NMSE

E, H, I, K = 8, 256, 256, 3
FORMATS = list(MOE_NMSE)


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))


def dense_reference(x, ids, w, gate, up, down) -> torch.Tensor:
    """Every expert on every token, then the routing matrix picks: [T, H] in float32 (its own
    rounding, ~1e-12 NMSE, is far below every bound)."""
    x, gate, up, down = (t.float() for t in (x, gate, up, down))
    h = F.silu(torch.einsum("th,eih->tei", x, gate)) * torch.einsum("th,eih->tei", x, up)  # [T, E, I]
    y = torch.einsum("tei,ehi->teh", h, down)                                             # [T, E, H]
    route = torch.zeros(x.shape[0], gate.shape[0])                                        # [T, E]
    route.scatter_add_(1, ids.clamp(min=0), w * (ids >= 0))
    return torch.einsum("te,teh->th", route, y)


class Experts:
    """Random experts in one format: the stored bytes and their dequantized values."""

    def __init__(self, qtype: str, e: int = E, h: int = H, i: int = I):
        self.qtype, self.shape = qtype, (e, h, i)
        src = [torch.randn(e, i, h) / h**0.5, torch.randn(e, i, h) / h**0.5, torch.randn(e, h, i) / i**0.5]
        self.raw = [quant.quantize(t.numpy(), qtype) for t in src]
        self.deq = [torch.from_numpy(quant.dequantize(r, qtype, tuple(t.shape))) for r, t in zip(self.raw, src)]

    def layer(self, pool, isa: str = "", numa: str = "replicate", max_chunk: int = 4096, backend: str = "gguf",
              gemm_min_tokens: int = -1, act: str = "silu", biases=None):
        """biases: None, or float32 [E, I] gate, [E, I] up and [E, H] down biases to load."""
        e, h, i = self.shape
        moe = _C.MoeLayer(pool, e, h, i, [self.qtype] * 3, numa=numa, isa=isa, max_chunk=max_chunk,
                          backend=backend, gemm_min_tokens=gemm_min_tokens, act=act)
        for p in range(3):
            moe.load(p, 0, self.raw[p])
            if biases is not None:
                moe.load_bias(p, biases[p].numpy())
        return moe


@pytest.fixture(scope="module")
def pool():
    return _C.ThreadPool(2)


@pytest.fixture(scope="module")
def experts():
    cache: dict[str, Experts] = {}

    def get(qtype: str) -> Experts:
        if qtype not in cache:
            cache[qtype] = Experts(qtype)
        return cache[qtype]

    return get


def np_view(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def routing(t: int, e: int = E, k: int = K):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])                         # [T, k]
    ids[torch.rand(t, k) < 0.15] = -1                                                     # skipped slots
    return ids, torch.rand(t, k)


def run(moe, x, ids, w, out=None, accumulate=False) -> torch.Tensor:
    out = torch.zeros_like(x) if out is None else out
    moe.forward(np_view(x), ids.numpy(), w.numpy(), np_view(out), accumulate)
    return out


@pytest.mark.parametrize("isa", cpu.supported_isas())
@pytest.mark.parametrize("qtype", FORMATS)
def test_formats_against_torch(pool, experts, qtype, isa):
    ex = experts(qtype)
    moe = ex.layer(pool, isa=isa)
    for t in (1, 3, 17, 300):
        ids, w = routing(t)
        x = torch.randn(t, H).bfloat16()                                                  # exact in f32 too
        ref = dense_reference(x, ids, w, *ex.deq)
        # NOTE: T=300 runs once (bf16): the scalar reference kernels make it the slow case.
        for dtype in (torch.float32, torch.bfloat16) if t < 300 else (torch.bfloat16,):
            err = nmse(run(moe, x.to(dtype), ids, w).float(), ref)
            assert err < MOE_NMSE[qtype], f"{qtype} {isa} T={t} {dtype}: NMSE {err:.2e}"


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0", "q5_k", "q4_0"])
def test_isa_variants_agree_with_generic(pool, experts, qtype):
    # The integer block sums are the reference's at every level (one token per dot at T=1,
    # several tokens per weight row through the multi-token dots for T > 1): only the float
    # summation order differs. That rounding can move one value of h across a q8 rounding
    # boundary before the down projection, so a few rows differ by one activation step
    # (measured up to 5e-6 NMSE); every other row agrees to rounding (~1e-13).
    ex = experts(qtype)
    layers = {isa: ex.layer(pool, isa=isa, gemm_min_tokens=0) for isa in cpu.supported_isas()}
    for isa, moe in layers.items():
        rows = []
        for t in (1, 2, 9, 40):
            ids, w = routing(t)
            x = torch.randn(t, H)
            base = run(layers["generic"], x, ids, w)
            out = run(moe, x, ids, w)
            rows += [nmse(out[r], base[r]) for r in range(t) if base[r].abs().sum() > 0]
        close = sum(e < MOE_LAYOUT_NMSE for e in rows)
        assert close >= 0.8 * len(rows) and max(rows) < MOE_ISA_ROW_NMSE, f"{qtype} {isa}: {sorted(rows)[-5:]}"


@pytest.mark.parametrize("isa", cpu.supported_isas())
@pytest.mark.parametrize("backend", list(MOE_PACKED_NMSE))
def test_packed_backends_against_torch(pool, experts, backend, isa):
    # Repacked at load from bf16 and from GGUF q4_k and mxfp4 (gpt-oss's -amx rules) blocks; AMX
    # tiles run for T=300 (M >= 16).
    for qtype, sizes in (("bf16", (1, 3, 17, 300)), ("q4_k", (3,)), ("mxfp4", (3, 300))):
        ex = experts(qtype)
        moe = ex.layer(pool, isa=isa, backend=backend)
        for t in sizes:
            ids, w = routing(t)
            x = torch.randn(t, H).bfloat16()
            ref = dense_reference(x, ids, w, *ex.deq)
            for dtype in (torch.float32, torch.bfloat16) if t < 300 else (torch.bfloat16,):
                err = nmse(run(moe, x.to(dtype), ids, w).float(), ref)
                assert err < MOE_PACKED_NMSE[backend], f"{backend} from {qtype} {isa} T={t} {dtype}: NMSE {err:.2e}"


@pytest.mark.parametrize("backend", list(MOE_PACKED_NMSE))
def test_packed_numa_layouts_agree(experts, backend):
    ex = experts("bf16")
    ids, w = routing(40)
    x = torch.randn(40, H).bfloat16()
    base = run(ex.layer(_C.ThreadPool(1), backend=backend), x, ids, w).float()
    two = _C.ThreadPool(2, 2)
    # Replicas hold the same packed bytes: only the summation order (and a bf16 ulp) moves.
    assert nmse(run(ex.layer(two, numa="replicate", backend=backend), x, ids, w).float(), base) < 1e-5
    # Split slices each row of down: int8 scales are per row slice, so compare with the reference.
    ref = dense_reference(x, ids, w, *ex.deq)
    assert nmse(run(ex.layer(two, numa="split", backend=backend), x, ids, w).float(), ref) < MOE_PACKED_NMSE[backend]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_and_skipped_tokens(pool, experts, dtype):
    ex = experts("q8_0")
    moe = ex.layer(pool)
    ids, w = routing(17)
    ids[5] = -1                                                                           # token 5: no expert
    x = torch.randn(17, H).to(dtype)
    base = torch.randn(17, H).to(dtype)
    out = run(moe, x, ids, w, out=base.clone(), accumulate=True)
    ref = dense_reference(x.float(), ids, w, *ex.deq) + base.double()
    assert nmse(out.float(), ref) < MOE_NMSE["q8_0"]
    assert torch.equal(out[5], base[5])                                                   # skipped: untouched
    assert torch.all(run(moe, x, ids, w)[5] == 0)


@pytest.mark.parametrize("qtype, gemm", [("bf16", 0), ("q4_k", 0), ("q4_k", 1), ("q8_0", 1)])
def test_threads_numa_layouts_and_chunks_agree(experts, qtype, gemm):
    # gemm 0: every expert on the vec_dot path; 1: every expert on the GEMM path (any chunk size).
    ex = experts(qtype)
    ids, w = routing(300)
    x = torch.randn(300, H)
    ref = dense_reference(x, ids, w, *ex.deq)
    base = run(ex.layer(_C.ThreadPool(1), gemm_min_tokens=gemm), x, ids, w)
    assert nmse(base, ref) < MOE_NMSE[qtype]
    two_nodes = _C.ThreadPool(2, 2)                                                       # forced layout
    assert two_nodes.num_groups == 2 and two_nodes.group_of(0) != two_nodes.group_of(1)
    for moe in (ex.layer(_C.ThreadPool(2), gemm_min_tokens=gemm),
                ex.layer(two_nodes, numa="replicate", gemm_min_tokens=gemm),
                ex.layer(two_nodes, numa="split", gemm_min_tokens=gemm),
                ex.layer(_C.ThreadPool(2), max_chunk=7, gemm_min_tokens=gemm)):
        assert nmse(run(moe, x, ids, w), base) < (MOE_GEMM_LAYOUT_NMSE if gemm else MOE_LAYOUT_NMSE)


def test_spin_settings_agree(experts):
    # Threads that never spin (every wait sleeps on a futex) and threads that spin long give the
    # same result over many back-to-back submits.
    ex = experts("q8_0")
    calls = [routing(t) + (torch.randn(t, H),) for t in (1, 1, 5, 1, 40, 1)]
    outs = {}
    for spin in (0, 20000):
        moe = ex.layer(_C.ThreadPool(2, 0, True, spin))
        outs[spin] = [run(moe, x, ids, w) for ids, w, x in calls]
    for a, b in zip(outs[0], outs[20000]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", cpu.supported_isas())
@pytest.mark.parametrize("qtype", [q for q in FORMATS if quant.QTYPES[q].block_size >= 32])
def test_gemm_path_against_torch(pool, experts, qtype, isa):
    # Skewed routing: some experts get more positions than the layer's GEMM threshold (dequantized
    # to bf16 panels + packed_gemm), others fewer (vec_dot), in the same call.
    ex = experts(qtype)
    moe = ex.layer(pool, isa=isa, gemm_min_tokens=24)      # forced on: the default is off without AMX
    threshold = moe.gemm_min_tokens
    assert ex.layer(pool, isa=isa).gemm_min_tokens == (24 if isa == "amx" else 0)
    t = 100
    ids = torch.multinomial(torch.tensor([16.0, 8, 4, 2, 1, 1, 0.5, 0.5]).expand(t, E), K)  # [T, k]
    w = torch.rand(t, K)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert counts.max() >= threshold > counts[counts > 0].min()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(t, H).to(dtype)
        ref = dense_reference(x.float(), ids, w, *ex.deq)
        err = nmse(run(moe, x, ids, w).float(), ref)
        assert err < MOE_NMSE[qtype], f"{qtype} {isa} GEMM path {dtype}: NMSE {err:.2e}"


@pytest.mark.parametrize("isa", cpu.supported_isas())
@pytest.mark.parametrize("qtype, backend, act", [
    ("q4_k", "gguf", "silu"), ("q8_0", "gguf", "silu"), ("bf16", "gguf", "silu"),
    ("bf16", "amx_bf16", "silu"), ("bf16", "amx_int8", "silu"), ("bf16", "amx_int4", "silu"),
    # gpt-oss's layer: clamped SwiGLU with gate/up/down biases, in its mxfp4 and on the packed path
    ("mxfp4", "gguf", "swiglu_oai"), ("q8_0", "gguf", "swiglu_oai"), ("mxfp4", "amx_int8", "swiglu_oai"),
    ("bf16", "amx_bf16", "swiglu_oai")])
def test_fused_small_chunks_match_phased(experts, qtype, backend, act, isa):
    # Chunks of <= fused_max_tokens tokens run in one fan-out (per-expert ready flags instead of
    # barriers): the same items and arithmetic as the phased forward, so bit-identical outputs,
    # for any thread count, with skipped slots, accumulate, and f32 or bf16 inputs; and the same
    # gating and expert biases (gpt-oss: x scaled by 4 so that gate/up outputs reach the clamp).
    ex = experts(qtype)
    biases = None
    if act != "silu":
        biases = [torch.randn(E, I) * 0.5, torch.randn(E, I) * 0.5, torch.randn(E, H) * 0.1]
    scale = 1.0 if act == "silu" else 4.0
    for threads in (1, 2, 3):
        pool = _C.ThreadPool(threads)
        fused, phased = (ex.layer(pool, isa=isa, backend=backend, act=act, biases=biases) for _ in range(2))
        assert fused.fused_max_tokens == 8
        phased.fused_max_tokens = 0
        for t in (1, 2, 4, 8):
            ids, w = routing(t)
            for dtype in (torch.float32, torch.bfloat16):
                x, base = (torch.randn(t, H) * scale).to(dtype), torch.randn(t, H).to(dtype)
                for acc in (False, True):
                    a = run(fused, x, ids, w, out=base.clone(), accumulate=acc)
                    b = run(phased, x, ids, w, out=base.clone(), accumulate=acc)
                    assert torch.equal(a, b), f"{qtype} {backend} {act} {isa} threads={threads} T={t} {dtype} acc={acc}"


def test_split_layout_with_uneven_blocks():
    # I = 768 in q4_k is 3 blocks of 256: node 0 gets one block, node 1 two.
    ex = Experts("q4_k", e=4, h=256, i=768)
    ids, w = routing(9, e=4, k=2)
    x = torch.randn(9, 256)
    moe = ex.layer(_C.ThreadPool(2, 2), numa="split")
    assert moe.weight_bytes == sum(r.nbytes for r in ex.raw)                              # one copy, split
    assert nmse(run(moe, x, ids, w), dense_reference(x, ids, w, *ex.deq)) < MOE_NMSE["q4_k"]
    assert ex.layer(_C.ThreadPool(2, 2)).weight_bytes == 2 * moe.weight_bytes             # replicated


def test_async_submit_in_order(pool, experts):
    ex = experts("bf16")
    layers = [ex.layer(pool) for _ in range(3)]
    x = torch.randn(4, H)
    ids, w = routing(4)
    outs = [torch.zeros(4, H) for _ in layers]
    tickets = [m.submit(x.numpy(), ids.numpy(), w.numpy(), o.numpy()) for m, o in zip(layers, outs)]
    pool.sync(tickets[-1])
    ref = dense_reference(x, ids, w, *ex.deq)
    for o in outs:
        assert nmse(o, ref) < MOE_NMSE["bf16"]


@pytest.mark.parametrize("backend,gemm", [("gguf", 4), ("amx_bf16", -1)])
def test_layers_share_the_pool_scratch(backend, gemm):
    # Three layers on one pool, called alternately with large and small T, against the same
    # layers each alone on its own pool (its own scratch): same outputs, and the shared scratch is
    # that of one layer, not three.
    exs = [Experts("bf16") for _ in range(3)]
    shared = _C.ThreadPool(2)
    layers = [ex.layer(shared, backend=backend, gemm_min_tokens=gemm) for ex in exs]
    solo_pools = [_C.ThreadPool(2) for _ in exs]
    solos = [ex.layer(p, backend=backend, gemm_min_tokens=gemm) for ex, p in zip(exs, solo_pools)]
    for t in (200, 5, 120, 1):
        ids, w = routing(t)
        x = torch.randn(t, H).bfloat16()
        for moe, solo in zip(layers, solos):
            assert torch.equal(run(moe, x, ids, w), run(solo, x, ids, w)), f"{backend} T={t}"
    assert shared.scratch_bytes > 0
    assert all(m.buffer_bytes == shared.scratch_bytes for m in layers)
    # NOTE: every layer saw the same T and routing, so each solo scratch grew exactly like the shared one.
    assert [p.scratch_bytes for p in solo_pools] == [shared.scratch_bytes] * 3
    del layers, moe
    assert shared.scratch_bytes == 0                                                      # freed with the last layer


def test_bad_input(pool, experts):
    moe = experts("bf16").layer(pool)
    x, out = torch.randn(2, H), torch.zeros(2, H)
    ids, w = torch.tensor([[0, E]]).repeat(2, 1), torch.rand(2, 2)
    with pytest.raises(ValueError, match="expert id 8 of token 0 is out of range"):
        moe.forward(x.numpy(), ids.numpy(), w.numpy(), out.numpy())
    with pytest.raises(ValueError, match="x has shape"):
        moe.forward(torch.randn(2, H + 1).numpy(), ids.numpy(), w.numpy(), out.numpy())
    with pytest.raises(ValueError, match="float32"):
        moe.forward(x.numpy(), ids.numpy(), w.double().numpy(), out.numpy())
    with pytest.raises(ValueError, match="whole number of experts"):
        moe.load(0, 0, np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="need rows of a multiple of 256"):
        _C.MoeLayer(pool, 2, 100, 256, ["q4_k"] * 3)
    with pytest.raises(ValueError, match="at least 1 thread, got 0"):
        _C.ThreadPool(0)
    with pytest.raises(ValueError, match="spin must be >= 0 microseconds, got -5"):
        _C.ThreadPool(1, 0, True, -5)
    ok = torch.tensor([[0, 1]]).repeat(2, 1)                                              # the pool survives
    moe.forward(x.numpy(), ok.numpy(), w.numpy(), out.numpy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_stream_task_without_cuda_says_so(pool, experts):
    moe = experts("bf16").layer(pool)
    x, out = torch.randn(1, H), torch.zeros(1, H)
    task = moe.stream_task(x.numpy(), torch.tensor([[0, 1, 2]]).numpy(), torch.rand(1, 3).numpy(), out.numpy())
    assert not _C.cuda_host_available()
    with pytest.raises(RuntimeError, match="stream-ordered submit needs CUDA: no CUDA runtime"):
        task.launch_start(0)
