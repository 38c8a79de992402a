"""MoE routing near-ties, told apart from errors, for tests that compare a lower-precision run
(bf16, quantized activations) with transformers' f32 model.

Such a run may pick a different expert where two router scores nearly tie; the token is then
legitimately far off, and through attention so is every later token of its request. Instead of
tolerating a share of badly-off tokens, the tests:
1. record the reference's router at every (MoE layer, request, position): `Reference`, forward
   hooks on transformers' router modules (`mlp.gate`, gpt-oss's `mlp.router`, which return
   logits, top-k weights, ids);
2. run ours with `force_reference_routing`: each MoE block's own choice is kept where it picks
   the reference's experts, and where it does not (a flip) it is recorded and replaced by the
   reference's experts and weights, so later layers and tokens see no trace of it;
3. require every flip to be a genuine near-tie: the least change of the reference's router
   logits that could turn its choice into ours (`flip_gap`) is no larger than how far our router
   logits really were from the reference's at that token (`Flip.drift`), and that distance is
   small everywhere (ROUTING_LOGIT_DRIFT);
4. then hold every token to the tight bound.
A wrong router (a missing score bias, a wrong group rule) flips where the logits agree, so its
flips have gaps wider than their drift and fail step 3; any other error fails step 4.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ktrans.config.arch import arch_from_config
from ktrans.operators.moe_block import MoEBlock


def _layer(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name + ".").group(1))


@dataclass
class Flip:
    layer: int
    row: tuple                 # (request, position)
    ours: list[int]            # the experts the run under test picked
    ref: list[int]             # the reference's
    gap: float                 # flip_gap(): the least router-logit change that could explain it
    drift: float               # how far ours' router logits were from the reference's there


@dataclass
class Reference:
    """The reference's routing by (layer, (request, position)): logits [E], ids [k], weights [k]."""
    config: object
    bias: dict = field(default_factory=dict)           # layer -> DeepSeek-V3 / GLM-4.5 score bias [E]
    logits: dict = field(default_factory=dict)
    ids: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def recording(self, model, rows: list):
        """Record transformers' `model` running the tokens `rows` = [(request, position), ...]."""
        def hook(module, args, out, layer):
            logits, w, idx = out
            for i, row in enumerate(rows):
                self.logits[(layer, row)] = logits[i].detach().float().cpu()
                self.ids[(layer, row)] = idx[i].detach().cpu()
                self.weights[(layer, row)] = w[i].detach().float().cpu()
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is None and len(args) > 1 and torch.is_tensor(args[1]):      # MiniMax-M2: the block's, passed in
                bias = args[1]
            if bias is not None:
                self.bias[layer] = bias.detach().float().cpu()
        with _gate_hooks(model, hook):
            yield

    @contextlib.contextmanager
    def recording_ktrans(self, model, rows_of_step):
        """Record ktrans's own `model` (MoEBlock routers) as the reference, e.g. a placement with
        dequantized f32 weights that another placement is compared with; `rows_of_step()` gives
        the (request, position) of each packed token of the step about to run."""
        blocks = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoEBlock)]

        def wrap(block, layer):
            own = block.route

            def route(x):
                w, idx = own(x)
                logits = F.linear(x.to(block.gate_weight.device, torch.float32), block.gate_weight,
                                  block.router_bias)                                          # [T, E]
                for i, row in enumerate(rows_of_step()):
                    self.logits[(layer, row)] = logits[i].detach().float().cpu()
                    self.ids[(layer, row)] = idx[i].detach().cpu()
                    self.weights[(layer, row)] = w[i].detach().float().cpu()
                if block.gate_bias is not None:
                    self.bias[layer] = block.gate_bias.detach().float().cpu()
                return w, idx
            return route

        for name, block in blocks:
            block.route = wrap(block, _layer(name))
        try:
            yield
        finally:
            for _, block in blocks:
                del block.route

    def moe_layers(self) -> set[int]:
        return {layer for layer, _ in self.ids}


