"""Full-precision checkpoints read lazily, tensor by tensor, and bound to a model's names.

The model walker reads every expert one block at a time, and the benches merge experts tensor
by tensor; neither ever needs a whole checkpoint in memory. ``CheckpointReader`` holds every
tensor of a checkpoint by its own key and reads one when asked:

* a HF ``save_pretrained`` directory or an open_clip ``local-dir`` (the weights file is found
  by ``weights_in``), a shard index (``*.index.json``), a ``.safetensors`` file, or a torch
  pickle (``.pt``/``.pth``/``.bin``/``.ckpt``, with or without a ``state_dict`` / ``model`` /
  ``module`` wrapper);
* tensors already in memory: a state dict (any ``Mapping``, lazy ones included) or an
  ``nn.Module``;
* a PEFT LoRA adapter directory: the whole expert, base plus updates (``epmq.lora``).

Safetensors files are opened with ``safe_open`` and read tensor by tensor; torch pickles are
memory-mapped (``torch.load(mmap=True)``), so pages are read only when a tensor is used (one in
the legacy, pre-1.6 format, which torch cannot map, has its tensors' bytes copied out of the
mapped file when each is read: ``_LegacyPickle``); an index's safetensors shards are opened at
once (their headers list what they hold, as transformers reads it, listed in the index or not),
its torch pickles when one of their tensors is first asked for. Every tensor leaves
a store through ``_read_tensor`` (tests count what is alive through it).

Checkpoint names rarely match the model's exactly: a transformers 4 CLIP checkpoint has a
``vision_model.`` prefix that transformers 5 flattened away, an open_clip training checkpoint
has ``module.``, a full CLIP checkpoint holds the visual tower under ``visual.``. ``Binding``
finds the one prefix rewrite (strip a leading part of the model's names, or add the
checkpoint's) under which most of the model's names exist in the checkpoint, and looks a tied
tensor up under each of its aliases in turn (``tie_order``: the way ``from_pretrained`` ties
them, every alias of a tied parameter reads the same checkpoint tensor). transformers 5 also
renamed some models' modules (ViT, DINOv2: ``encoder.layer.N.attention.attention.query`` became
``layers.N.attention.q_proj``) and still saves and hub-hosts their checkpoints in the old
naming, converting as it loads: ``key_renaming`` gives that model's renaming rules, and a
``Binding`` made with them finds a key under its renamed name too (and ``saved_key_renaming``,
their reverse, lets ``save_quantized`` write the layout ``save_pretrained`` writes). ``bind``
turns a reader into a ``LazyStateDict``: a state dict in the model's naming whose tensors are
read when indexed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ._util import read_json_file
from .lora import LoraExpert, is_lora_adapter

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_FILES = (  # in order of preference, inside a directory (transformers': a single file first)
    "model.safetensors",
    "model.safetensors.index.json",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
)
# what training scripts wrap a state dict in (Lightning and timm; the PyTorch tutorials' form)
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


_AVERAGED = re.compile(r"ema|swa|averaged", re.IGNORECASE)  # (keys naming an averaged copy)


def _second_copy(state: Mapping, wrapper: str) -> Optional[str]:
    """The key beside ``state[wrapper]`` holding an averaged copy of its tensors (timm's
    ``state_dict_ema``, a ``model_ema``, an SWA model: the same names, under a key that says
    so), or None. (Other tensors of the same names beside it are parts of the model, such as
    DeepSpeed's ``frozen_param_fragments``.)"""
    names = {k for k, v in state[wrapper].items() if isinstance(v, torch.Tensor)}
    return next((key for key, other in state.items() if key != wrapper and isinstance(other, Mapping)
                 and _AVERAGED.search(str(key)) and any(isinstance(other.get(n), torch.Tensor) for n in names)), None)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is bound to."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_FILES = {  # what is fetched of a hub repository, by what it is needed for
    # (a tokenizer's chat templates: transformers 5 saves them as chat_template.jinja and
    # additional_chat_templates/*.jinja, not in tokenizer_config.json)
    "model": ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"],
    "weights": ["*.json", "*.safetensors"],
    "tokenizer": ["*.json", "*.txt", "*.model", "*.jinja"],
}


def looks_like_hub_id(source: str) -> bool:
    """``org/name``, and not a relative path or a weights file name."""
    return bool(_HUB_ID.match(source)) and not source.startswith(".") and not source.endswith(
        (".safetensors",) + PICKLE_SUFFIXES
    )


