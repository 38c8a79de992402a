"""A toy module tree and toy operators for testing the rule mechanics without real models.

The tree mimics a decoder (`model.embed`, `model.layers.N.{attn,mlp.{up,down},norm}`,
`lm_head`) so layer ranges and regexes behave as on HF models. The operators are real
`Operator` subclasses registered under `toy_*` names: `toy_linear` computes a scaled linear
from weights it loads itself, `toy_mlp` wraps an MLP and keeps its children for rules to place,
`toy_lazy` forgets to load its weights (to test the meta-tensor check).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ktrans.operators import Operator, register_operator

HIDDEN, INTER, VOCAB = 8, 16, 32


class ToyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(HIDDEN, INTER)
        self.down = torch.nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class ToyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.mlp = ToyMLP()
        self.norm = torch.nn.LayerNorm(HIDDEN)

    def forward(self, x):
        x = x + self.attn(x)
        return self.norm(x + self.mlp(x))


class ToyModel(torch.nn.Module):
    def __init__(self, num_layers: int = 4):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=num_layers)
        self.model = torch.nn.Module()
        self.model.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = torch.nn.ModuleList(ToyBlock() for _ in range(num_layers))
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        x = self.model.embed(ids)
        for layer in self.model.layers:
            x = layer(x.to(_device_of(layer, x.device)))
        return self.lm_head(x.to(_device_of(self.lm_head, x.device)))


def _device_of(module, default):
    for t in module.parameters():
        return t.device
    return default


def meta_toy(num_layers: int = 4) -> ToyModel:
    with torch.device("meta"):
        return ToyModel(num_layers)


@register_operator("toy_linear")
class ToyLinear(Operator):
    """scale * (x @ W.T + b), weights read by parameter name."""

    def __init__(self, *, key, orig_module, config, device, scale: float = 1.0, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self.scale = float(scale)
        self.has_bias = orig_module.bias is not None
        self.weight = torch.nn.Parameter(torch.empty_like(orig_module.weight), requires_grad=False)

    def load_weights(self, weights) -> None:
        self.weight = torch.nn.Parameter(weights.tensor(f"{self.key}.weight", device=self.device), requires_grad=False)
        self.bias = None
        if self.has_bias:
            self.bias = torch.nn.Parameter(weights.tensor(f"{self.key}.bias", device=self.device), requires_grad=False)

    def forward(self, x):
        return self.scale * F.linear(x.to(self.device), self.weight, self.bias)

    forward_native = forward


@register_operator("toy_mlp")
class ToyMLPOp(Operator):
    """Runs the MLP's (possibly replaced) children; records what they were when it was built."""

    def __init__(self, *, key, orig_module, config, device, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self.up, self.down = orig_module.up, orig_module.down
        self.children_at_build = (type(self.up).__name__, type(self.down).__name__)

    def load_weights(self, weights) -> None:
        """Nothing of its own: the children are placed and loaded by their own rules."""

    @classmethod
    def planned_bytes(cls, **_) -> dict[str, int]:
        return {}

    def forward(self, x):
        return self.down(F.silu(self.up(x)))

    forward_native = forward


@register_operator("toy_lazy")
class ToyLazy(Operator):
    """Keeps a meta weight and never loads it."""

    def __init__(self, *, key, orig_module, config, device, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self.weight = torch.nn.Parameter(torch.empty_like(orig_module.weight), requires_grad=False)

    def load_weights(self, weights) -> None:
        pass
