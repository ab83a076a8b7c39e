"""The benchmark's model: a small CLIP vision encoder and frozen per-task class heads.

The encoder is a ``transformers.CLIPVisionModel`` (8x8 RGB images, 2x2 patches, so 16 patch
tokens and the class token; width 64, MLP 256, 4 layers, 4 heads: 0.2 M parameters, 24 block
linears). It is the only part that is pretrained, fine-tuned, merged and quantized. A task's
logits are

    logits_k(x) = logit_scale * normalize(pooled(x)) @ P_k^T

``pooled`` is the encoder's pooled output (post-layer-norm class token), ``P_k [C_k, d]`` the
task's frozen head: its class prototypes, computed once from the *base* encoder on the task's
training images (the mean of the normalized features of each class, centered on the mean of
the class means, normalized). This plays the part of CLIP's zero-shot text heads: built from
the pretrained model alone, frozen, shared by the base, the experts and every merged or
quantized model. Centering removes the component every class shares, so that the heads of a
task the base barely understands still point in distinct directions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 8
    patch_size: int = 2
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # CLIP's init scale, twice the usual: measured on this benchmark, per-channel 3-bit RTN of
    # the merged model costs ~2 points at 1 and ~15 at 2 (4 bits: ~0 and ~3), while base,
    # experts and merges stay alike. A benchmark where quantization barely hurts says nothing.
    initializer_factor: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)


def clip_config(cfg: ModelConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        attention_dropout=0.0,
        hidden_act="quick_gelu",
        initializer_factor=cfg.initializer_factor,
    )


def build_encoder(cfg: ModelConfig, state_dict=None, seed: int | None = None) -> nn.Module:
    """A ``CLIPVisionModel`` of ``cfg`` in eval mode, with ``state_dict`` loaded if given
    (else a fresh initialisation, seeded when ``seed`` is given)."""
    from transformers import CLIPVisionModel

    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModel(clip_config(cfg))
    else:
        model = CLIPVisionModel(clip_config(cfg))
    if state_dict is not None:
        model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


def pooled(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The encoder's pooled output ``[N, d]`` (works for any module with the same call)."""
    out = encoder(pixel_values=pixel_values)
    return out.pooler_output if hasattr(out, "pooler_output") else out[1]


def features(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm image features ``[N, d]``."""
    return F.normalize(pooled(encoder, pixel_values), dim=-1)


def logits(encoder: nn.Module, head: torch.Tensor, pixel_values: torch.Tensor, logit_scale=LOGIT_SCALE):
    """Task logits ``[N, C]`` with the frozen head ``[C, d]``."""
    return logit_scale * features(encoder, pixel_values) @ head.t().to(pixel_values.dtype)


@torch.no_grad()
def class_prototypes(feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The head ``[C, d]`` from unit features of one task's training images (see the module
    docstring): per-class means, centered on their mean, normalized."""
    means = torch.stack([feats[labels == c].mean(0) for c in range(n_classes)])
    if torch.isnan(means).any():
        missing = [c for c in range(n_classes) if not (labels == c).any()]
        raise ValueError(f"classes {missing} have no training image: cannot build the head")
    return F.normalize(means - means.mean(0, keepdim=True), dim=-1)


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Unit features of ``x`` in batches (no gradient)."""
    return torch.cat([features(encoder, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def find_blocks(model: nn.Module) -> Tuple[str, List[nn.Module]]:
    """The transformer blocks: the longest ``nn.ModuleList`` whose items are all of one class
    and contain ``nn.Linear`` layers. Returns ``(qualified name, blocks)``; found by structure,
    not by a path (transformers 5 flattened ``CLIPVisionModel``)."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not any(isinstance(s, nn.Linear) for s in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, list(module))
    if best is None:
        raise ValueError("no list of transformer blocks with linear layers found in the model")
    return best


def block_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` inside the transformer blocks, as ``(qualified name, module)`` in
    block order (the layers the model walker quantizes)."""
    prefix, _ = find_blocks(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith(prefix + ".")
    ]
