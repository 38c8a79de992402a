"""`gated_deltanet`: the linear-attention layers of Qwen3-Next and Qwen3.5-MoE (Gated DeltaNet),
with each request's state in the KV cache's state rows (kv_cache/state.py).

Per token t of a request (shape legend: T tokens, C = 2·Hk·dk + Hv·dv conv channels, Hk key
heads of dk, Hv value heads of dv, r = Hv / Hk value heads per key head, K the conv kernel):
  qkv_t = causal depthwise conv1d over the projected [q | k | v] (kernel K, SiLU), the last
          K - 1 inputs carried in the conv state;
  q, k  = L2-normalised per head (q also scaled by dk^-1/2), each key head serving r value heads;
  beta  = sigmoid(b_t), decay g_t = -exp(A_log) · softplus(a_t + dt_bias)  (log space, <= 0);
  S     = exp(g_t) · S;  S += k_t ⊗ beta_t (v_t - Sᵀ k_t);  o_t = Sᵀ q_t   (S: [Hv, dk, dv], f32)
  out   = out_proj(RMSNorm(o_t) · silu(z_t)), the norm per value head with its own weight.
Qwen3-Next projects [q k v z] and [b a] interleaved per key-head group (in_proj_qkvz, in_proj_ba);
Qwen3.5 projects in_proj_qkv / in_proj_z / in_proj_b / in_proj_a separately.

`forward` runs a multi-token chunk through the chunked form of the recurrence (64-token blocks:
a unit-triangular solve per block, then one state update per block) and all single-token
(decode) requests of a step as one batched recurrent step on the device (CUDA-graph safe: a
request at position 0 reads zeros instead of its state rows, decided on the device).
`forward_native`, the oracle, walks every request token by token with the recurrence above.
A step reads each request's state from its read row and writes the new state to its write row;
a request starting at position 0 starts from zero state.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ktrans.engine.batch import current_forward
from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.linear import ProjectionOwner, resolve_dtype
from ktrans.operators.registry import register_operator

CHUNK = 64          # tokens per block of the chunked form
_L2_EPS = 1e-6      # as the FLA kernels (and transformers' torch fallback) normalise q and k


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + _L2_EPS)


def delta_rule_recurrent(q, k, v, beta, g, state):
    """Token-by-token gated delta rule. q, k [B, n, Hv, dk]; v [B, n, Hv, dv]; beta, g [B, n, Hv];
    state [B, Hv, dk, dv]; all float32, q already normalised and scaled. Returns (o [B, n, Hv, dv],
    final state)."""
    out = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        mem = torch.einsum("bhkv,bhk->bhv", state, k[:, t])                                 # [B, Hv, dv]
        delta = (v[:, t] - mem) * beta[:, t][..., None]
        state = state + k[:, t][..., None] * delta[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(out, dim=1), state


def delta_rule_chunked(q, k, v, beta, g, state, chunk: int = CHUNK):
    """The same recurrence, a block of `chunk` tokens at a time, for one request: q, k [n, Hv, dk];
    v [n, Hv, dv]; beta, g [n, Hv]; state [Hv, dk, dv] (float32). Returns (o [n, Hv, dv], state).

    Within a block with cumulative log decay γ (γ_i = g_1 + ... + g_i) the corrections
    u_i = beta_i (v_i - Sᵀ k_i at token i) satisfy (I + A) u = beta·v - beta·exp(γ)·(Sᵀ k) with
    A_ij = beta_i exp(γ_i - γ_j) k_i·k_j for j < i: one unit-lower-triangular solve per block.
    Then o_i = exp(γ_i) Sᵀ q_i + Σ_{j<=i} exp(γ_i - γ_j) (q_i·k_j) u_j and
    S' = exp(γ_last) S + Σ_j exp(γ_last - γ_j) k_j u_jᵀ. Padding past the end (k = v = 0,
    beta = g = 0) changes neither o nor S."""
    n = q.shape[0]
    pad = (-n) % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta, g = (F.pad(x, (0, 0, 0, pad)) for x in (beta, g))
    nb = (n + pad) // chunk
    # [Hv, blocks, chunk, ...]
    q, k, v = (x.view(nb, chunk, *x.shape[1:]).permute(2, 0, 1, 3) for x in (q, k, v))
    beta, g = (x.view(nb, chunk, -1).permute(2, 0, 1) for x in (beta, g))
    gam = g.cumsum(-1)                                                                      # [Hv, nb, c]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [Hv, nb, c, c]
    kb = k * beta[..., None]
    system = (kb @ k.transpose(-1, -2)) * decay                                            # A plus its diagonal
    system = system.masked_fill(~lower, 0.0)
    u_v = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    u_s = torch.linalg.solve_triangular(system, kb * gam.exp()[..., None], upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * decay                                                 # [Hv, nb, c, c]
    q_decayed = q * gam.exp()[..., None]
    k_tail = k * (gam[..., -1:] - gam).exp()[..., None]                                    # decay to block end
    out = torch.empty_like(v)
    for b in range(nb):
        u = u_v[:, b] - u_s[:, b] @ state                                                   # [Hv, c, dv]
        out[:, b] = q_decayed[:, b] @ state + qk[:, b] @ u
        state = state * gam[:, b, -1].exp()[:, None, None] + k_tail[:, b].transpose(-1, -2) @ u
    out = out.permute(1, 2, 0, 3).reshape(nb * chunk, out.shape[0], out.shape[-1])[:n]     # [n, Hv, dv]
    return out, state


@register_operator("gated_deltanet")
class GatedDeltaNet(ProjectionOwner, Operator):
    name: ClassVar[str] = "gated_deltanet"
    owned_children: ClassVar[tuple[str, ...]] = ("*",)      # projections, conv, norm loaded here

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", weights="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if not hasattr(orig_module, "A_log") or not hasattr(orig_module, "conv1d"):
            raise KtransError(f"{key}: gated_deltanet replaces a Gated DeltaNet layer (linear_attn), "
                              f"got {type(orig_module).__name__}")
        self.layer_idx = orig_module.layer_idx
        self.hk, self.hv = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        if self.hv % self.hk:
            raise KtransError(f"{key}: {self.hv} value heads do not divide into {self.hk} key heads")
        self.kernel = config.linear_conv_kernel_dim
        self.conv_dim = 2 * self.hk * self.dk + self.hv * self.dv
        self.eps = config.rms_norm_eps
        act = getattr(orig_module, "activation", "silu")
        if act not in ("silu", "swish"):
            raise KtransError(f"{key}: the conv activation is {act!r}; gated_deltanet applies SiLU")
        # Qwen3-Next: [q k v z] and [b a] interleaved per key-head group; Qwen3.5: four projections.
        self.fused_qkvz = hasattr(orig_module, "in_proj_qkvz")
        self.dtype = resolve_dtype(dtype, self.device)
        self._set_weights_mode(key, weights)

    def _proj_shapes(self) -> dict[str, tuple[int, int]]:
        h, kd, vd, nv = self.config.hidden_size, self.hk * self.dk, self.hv * self.dv, self.hv
        if self.fused_qkvz:
            return {"in_proj_qkvz": (2 * kd + 2 * vd, h), "in_proj_ba": (2 * nv, h), "out_proj": (h, vd)}
        return {"in_proj_qkv": (2 * kd + vd, h), "in_proj_z": (vd, h), "in_proj_b": (nv, h), "in_proj_a": (nv, h),
                "out_proj": (h, vd)}

    def _biased(self) -> set[str]:
        return set()

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv1d.weight": (self.conv_dim, 1, self.kernel), "dt_bias": (self.hv,), "A_log": (self.hv,),
                "norm.weight": (self.dv,)}

    def load_weights(self, weights) -> None:
        self._load_owned(weights)

    # -- the per-token parts ---------------------------------------------------------------------

    def _project(self, x: torch.Tensor, native: bool):
        """x [T, H] -> (mixed qkv [T, C], z [T, Hv, dv], b [T, Hv], a [T, Hv])."""
        t, r = x.shape[0], self.hv // self.hk
        if self.fused_qkvz:
            qkvz = self._linear(x, "in_proj_qkvz", native).view(t, self.hk, -1)
            q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
            b, a = self._linear(x, "in_proj_ba", native).view(t, self.hk, 2 * r).split([r, r], dim=-1)
            mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
            return mixed, z.reshape(t, self.hv, self.dv), b.reshape(t, self.hv), a.reshape(t, self.hv)
        z = self._linear(x, "in_proj_z", native).view(t, self.hv, self.dv)
        return (self._linear(x, "in_proj_qkv", native), z, self._linear(x, "in_proj_b", native),
                self._linear(x, "in_proj_a", native))

    def _qkv_heads(self, mixed: torch.Tensor):
        """Conv output [..., C] -> q, k [..., Hv, dk] (normalised, q scaled; key heads repeated for
        their value heads) and v [..., Hv, dv], all float32."""
        kd = self.hk * self.dk
        q, k, v = mixed.float().split([kd, kd, self.hv * self.dv], dim=-1)
        r = self.hv // self.hk
        q = _l2norm(q.unflatten(-1, (self.hk, self.dk))).repeat_interleave(r, dim=-2) * self.dk ** -0.5
        k = _l2norm(k.unflatten(-1, (self.hk, self.dk))).repeat_interleave(r, dim=-2)
        return q, k, v.unflatten(-1, (self.hv, self.dv))

    def _gates(self, b: torch.Tensor, a: torch.Tensor):
        """beta [..., Hv] and the log decay g [..., Hv], float32."""
        beta = b.sigmoid().float()
        g = -self._p("A_log").float().exp() * F.softplus(a.float() + self._p("dt_bias"))
        return beta, g

    def _conv(self, window: torch.Tensor) -> torch.Tensor:
        """window [B, C, K - 1 + n] (state then inputs) -> SiLU(conv) [B, n, C]."""
        w = self._p("conv1d.weight")                                                    # [C, 1, K]
        return F.silu(F.conv1d(window.to(w.dtype), w, groups=self.conv_dim)).transpose(1, 2)

    def _output(self, o: torch.Tensor, z: torch.Tensor, native: bool) -> torch.Tensor:
        """o [T, Hv, dv] (float32) -> out_proj(RMSNorm(o) · silu(z)) [T, H], in the compute dtype."""
        o = o.to(self.dtype)
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self._p("norm.weight") * of.to(self.dtype)
        y = (y * F.silu(z.float())).to(self.dtype)
        return self._linear(y.reshape(o.shape[0], -1), "out_proj", native)

    # -- one step ------------------------------------------------------------------------------

    def _states(self, ctx, rows: torch.Tensor, fresh: torch.Tensor):
        """(conv [B, C, K-1], recurrent [B, Hv, dk, dv]) read from `rows`, zero where `fresh`."""
        conv, rec = ctx.kv.state(self.layer_idx)
        keep = (~fresh).to(torch.float32)
        c = conv.index_select(0, rows) * keep.to(conv.dtype)[:, None, None]
        return c, rec.index_select(0, rows) * keep[:, None, None, None]

    def _run(self, hidden_states, native: bool):
        ctx = current_forward().on(self.device)
        if ctx.state_read is None:
            raise KtransError(f"{self.key}: this linear-attention layer needs each request's recurrent-state rows "
                              f"(ForwardBatch.state_rows [R, 2]: row read, row written)")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).to(self.device, self.dtype)             # [T, H]
        mixed, z, b, a = self._project(x, native)
        beta, g = self._gates(b, a)
        o = torch.empty(x.shape[0], self.hv, self.dv, dtype=torch.float32, device=self.device)
        qs, batch = ctx.query_start, ctx.batch
        group = None if native else ctx.decode_group()
        single = group.reqs if group is not None else frozenset()
        if group is not None:
            o_rows = self._decode(ctx, group, mixed, beta, g)
            if group.whole:
                o = o_rows
            else:
                o[group.rows] = o_rows
        for r in range(batch.num_reqs):
            if r not in single:
                sl = slice(qs[r], qs[r + 1])
                o[sl] = self._chunk(ctx, r, mixed[sl], beta[sl], g[sl], native)
        out = self._output(o, z, native)
        return out.view(*shape[:-1], -1)

    def _chunk(self, ctx, r: int, mixed, beta, g, native: bool) -> torch.Tensor:
        """Request r's tokens of this step (mixed [n, C], beta / g [n, Hv]) from its state rows:
        o [n, Hv, dv]; its new states written to its write row. The chunked form, or the
        token-by-token recurrence for the oracle."""
        conv_state, rec_state = ctx.kv.state(self.layer_idx)
        fresh = torch.tensor([ctx.batch.num_computed[r] == 0], device=self.device)
        c0, s0 = self._states(ctx, ctx.state_read[r:r + 1], fresh)                       # [1, C, K-1], [1, Hv, dk, dv]
        window = torch.cat([c0, mixed.t()[None].to(c0.dtype)], dim=-1)                    # [1, C, K-1+n]
        q, k, v = self._qkv_heads(self._conv(window)[0].to(self.dtype))                  # [n, Hv, d]
        if native:
            out, s1 = delta_rule_recurrent(q[None], k[None], v[None], beta[None], g[None], s0)
        else:
            out, s1 = delta_rule_chunked(q, k, v, beta, g, s0[0])
            out, s1 = out[None], s1[None]
        w = ctx.state_write[r:r + 1]
        conv_state.index_copy_(0, w, window[..., window.shape[-1] - (self.kernel - 1):])
        rec_state.index_copy_(0, w, s1)
        return out[0]

    def _decode(self, ctx, group, mixed, beta, g) -> torch.Tensor:
        """Every single-token request of the step at once: o [B, Hv, dv]. Only device tensors are
        read (the rows and positions of the decode group), so the step can be a CUDA graph."""
        conv_state, rec_state = ctx.kv.state(self.layer_idx)
        reqs = _decode_reqs(ctx, group)
        read, write = ctx.state_read.index_select(0, reqs), ctx.state_write.index_select(0, reqs)
        fresh = group.q_pos[:, 0] == 0
        c0, s0 = self._states(ctx, read, fresh)
        rows = group.rows
        x = mixed if group.whole else mixed.index_select(0, rows)                           # [B, C]
        window = torch.cat([c0, x[:, :, None].to(c0.dtype)], dim=-1)                         # [B, C, K]
        qh, kh, vh = self._qkv_heads(self._conv(window)[:, 0].to(self.dtype))              # [B, Hv, d]
        bt = beta if group.whole else beta.index_select(0, rows)
        gt = g if group.whole else g.index_select(0, rows)
        out, s1 = delta_rule_recurrent(qh[:, None], kh[:, None], vh[:, None], bt[:, None], gt[:, None], s0)
        conv_state.index_copy_(0, write, window[..., 1:])
        rec_state.index_copy_(0, write, s1)
        return out[:, 0]

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return self._run(hidden_states, native=False)

    def forward_native(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return self._run(hidden_states, native=True)


def _decode_reqs(ctx, group) -> torch.Tensor:
    """Batch indices [B] (device, int64) of the decode group's requests, in the order of its rows."""
    key = ("decode_reqs", ctx.device)
    if key not in ctx.cache:
        n = len(group.reqs)
        ctx.cache[key] = (torch.arange(n, device=ctx.device) if group.whole else
                          torch.tensor(sorted(group.reqs), device=ctx.device))
    return ctx.cache[key]
