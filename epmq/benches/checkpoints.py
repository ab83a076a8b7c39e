"""Checkpoints for the benches: find them (local path or HF hub) and load them into a model.

``resolve`` turns a config string into a local path: an existing file or directory (relative
to the config's directory), else, when the string looks like a hub id (``org/name``), a
``huggingface_hub.snapshot_download`` of the files a bench needs (configs, tokenizer files and
safetensors weights; torch ``.bin`` weights only when a repository has no safetensors).

Reading them lazily and binding them to a model's names is ``epmq.checkpoint_io``'s
(``open_state``, ``bind``, ``LazyStateDict``); the benches pass ``error=BenchConfigError`` so
that a bad checkpoint is reported as a bad configuration. ``load_into`` copies a (lazy) state
dict into a model tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..checkpoint_io import CheckpointError, hub_snapshot, looks_like_hub_id, not_fetched
from .config import BenchConfigError


def resolve(source: str, *, base_dir, what: str, kind: str = "model", revision: Optional[str] = None,
            cache_dir: Optional[str] = None, offline: bool = False) -> Path:
    """A local path for ``source`` (see the module docstring); ``kind``: model | weights | tokenizer."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.exists():
        return path
    if not looks_like_hub_id(source):
        raise BenchConfigError(f"{what}: no such file or directory: {path}")
    try:
        return hub_snapshot(source, kind=kind, revision=revision, cache_dir=cache_dir, offline=offline)
    except CheckpointError as e:
        raise BenchConfigError(f"{what}: {not_fetched(path, source, e)}") from e


@torch.no_grad()
def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "state") -> nn.Module:
    """Copy ``state`` into ``model`` tensor by tensor (strict: same names and shapes; integer
    values are not taken for a floating-point tensor: they are a quantized checkpoint's codes, a
    bitsandbytes int8 ``weight``, which a cast would turn into wrong weights silently)."""
    own = model.state_dict()
    state_keys = set(state.keys())
    missing = [k for k in own if k not in state_keys]
    extra = sorted(state_keys - set(own))
    if missing or extra:
        raise ValueError(f"{what} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, target in own.items():
        t = state[name]
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(t.shape)}, the model's is {tuple(target.shape)}"
            )
        if target.is_floating_point() and not (t.is_floating_point() or t.is_complex()):
            raise ValueError(
                f"{what}: tensor {name!r} is stored as {t.dtype}, the model's as {target.dtype}: is it "
                f"a quantized checkpoint? Give full-precision checkpoints of the model's architecture"
            )
        target.copy_(t)
    return model
