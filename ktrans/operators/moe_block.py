"""`moe_block`: a sparse MoE layer — the router on the block's device (GPU by default), routed
experts on whatever the rules put at `<key>.experts`, shared experts overlapped with them.

Routing follows each architecture exactly as transformers computes it:
- DeepSeek-V3 and GLM-4.5: sigmoid scores + e_score_correction_bias for the choice only,
  group-limited top-k (groups ranked by the sum of their two best biased scores), weights from the
  unbiased scores, normalised when norm_topk_prob, × routed_scaling_factor;
- DeepSeek-V2: softmax, greedy or group-limited greedy (groups ranked by their best score),
  × routed_scaling_factor;
- Qwen2-MoE / Qwen3-MoE / Qwen3-Next: softmax top-k, renormalised when norm_topk_prob; Qwen2-MoE
  and Qwen3-Next add a shared expert scaled by sigmoid(shared_expert_gate(x));
- Mixtral, Qwen3.5-MoE: softmax top-k, always renormalised (Qwen3.5 with Qwen3-Next's gated
  shared expert);
- gpt-oss: biased router logits, top-k of the logits, softmax over those k;
- MiniMax-M2: sigmoid scores + e_score_correction_bias (the block's own, not the router's) for the
  choice only, plain top-k, weights from the unbiased scores, always renormalised.
Which one is the arch entry's `routing` (ktrans/config/arch.py). The router runs in f32 (its
logits decide discrete choices; bf16 would flip near-ties). The router is the HF block's `gate`
(`router` in gpt-oss, whose decoder layer also expects (hidden, router scores) back).

Overlap: when the block runs on the GPU and the experts operator has submit/sync (the CPU
experts), the routed work is submitted first, the shared experts run on the GPU meanwhile, then
sync joins them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ktrans.config.arch import arch_from_config
from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.linear import load_param
from ktrans.operators.registry import register_operator

_ROUTED_TYPES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "glm4_moe",
                 "minimax_m2", "qwen3_next", "qwen3_5_moe_text")
# softmax_topk routings that always renormalise the k weights (their configs have no norm_topk_prob)
_ALWAYS_RENORMALISED = ("mixtral", "qwen3_5_moe_text")
# Routings that choose with sigmoid scores + a correction bias (loaded beside the router).
_SCORE_BIASED = ("deepseek_v3", "sigmoid_topk")


def _group_mask(choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """Keep only experts of the `topk_group` best groups: choice [T, E], group_scores [T, G]."""
    t, g = group_scores.shape
    top = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]               # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)      # [T, G]
    return keep[:, :, None].expand(t, g, choice.shape[1] // g).reshape(t, -1)           # [T, E]


def route_deepseek_v3(logits, bias, *, top_k, n_group, topk_group, norm, scale):
    scores = logits.sigmoid()                                                            # [T, E]
    choice = scores + bias
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)     # [T, G]
    choice = choice.masked_fill(~_group_mask(choice, group_scores, topk_group), float("-inf"))
    idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]                           # [T, k]
    w = scores.gather(1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, idx


def route_deepseek_v2(logits, *, top_k, method, n_group, topk_group, scale):
    scores = logits.softmax(dim=-1)                                                      # [T, E]
    if method == "group_limited_greedy":
        t, e = scores.shape
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values         # [T, G]
        scores = scores.masked_fill(~_group_mask(scores, group_scores, topk_group), 0.0)
    elif method != "greedy":
        raise KtransError(f"DeepSeek-V2 topk_method '{method}' is not one of greedy, group_limited_greedy")
    w, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return w * scale, idx


def route_softmax_topk(logits, *, top_k, norm):
    w, idx = torch.topk(logits.softmax(dim=-1), k=top_k, dim=-1)                        # [T, k]
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def route_sigmoid_topk(logits, bias, *, top_k):
    scores = logits.sigmoid()                                                            # [T, E]
    idx = torch.topk(scores + bias, k=top_k, dim=-1, sorted=False)[1]                    # [T, k]
    w = scores.gather(1, idx)
    return w / w.sum(-1, keepdim=True), idx


def route_topk_softmax(logits, *, top_k):
    top, idx = torch.topk(logits, k=top_k, dim=-1)                                       # [T, k]
    return torch.softmax(top, dim=-1), idx


def renormalises(config) -> bool:
    """Whether a softmax_topk router renormalises its k weights to sum to 1."""
    return config.model_type in _ALWAYS_RENORMALISED or bool(getattr(config, "norm_topk_prob", False))


def router_of(orig_module) -> tuple[str, torch.nn.Module]:
    """(child name, module) of a sparse MoE block's router: `gate`, or gpt-oss's `router`."""
    for name in ("gate", "router"):
        child = getattr(orig_module, name, None)
        if isinstance(child, torch.nn.Module):
            return name, child
    raise KtransError(f"{type(orig_module).__name__} has no router (expected a 'gate' or 'router' child)")


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return default


@register_operator("moe_block")
class MoEBlock(Operator):
    name: ClassVar[str] = "moe_block"
    owned_children: ClassVar[tuple[str, ...]] = ("gate", "router")   # the router is loaded here, in f32

    def __init__(self, *, key: str, orig_module, config, device, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if config.model_type not in _ROUTED_TYPES:
            raise KtransError(f"{key}: moe_block supports {', '.join(_ROUTED_TYPES)}, not '{config.model_type}'")
        if not hasattr(orig_module, "experts"):
            raise KtransError(f"{key}: moe_block replaces a sparse MoE block (with .experts), "
                              f"got {type(orig_module).__name__}")
        # Children kept under their HF names: the rule engine swaps/loads them by dotted path.
        self.experts = orig_module.experts
        for child in ("shared_experts", "shared_expert", "shared_expert_gate"):
            if getattr(orig_module, child, None) is not None:
                setattr(self, child, getattr(orig_module, child))
        self.model_type = config.model_type
        spec = arch_from_config(config)
        self.routing, self.returns_pair = spec.routing, spec.mlp_returns_pair
        self.top_k = config.num_experts_per_tok
        self.router_name, router = router_of(orig_module)
        self.num_experts = router.weight.shape[0]
        self.has_router_bias = getattr(router, "bias", None) is not None
        # The correction bias lives on the router (DeepSeek-V3, GLM-4.5) or on the block (MiniMax-M2).
        on_block = isinstance(getattr(orig_module, "e_score_correction_bias", None), torch.Tensor)
        self.score_bias_name = f"{key}.e_score_correction_bias" if on_block else \
            f"{key}.{self.router_name}.e_score_correction_bias"

    def load_weights(self, weights) -> None:
        e, h, r = self.num_experts, self.config.hidden_size, f"{self.key}.{self.router_name}"
        self.gate_weight = load_param(weights, f"{r}.weight", torch.float32, self.device, (e, h))  # [E, H]
        self.gate_bias = None          # DeepSeek-V3's (GLM-4.5's, MiniMax-M2's) correction bias: for the choice only
        if self.routing in _SCORE_BIASED:
            self.gate_bias = load_param(weights, self.score_bias_name, torch.float32, self.device, (e,))
        self.router_bias = None        # gpt-oss: added to the logits
        if self.has_router_bias:
            self.router_bias = load_param(weights, f"{r}.bias", torch.float32, self.device, (e,))
        # How often each expert was chosen (ktrans.fit.counts reads it: hot experts go to the GPU).
        self.expert_counts = torch.zeros(e, dtype=torch.int64, device=self.device)

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        router = router_of(orig_module)[1]
        e, h = router.weight.shape
        biased = arch_from_config(config).routing in _SCORE_BIASED or getattr(router, "bias", None) is not None
        extra = e if biased else 0
        return {str(torch.device(device)): 4 * (e * h + extra)}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (top_k_weights [T, k] f32, top_k_index [T, k] int64)."""
        c = self.config
        logits = F.linear(x.to(self.device, torch.float32), self.gate_weight, self.router_bias)  # [T, E]
        if self.routing == "topk_softmax":
            return route_topk_softmax(logits, top_k=self.top_k)
        if self.routing == "sigmoid_topk":
            return route_sigmoid_topk(logits, self.gate_bias, top_k=self.top_k)
        if self.routing == "deepseek_v3":
            return route_deepseek_v3(logits, self.gate_bias, top_k=self.top_k, n_group=c.n_group,
                                     topk_group=c.topk_group, norm=c.norm_topk_prob, scale=c.routed_scaling_factor)
        if self.routing == "deepseek_v2":
            return route_deepseek_v2(logits, top_k=self.top_k, method=c.topk_method, n_group=c.n_group,
                                     topk_group=c.topk_group, scale=c.routed_scaling_factor)
        return route_softmax_topk(logits, top_k=self.top_k, norm=renormalises(c))

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert output [T, H] on x's device, or None for blocks without one."""
        if hasattr(self, "shared_experts"):
            dev = _device_of(self.shared_experts, self.device)
            return self.shared_experts(x.to(dev)).to(x.device)
        if hasattr(self, "shared_expert"):
            dev = _device_of(self.shared_expert, self.device)
            xs = x.to(dev)
            gate = torch.sigmoid(self.shared_expert_gate(xs.to(_device_of(self.shared_expert_gate, dev))).to(dev))
            return (gate * self.shared_expert(xs)).to(x.device)
        return None

    def _routed_sync(self, x, idx, w) -> torch.Tensor:
        dev = _device_of(self.experts, x.device)
        return self.experts(x.to(dev), idx.to(dev), w.to(dev)).to(x.device, x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])                                          # [T, H]
        w, idx = self.route(x)
        flat = idx.reshape(-1)
        self.expert_counts.scatter_add_(0, flat, torch.ones_like(flat))   # no host sync: fine in a CUDA graph
        # NOTE: overlap only pays when the shared experts run on an accelerator; on the CPU they
        # would compete with the experts' thread pool for the same cores.
        if hasattr(self.experts, "submit") and x.device.type != "cpu":
            handle = self.experts.submit(x, idx, w)          # routed experts start on the CPU ...
            shared = self._shared(x)                          # ... while the GPU runs the shared ones
            routed = self.experts.sync(handle).to(x.device, x.dtype)
        else:
            routed, shared = self._routed_sync(x, idx, w), self._shared(x)
        out = routed if shared is None else routed + shared
        return self._output(out.view(shape), w)

    def forward_native(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = self._routed_sync(x, idx, w)
        shared = self._shared(x)
        return self._output((out if shared is None else out + shared).view(shape), w)

    def _output(self, out: torch.Tensor, w: torch.Tensor):
        """What the HF decoder layer takes from its MLP: the output, or (output, router scores)."""
        return (out, w) if self.returns_pair else out