def hub_reference(source: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(repo id, revision)`` of an HF hub reference ``org/name`` or ``org/name@revision``
    (mergekit's form of a pinned branch, tag or commit; revision None: main), else None."""
    repo_id, at, revision = source.partition("@")
    if not looks_like_hub_id(repo_id) or (at and (not revision or "@" in revision)):
        return None
    return repo_id, revision or None


def hub_snapshot(repo_id: str, *, kind: str = "weights", revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, offline: bool = False) -> Path:
    """The local directory of HF hub repository ``repo_id``: a ``snapshot_download`` of the files
    ``kind`` needs (HUB_FILES; torch ``.bin`` weights only when the repository has no
    safetensors). ``offline``: the local cache only. Raises CheckpointError, saying why."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise CheckpointError(f"{repo_id!r} is not a local path and huggingface_hub is not installed") from e
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    try:
        patterns = HUB_FILES[kind]
        if "*.safetensors" in patterns:
            # the JSON files first: where a shard index lists the weights, only its shards (and a
            # single file) are fetched: Mistral's repositories also hold consolidated.safetensors,
            # the same weights again in another layout, which would double the download and disk
            others = [p for p in patterns if p != "*.safetensors"]
            index = Path(snapshot_download(allow_patterns=others, **kwargs)) / "model.safetensors.index.json"
            if index.is_file():
                patterns = others + ["model.safetensors"] + sorted(set(shard_weight_map(index).values()))
        local = Path(snapshot_download(allow_patterns=patterns, **kwargs))
        weights = None if kind == "tokenizer" else weights_in(local)
        # an older repository: torch weights (its shard index, pytorch_model.bin.index.json, came
        # with the JSON files above, but not the .bin shards it lists)
        if kind != "tokenizer" and (weights is None or weights.name.endswith(".bin.index.json")):
            local = Path(snapshot_download(allow_patterns=["*.json", "*.bin"], **kwargs))
    except Exception as e:  # offline, unknown repository, gated, ...
        reason = hub_failure(e, offline, cache_dir)
        failure = CheckpointError(
            f"{repo_id!r}{f' at revision {revision!r}' if revision else ''} could not be fetched from the HF hub: "
            f"{reason}")
        failure.reason = reason  # (not_fetched words a mistyped folder with it)
        raise failure from e
    return local


def hub_failure(error: Exception, offline: bool = False, cache_dir: Optional[str] = None) -> str:
    """Why ``snapshot_download`` failed, in one line with the one piece of advice that fits. The
    hub library's messages run to lines of advice for its Python callers ('pass
    local_files_only=False', 'please check your internet connection and try again') that, printed
    after epmq's, said the failure twice and named settings a command's user has not got."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    def first_line(e: BaseException) -> str:
        line = next(iter(str(e).strip().splitlines()), "")
        return f"{type(e).__name__}: {line}" if line else type(e).__name__

    # (the subclasses first: a gated repository is a RepositoryNotFoundError too)
    if isinstance(error, GatedRepoError):
        return "the repository is gated: accept its terms on its hub page, then log in (hf auth login)"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository on the hub (if it is private, log in: hf auth login)"
    if isinstance(error, RevisionNotFoundError):
        return "the repository has no such revision"
    if not isinstance(error, LocalEntryNotFoundError):
        return first_line(error)
    # (a snapshot in the cache in part is said as none: it is fetched whole)
    cached = f"the hub cache {cache_dir or constants.HF_HUB_CACHE} holds no complete snapshot of it"
    if offline:
        return f"offline (cache only), and {cached}"
    if constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set, and {cached}: unset it to download"
    return f"the hub could not be reached ({first_line(error.__cause__ or error)}), and {cached}"


# dtypes by the names configs and config.json give them
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def not_fetched(path: Path, repo_id: str, error: CheckpointError) -> str:
    """What to say of ``path``, no local path, that the hub could not give as ``repo_id`` either
    (``error``, hub_snapshot's). An org/name whose org is a folder here is a local folder mistyped,
    far likelier than a hub repository, and was said as the hub's failure, its lines of advice on
    the connection: it is said to be no folder there, naming those it holds, and why the hub could
    not give it (hub_failure's line)."""
    if not path.parent.is_dir():
        return f"no local path {path.absolute()}, and {error}"
    why = getattr(error, "reason", None) or str(error)
    held = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
    listed = ", ".join(held[:10]) + (", ..." if len(held) > 10 else "")
    return (f"no folder {path.absolute()}: {path.parent} holds no {path.name!r}"
            f"{f' (its folders: {listed})' if held else ''}, and {repo_id!r} is no HF hub repository that "
            f"could be fetched either: {why}")


def local_checkpoint(source, *, directory: bool = False, revision: Optional[str] = None) -> Path:
    """``source`` on disk, or the HF hub snapshot (weights, config, tokenizer) of an ``org/name``
    that is not a local path; ``directory``: it must be a directory. ``revision``: the hub
    revision (branch, tag or commit) of an ``org/name`` (default: main; ``org/name@revision``
    names its own); a local path has none."""
    path = Path(source)
    reference = None if path.exists() else hub_reference(str(source))
    if reference is not None:
        repo_id, pinned = reference
        try:
            return hub_snapshot(repo_id, kind="model", revision=pinned or revision)
        except CheckpointError as e:
            raise FileNotFoundError(not_fetched(path, repo_id, e)) from e
    if directory and path.is_file():
        raise FileNotFoundError(f"{source} is a file, not a checkpoint directory: give the directory "
                                f"that holds it and its config")
    if not (path.is_dir() if directory else path.exists()):
        raise FileNotFoundError(f"no checkpoint {'directory ' if directory else ''}at {source} "
                                f"(nor an HF hub id)")
    return path


def json_files(source, *, revision: Optional[str] = None) -> Path:
    """The directory of ``source``: itself, or for an HF hub reference the snapshot of its JSON
    files (config and tokenizer) at its revision (``org/name@revision``'s, else ``revision``),
    fetched (CheckpointError where it cannot be, a mistyped local folder said as one: not_fetched);
    a path that is neither is returned as it is."""
    path = Path(source)
    reference = None if path.exists() else hub_reference(str(source))
    if reference is not None:
        try:
            return hub_snapshot(reference[0], kind="tokenizer", revision=reference[1] or revision)
        except CheckpointError as e:
            raise CheckpointError(not_fetched(path, reference[0], e)) from e
    return path


def local_checkpoint_or_none(source, *, directory: bool = False, revision: Optional[str] = None) -> Optional[Path]:
    """``local_checkpoint(source, ...)``, or None where ``source`` is no path or hub id, or is not
    found (what reads it says why)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return local_checkpoint(source, directory=directory, revision=revision)
    except (OSError, ValueError):
        return None


def weights_in(directory: Path) -> Optional[Path]:
    """The weights file (or shard index) of a checkpoint directory, or None."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    return found[0] if len(found) == 1 else None


def shard_weight_map(index: Path) -> dict:
    """The ``weight_map`` (tensor name -> shard file) of the shard index ``index``; a ValueError
    naming the file where it holds none (cut short by an interrupted download, or hand-edited)."""
    content = read_json_file(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index} has no weight_map (tensor name -> shard file)")
    # the index comes with the checkpoint (a hub repository, a downloaded folder): a shard it names
    # must be a file of the checkpoint's directory, not "../x.safetensors" or an absolute path,
    # which would read (and merge, or serve) another file of this machine. Checked on the names,
    # not on resolved paths: a hub cache's shards are links to blobs outside the snapshot.
    outside = sorted(f for f in set(weight_map.values()) if Path(f).anchor or ".." in Path(f).parts)
    if outside:
        raise ValueError(f"{index} lists shard file(s) outside its directory: {outside[:3]} (a shard is "
                         f"named relative to the index, without '..')")
    return weight_map


def ignored_on_load(model: nn.Module) -> list:
    """The patterns of checkpoint keys ``model``'s own loading ignores (transformers'
    ``_keys_to_ignore_on_load_unexpected``: DeepSeek-V3's multi-token prediction layer, saved as
    the layer after the last)."""
    return [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]


def _read_tensor(store, key: str, index=None) -> torch.Tensor:
    """The one place tensors leave a store (tests count what is alive through it); ``index`` (an
    int, slice or tuple of them): ``tensor[index]`` only (from a safetensors file, or a LoRA
    expert's base, only its bytes are read)."""
    if index is None:
        return store.get_tensor(key) if hasattr(store, "get_tensor") else store[key]
    if hasattr(store, "get_slice"):
        return store.get_slice(key)[index]
    if hasattr(store, "part"):  # (a LoraExpert, a legacy torch pickle's tensors)
        return store.part(key, index)
    return store[key][index]


# --------------------------------------------------------------------------- reading


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}
# (the header's names for dtypes a torch may lack: those it has, by name)
_SAFETENSORS_DTYPES.update({code: getattr(torch, name) for code, name in (
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"), ("F8_E8M0", "float8_e8m0fnu"))
    if hasattr(torch, name)})


class _LegacyPickle:
    """A torch pickle in the legacy (pre-1.6, non-zip) format, its tensors read from the file one
    at a time. ``torch.load`` cannot memory-map it and reads it whole: a merge or walk of K such
    experts held all K. The format is pickles (magic number, protocol, system info, the object
    whose tensors name their storages by key, the storages' keys in the order written), then
    each storage's element count (int64) and bytes. ``state``: the object, its tensors on the
    meta device; ``read`` gives one's values."""

    def __init__(self, file: Path):
        from torch import _weights_only_unpickler as safe  # (what torch.load(weights_only=True) runs)

        with open(file, "rb") as f:
            magic, protocol, system = (safe.load(f, encoding="utf-8") for _ in range(3))
            little = isinstance(system, Mapping) and system.get("little_endian")
            if magic != torch.serialization.MAGIC_NUMBER or protocol != torch.serialization.PROTOCOL_VERSION or (
                    little != (sys.byteorder == "little")):
                raise ValueError("not a legacy torch pickle of this machine's byte order")
            roots, self._at = {}, {}  # key -> (dtype, numel); id(meta storage) -> (key, byte offset in it)
            self._held = []  # (the meta storages, so that their ids stay theirs)

            def storage(pid):
                _, kind, key, _, numel, view = pid  # ("storage", type, key, location, numel, view)
                key, dtype = str(key), kind.dtype
                roots.setdefault(key, (dtype, numel))
                offset, size = (0, numel) if view is None else view[1:]
                untyped = torch.UntypedStorage(size * dtype.itemsize, device="meta")
                self._held.append(untyped)
                self._at[id(untyped)] = (key, offset * dtype.itemsize)
                return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

            unpickler = safe.Unpickler(f, encoding="utf-8")
            unpickler.persistent_load = storage
            self.state = unpickler.load()
            keys = safe.load(f, encoding="utf-8")
            self._data, position, end = {}, f.tell(), os.fstat(f.fileno()).st_size
            for key in map(str, keys):
                dtype, numel = roots[key]
                f.seek(position)
                written = int.from_bytes(f.read(8), sys.byteorder, signed=True)
                if written != numel:
                    raise ValueError(f"storage {key} holds {written} elements where its tensors say {numel}")
                self._data[key] = position + 8
                position += 8 + numel * dtype.itemsize
            if position > end:
                raise ValueError(f"its storages end at byte {position}, past the file's {end}")
        self._file = torch.from_file(str(file), shared=False, size=end, dtype=torch.uint8)  # (mapped, private)

    def read(self, meta: torch.Tensor) -> torch.Tensor:
        """The values of ``meta`` (a tensor of ``state``): its bytes copied out of the file (a
        storage's bytes lie at any offset, not aligned to its dtype)."""
        key, offset = self._at[id(meta.untyped_storage())]
        size = meta.element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(meta.shape, meta.stride())) if meta.numel() else 0
        start = self._data[key] + offset + meta.storage_offset() * size
        values = self._file[start:start + extent * size].clone().view(meta.dtype)
        return values.as_strided(meta.shape, meta.stride())


def _legacy_pickle(file: Path) -> Optional[_LegacyPickle]:
    """``file`` (a torch pickle in the legacy format) read tensor by tensor, or None where its
    layout is not the one ``_LegacyPickle`` knows: it is then read whole by ``torch.load``, with
    a warning naming it and its size."""
    try:
        return _LegacyPickle(file)
    except Exception as e:
        warnings.warn(f"{file} is a torch pickle in the legacy (pre-1.6) format that could not be read tensor by "
                      f"tensor ({type(e).__name__}: {e}): it is read whole, {file.stat().st_size / 2**20:.1f} MB "
                      f"held until it is closed; re-save it with torch.save (or as safetensors) to read it lazily")
        return None


class _LegacyTensors(Mapping):
    """The tensors ``meta`` (name -> meta tensor of ``legacy.state``) of a legacy torch pickle,
    each read from its file when indexed."""

    def __init__(self, legacy: _LegacyPickle, meta: Mapping[str, torch.Tensor]):
        self.legacy, self.meta = legacy, dict(meta)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.legacy.read(self.meta[key])

    def part(self, key: str, index) -> torch.Tensor:
        """``self[key][index]``, only its bytes read (one expert of a fused MoE tensor)."""
        return self.legacy.read(self.meta[key][index])

    def __iter__(self):
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)

    def shape_of(self, key: str) -> tuple:
        return tuple(self.meta[key].shape)

    def dtype_of(self, key: str) -> torch.dtype:
        return self.meta[key].dtype


