"""The Gated DeltaNet operator (Qwen3-Next's and Qwen3.5-MoE's linear-attention layers) vs the
transformers module it replaces, on the same random weights: requests packed into steps that mix
prefill chunks (longer than one 64-token block of the chunked form) and single-token decodes,
each carrying its conv and recurrent state between steps in its KV-cache state rows, must
reproduce each request's full-sequence HF output; the chunked form equals the token-by-token
recurrence; a step run twice (read row -> write row) writes the same state."""

from __future__ import annotations

import pytest
import torch

from ktrans.engine.batch import ForwardBatch, forward_context
from ktrans.kv_cache.state import StatePool
from ktrans.kv_cache.storage import KVStorage
from ktrans.operators.gated_deltanet import GatedDeltaNet, delta_rule_chunked, delta_rule_recurrent
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.operators.test_attention import split_packed
from tests.tolerances import F32_ATOL, F32_RTOL

ARCHS = ["qwen3_next", "qwen3_5_moe"]
# Each request's tokens, split into the chunks scheduled at each step (0 = idle): request 0 is
# prefilled in two chunks (one over 64 tokens) then decodes; request 1 starts at step 1; request 2
# is a one-token prompt (its first step is a decode-shaped step at position 0).
SCHEDULE = {0: [70, 9, 1, 1], 1: [0, 130, 1, 1], 2: [0, 0, 1, 1]}


def _hf_reference(attn, x):
    """HF module over one whole sequence x [S, H] (no cache) -> [S, H]."""
    with torch.no_grad():
        return attn(hidden_states=x[None])[0]


def _op(arch, layer=0):
    config, model = tiny_hf_model(arch)
    attn = model.model.layers[layer].linear_attn
    op = GatedDeltaNet(key=f"model.layers.{layer}.linear_attn", orig_module=attn, config=config, device="cpu")
    op.load_weights(model_source(model))
    return config, attn, op


def _run_schedule(op, config, xs, native, twice=False):
    kv = KVStorage.for_config(config, num_pages=3, page_size=64, dtype=torch.float32, device="cpu")
    pool = StatePool(len(xs))
    kv.reserve_states(pool.num_slots)
    done = [0] * len(xs)
    outs = [[] for _ in xs]
    for step in range(len(SCHEDULE[0])):
        reqs = [r for r in range(len(xs)) if SCHEDULE[r][step] > 0]
        for r in reqs:
            pool.alloc(r)
        chunks = [xs[r][done[r]:done[r] + SCHEDULE[r][step]] for r in reqs]
        positions = torch.cat([torch.arange(done[r], done[r] + SCHEDULE[r][step]) for r in reqs])
        batch = ForwardBatch(input_ids=torch.zeros(len(positions), dtype=torch.long), positions=positions,
                             seq_ids=reqs, num_computed=[done[r] for r in reqs],
                             num_new=[SCHEDULE[r][step] for r in reqs],
                             page_table=torch.arange(3).int().repeat(len(reqs), 1),
                             logits_indices=torch.zeros(0, dtype=torch.long),
                             state_rows=torch.tensor([pool.rows(r) for r in reqs]))
        fn = op.forward_native if native else op.forward
        for _ in range(2 if twice else 1):            # a re-run reads the same rows: same result
            with forward_context(batch, kv), torch.no_grad():
                y = fn(torch.cat(chunks)[None])[0]
        for r in reqs:
            pool.commit(r)
        split_packed(y, reqs, chunks, outs, done)
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("native", [False, True])
def test_deltanet_matches_hf_over_packed_chunked_steps(arch, native):
    config, attn, op = _op(arch)
    xs = [torch.randn(sum(SCHEDULE[r]), config.hidden_size) for r in range(3)]
    got = _run_schedule(op, config, xs, native, twice=not native)
    for r in range(3):
        torch.testing.assert_close(got[r], _hf_reference(attn, xs[r]), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


def test_chunked_form_equals_the_recurrence():
    """delta_rule_chunked over several blocks (a partial last one) from a nonzero state equals
    the token-by-token recurrence: outputs and final state."""
    n, hv, dk, dv = 150, 3, 8, 5
    q = torch.nn.functional.normalize(torch.randn(n, hv, dk), dim=-1) * dk ** -0.5
    k = torch.nn.functional.normalize(torch.randn(n, hv, dk), dim=-1)
    v, beta = torch.randn(n, hv, dv), torch.rand(n, hv)
    g = -torch.rand(n, hv) * 2
    s0 = torch.randn(hv, dk, dv)
    out, s1 = delta_rule_chunked(q.double(), k.double(), v.double(), beta.double(), g.double(), s0.double())
    ref, s_ref = delta_rule_recurrent(q[None].double(), k[None].double(), v[None].double(), beta[None].double(),
                                      g[None].double(), s0[None].double())
    torch.testing.assert_close(out, ref[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s1, s_ref[0], rtol=1e-9, atol=1e-9)
