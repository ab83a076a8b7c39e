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

import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..checkpoint_io import PICKLE_SUFFIXES, weights_in
from .config import BenchConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DOWNLOAD = {  # what a bench needs of a hub repository
    "model": ["*.json", "*.txt", "*.model", "*.safetensors"],
    "weights": ["*.json", "*.safetensors"],
    "tokenizer": ["*.json", "*.txt", "*.model"],
}


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith(".") and not source.endswith(
        (".safetensors",) + PICKLE_SUFFIXES
    )


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
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise BenchConfigError(f"{what}: {path} does not exist and huggingface_hub is not installed") from e
    kwargs = dict(repo_id=source, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    try:
        local = Path(snapshot_download(allow_patterns=_DOWNLOAD[kind], **kwargs))
        if kind != "tokenizer" and weights_in(local) is None:  # an older repository: torch weights
            local = Path(snapshot_download(allow_patterns=["*.json", "*.bin"], **kwargs))
    except Exception as e:  # offline, unknown repository, gated, ...
        raise BenchConfigError(
            f"{what}: {source!r} is not a local path (looked for {path}) and could not be fetched from the "
            f"HF hub{' (offline: cache only)' if offline else ''}: {type(e).__name__}: {e}"
        ) from e
    return local


@torch.no_grad()
def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "state") -> nn.Module:
    """Copy ``state`` into ``model`` tensor by tensor (strict: same names and shapes)."""
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
        target.copy_(t)
    return model
