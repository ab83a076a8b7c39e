"""Checkpoints for the benches: find them (local path or HF hub) and read them lazily.

``resolve`` turns a config string into a local path: an existing file or directory (relative
to the config's directory), else, when the string looks like a hub id (``org/name``), a
``huggingface_hub.snapshot_download`` of the files a bench needs (configs, tokenizer files and
safetensors weights; torch ``.bin`` weights only when a repository has no safetensors).

``LazyStateDict`` is a ``Mapping`` name -> tensor in the *model's* naming over a checkpoint on
disk: safetensors files (single or sharded with an index) are opened with ``safe_open`` and a
tensor is read when it is indexed, so merging tensor by tensor holds one tensor per expert;
torch pickles are memory-mapped. ``bind`` finds the leading part the checkpoint adds to the
model's names (``vision_model.`` of a transformers-4 CLIPVisionModel checkpoint, ``visual.`` of
a full open_clip checkpoint, ``module.`` of a DDP training checkpoint) and resolves tied tensors
(T5's shared embedding and its aliases) the way ``from_pretrained`` does: every alias of a
tied parameter reads the same checkpoint tensor.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .config import BenchConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WEIGHT_FILES = (  # in order of preference, inside a directory
    "model.safetensors.index.json",
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
_DOWNLOAD = {  # what a bench needs of a hub repository
    "model": ["*.json", "*.txt", "*.model", "*.safetensors"],
    "weights": ["*.json", "*.safetensors"],
    "tokenizer": ["*.json", "*.txt", "*.model"],
}


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith(".") and not source.endswith(
        (".safetensors",) + _PICKLE_SUFFIXES
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


def weights_in(directory: Path) -> Optional[Path]:
    """The weights file (or shard index) of a checkpoint directory, or None."""
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------- reading


class CheckpointReader:
    """Every tensor of a checkpoint (file, directory or shard index) by its own key, read on demand."""

    def __init__(self, path, what: str = "checkpoint"):
        path = Path(path)
        self.what = what
        self.path = path
        if path.is_dir():
            found = weights_in(path)
            if found is None:
                raise BenchConfigError(
                    f"{what}: no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)} "
                    f"or a single *.safetensors"
                )
            path = found
        if not path.is_file():
            raise BenchConfigError(f"{what}: no such file: {path}")
        self._files: Dict[str, Path] = {}  # key -> file
        self._handles: dict = {}  # file -> safe_open handle or dict of tensors
        if path.name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            for key, shard in weight_map.items():
                self._files[key] = path.parent / shard
            missing = sorted({str(f) for f in self._files.values() if not f.is_file()})
            if missing:
                raise BenchConfigError(f"{what}: shard(s) listed in {path.name} are missing: {missing[:3]}")
        elif path.suffix == ".safetensors":
            for key in self._open(path).keys():
                self._files[key] = path
        elif path.suffix in _PICKLE_SUFFIXES:
            for key in self._open(path).keys():
                self._files[key] = path
        else:
            raise BenchConfigError(f"{what}: unknown checkpoint file type {path.suffix!r}: {path}")

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(str(file), framework="pt", device="cpu")
            else:
                try:
                    state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    raise BenchConfigError(f"{self.what}: cannot read {file}: {type(e).__name__}: {e}") from e
                for wrapper in ("state_dict", "model", "module"):
                    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
                        state = state[wrapper]
                if not isinstance(state, Mapping):
                    raise BenchConfigError(f"{self.what}: {file} does not hold a state dict")
                handle = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            self._handles[file] = handle
        return handle

    def keys(self):
        return self._files.keys()

    def __contains__(self, key) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple:
        handle = self._open(self._files[key])
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)

    def get(self, key: str) -> torch.Tensor:
        handle = self._open(self._files[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


def tie_order(model: nn.Module) -> Dict[str, List[str]]:
    """For every state-dict name of ``model``, the names to look for in a checkpoint, in order.

    Aliases of one tied parameter all get the same list (the first name first, as
    ``named_parameters`` lists them), so they read the same tensor; an untied parameter that
    transformers would tie by default (``_tied_weights_keys``) falls back to its source."""
    groups = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    order = {name: [name] for name in model.state_dict().keys()}
    for names in groups.values():
        for name in names:
            order[name] = list(names)
    hints = getattr(model, "_tied_weights_keys", None)
    if isinstance(hints, Mapping):
        for target, source in hints.items():
            if isinstance(source, str) and order.get(target) == [target] and source in order:
                order[target] = [target, source]
    return order


class LazyStateDict(Mapping):
    """A state dict in the model's naming whose tensors are read from a checkpoint when indexed."""

    def __init__(self, reader: CheckpointReader, keys: Dict[str, str], *, dtype: Optional[torch.dtype] = None,
                 description: str = ""):
        self.reader = reader
        self._keys = dict(keys)  # model name -> checkpoint key
        self.dtype = dtype
        self.description = description or str(reader.path)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.reader.get(self._keys[name])
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name) -> bool:
        return name in self._keys

    def checkpoint_key(self, name: str) -> str:
        return self._keys[name]

    def __repr__(self):
        return f"LazyStateDict({len(self)} tensors from {self.description})"


def bind(reader: CheckpointReader, order: Mapping[str, Sequence[str]], *, what: str,
         shapes: Optional[Mapping[str, tuple]] = None, dtype: Optional[torch.dtype] = None,
         prefixes: Iterable[str] = ()) -> LazyStateDict:
    """A ``LazyStateDict`` with the model's names (the keys of ``order``, see ``tie_order``).

    The checkpoint may add one leading part to every name (found from its keys; ``prefixes``
    are tried too). Raises ``BenchConfigError`` for tensors the checkpoint lacks or whose
    shape differs from ``shapes`` (the model's)."""
    names = list(order)
    keys = set(reader.keys())
    candidates = {""} | set(prefixes)
    probe = sorted(names, key=len, reverse=True)[:8]  # long names: unlikely to end other keys by chance
    for key in keys:
        for n in probe:
            if key.endswith("." + n):
                candidates.add(key[: -len(n)])

    def resolve(name, add):
        for alias in order[name]:
            if add + alias in keys:
                return add + alias
        return None

    def coverage(add):
        return sum(resolve(n, add) is not None for n in names)

    add = max(sorted(candidates), key=lambda a: (coverage(a), a == ""))
    mapping, missing = {}, []
    for n in names:
        key = resolve(n, add)
        if key is None:
            missing.append(n)
        else:
            mapping[n] = key
    if missing:
        raise BenchConfigError(
            f"{what} ({reader.path}) lacks {len(missing)} of the model's {len(names)} tensors, e.g. "
            f"{missing[:4]}: is it a checkpoint of this architecture?"
        )
    if shapes is not None:
        for n, key in mapping.items():
            got, want = reader.shape(key), tuple(shapes[n])
            if tuple(got) != want:
                raise BenchConfigError(
                    f"{what} ({reader.path}): tensor {n!r} has shape {tuple(got)}, the model's is {want}: "
                    f"is it a checkpoint of this architecture?"
                )
    return LazyStateDict(reader, mapping, dtype=dtype, description=f"{what} at {reader.path}")


def open_state(path, model: nn.Module, *, what: str, dtype: Optional[torch.dtype] = None,
               prefixes: Iterable[str] = ()) -> LazyStateDict:
    """``bind`` a checkpoint at ``path`` to ``model``'s state-dict names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return bind(CheckpointReader(path, what), tie_order(model), what=what, shapes=shapes, dtype=dtype,
                prefixes=prefixes)


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
