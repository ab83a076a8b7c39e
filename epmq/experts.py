"""Lazy, name-addressed access to an expert's tensors.

E-PMQ reads the weights of every expert at every layer, but never needs a whole expert at once:
the model walker asks for one block's tensors of one expert at a time. ``ExpertWeights`` wraps
an expert given as

* an ``nn.Module`` or a state dict (already in memory: tensors are handed out as they are),
* a checkpoint on disk: a HF ``save_pretrained`` directory (``model.safetensors``, or shards
  with ``model.safetensors.index.json``), a single ``.safetensors`` file, or an open_clip
  checkpoint (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` in a
  directory, or a ``.pt``/``.bin``/``.pth`` file, with or without a ``state_dict`` wrapper).

Safetensors files are opened with ``safe_open`` and read tensor by tensor; torch pickles are
memory-mapped (``torch.load(mmap=True)``), so pages are read only when a tensor is used.

Checkpoint names rarely match the model's exactly: a transformers 4 CLIP checkpoint has a
``vision_model.`` prefix that transformers 5 flattened away, an open_clip training checkpoint
has ``module.``, a full CLIP checkpoint holds the visual tower under ``visual.``. ``bind``
finds the one prefix rewrite (strip and/or add a prefix) under which most of the model's names
exist in the checkpoint, and tied tensors may be found under any of their aliases.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

_SHARD_INDEX = "model.safetensors.index.json"
_DIR_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _read_tensor(store, key: str) -> torch.Tensor:
    """The one place tensors leave a store (tests count what is alive through it)."""
    return store.get_tensor(key) if hasattr(store, "get_tensor") else store[key]


class ExpertWeights:
    """Tensors of one expert, read on demand by the model's tensor names."""

    def __init__(self, source, *, task: str = "expert"):
        self.task = task
        self._stores: dict[str, object] = {}  # store id -> safe_open handle or Mapping
        self._where: dict[str, str] = {}  # checkpoint key -> store id
        self.description = self._open(source)
        self._strip, self._add = "", ""
        self._aliases: dict[str, list[str]] = {}

    # ----------------------------------------------------------------- opening

    def _open(self, source) -> str:
        if isinstance(source, nn.Module):
            self._add_mapping("module", source.state_dict())
            return f"module {type(source).__name__}"
        if isinstance(source, Mapping):
            self._add_mapping("state dict", source)
            return "state dict"
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                return self._open_dir(path)
            if path.is_file():
                self._open_file(path)
                return str(path)
            raise FileNotFoundError(f"expert checkpoint of task {self.task!r} not found: {path}")
        raise TypeError(
            f"the expert of task {self.task!r} must be an nn.Module, a state dict or a checkpoint "
            f"path, got {type(source).__name__}"
        )

    def _open_dir(self, path: Path) -> str:
        index = path / _SHARD_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                self._open_file(path / shard)
            return str(path)
        for name in _DIR_FILES:
            if (path / name).is_file():
                self._open_file(path / name)
                return str(path / name)
        raise FileNotFoundError(
            f"no checkpoint for task {self.task!r} in {path}: expected {_SHARD_INDEX} or one of {_DIR_FILES}"
        )

    def _open_file(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt", device="cpu")
            self._stores[str(path)] = handle
            for key in handle.keys():
                self._where[key] = str(path)
        elif path.suffix in _PICKLE_SUFFIXES:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            for wrapper in ("state_dict", "model", "module"):
                if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
                    state = state[wrapper]
            self._add_mapping(str(path), {k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        else:
            raise ValueError(f"unknown checkpoint file type for task {self.task!r}: {path}")

    def _add_mapping(self, store_id: str, mapping: Mapping) -> None:
        self._stores[store_id] = mapping
        for key in mapping.keys():
            self._where[key] = store_id

    def close(self) -> None:
        self._stores.clear()
        self._where.clear()

    # ----------------------------------------------------------------- names

    def keys(self):
        return self._where.keys()

    def bind(self, model_names: Iterable[str], aliases: Optional[Mapping[str, list]] = None) -> None:
        """Choose the prefix rewrite from the model's names to this checkpoint's keys.

        ``model_names``: every tensor name of the model (in checkpoint naming); ``aliases``:
        for tied tensors, the other names the same tensor goes by.
        """
        names = list(model_names)
        self._aliases = dict(aliases or {})
        keys = set(self._where)
        probe = names[:16]
        candidates = {("", "")}
        for name in probe:  # strip a leading part of the model's names ...
            parts = name.split(".")
            candidates.update((".".join(parts[:j]) + ".", "") for j in range(1, len(parts)))
        for key in keys:  # ... or add the checkpoint's extra leading part
            candidates.update(("", key[: -len(n)]) for n in probe if key.endswith("." + n))

        def coverage(rewrite):
            strip, add = rewrite
            return sum(n.startswith(strip) and add + n[len(strip):] in keys for n in names)

        # max() keeps the first of equals: the identity goes first, so it wins ties (a full
        # CLIP checkpoint also holds names of the text tower unprefixed)
        ordered = [("", "")] + sorted(candidates - {("", "")})
        self._strip, self._add = max(ordered, key=coverage)

    def key_for(self, name: str) -> Optional[str]:
        """The checkpoint key holding the model tensor ``name`` (or one of its aliases)."""
        for candidate in [name, *self._aliases.get(name, ())]:
            if candidate.startswith(self._strip):
                key = self._add + candidate[len(self._strip):]
                if key in self._where:
                    return key
        return None

    def _require(self, name: str) -> str:
        key = self.key_for(name)
        if key is None:
            raise ValueError(
                f"the expert of task {self.task!r} ({self.description}) has no tensor {name!r}: "
                f"it must be a checkpoint of the merged model's architecture"
            )
        return key

    # ----------------------------------------------------------------- access

    def shape(self, name: str) -> tuple:
        key = self._require(name)
        store = self._stores[self._where[key]]
        if hasattr(store, "get_slice"):
            return tuple(store.get_slice(key).get_shape())
        return tuple(store[key].shape)

    def check(self, expected: Mapping[str, tuple]) -> None:
        """Every tensor ``name -> shape`` of ``expected`` exists here with that shape."""
        for name, shape in expected.items():
            got = self.shape(name)
            if tuple(got) != tuple(shape):
                raise ValueError(
                    f"the expert of task {self.task!r} ({self.description}): tensor {name!r} has "
                    f"shape {tuple(got)}, the merged model's has {tuple(shape)}; experts must "
                    f"share the merged model's architecture"
                )

    def read(self, name: str, *, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tensor ``name`` (a fresh read for files); ``like`` converts to its dtype and device."""
        key = self._require(name)
        tensor = _read_tensor(self._stores[self._where[key]], key)
        if like is not None:
            tensor = tensor.to(device=like.device, dtype=like.dtype)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"the expert of task {self.task!r} ({self.description}): tensor {name!r} has "
                f"non-finite values (NaN or inf)"
            )
        return tensor