@contextlib.contextmanager
def _gate_hooks(model, hook):
    handles = [mod.register_forward_hook(lambda m, a, o, layer=_layer(name): hook(m, a, o, layer))
               for name, mod in model.named_modules()
               if name.endswith((".mlp.gate", ".mlp.router")) and hasattr(mod, "top_k")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return sorted(a.tolist()) == sorted(b.tolist())


@contextlib.contextmanager
def force_reference_routing(model, ref: Reference, rows_of_step, flips: list, drift: list,
                            routed: set | None = None):
    """Run ktrans's `model` (MoEBlock routers) with the reference's choice wherever its own differs.

    `rows_of_step()` gives the (request, position) of each packed token of the step about to run;
    flips found are appended to `flips`; drift[0] is raised to the largest difference seen between
    a router logit of ours and the reference's; every (layer, row) routed here is added to
    `routed`, so that a caller can prove no step bypassed the MoEBlock's Python router (the fused
    all-CPU decode step routes in C++: run such a runner with fused_decode=False).
    """
    blocks = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoEBlock)]
    # Layers a rule file left as transformers' own modules (e.g. a whole layer on the CPU with
    # `class: default`) route in transformers' router: held the same way through its output.
    kept = {_layer(name) for name, mod in model.named_modules()
            if name.endswith((".mlp.gate", ".mlp.router")) and hasattr(mod, "top_k")}
    assert {_layer(name) for name, _ in blocks} | kept == ref.moe_layers(), "MoE layers of ours and the reference differ"

    def force(layer, logits, w, idx):
        """The reference's choice wherever ours differs, for the tokens of the step; logits [T, E] f32 CPU."""
        rows = rows_of_step()
        assert len(rows) == idx.shape[0]
        w, idx = w.clone(), idx.clone()
        for i, row in enumerate(rows):
            if routed is not None:
                routed.add((layer, row))
            want = ref.ids[(layer, row)]
            off = float((logits[i] - ref.logits[(layer, row)]).abs().max())
            drift[0] = max(drift[0], off)
            if not _same(idx[i].cpu(), want):
                flips.append(Flip(layer, row, sorted(idx[i].tolist()), sorted(want.tolist()),
                                  flip_gap(ref, layer, row, idx[i].cpu()), off))
                idx[i] = want.to(idx.device)
                w[i] = ref.weights[(layer, row)].to(w.device, w.dtype)
        return w, idx

    def wrap(block, layer):
        own = block.route

        def route(x):
            w, idx = own(x)
            logits = F.linear(x.to(block.gate_weight.device, torch.float32), block.gate_weight,
                              block.router_bias).cpu()                                    # [T, E]
            return force(layer, logits, w, idx)
        return route

    def hf_hook(module, args, out, layer):
        logits, w, idx = out
        return (logits, *force(layer, logits.detach().float().cpu(), w, idx))

    for name, block in blocks:
        block.route = wrap(block, _layer(name))
    try:
        with _gate_hooks(model, hf_hook):
            yield
    finally:
        for _, block in blocks:
            del block.route                   # back to the class's method


@contextlib.contextmanager
def force_reference_routing_hf(model, ref: Reference, rows: list, drift: list | None = None):
    """The same for transformers' own (e.g. bf16) model running the tokens `rows`: its router's
    choice is replaced by the reference's where they differ (not asserted: its bf16 router is
    not what the tests check). drift[0], when given, is raised to the largest difference seen
    between a router logit of this model and the reference's (the floor that a run under test's
    own drift is compared with)."""
    def hook(module, args, out, layer):
        logits, w, idx = out
        w, idx = w.clone(), idx.clone()
        for i, row in enumerate(rows):
            if drift is not None:
                drift[0] = max(drift[0], float((logits[i].detach().float().cpu() - ref.logits[(layer, row)]).abs().max()))
            want = ref.ids[(layer, row)]
            if not _same(idx[i].cpu(), want):
                idx[i] = want.to(idx.device)
                w[i] = ref.weights[(layer, row)].to(w.device, w.dtype)
        return logits, w, idx
    with _gate_hooks(model, hook):
        yield


def flip_gap(ref: Reference, layer: int, row, ours: torch.Tensor) -> float:
    """A lower bound on the change of the reference's router logits (largest change of any one
    logit) that would make the router pick `ours` instead of its own choice; 0 for a tie.

    Softmax routers (Qwen2/3-MoE, Mixtral, DeepSeek-V2 greedy) rank experts by logit: an expert a
    can displace b only if l_b - l_a <= 2 delta. DeepSeek-V3 ranks by sigmoid(l) + bias, which
    moves at most delta / 4: s_b - s_a <= delta / 2 (GLM-4.5 too). With group-limited routing a group of ours
    that the reference left out must overtake the reference's weakest group: group scores (sum of
    two sigmoid scores, V3; largest softmax probability, V2) move at most delta / 2 each.
    """
    cfg = ref.config
    logits = ref.logits[(layer, row)].double()                                        # [E]
    theirs = set(ref.ids[(layer, row)].tolist())
    mine = set(ours.tolist())
    e = logits.numel()
    routing = arch_from_config(cfg).routing
    v3 = routing in ("deepseek_v3", "sigmoid_topk")                                   # (GLM-4.5, MiniMax-M2)
    grouped = routing in ("deepseek_v3", "deepseek_v2") and getattr(cfg, "n_group", 1) > 1 and (
        v3 or getattr(cfg, "topk_method", "greedy") == "group_limited_greedy")
    if v3:
        score = logits.sigmoid() + ref.bias[layer].double()
        per_expert = lambda a, b: 2 * float(score[b] - score[a])                      # noqa: E731
    else:
        per_expert = lambda a, b: float(logits[b] - logits[a]) / 2                    # noqa: E731
    need = 0.0
    groups_of_mine = None
    if grouped:
        size = e // cfg.n_group
        if v3:
            gscore = score.view(cfg.n_group, size).topk(2, dim=-1).values.sum(-1)      # [G]
        else:
            gscore = logits.softmax(-1).view(cfg.n_group, size).max(-1).values         # [G]
        chosen = set(gscore.topk(cfg.topk_group).indices.tolist())
        groups_of_mine = {a // size for a in mine}
        weakest = min(float(gscore[g]) for g in chosen)
        for g in groups_of_mine - chosen:
            need = max(need, weakest - float(gscore[g]))
    for a in mine - theirs:
        for b in theirs - mine:
            if groups_of_mine is None or b // (e // cfg.n_group) in groups_of_mine:
                need = max(need, per_expert(a, b))
    return need