# the names of the scales a quantized checkpoint stores beside a weight ``<key>`` (``<key><suffix>``)
SCALE_SUFFIXES = ("_scale_inv", "_scale")
# what bitsandbytes saves beside a quantized ``<module>.weight``: Linear4bit's QuantState under
# ``weight.`` (the weight two codes a byte), Linear8bitLt's row scales ``<module>.SCB``
BITSANDBYTES_STATE = (".absmax", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


class CheckpointReader:
    """Every tensor of a checkpoint (see the module docstring) by its own key, read on demand.

    ``what`` names the checkpoint in errors, which are raised as ``error`` (the benches pass
    their configuration error)."""

    def __init__(self, source, what: str = "checkpoint", *, error: type = CheckpointError):
        self.what = what
        self.error = error
        self._where: Dict[str, object] = {}  # key -> store: a file, or None for tensors in memory
        self._stores: dict = {}  # store -> safe_open handle or Mapping of tensors (files: once opened)
        self._opened = None  # a LoraExpert this reader opened (and closes)
        if isinstance(source, (str, os.PathLike)) and is_lora_adapter(source):
            # an expert as a LoRA adapter: its whole state dict, on the base its config names
            source = self._opened = LoraExpert(source)
        self.lora = source if isinstance(source, LoraExpert) else None
        if isinstance(source, (nn.Module, Mapping)):
            self.path = None
            self.description = (f"module {type(source).__name__}" if isinstance(source, nn.Module)
                                else getattr(source, "description", "state dict"))
            self._stores[None] = source.state_dict() if isinstance(source, nn.Module) else source
            self._where = dict.fromkeys(self._stores[None].keys())
            return
        path = self.path = Path(source)
        if path.is_dir():
            found = weights_in(path)
            if found is None:
                # (a hub cache's snapshot holds only what was fetched: a tokenizer-only download;
                # huggingface_hub 1.0 replaced its huggingface-cli with hf)
                cached = [p for p in path.parts if p.startswith("models--")] if "snapshots" in path.parts else []
                raise error(
                    f"{what}: no weights in {path}: expected one of {', '.join(WEIGHT_FILES)} "
                    f"or a single *.safetensors"
                    + (f" (the HF hub cache holds part of the repository, without its weights: fetch it "
                       f"online, HF_HUB_OFFLINE unset, or hf download {cached[0][len('models--'):].replace('--', '/')})"
                       if cached else "")
                )
            path = found
        if not path.is_file():
            raise error(f"{what}: no such file: {path}")
        if path.name.endswith(".index.json"):
            try:
                weight_map = shard_weight_map(path)
            except ValueError as e:
                raise error(f"{what}: {e}") from e
            # (one path a shard, not one a tensor: an index of 77k tensors took 4 s and 32 MB a reader)
            shards = {shard: path.parent / shard for shard in set(weight_map.values())}
            self._where = {key: shards[shard] for key, shard in weight_map.items()}
            missing = sorted(str(f) for f in shards.values() if not f.is_file())
            if missing:
                raise error(f"{what}: shard(s) listed in {path.name} are missing: {missing[:3]}")
            # transformers reads every tensor of the shards an index names, listed or not (an index
            # written before a tensor was added, or edited by hand): one left out was left out of a
            # merge's output, loaded randomly initialised. A safetensors shard's header says what it
            # holds, a torch pickle's structure does (memory-mapped, a legacy one's read tensor by
            # tensor: its values are not read here), as transformers reads its .bin shards
            holders: Dict[str, list] = {}  # key -> the shards holding it
            for shard in sorted(set(shards.values())):
                for key in self._open(shard).keys():
                    holders.setdefault(key, []).append(shard)
            moved = []  # (key, the shard listed, the one holding it)
            for key, held in holders.items():
                listed = self._where.get(key)
                if len(held) > 1:
                    self._check_copies_alike(key, held, listed)
                if listed in held:
                    continue
                # listed in a shard without it (an index edited by hand, shards re-split), or nowhere:
                # transformers reads it from the shards holding it, the last one's copy where several do
                if listed is not None:
                    moved.append((key, listed, held[-1]))
                self._where[key] = held[-1]
            if moved:
                warnings.warn(f"{what}: {path} lists {len(moved)} tensor(s) in a shard that does not hold them, "
                              f"read from the shard that does (as transformers reads them): "
                              + "; ".join(f"lists tensor {key!r} in {listed.name}, which does not hold it: it is "
                                          f"read from {held.name}, which does" for key, listed, held in moved[:3]))
            self.description = str(self.path)
        elif path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
            self._where = dict.fromkeys(self._open(path).keys(), path)
            self.description = str(path)
        else:
            raise error(f"{what}: unknown checkpoint file type {path.suffix!r}: {path}")

    def _check_copies_alike(self, key: str, held: list, listed: Optional[Path]) -> None:
        """Several shards hold ``key``, the index lists it in ``listed`` (None: nowhere): transformers
        reads every shard, in the order of their names, each copy replacing the one before, so it loads
        the last shard's copy whichever the index lists; copies that differ are refused (the merge would
        read one tensor and from_pretrained of the same checkpoint another), alike ones are one tensor."""
        reference = listed if listed in held else held[-1]
        want = _read_tensor(self._open(reference), key)
        for shard in held:
            if shard == reference:
                continue
            copy = _read_tensor(self._open(shard), key)
            if copy.dtype == want.dtype and copy.shape == want.shape and torch.equal(copy, want):
                continue
            if reference == listed:
                where = f"lists tensor {key!r} in {listed.name}, and {shard.name} holds another copy of it that differs"
            else:
                where = (f"lists tensor {key!r} in {listed.name}, which does not hold it," if listed else
                         f"does not list tensor {key!r},") + f" and both {shard.name} and {reference.name} do, " \
                    "with copies that differ"
            raise self.error(f"{self.what}: {self.path} {where} (from_pretrained reads {held[-1].name}'s, the last "
                             f"shard it reads): remove the copy that is not the model's")

    def _open(self, file: Path):
        handle = self._stores.get(file)
        if handle is None:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except Exception as e:  # (SafetensorError: truncated or not safetensors)
                    raise self.error(f"{self.what}: cannot read {file}: {type(e).__name__}: {e}") from e
            else:
                try:  # (mapped: torch.load cannot map a legacy, pre-1.6 pickle, which is no zip file)
                    legacy = None if zipfile.is_zipfile(file) else _legacy_pickle(file)
                    state = (legacy.state if legacy is not None else
                             torch.load(str(file), map_location="cpu", mmap=zipfile.is_zipfile(file),
                                        weights_only=True))
                except Exception as e:
                    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                    if pickled is not None:  # (torch's own text asks for weights_only=False, which nothing here takes)
                        raise self.error(f"{self.what}: {file} holds a pickled {pickled.group(1)}, not a state dict: "
                                         f"epmq reads tensors alone, never running a pickle's code; load it where "
                                         f"you trust it and save its weights, torch.save(model.state_dict(), "
                                         f"path)") from e
                    raise self.error(f"{self.what}: cannot read {file}: {type(e).__name__}: {e}") from e
                for wrapper in _WRAPPERS:
                    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
                        twin = _second_copy(state, wrapper)
                        if twin is not None:
                            raise self.error(f"{self.what}: {file} holds the model twice, under {wrapper!r} and "
                                             f"{twin!r} (e.g. its weights and an EMA copy): save the copy you mean "
                                             f"alone")
                        state = state[wrapper]
                if not isinstance(state, Mapping):
                    raise self.error(f"{self.what}: {file} does not hold a state dict")
                handle = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
                if legacy is not None:
                    handle = _LegacyTensors(legacy, handle)
                if not handle:
                    raise self.error(f"{self.what}: {file} holds no tensors at its top level (its keys: "
                                     f"{sorted(map(str, state))[:8]}): save the model's state dict itself")
            self._stores[file] = handle
        return handle

    def keys(self):
        return self._where.keys()

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple:
        handle = self._open(self._where[key])
        with self._listed(handle, key):
            if hasattr(handle, "get_slice"):
                return tuple(handle.get_slice(key).get_shape())
            if hasattr(handle, "shape_of"):  # a LoraExpert (no update formed for a shape) or a
                # LazyStateDict (no tensor read for a shape)
                return tuple(handle.shape_of(key))
            return tuple(handle[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """Tensor ``key``'s dtype, without reading it from a file."""
        handle = self._open(self._where[key])
        with self._listed(handle, key):
            if hasattr(handle, "dtype_of"):  # (a legacy torch pickle's: from its pickle)
                return handle.dtype_of(key)
            if hasattr(handle, "get_slice"):
                known = _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
                if known is not None:
                    return known
                # (a dtype the table does not name, e.g. one newer safetensors writes: the tensor
                # says, read; a KeyError of its header's code refused a checkpoint torch reads)
            elif isinstance(handle, dict):  # (tensors in memory, a module's or a state dict: no read)
                return handle[key].dtype
            return _read_tensor(handle, key).dtype

    def quantized_with_scales(self, key: str, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """Why tensor ``key`` is no weight but a quantized checkpoint's, else None: one-byte values
        (float8, int8) with their scales stored beside them, under ``key`` + ``_scale_inv``
        (transformers' fine-grained FP8) or ``_scale`` (compressed-tensors'), or bitsandbytes' state
        (``BITSANDBYTES_STATE``: its 4-bit codes, of another shape, or int8 ones). Cast alone to a
        compute dtype, they are the weight divided by its scales, taken for the weight silently;
        every path that reads weights (``LazyStateDict``, ``epmq.experts.ExpertWeights``, a LoRA
        expert's base in ``epmq.lora.LoraExpert``) asks here. ``dtype``: the tensor's, where it
        is read already (else its header's)."""
        scale = next((f"{key}{s}" for s in SCALE_SUFFIXES if f"{key}{s}" in self), None)
        bnb = next((k for k in [f"{key}{s}" for s in BITSANDBYTES_STATE] + [f"{key.removesuffix('weight')}SCB"]
                    if key.endswith("weight") and k in self), None)
        if scale is None and bnb is None:  # (no dtype asked: a LoRA expert's would form the update)
            return None
        dtype = dtype if dtype is not None else self.dtype(key)
        if dtype.itemsize != 1:
            return None
        if scale is None:
            return f"is stored as {dtype} with bitsandbytes' quantization state in {bnb!r}: a quantized checkpoint"
        return f"is stored as {dtype} with its scales in {scale!r}: a quantized checkpoint"

    def get(self, key: str, index=None) -> torch.Tensor:
        """Tensor ``key`` (``index``: ``key[index]`` only, e.g. one expert's rows of a fused MoE
        tensor). Not a copy: every read of a tensor of a mapped file (safetensors, a torch pickle
        of the zip format) is the same memory, a write into one seen by the next read."""
        handle = self._open(self._where[key])
        with self._listed(handle, key):
            return _read_tensor(handle, key, index)

    @contextlib.contextmanager
    def _listed(self, handle, key: str):
        """A shard index that lists ``key`` in a file without it (stale, or hand-edited): the
        error names the checkpoint, the file and the index, not the file reader's."""
        try:
            yield
        except Exception as e:
            file = self._where.get(key)
            if file is None or key in handle.keys():
                raise
            raise self.error(f"{self.what}: {self.path} lists tensor {key!r} in {Path(file).name}, which "
                             f"does not hold it ({type(e).__name__}): the index is stale or the shard "
                             f"is not its own") from e

    def close(self) -> None:
        """Let go of every handle and in-memory tensor (the reader is empty afterwards)."""
        self._stores.clear()
        self._where.clear()
        if self._opened is not None:
            self._opened.close()


# --------------------------------------------------------------------------- names


Rewrite = Tuple[str, str]  # (leading part stripped from a model name, leading part added)


class Binding:
    """Model tensor names -> checkpoint keys, under one prefix rewrite.

    ``order``: for a model name, the names to look for it under, in turn (see ``tie_order``;
    a name it does not list is looked for under itself only). The rewrite is the one under
    which most of ``names`` (default: those of ``order``) are found among ``keys``; ``prefixes``
    are leading parts the checkpoint may add, tried besides those found from its keys. With no
    names the rewrite is the identity. ``rename`` (``key_renaming``): every key is also found
    under its renamed name; ``key_for`` returns the key itself. ``fits(name, key)``: whether a
    key found for a name may hold it (e.g. its shape); only those count. Two rewrites that find
    as many names in different keys are two copies of the model (``ambiguous``): callers refuse
    them (``refuse_ambiguity``) rather than take one by the order of their names. ``leads``:
    ``_leads`` of these keys for (at least) the ``_rests`` of ``names``, found once for several
    bindings of one checkpoint (else here)."""

    def __init__(self, keys: Iterable[str], order: Optional[Mapping[str, Sequence[str]]] = None,
                 names: Optional[Iterable[str]] = None, prefixes: Iterable[str] = (),
                 rename: Optional[Callable[[str], str]] = None,
                 fits: Optional[Callable[[str, str], bool]] = None,
                 leads: Optional[Mapping[str, Iterable[str]]] = None):
        keys = list(keys)
        self.original = {k: k for k in keys}  # a name looked up -> the checkpoint's key
        if rename is not None:
            for k in keys:
                self.original.setdefault(rename(k), k)
        self.keys = set(self.original)
        self.order = dict(order or {})
        names = list(self.order if names is None else names)
        strips, rests = self._rests(names)
        candidates = {("", "")} | {("", p) for p in prefixes} | {(strip, "") for strip in strips}
        if leads is None:
            leads = _leads(self.keys, rests)
        for rest, stripped in rests.items():
            candidates.update((strip, lead) for lead in leads.get(rest, ()) for strip in stripped)

        # max() keeps the first of equals: the identity goes first, so it wins ties (a full
        # CLIP checkpoint also holds names of the text tower unprefixed)
        ordered = [("", "")] + sorted(candidates - {("", "")})
        scores = self._coverage(ordered, names, fits)
        self.rewrite: Rewrite = max(ordered, key=scores.get)
        # every rewrite that finds as many (a caller may refuse to choose among them)
        self.equals = [r for r in ordered if scores[r] == scores[self.rewrite]] if scores[self.rewrite] else []
        self._names = names

    @staticmethod
    def _rests(names: Sequence[str]) -> Tuple[set, Dict[str, set]]:
        """The leading parts of probed ``names`` to strip, and ``{rest: the parts stripped to
        reach it}``: a key that a rest ends (``_leads``) gives the key's part before it to add."""
        # long names are unlikely to end other keys by chance; the first ones are the model's own
        probe = list(dict.fromkeys(names[:16] + sorted(names, key=len, reverse=True)[:8]))
        # strip a leading part of the model's names, add the checkpoint's extra leading part, or
        # both (a DDP-wrapped tower saved alone: "module.conv1.weight" for "visual.conv1.weight"):
        # every rest of a probed name (the name, or it less its first one or two parts where two
        # are left: "weight" alone ends every key) that ends a key gives the key's part before it
        # to add
        strips, rests = set(), {}  # rest of a probed name -> the parts stripped to reach it
        for name in probe:
            parts = name.split(".")
            strips.update(".".join(parts[:j]) + "." for j in range(1, len(parts)))
            for j in range(max(1, min(3, len(parts) - 1))):
                rests.setdefault(".".join(parts[j:]), set()).add(".".join(parts[:j]) + "." if j else "")
        return strips, rests

    def _coverage(self, rewrites: Sequence[Rewrite], names: Sequence[str],
                  fits: Optional[Callable[[str, str], bool]]) -> Dict[Rewrite, int]:
        """``{rewrite: how many of names it finds in a key that fits}``, each name found as
        ``_lookup`` finds it (its first alias under the rewrite held). A name is looked up under
        the rewrites whose stripped part leads it only: under every rewrite, ~100 of them x 77k
        names took seconds for an MoE checkpoint, per expert opened."""
        adds: Dict[str, List[str]] = {}  # leading part a rewrite strips -> the parts added in its place
        for strip, add in rewrites:
            adds.setdefault(strip, []).append(add)
        # a stripped part is "" or ends at a dot: a name is cut at its dots, as far as the leading
        # parts of some stripped part go
        stems = _stems(adds)
        scores = dict.fromkeys(rewrites, 0)
        for name in names:
            found: Dict[Rewrite, str] = {}  # (the first alias a rewrite finds, as _lookup)
            for alias in self.order.get(name, (name,)):
                i = -1
                while True:
                    strip = alias[:i + 1]
                    for add in adds.get(strip, ()):
                        key = add + alias[i + 1:]
                        if key in self.keys:
                            found.setdefault((strip, add), key)
                    i = alias.find(".", i + 1)
                    if i < 0 or alias[:i + 1] not in stems:
                        break
            for rewrite, key in found.items():
                if fits is None or fits(name, self.original[key]):
                    scores[rewrite] += 1
        return scores

    def ambiguous(self) -> list:
        """The rewrites that find as many names as the one chosen but in other keys (two full
        copies of the model under different leading parts, e.g. a Lightning checkpoint's
        ``model.`` and ``ema_model.module.``), the chosen one first; [] when the choice is clear."""
        if len(self.equals) < 2:
            return []
        # a name under itself, not its aliases (a tied lm_head found as itself by one rewrite
        # and as the embeddings by another is one copy); rewrites that find other names only,
        # as a renamed checkpoint's untouched embeddings and its layers under a partial
        # rewrite, are no second copy either
        mapping = [self._key(n, self.rewrite, aliases=False) for n in self._names]
        others = [r for r in self.equals if r != self.rewrite and any(
            k is not None and self._key(n, r, aliases=False) not in (None, k)
            for n, k in zip(self._names, mapping))]
        return [self.rewrite, *others] if others else []

    def _key(self, name: str, rewrite: Rewrite, aliases: bool = True) -> Optional[str]:
        key = self._lookup(name, rewrite, aliases)
        return None if key is None else self.original[key]

    def refuse_ambiguity(self, error: Callable[[str], Exception]) -> None:
        """Raise ``error(message)`` when ``ambiguous``: the names are found under several leading
        parts and nothing says which copy is meant."""
        places = self.ambiguous()
        if places:
            name = next(n for n in self._names
                        if len({self._key(n, r, aliases=False) for r in places} - {None}) > 1)
            keys = [k for k in dict.fromkeys(self._key(name, r, aliases=False) for r in places) if k]
            raise error(f"holds the model's tensors in several copies ({name!r} is both "
                        f"{' and '.join(map(repr, keys))}), e.g. a Lightning checkpoint's weights and "
                        f"their EMA: save the copy you mean alone")

    def _lookup(self, name: str, rewrite: Rewrite, aliases: bool = True) -> Optional[str]:
        strip, add = rewrite
        for alias in self.order.get(name, (name,)) if aliases else (name,):
            if alias.startswith(strip):
                key = add + alias[len(strip):]
                if key in self.keys:
                    return key
        return None

    def key_for(self, name: str) -> Optional[str]:
        """The checkpoint key holding the model tensor ``name`` (or one of its aliases), or None."""
        return self._key(name, self.rewrite)


def _leads(keys: Iterable[str], rests: Iterable[str]) -> Dict[str, set]:
    """``{rest: the leading parts of keys it ends}`` (``model.`` of ``model.a.b`` for ``a.b``),
    for the ``rests`` some key ends: one scan of the keys, at their dots."""
    rests, leads = set(rests), {}
    for key in keys:
        i = key.find(".")
        while i >= 0:
            if key[i + 1:] in rests:
                leads.setdefault(key[i + 1:], set()).add(key[:i + 1])
            i = key.find(".", i + 1)
    return leads


def _stems(parts: Iterable[str]) -> set:
    """Every leading part of ``parts`` up to one of its dots (``a.b.``: ``a.`` and ``a.b.``)."""
    return {p[:i + 1] for p in parts for i, c in enumerate(p) if c == "."}


def key_renaming(model: nn.Module) -> Optional[Callable[[str], str]]:
    """The renaming transformers applies to a checkpoint key as it loads ``model`` (its
    ``WeightRenaming`` rules, in order; not its converters, which fuse or split tensors), or
    None for a model that is not a transformers model or a transformers without the rules."""
    return _renaming(model, saving=False)


def saved_key_renaming(model: nn.Module) -> Optional[Callable[[str], str]]:
    """The renaming ``save_pretrained`` applies to ``model``'s state-dict names: its load-time
    ``WeightRenaming`` rules reversed, so a checkpoint keeps the layout it was loaded from (or,
    for a model built from a config, the layout transformers writes: Mixtral's experts under
    ``block_sparse_moe``, ViT's as ``encoder.layer.N.attention.attention.query``). None where
    ``key_renaming`` is None. Some rules keep state between keys, as in transformers: rename a
    checkpoint's keys with one call each, in ``natural_order``."""
    return _renaming(model, saving=True)


def _renaming(model, saving):
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    if not saving:
        rules = get_model_conversion_mapping(model)
    else:  # as transformers' revert_weight_conversion
        rules = getattr(model, "_weight_conversions", None)
        if rules is None:
            try:  # a model built from a config: its own rules, not the legacy ones of old checkpoints
                rules = get_model_conversion_mapping(model, add_legacy=False)
            except TypeError:  # a transformers without the option
                return None
            # a prefix change only restores what from_pretrained stripped, and nothing was
            rules = [t for t in rules if type(t).__name__ != "PrefixChange"]
        rules = [t.reverse_transform() for t in rules[::-1]]
    rules = [t for t in rules if isinstance(t, WeightRenaming)]
    if not rules:
        return None

    def rename(key: str) -> str:
        for rule in rules:
            key, _ = rule.rename_source_key(key)
        return key

    return rename


def loads_transposed(model: nn.Module) -> Callable[[str], bool]:
    """Whether ``model``'s conversion mapping transposes a checkpoint tensor's dims 1 and 2 as it
    loads it, by the tensor's checkpoint key: Qwen3-VL-MoE's fused experts, which transformers 4
    saved ``gate_up_proj [E, H, 2I]`` and transformers 5 holds and saves ``[E, 2I, H]``
    (``Transpose(1, 2, check_dims=True)``: either is loaded). False for every key of a model
    without such a rule (not a transformers model, a transformers without converters)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Transpose, WeightConverter

        rules = get_model_conversion_mapping(model)
    except Exception:
        return lambda key: False
    patterns = [p for rule in rules
                if isinstance(rule, WeightConverter) and len(rule.operations) == 1
                and isinstance(rule.operations[0], Transpose)
                and {rule.operations[0].dim0 % 3, rule.operations[0].dim1 % 3} == {1, 2}
                for p in rule.source_patterns]
    return lambda key: any(re.search(p, key) for p in patterns)


@contextlib.contextmanager
def conversions_found_once(model: nn.Module, rules: Optional[list] = None):
    """Inside it, transformers' ``revert_weight_conversion(model, ...)`` uses ``rules`` (default:
    found here, as it finds them) where ``model`` holds none (``_weight_conversions``, which
    ``from_pretrained`` sets): it found them again at every call, walking every module of the
    model, so one call per layer's tensor (experts rebuilt, merged as saved) took time quadratic
    in the layers (Qwen3-235B-A22B's 94 MoE layers: 45 s to rebuild its experts)."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        rules = None
    else:
        if not isinstance(model, PreTrainedModel) or getattr(model, "_weight_conversions", None) is not None:
            rules = None
        elif rules is None:
            try:  # (as revert_weight_conversion finds them for a model built from a config)
                rules = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                         if not isinstance(t, PrefixChange)]
            except Exception:  # (a transformers without the option: left to find them itself)
                rules = None
    if not rules:  # (none: revert_weight_conversion returns the state as given)
        yield
        return
    model.__dict__["_weight_conversions"] = rules
    try:
        yield
    finally:
        model.__dict__.pop("_weight_conversions", None)


def natural_order(names: Iterable[str]) -> List[str]:
    """``names`` sorted as transformers walks a state dict (dotted parts, numbers as numbers)."""
    return sorted(names, key=lambda name: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                           for p in name.split(".")])


def renamed(names: Iterable[str], rename: Optional[Callable[[str], str]]) -> Dict[str, str]:
    """``{name: rename(name)}`` in ``natural_order``; a clear error if two names would collide."""
    out: Dict[str, str] = {}
    seen: Dict[str, str] = {}
    for name in natural_order(names):
        new = name if rename is None else rename(name)
        if new in seen:
            raise CheckpointError(f"renaming maps both {seen[new]!r} and {name!r} to {new!r}")
        out[name], seen[new] = new, name
    return out


class SavedLayout:
    """Where ``save_pretrained`` puts the tensors of a transformers module that its converters
    fuse or split: transformers 5 holds a MoE layer's experts fused (Mixtral's, Qwen3-MoE's
    ``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) and saves them as one
    matrix per expert and projection (``block_sparse_moe.experts.N.w1.weight [I, H]``, ...), the
    layout ``epmq merge`` reads. ``group(name)``: the state-dict names converted together with
    ``name`` (None for a tensor saved whole, renamed at most); ``pieces(names)``: for each saved
    tensor of that group, its name, its shape and the entries of the module's tensors it holds.
    Found by transformers' own ``revert_weight_conversion`` applied to tensors of entry indices
    (concatenations, stacks, transposes alike), one group at a time."""

    def __init__(self, model, converters, shapes: Dict[str, tuple], saved: Dict[str, tuple], rules=None):
        from transformers.core_model_loading import apply_converters, dot_natural_key

        self.model, self.shapes, self.saved = model, shapes, saved
        self.rules = rules  # (the model's conversion mapping: found once, see conversions_found_once)
        groups: Dict[str, List[str]] = {}
        for name in sorted(shapes, key=dot_natural_key):  # (as revert_weight_conversion groups them)
            target, pattern = apply_converters(name, converters)
            if pattern is not None:
                groups.setdefault(target, []).append(name)
        self._group = {name: names for names in groups.values() for name in names}

    def group(self, name: str) -> Optional[List[str]]:
        return self._group.get(name)

    def pieces(self, names: Sequence[str]) -> Optional[list]:
        """``[(saved name, saved shape, [(module name, where, at)])]``: the saved tensor's flat
        entries ``where`` (a slice or indices) are the module tensor's flat entries ``at``. None
        where the saved tensors are not the module's entries each once (a converter that pads,
        dequantizes, or a renaming that depends on the other keys)."""
        from transformers.core_model_loading import revert_weight_conversion

        sizes = [math.prod(self.shapes[n]) for n in names]
        total = sum(sizes)
        starts = [sum(sizes[:j]) for j in range(len(names))]  # (disjoint ranges: a saved tensor may join several)
        views = self._view_pieces(names, sizes, starts)
        if views is not None:
            return views
        dtype = torch.int32 if total < 2 ** 31 else torch.int64  # (an index as large as an fp32 tensor)
        index = {n: torch.arange(s, s + size, dtype=dtype).view(self.shapes[n])
                 for n, s, size in zip(names, starts, sizes)}
        try:
            with conversions_found_once(self.model, self.rules):
                saved = revert_weight_conversion(self.model, index)
        except Exception:  # (a converter that cannot take integer tensors)
            return None
        del index
        seen, count, pieces = torch.zeros(total, dtype=torch.bool), 0, []
        for key, t in saved.items():
            if self.saved.get(key) != tuple(t.shape) or t.dtype != dtype:
                return None
            v = t.reshape(-1)
            count += v.numel()
            seen[v.long()] = True
            pieces.append((key, tuple(t.shape), _sources(v, names, starts, sizes)))
        if count != total or not bool(seen.all()):
            return None
        return pieces

    def _view_pieces(self, names, sizes, starts) -> Optional[list]:
        """``pieces`` found without an entry held, where every saved tensor is a view of the
        module's entries (chunks, unbinds, transposes, renames: Mixtral's and Qwen3-MoE's experts):
        the names' tensors are meta views of one flat meta tensor, converted with their copies
        (``contiguous``, ``clone``) left views, so each saved tensor's offset and strides say which
        entries it holds. An index of entries was 8 bytes an entry of the group at its peak (12.9 GB
        for Mixtral-8x22B's gate_up_proj, every layer). None where a saved tensor is not such a
        view (a concatenation: a new tensor), the entries are not each once, or a converter fails."""
        from transformers.core_model_loading import revert_weight_conversion

        total = sum(sizes)
        flat = torch.empty(total, dtype=torch.int64, device="meta")
        index = {n: flat[s:s + size].view(self.shapes[n]) for n, s, size in zip(names, starts, sizes)}
        try:
            with _CopiesAsViews(flat), conversions_found_once(self.model, self.rules):
                saved = revert_weight_conversion(self.model, index)
        except Exception:
            return None
        runs, strided, pieces = [], [], []
        for key, t in saved.items():
            if (self.saved.get(key) != tuple(t.shape) or t.dtype != flat.dtype
                    or (t is not flat and t._base is not flat)):
                return None
            if t.is_contiguous():
                a, b = t.storage_offset(), t.storage_offset() + t.numel()
                runs.append((a, b))
                sources = []
                for n, s, size in zip(names, starts, sizes):
                    lo, hi = max(a, s), min(b, s + size)
                    if lo < hi:
                        where = slice(None) if (lo, hi) == (a, b) else slice(lo - a, hi - a)
                        sources.append((n, where, slice(lo - s, hi - s)))
                pieces.append((key, tuple(t.shape), sources))
                continue
            # (a transposed view: its entries' places, as many as the piece has)
            span = 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride())) if t.numel() else 0
            v = torch.arange(t.storage_offset(), t.storage_offset() + span).as_strided(t.shape, t.stride())
            v = v.reshape(-1)
            strided.append(v)
            pieces.append((key, tuple(t.shape), _sources(v, names, starts, sizes)))
        count = sum(b - a for a, b in runs) + sum(v.numel() for v in strided)
        if count != total:
            return None
        if strided:  # (each entry once: marked)
            seen = torch.zeros(total, dtype=torch.bool)
            for a, b in runs:
                seen[a:b] = True
            for v in strided:
                seen[v] = True
            return pieces if bool(seen.all()) else None
        end = 0
        for a, b in sorted(runs):  # (runs as many entries as the group's: each once where they meet end to end)
            if a != end:
                return None
            end = b
        return pieces


