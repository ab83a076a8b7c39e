"""LoRA adapters trained on ``QuantLinear`` layers with PEFT.

PEFT dispatches LoRA only to layer types it knows (``nn.Linear``, bitsandbytes', GPTQModel's,
...); a packed layer is none of them, and ``get_peft_model`` failed on it. ``with_quant_linear``
registers ``QuantLoraLinear`` for ``QuantLinear`` through PEFT's custom-module mechanism
(``LoraConfig._register_custom_module``):

    from epmq.peft_lora import with_quant_linear

    config = with_quant_linear(LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(epmq.load_quantized(directory), config)

The base layer stays packed and frozen: ``y = QuantLinear(x) + B A x * scaling``, the adapters
trained in full precision (QLoRA's scheme on the gptq layout). A merge cannot keep the layer
packed without rounding the update away (most of ``B A`` is smaller than a grid step): the
merged layer is an ``nn.Linear`` of the dequantized weight plus the update, ``unmerge`` gives
the packed layer back exactly, and ``merge_and_unload`` leaves the model in full precision, to
be quantized again (``epmq.quantize_model``). Variants and initialisations that read or change
the base weight (DoRA, PiSSA, OLoRA, MiCA, LoftQ, CorDA, LoRA-GA) are refused: the packed layer
has no full-precision weight to give them (``SHAPE_ONLY_INITS``: those that need none).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft import LoraConfig
from peft.tuners import tuners_utils
from peft.tuners.lora import model as lora_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .qlinear import QuantLinear


# PEFT's string values of ``init_lora_weights`` that read nothing of the base layer but its shapes and dtype
SHAPE_ONLY_INITS = ("gaussian", "eva", "orthogonal")


class QuantLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` over a frozen ``QuantLinear``; see the module docstring."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # (a packed layer is nn.Linear's orientation, whatever a config written for GPT-2's Conv1D says)
        self.fan_in_fan_out = False

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        init = config.init_lora_weights
        # the initialisations that need only the layer's shapes and dtype (orthogonal leaves the base
        # weight untouched; EVA's comes from the inputs); the others take the base weight's SVD (PiSSA,
        # OLoRA, MiCA, CorDA), quantize it (LoftQ) or subtract B A from it (LoRA-GA, after its gradient)
        if isinstance(init, str) and init.lower() not in SHAPE_ONLY_INITS:
            raise ValueError(f"init_lora_weights={init!r} reads or changes the base weight, which a QuantLinear "
                             f"holds packed: use the default initialisation (True) or one of {SHAPE_ONLY_INITS}")
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"{type(variant).__name__} is not supported on a QuantLinear (it reads or changes the "
                             f"base weight, which is packed): plain LoRA only")
        return None

    def _get_in_out_features(self, module: nn.Module):
        # (PEFT's own reading warns of an unsupported layer type, "proceed at your own risk")
        if isinstance(module, QuantLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # (PEFT reads .weight first: a packed layer's is a PackedWeight, whose device and dtype are
        # the codes' and the layer's; asked of them, no read can dequantize it)
        if isinstance(base_layer, QuantLinear):
            return base_layer.qweight.device, base_layer.weight.dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        packed = self.get_base_layer()
        if isinstance(packed, QuantLinear):
            self._swap_base(_dense_copy(packed))
            object.__setattr__(self, "_packed_base", packed)  # (no submodule: not in state_dict while merged)
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            if not self.merged_adapters:  # (a failed safe merge: the packed layer again)
                self._restore_packed()

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        # the packed layer kept aside, exactly as it was, for every merged adapter at once
        self._restore_packed()
        self.merged_adapters.clear()

    def _restore_packed(self) -> None:
        packed = vars(self).pop("_packed_base", None)
        if packed is not None:
            self._swap_base(packed.to(self.get_base_layer().weight.device))  # (where the model was moved)

    def _swap_base(self, layer: nn.Module) -> None:
        owner = self
        while hasattr(owner.base_layer, "base_layer"):  # (nested tuner layers)
            owner = owner.base_layer
        owner.base_layer = layer


def _dense_copy(packed: QuantLinear) -> nn.Linear:
    """An ``nn.Linear`` computing what ``packed`` computes, frozen, in its dtype and on its device."""
    dtype, device = packed.weight.dtype, packed.qweight.device
    dense = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
    dense.weight = nn.Parameter(packed.dequantize(dtype).to(device), requires_grad=False)
    if packed.bias is not None:
        dense.bias = nn.Parameter(packed.bias.detach().to(dtype).clone(), requires_grad=False)
    return dense


# (PEFT's own, from where it is defined: the LoRA tuner's name for it is the one replaced, and read
# from there after a reload of this module (a notebook's autoreload) it was this module's own
# _device_map, which then called itself)
_peft_device_map = getattr(tuners_utils, "get_device_map", None)


def _device_map(model: nn.Module) -> dict:
    """PEFT's ``get_device_map``, for a model of packed layers alone too: PEFT places a new adapter by
    the model's first parameter (``next(model.parameters())``), and on a model whose weights are all
    packed (buffers) ``get_peft_model`` ended in a bare StopIteration; its codes' device then (a
    model of no tensors at all, torch's default device: PEFT then names the layer it cannot adapt)."""
    if hasattr(model, "hf_device_map") or next(model.parameters(), None) is not None:
        return _peft_device_map(model)
    held = next(model.buffers(), None)
    return {"": held.device if held is not None else torch.get_default_device()}


def with_quant_linear(config: LoraConfig) -> LoraConfig:
    """``config`` with LoRA on ``QuantLinear`` layers registered (PEFT's custom-module mechanism);
    returns it, for ``peft.get_peft_model(model, with_quant_linear(LoraConfig(...)))``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    if _peft_device_map is not None and hasattr(lora_model, "get_device_map"):  # (its LoRA tuner's own name)
        lora_model.get_device_map = _device_map
    return config


__all__ = ["QuantLoraLinear", "with_quant_linear"]
