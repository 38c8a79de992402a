"""What each part of a model costs on each device, from the planner (nothing is loaded).

The model is planned twice with the architecture's shipped rule file — once as written (routed
experts on the CPU, the rest on the GPU) and once with every device mapped to the CPU — and the
KV cache is sized for both (ktrans.kv_cache.sizing). Operators' own `planned_bytes` give every
number, so whatever a rule would load is what is counted here; the placement decision
(ktrans.fit.placement) then works on these plain numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktrans.rules.matcher import layer_of

EXPERT_OPS = ("cpu_experts", "torch_experts", "hybrid_experts")


@dataclass(frozen=True)
class LayerBytes:
    index: int
    dense_gpu: int          # the layer without its routed experts on the GPU: attention, norms, router, MLPs
    dense_cpu: int          # the same on the CPU (where projections are dequantized to f32)
    kv_gpu: int             # this layer's KV cache on the GPU (bf16)
    kv_cpu: int             # ... on the CPU (f32)
    num_experts: int = 0    # routed experts (0: a dense layer)
    expert_cpu: int = 0     # one routed expert in the CPU kernels (one copy; NUMA replication multiplies)
    expert_gpu: int = 0     # one routed expert on the GPU (dequantized, as the GPU experts hold it)
    expert_stored: int = 0  # one routed expert as stored in the weight file (what a stream would copy)


@dataclass(frozen=True)
class ModelBytes:
    arch: str                       # ktrans architecture name (deepseek_v3, ...)
    layers: tuple[LayerBytes, ...]
    outer_gpu: int                  # outside the layers, placed on the GPU (final norm, lm_head)
    outer_cpu: int                  # outside the layers, on the CPU (the embedding table)
    outer_all_cpu: int              # outside the layers when everything runs on the CPU
    activations_gpu: int            # working memory of one prefill chunk on the GPU (estimate)
    top_k: int = 0                  # experts per token
    hidden_size: int = 0
    moe_intermediate: int = 0       # one expert's intermediate size (FLOPs of the prefill choice)

    def moe_layers(self) -> list[LayerBytes]:
        return [lb for lb in self.layers if lb.num_experts]

    def experts_cpu_total(self) -> int:
        return sum(lb.expert_cpu * lb.num_experts for lb in self.layers)


def activation_bytes(config, chunk_size: int) -> int:
    """GPU working memory of a prefill chunk: a few live [T, W] bf16 tensors, W the widest
    activation (hidden size, a dense MLP's gate+up, the attention heads' q/k/v), plus f32 logits of
    up to 64 rows. NOTE: an estimate with a factor of 8 live tensors; the fit adds a margin."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or 0) or (text.hidden_size // max(heads, 1))
    width = max(text.hidden_size, 2 * int(getattr(text, "intermediate_size", 0) or 0), 3 * heads * head_dim)
    return chunk_size * width * 2 * 8 + 64 * int(text.vocab_size) * 4


def _per_layer(entries, n_layers: int) -> tuple[list[int], int]:
    """(bytes per layer, bytes outside the layers) of plan entries, all devices together."""
    per = [0] * n_layers
    outer = 0
    for e in entries:
        layer = layer_of(e.path)
        if layer is None:
            outer += e.total_bytes
        else:
            per[layer] += e.total_bytes
    return per, outer


def _expert_bytes(model, entry, config, weights, gpu: str) -> tuple[int, int, int, int]:
    """(E, bytes of one expert in the CPU kernels, on the GPU, as stored) for a routed-experts entry."""
    from ktrans.operators.experts import CPUExperts, TorchExperts, expert_dims

    orig = model.get_submodule(entry.path)
    e, h, i = expert_dims(orig)
    kwargs = {k: v for k, v in entry.kwargs.items() if k in CPUExperts.accepted_kwargs()}
    cpu = CPUExperts.planned_bytes(key=entry.path, orig_module=orig, config=config, device=torch.device("cpu"),
                                   kwargs={**kwargs, "numa": "split", "numa_nodes": 1}, weights=weights)["cpu"]
    gpu_b = sum(TorchExperts.planned_bytes(key=entry.path, orig_module=orig, config=config,
                                           device=torch.device(gpu), kwargs={}, weights=weights).values())
    stored = 0
    for name in ("gate_up_proj", "down_proj"):
        full = f"{entry.path}.{name}"
        stored += weights.info(full).nbytes if weights is not None and weights.has(full) else 0
    return e, cpu // e, gpu_b // e, (stored // e) if stored else 2 * 3 * h * i


def model_bytes(config, weights, *, rules_path, cache_lens: int, page_size: int, chunk_size: int = 2048,
                gpu: str = "cuda:0", state_slots: int = 1):
    """(ModelBytes, the plan as the rules are written): `config` (tensor infos from `weights`, may
    be None or a PlannedSource) planned under `rules_path` (experts on the CPU, the rest on
    `gpu`) and on the CPU alone."""
    from ktrans.config.arch import arch_from_config, build_meta_model
    from ktrans.kv_cache.sizing import plan_kv_cache
    from ktrans.rules.plan import plan_model
    from ktrans.rules.schema import load_rules

    rules = load_rules(rules_path)
    model = build_meta_model(config)
    on_gpu = plan_model(model, rules, config=config, weights=weights, default_device=gpu, device_map={"cuda": gpu})
    on_cpu = plan_model(model, rules, config=config, weights=weights, default_device="cpu", device_map="cpu")
    n = config.num_hidden_layers
    experts = {layer_of(e.path): e for e in on_gpu.entries if e.op in EXPERT_OPS}
    dense_gpu, outer_all_gpu = _per_layer([e for e in on_gpu.entries if e.op not in EXPERT_OPS], n)
    dense_cpu, outer_all_cpu = _per_layer([e for e in on_cpu.entries if e.op not in EXPERT_OPS], n)
    outer_cpu = sum(e.nbytes.get("cpu", 0) for e in on_gpu.entries if layer_of(e.path) is None)
    # NOTE: each layer is given an equal share of the cache (KV pages and, in models with
    # linear-attention layers, the state rows of `state_slots` requests): the totals are exact,
    # a layer's own share is not where layers differ (sliding, linear).
    kv = dict(cache_lens=cache_lens, page_size=page_size, state_slots=state_slots)
    kv_gpu = sum(plan_kv_cache(on_gpu, **kv).nbytes.values()) // n
    kv_cpu = sum(plan_kv_cache(on_cpu, **kv).nbytes.values()) // n
    layers = []
    for i in range(n):
        ex = _expert_bytes(model, experts[i], config, weights, gpu) if i in experts else (0, 0, 0, 0)
        layers.append(LayerBytes(i, dense_gpu[i], dense_cpu[i], kv_gpu, kv_cpu, *ex))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    mb = ModelBytes(arch_from_config(config).name, tuple(layers), outer_all_gpu - outer_cpu, outer_cpu,
                      outer_all_cpu, activation_bytes(config, chunk_size),
                      top_k=int(getattr(text, "num_experts_per_tok", 0) or 0), hidden_size=text.hidden_size,
                      moe_intermediate=int(getattr(text, "moe_intermediate_size", 0)
                                           or getattr(text, "intermediate_size", 0) or 0))
    return mb, on_gpu