class _CopiesAsViews(torch.overrides.TorchFunctionMode):
    """``contiguous`` and ``clone`` of a view of ``flat`` give the view itself: the entries a
    copy holds are the view's, which its offset and strides keep saying (``SavedLayout``)."""

    def __init__(self, flat: torch.Tensor):
        super().__init__()
        self.flat = flat

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.contiguous, torch.Tensor.clone, torch.clone) and args:
            t = args[0]
            if isinstance(t, torch.Tensor) and (t is self.flat or t._base is self.flat):
                return t
        return func(*args, **kwargs)


def _sources(v: torch.Tensor, names, starts, sizes) -> list:
    """``(name, where, at)`` of the names' tensors whose entries ``v`` (a saved tensor's entries'
    places in the group, flat) holds: ``where`` its entries from that tensor, ``at`` their places in it."""
    sources = []
    for n, s, size in zip(names, starts, sizes):
        inside = (v >= s) & (v < s + size)
        if bool(inside.all()):
            sources.append((n, slice(None), _as_slice(v - s)))
        elif bool(inside.any()):
            where = inside.nonzero().squeeze(1)
            sources.append((n, _as_slice(where), _as_slice(v[where] - s)))
    return sources


def _as_slice(positions: torch.Tensor):
    """``positions`` as a slice where they are a run (no index held), else as int64 indices."""
    n = positions.numel()
    if n and int(positions[-1]) - int(positions[0]) == n - 1:
        first = int(positions[0])
        if torch.equal(positions, torch.arange(first, first + n, dtype=positions.dtype)):
            return slice(first, first + n)
    return positions.long()


