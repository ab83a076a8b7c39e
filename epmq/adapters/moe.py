"""Mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE).

transformers 5 keeps a block's experts in two 3-D parameters, ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, and runs them in a routing loop. ``LinearExperts`` is the same module
with one small MLP of ``nn.Linear`` per expert, named as the checkpoints on the hub (and
``save_pretrained``) store them (``experts.{e}.gate_proj``, Mixtral ``experts.{e}.w1``), so each
expert's projections are quantized, saved and served like any linear. Each takes only the
tokens routed to it: its statistics are those of its own tokens, and an expert no calibration
token reached is rounded to nearest (the walker warns).

The walker solves the experts of a block in two stages (``MoEAdapter.stage``): every expert's
gate and up projections, which read the block's routed hidden states, then every down
projection; not one group per expert, which would cost a calibration pass per expert.
"""

from __future__ import annotations

import torch
from torch import nn

from . import Adapter, Part

# Per experts class: the names of an expert's (gate, up, down) projections in checkpoints.
PROJECTION_NAMES = {"MixtralExperts": ("w1", "w3", "w2")}
DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


class _Expert(nn.Module):
    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, names):
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)

    def projections(self):
        return tuple(getattr(self, name) for name in self.names)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``weight`` itself, a view of the fused parameter: the
    walker keeps the fused module (to restore it if quantization fails), so a copy would hold
    every expert twice."""
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return linear


class LinearExperts(nn.Module):
    """Fused experts as ``nn.Linear`` per expert (children ``"0"``, ``"1"``, ...); the fused
    module's routing loop, unchanged."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        names = PROJECTION_NAMES.get(type(fused).__name__, DEFAULT_NAMES)
        gate_up, down = fused.gate_up_proj, fused.down_proj
        inner = gate_up.shape[1] // 2
        self.num_experts = gate_up.shape[0]
        for e in range(self.num_experts):
            self.add_module(str(e), _Expert(_linear(gate_up[e, :inner]), _linear(gate_up[e, inner:]),
                                            _linear(down[e]), names))
        self.act_fn = fused.act_fn
        self.train(fused.training)

    def __getitem__(self, e: int) -> _Expert:
        return getattr(self, str(e))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        n = self.num_experts
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == n:
                continue
            position, token = torch.where(mask[e])
            gate, up, down = self[e].projections()
            x = hidden_states[token]
            y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3)


class MoEAdapter(Adapter):
    """Decoder layers whose MLP routes tokens to fused experts (rebuilt as ``LinearExperts``)."""

    routes_tokens = True

    def prepare(self, model, swap):
        renames = {}
        for name, module in list(self.block_modules(model)):
            if not _is_fused_experts(module):
                continue
            experts = LinearExperts(module)
            swap(name, experts)
            shape_gate_up, shape_down = tuple(module.gate_up_proj.shape), tuple(module.down_proj.shape)
            inner = shape_gate_up[1] // 2
            for e in range(experts.num_experts):
                gate, up, down = (f"{name}.{e}.{n}.weight" for n in experts[e].names)
                renames[gate] = Part(gate, f"{name}.gate_up_proj", e, (0, inner), shape_gate_up)
                renames[up] = Part(up, f"{name}.gate_up_proj", e, (inner, 2 * inner), shape_gate_up)
                renames[down] = Part(down, f"{name}.down_proj", e, None, shape_down)
        return renames

    def stage(self, block: nn.Module, rel: str):
        """Experts' projections: ``"<experts>.in"`` for gate and up, ``"<experts>.out"`` for down."""
        parent, _, projection = rel.rpartition(".")
        expert = block.get_submodule(parent) if parent else None
        if not isinstance(expert, _Expert):
            return None
        experts = parent.rpartition(".")[0]
        return f"{experts}.{'out' if projection == expert.names[2] else 'in'}"

    def module_alias(self, model, name):
        """An expert's projection under the other naming: GPTQModel writes Mixtral's w1, w3, w2
        as gate_proj, up_proj, down_proj."""
        parent, _, projection = name.rpartition(".")
        try:
            expert = model.get_submodule(parent)
        except AttributeError:
            return None
        if not isinstance(expert, _Expert):
            return None
        for default, own in zip(DEFAULT_NAMES, expert.names):
            if projection in (default, own):
                return f"{parent}.{own}"
        return None


MOE_DECODERS = MoEAdapter("hf-moe-decoder", block_types=(
    "Qwen2MoeDecoderLayer", "Qwen3MoeDecoderLayer", "MixtralDecoderLayer", "OlmoeDecoderLayer",
    "PhimoeDecoderLayer", "GraniteMoeDecoderLayer", "DeepseekV2DecoderLayer", "DeepseekV3DecoderLayer",
    "JambaAttentionDecoderLayer", "JambaMambaDecoderLayer",
))
