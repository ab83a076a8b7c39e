"""Small helpers about modules, shared by the benches (and the demo)."""

from __future__ import annotations

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); the CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter; float32 if it has none."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32