def saved_layout(model: nn.Module) -> Optional[SavedLayout]:
    """``model``'s ``SavedLayout``, or None where ``save_pretrained`` fuses or splits none of its
    tensors (not a transformers model, a transformers without converters, a model without them).
    The converters are those ``revert_weight_conversion`` applies."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, revert_weight_conversion
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    rules = getattr(model, "_weight_conversions", None)
    if rules is None:  # (as revert_weight_conversion: a model built from a config)
        try:
            rules = get_model_conversion_mapping(model, add_legacy=False)
        except TypeError:
            return None
        rules = [t for t in rules if not isinstance(t, PrefixChange)]
    converters = [t.reverse_transform() for t in rules[::-1]]
    converters = [t for t in converters if isinstance(t, WeightConverter)]
    if not converters:
        return None
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    try:  # the names and shapes save_pretrained writes (meta tensors: nothing allocated)
        with conversions_found_once(model, rules):
            saved = revert_weight_conversion(model, {n: torch.empty(s, device="meta") for n, s in shapes.items()})
    except Exception as e:  # (a converter that cannot run on meta tensors)
        warnings.warn(f"the layout save_pretrained writes {type(model).__name__} in could not be found ({e}): its "
                      f"fused or split tensors are merged as the module holds them, which a merge of its "
                      f"checkpoint (epmq merge) does not")
        return None
    layout = SavedLayout(model, converters, shapes, {n: tuple(t.shape) for n, t in saved.items()}, rules)
    return layout if layout._group else None


def parameter_aliases(model: nn.Module) -> List[List[str]]:
    """The names of each parameter, as ``named_parameters`` lists them (tied ones have several)."""
    groups = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return list(groups.values())


def tie_order(model: nn.Module, *, own_checkpoint: bool = False) -> Dict[str, List[str]]:
    """For every state-dict name of ``model``, the names to look for in a checkpoint, in order.

    Aliases of one tied parameter all get the same list (the first name first, as
    ``named_parameters`` lists them), so they read the same tensor; an untied parameter that
    transformers would tie by default (``_tied_weights_keys``) falls back to its source (an
    expert saved with a tied head, read for a merged model whose head is untied), except, with
    ``own_checkpoint`` (a checkpoint of this model itself), where the config unties them
    (``_ties_off``): there a checkpoint without one lacks it, as transformers says."""
    order = {name: [name] for name in model.state_dict().keys()}
    for names in parameter_aliases(model):
        for name in names:
            order[name] = list(names)
    hints = getattr(model, "_tied_weights_keys", None)
    if isinstance(hints, Mapping) and not (own_checkpoint and _ties_off(model)):
        for target, source in hints.items():
            if isinstance(source, str) and order.get(target) == [target] and source in order:
                order[target] = [target, source]
    return order


def _ties_off(model: nn.Module) -> bool:
    """Whether the config unties what transformers ties by default (``tie_word_embeddings=
    False``, which turns off every ``_tied_weights_keys`` tie: a checkpoint without one of them
    lacks it, it is not tied)."""
    config = getattr(model, "config", None)
    # (the decoder's, whose head the tie is of: asked for "the" text config, transformers refuses a config
    # of a text encoder and a decoder, MusicGen's)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return not getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True))


class LazyStateDict(Mapping):
    """A state dict in the model's naming whose tensors are read from a checkpoint when indexed."""

    def __init__(self, reader: CheckpointReader, keys: Dict[str, str], *, dtype: Optional[torch.dtype] = None,
                 description: str = "", joined: Optional[Mapping[str, tuple]] = None):
        self.reader = reader
        self._keys = dict(keys)  # model name -> checkpoint key
        # model name -> (its shape, [(checkpoint key, where, at)]): a tensor the model's loading
        # makes of parts of checkpoint tensors (``saved_pieces``); its "key" is its own name
        self._joined = dict(joined or {})
        self._keys.update({name: name for name in self._joined})
        self.dtype = dtype
        self.description = description or reader.description
        self._transposed = set()  # (names read with dims 1 and 2 swapped: read_transposed)
        checked = [(name, key) for name, key in self._keys.items() if name not in self._joined]
        checked += [(name, key) for name, (_, pieces) in self._joined.items() for key, _, _ in pieces]
        for name, key in checked:  # (before a cast to ``dtype`` hides what they are)
            why = reader.quantized_with_scales(key)
            if why is not None:
                raise reader.error(f"{self.description}: tensor {name!r} {why}; give the full-precision checkpoint")

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._join(name) if name in self._joined else self.reader.get(self._keys[name])
        if name in self._transposed:
            t = t.transpose(1, 2)
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def _join(self, name: str) -> torch.Tensor:
        return joined_tensor(self.reader, *self._joined[name])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name) -> bool:
        return name in self._keys

    def checkpoint_key(self, name: str) -> str:
        """The checkpoint key tensor ``name`` is read from (its own name where it is made of
        several: no other name's)."""
        return self._keys[name]

    def read_as(self, name: str, other: str) -> None:
        """Read ``name`` from ``other``'s checkpoint key from now on (a copy stored under its own
        key that equals the tensor it is tied to: one tensor, as from_pretrained ties them)."""
        self._keys[name] = self._keys[other]

    def read_transposed(self, name: str) -> None:
        """Read ``name`` with its dims 1 and 2 swapped from now on (a checkpoint holding it as
        transformers 4 saved it, which the model's loading transposes: ``loads_transposed``)."""
        self._transposed.add(name)

    def shape_of(self, name: str) -> tuple:
        """Tensor ``name``'s shape, from the checkpoint without reading the tensor
        (``CheckpointReader.shape`` of a reader over this state dict asks here: indexing would
        read every tensor the walk checks, a second read of a whole expert)."""
        if name in self._joined:
            return tuple(self._joined[name][0])
        shape = tuple(self.reader.shape(self._keys[name]))
        return (shape[0], shape[2], shape[1], *shape[3:]) if name in self._transposed else shape

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype indexing gives tensor ``name`` (``dtype`` where it casts), without reading
        it from a safetensors file."""
        stored = self.reader.dtype(self._joined[name][1][0][0] if name in self._joined else self._keys[name])
        return self.dtype if self.dtype is not None and stored.is_floating_point else stored

    def __repr__(self):
        return f"LazyStateDict({len(self)} tensors from {self.description})"


def bind(reader: CheckpointReader, order: Mapping[str, Sequence[str]], *, what: str,
         shapes: Optional[Mapping[str, tuple]] = None, dtype: Optional[torch.dtype] = None,
         prefixes: Iterable[str] = (), rename: Optional[Callable[[str], str]] = None,
         model: Optional[nn.Module] = None, binding: Optional[Binding] = None) -> LazyStateDict:
    """A ``LazyStateDict`` with the model's names (the keys of ``order``, see ``tie_order``).

    The names are found under one prefix rewrite (``Binding``; ``prefixes`` are tried too, and
    keys also under ``rename``, see ``key_renaming``); with ``model``, a name no key holds is made
    of the checkpoint tensors ``save_pretrained`` writes it as (``saved_pieces``). Raises
    ``reader.error`` for tensors the checkpoint lacks or whose shape differs from ``shapes`` (the
    model's). ``binding``: the ``Binding`` of these arguments, where the caller has made it."""
    names = list(order)
    if binding is None:
        binding = Binding(reader.keys(), order, prefixes=prefixes, rename=rename)
    binding.refuse_ambiguity(lambda message: reader.error(f"{what} ({reader.path}) {message}"))
    mapping, missing = {}, []
    for n in names:
        key = binding.key_for(n)
        if key is None:
            missing.append(n)
        else:
            mapping[n] = key
    joined = saved_pieces(reader, model, missing, prefixes) if missing and model is not None else {}
    missing = [n for n in missing if n not in joined]
    if missing:
        raise reader.error(
            f"{what} ({reader.path}) lacks {len(missing)} of the model's {len(names)} tensors, e.g. "
            f"{missing[:4]}: is it a checkpoint of this architecture?"
        )
    if shapes is not None:
        for n, key in mapping.items():
            got, want = reader.shape(key), tuple(shapes[n])
            if tuple(got) != want:
                raise reader.error(
                    f"{what} ({reader.path}): tensor {n!r} has shape {tuple(got)}, the model's is {want}: "
                    f"is it a checkpoint of this architecture?"
                )
    return LazyStateDict(reader, mapping, dtype=dtype, description=f"{what} at {reader.path}", joined=joined)


def joined_tensor(reader: CheckpointReader, shape: Sequence[int], pieces: Sequence[tuple]) -> torch.Tensor:
    """The tensor of ``shape`` made of the checkpoint tensors' entries that hold it
    (``saved_pieces``' ``[(checkpoint key, where, at)]``), as from_pretrained makes it: one read
    of each."""
    out = None
    for key, where, at in pieces:
        t = reader.get(key)
        if out is None:
            out = torch.empty(math.prod(shape), dtype=t.dtype)
        out[at] = t.reshape(-1)[where].to(out.dtype)
    return out.view(tuple(shape))


def saved_pieces(reader: CheckpointReader, model: nn.Module, names: Sequence[str],
                 prefixes: Iterable[str] = ()) -> Dict[str, tuple]:
    """``{name: (shape, [(checkpoint key, where, at)])}`` for the tensors ``names`` of ``model``
    that no checkpoint key holds but ``save_pretrained`` writes as parts of others (transformers
    5 holds a Mixtral's experts fused, ``mlp.experts.gate_up_proj [E, 2I, H]``, and saves one
    matrix per expert, ``block_sparse_moe.experts.N.w1.weight``, which from_pretrained fuses): the
    checkpoint tensor's flat entries ``where`` are the tensor's flat entries ``at``
    (``SavedLayout.pieces``). Only groups whose every saved tensor the checkpoint holds, in its
    saved shape."""
    with warnings.catch_warnings():  # (a layout not found: the names stay missing, said so)
        warnings.simplefilter("ignore")
        layout = saved_layout(model)
    if layout is None:
        return {}
    wanted, found, done, groups = set(names), {}, set(), []
    for name in names:
        group = layout.group(name)
        if group is None or name in done:
            continue
        done.update(group)
        pieces = layout.pieces(group)
        if pieces is not None:
            groups.append((group, pieces))
    # the checkpoint's keys scanned once for every group's names: a scan a group (two a MoE layer)
    # took time quadratic in the layers (Qwen3-30B-A3B's 48 layers of 128 experts: 13 s an expert)
    checkpoint = list(reader.keys())
    leads = _leads(checkpoint, {rest for _, pieces in groups for rest in Binding._rests([k for k, _, _ in pieces])[1]})
    for group, pieces in groups:
        keys = Binding(checkpoint, names=[key for key, _, _ in pieces], prefixes=prefixes, leads=leads)
        held = {n: [] for n in group}
        for key, shape, sources in pieces:
            stored = keys.key_for(key)
            if stored is None or tuple(reader.shape(stored)) != tuple(shape):
                break
            for n, where, at in sources:
                held[n].append((stored, where, at))
        else:
            found.update((n, (layout.shapes[n], held[n])) for n in group if n in wanted)
    return found


def open_state(path, model: nn.Module, *, what: str, dtype: Optional[torch.dtype] = None,
               prefixes: Iterable[str] = (), error: type = CheckpointError) -> LazyStateDict:
    """``bind`` a checkpoint at ``path`` to ``model``'s state-dict names and shapes. A checkpoint
    of more blocks than the model (another configuration) holds every tensor the model has and
    is refused: what it has past the model's last block says so. A name the checkpoint stores
    is read under its own key even where ``model`` ties it to another (an untied expert's head
    beside a tied base: the state then holds the two apart, see ``BenchBase._open_experts``)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reader = CheckpointReader(path, what, error=error)
    # each name under its own key first, then its aliases': a tied model lists a tied head's
    # embeddings first, and an untied expert's trained head, stored under its own name, was read
    # as its embeddings. As from_pretrained: a stored head is the checkpoint's own (transformers
    # ties it only where it equals the embeddings), one left out is the tensor it is tied to
    order = {name: list(dict.fromkeys([name, *names])) for name, names in tie_order(model).items()}
    rename = key_renaming(model)
    # (one binding for both: each matches every key, seconds for an MoE checkpoint's 77k)
    binding = Binding(reader.keys(), order, prefixes=prefixes, rename=rename)
    state = bind(reader, order, what=what, shapes=shapes, dtype=dtype, prefixes=prefixes, rename=rename,
                 model=model, binding=binding)
    from .walker import _following_name

    ignored = ignored_on_load(model)  # (no block of it)
    for name, stack in model.named_modules():
        if isinstance(stack, (nn.ModuleList, nn.Sequential)) and len(stack):
            # the first block's first tensor, in the block after the last: named after the last's
            # name, an index or a name an OrderedDict gave it (torchvision's ViT's encoder_layer_1)
            rel = next(iter(stack[0].state_dict()), None)
            following = _following_name(list(stack._modules)[-1])
            past = None if rel is None or following is None else f"{name}.{following}.{rel}".lstrip(".")
            # (one the model holds: an OrderedDict's names out of order, conv1, conv3, conv2, are no deeper stack)
            key = None if past is None or past in shapes else binding.key_for(past)
            if key is not None and not any(p.search(key) or p.search(past) for p in ignored):
                raise reader.error(f"{what} ({reader.path}) has more blocks at {name!r} than the model's "
                                   f"{len(stack)} ({key!r}): is it a checkpoint of this architecture?")
    return state
