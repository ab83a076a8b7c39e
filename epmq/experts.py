"""Lazy, name-addressed access to an expert's tensors.

E-PMQ reads the weights of every expert at every layer, but never needs a whole expert at once:
the model walker asks for one block's tensors of one expert at a time. ``ExpertWeights`` wraps
an expert given as an ``nn.Module``, a state dict (already in memory: tensors are handed out as
they are) or a checkpoint on disk (a HF ``save_pretrained`` directory, sharded or not, a
``.safetensors`` file, an open_clip checkpoint or a torch pickle) or on the HF hub (an
``org/name`` that is not a local path: its config and weights files are downloaded, or taken
from the cache when ``HF_HUB_OFFLINE=1``), read through ``epmq.checkpoint_io.CheckpointReader``
tensor by tensor.

Checkpoint names rarely match the model's exactly (``vision_model.``, ``visual.``, ``module.``
prefixes; tied tensors saved under one of their names): ``bind`` finds the prefix rewrite
(``epmq.checkpoint_io.Binding``) under which most of the model's names exist in the checkpoint,
and tied tensors may be found under any of their aliases.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from .checkpoint_io import (Binding, CheckpointError, CheckpointReader, hub_reference, hub_snapshot,
                            joined_tensor, not_fetched, saved_pieces)
from .checks import all_finite


class OnVocabulary:
    """An expert ``source`` whose token embeddings are numbered by another tokenizer than the
    merged model's (an expert with fewer added tokens than a union merge): ``rows[i]`` is its
    row of the merged model's token ``i``, -1 where it lacks the token (there the merged model's
    row stands in). Built by ``epmq.vocabulary.rows_by_token``."""

    def __init__(self, source, rows: torch.Tensor):
        self.source, self.rows = source, rows


class ExpertWeights:
    """Tensors of one expert, read on demand by the model's tensor names (``rows``: its
    ``OnVocabulary`` row map, or None)."""

    def __init__(self, source, *, task: str = "expert"):
        self.task = task
        self.rows = None
        if isinstance(source, OnVocabulary):
            source, self.rows = source.source, source.rows
        if isinstance(source, (str, os.PathLike)):
            if not Path(source).exists():
                reference = hub_reference(source) if isinstance(source, str) else None
                if reference is None:
                    raise FileNotFoundError(f"expert checkpoint of task {task!r} not found: {Path(source)}")
                try:
                    source = hub_snapshot(reference[0], kind="weights", revision=reference[1])
                except CheckpointError as e:
                    raise FileNotFoundError(f"the expert of task {task!r}: "
                                            + not_fetched(Path(source), reference[0], e)) from e
        elif not isinstance(source, (nn.Module, Mapping)):
            raise TypeError(
                f"the expert of task {task!r} must be an nn.Module, a state dict or a checkpoint "
                f"path, got {type(source).__name__}"
            )
        self.reader = CheckpointReader(source, f"the expert of task {task!r}")
        self.description = self.reader.description
        self._binding = Binding(self.reader.keys())  # the identity until ``bind``
        # model name -> (its shape, [(checkpoint key, where, at)]): a tensor the model's loading
        # makes of parts of checkpoint tensors (``join``), read under its own name
        self._joined = {}
        # model name -> what the merged model's weight was divided by (RWKV's layers rescaled for
        # inference, ``walker._rescale_for_inference``): the expert's is read divided alike
        self.divisors = {}

    def close(self) -> None:
        self.reader.close()

    # ----------------------------------------------------------------- names

    def keys(self):
        return self.reader.keys()

    def bind(self, model_names: Iterable[str], aliases: Optional[Mapping[str, list]] = None,
             rename: Optional[Callable[[str], str]] = None) -> None:
        """Choose the prefix rewrite from the model's names to this checkpoint's keys.

        ``model_names``: every tensor name of the model (in checkpoint naming); ``aliases``:
        for tied tensors, the other names the same tensor goes by; ``rename``: how the model's
        loader renames checkpoint keys (``epmq.checkpoint_io.key_renaming``).
        """
        from .lora import checkpoint_ties

        names = list(model_names)
        aliases = aliases or {}
        # then the names the expert's own config ties it to: a tied expert, saved without its
        # head, read for a merged model whose head is untied (a merge with trained heads)
        own = checkpoint_ties(self.reader)
        order = {n: list(dict.fromkeys([n, *aliases.get(n, ()), *own.get(n, ())])) for n in [*names, *aliases]}
        self._binding = Binding(self.reader.keys(), order, names=names, rename=rename)
        self._binding.refuse_ambiguity(
            lambda message: ValueError(f"the expert of task {self.task!r} ({self.description}) {message}"))

    def key_for(self, name: str) -> Optional[str]:
        """The checkpoint key holding the model tensor ``name`` (or one of its aliases); ``name``
        itself where it is made of parts of others (``join``)."""
        key = self._binding.key_for(name)
        return name if key is None and name in self._joined else key

    def join_saved(self, names: Iterable[str]) -> None:
        """Read each of the model tensors ``names`` that no key holds but that ``save_pretrained``
        writes as parts of other tensors (OLMo-hybrid's linear_attn.conv1d, as q_conv1d, k_conv1d
        and v_conv1d) made of those parts, as the model's loading makes it
        (``checkpoint_io.saved_pieces``, by the layout of the model this checkpoint's config
        builds, its names found under the prefix rewrite ``bind`` chose: a base model's walk reads
        its causal LM's directory)."""
        from .lora import model_skeleton

        lora = self.reader.lora  # (a LoRA adapter: its base's checkpoint, whose keys it reads)
        home = lora.base.path if lora is not None else self.reader.path
        if home is None:  # (a module or state dict: the model's names)
            return
        strip, add = self._binding.rewrite
        stored = {add + n[len(strip):]: n for n in names if n.startswith(strip) and self.key_for(n) is None}
        skeleton = model_skeleton(home) if stored else None
        if skeleton is not None:
            found = saved_pieces(self.reader, skeleton, list(stored))
            self._joined.update((stored[n], pieces) for n, pieces in found.items())

    def joined_keys(self) -> set:
        """The checkpoint keys read as parts of other tensors (``join``)."""
        return {key for _, pieces in self._joined.values() for key, _, _ in pieces}

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
        if key in self._joined and key not in self.reader:
            return tuple(self._joined[key][0])
        return self.reader.shape(key)

    def dtype(self, name: str) -> torch.dtype:
        """Tensor ``name``'s dtype as ``fetch`` gives it, without reading it (one made of parts takes
        its first part's, ``joined_tensor``)."""
        key = self._require(name)
        if key in self._joined and key not in self.reader:
            key = self._joined[key][1][0][0]
        return self.reader.dtype(key)

    def check(self, expected: Mapping[str, tuple]) -> None:
        """Every tensor ``name -> shape`` of ``expected`` exists here with that shape."""
        for name, shape in expected.items():
            got = self.shape(name)
            key = self._require(name)
            # (bitsandbytes' 4-bit weight, two codes a byte, is of another shape: not another architecture)
            why = None if key in self._joined and key not in self.reader else self.reader.quantized_with_scales(key)
            if tuple(got) != tuple(shape) and why is not None:
                raise ValueError(
                    f"the expert of task {self.task!r} ({self.description}): tensor {name!r} {why}. Experts must be "
                    f"full-precision checkpoints of the merged model's architecture"
                )
            if tuple(got) != tuple(shape):
                raise ValueError(
                    f"the expert of task {self.task!r} ({self.description}): tensor {name!r} has "
                    f"shape {tuple(got)}, the merged model's has {tuple(shape)}; experts must "
                    f"share the merged model's architecture"
                )

    def fetch(self, name: str, index=None) -> torch.Tensor:
        """Tensor ``name`` as stored (``index``: ``name[index]`` only), not to be written into
        (``unshared``); its values unchecked (``check_values``); an integer tensor is refused (a quantized
        checkpoint's codes, a bitsandbytes int8 ``weight``: a cast would take them for weights)."""
        key = self._require(name)
        joined = key in self._joined and key not in self.reader
        tensor = self._join(key, index) if joined else self.reader.get(key, index)
        if tensor.is_meta:  # (a module built on the meta device, init_empty_weights, never loaded:
            # torch's "Cannot copy out of meta tensor" named neither the expert nor the tensor)
            raise ValueError(
                f"the expert of task {self.task!r} ({self.description}): tensor {name!r} is on the meta "
                f"device (its weights were never loaded): load them first"
            )
        parts = [k for k, _, _ in self._joined[key][1]] if joined else [key]
        why = next((w for k in parts for w in [self.reader.quantized_with_scales(k, None if joined else tensor.dtype)]
                    if w is not None), None)
        if why is not None:
            raise ValueError(
                f"the expert of task {self.task!r} ({self.description}): tensor {name!r} {why}. Experts must be "
                f"full-precision checkpoints of the merged model's architecture"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"the expert of task {self.task!r} ({self.description}): tensor {name!r} is stored as "
                f"{tensor.dtype}, not as floating point: is it a quantized checkpoint? Experts must be "
                f"full-precision checkpoints of the merged model's architecture"
            )
        divisor = self.divisors.get(name)
        return tensor if divisor is None else tensor / divisor

    def _join(self, name: str, index=None) -> torch.Tensor:
        """Tensor ``name`` made of its parts (``join``; one read of each), ``[index]`` of it."""
        out = joined_tensor(self.reader, *self._joined[name])
        return out if index is None else out[index]

    def check_values(self, name: str, tensor: torch.Tensor) -> None:
        """A clear error where ``tensor``, read for ``name``, holds NaN or inf."""
        if not all_finite(tensor):
            raise ValueError(
                f"the expert of task {self.task!r} ({self.description}): tensor {name!r} has "
                f"non-finite values (NaN or inf)"
            )

    def read(self, name: str, *, like: Optional[torch.Tensor] = None, index=None,
             device=None, own: bool = False) -> torch.Tensor:
        """Tensor ``name``; ``like`` converts to its dtype and device, ``device`` moves it there as
        it is; ``index``: ``name[index]`` only; ``own``: a tensor of its own, for a caller that
        writes into it or puts it in a module whose forward may (``unshared``). The values are
        checked where they end up (on a GPU, a pass over a block's expert weights takes
        microseconds where the CPU took about a tenth of a second per expert of a Llama-8B block)."""
        tensor = stored = self.fetch(name, index)
        if like is not None:
            tensor = tensor.to(device=like.device, dtype=like.dtype)
        elif device is not None:
            tensor = tensor.to(device)
        self.check_values(name, tensor)
        return unshared(tensor, stored) if own else tensor

    def low_rank(self, name: str, device=None, bases: Optional[dict] = None):
        """Tensor ``name`` as ``W_0 + U V`` where this expert is a LoRA adapter that updates it
        so (``LoraExpert.low_rank``; ``bases``: its base's tensors shared with other adapters'),
        the parts' values checked; else None."""
        lora = self.reader.lora
        if name in self.divisors:  # (read dense, divided: W_0 is shared by the experts of one base)
            return None
        shared = {id(t) for t in bases.values()} if bases else set()  # (W_0s checked already)
        expert = None if lora is None else lora.low_rank(self._require(name), device, bases)
        if expert is not None:
            expert.check_values(f"of task {self.task!r} ({self.description}) for {name!r}",
                                ("U", "V") if id(expert.W_0) in shared else ("W_0", "U", "V"))
        return expert


def unshared(tensor: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``tensor``, converted from ``stored`` (a reader's tensor as handed out), copied where the
    conversion left it in ``stored``'s memory. Every read of a file's tensor is the same memory
    (safetensors and torch map the file: a write into one read shows in the next, the file left
    as it is), and an in-memory expert's is the caller's own tensor: a read that is written into,
    or run by a forward that writes it in place, must be a copy."""
    if tensor.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr():
        return tensor.clone()
    return tensor


def model_home(model) -> Optional[Path]:
    """The local directory of the files ``model.name_or_path`` names (from_pretrained's), whose tokenizer files are
    the model's: a directory, or an HF hub id's snapshot in the local hub cache, at the commit the model was loaded
    from where its config records it (nothing is fetched: a model's weights are in memory, and a walk is no
    download). None where it names neither, or the hub cache holds no snapshot of it."""
    name = getattr(model, "name_or_path", None)
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    if Path(name).is_dir():
        return Path(name)
    reference = None if Path(name).exists() else hub_reference(str(name))
    if reference is None:
        return None
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    try:
        return hub_snapshot(reference[0], kind="tokenizer", revision=reference[1] or commit, offline=True)
    except CheckpointError:
        return None


def on_model_vocabulary(model: nn.Module, experts: Mapping[str, object]) -> dict:
    """``experts``, each one whose tokenizer numbers the tokens otherwise than the tokenizer saved
    with ``model`` (``model_home``: its ``name_or_path``, a directory or HF hub id in the hub cache; a merge over
    experts with added tokens, ``tokenizer_source``) wrapped in ``OnVocabulary`` with its row of each of the
    model's tokens, so that expert-path targets run it on the model's token ids; the others as
    they are. An expert's tokenizer is the one saved with it (a directory or hub id), else, for a
    LoRA adapter, its base's. Where the model's or an expert's tokenizer is unknown, that expert
    is taken as numbered like the model (rows of another count are refused by the walk, by
    name), unless the experts' own tokenizers number the tokens otherwise among themselves: then
    some cannot match the model's ids, and the walk is refused. Experts given as modules or
    state dicts carry no tokenizer: give those that number the tokens otherwise as
    ``OnVocabulary``."""
    from .checkpoint_io import key_renaming, local_checkpoint_or_none
    from .lora import LoraExpert, adapter_directory, named_base, named_revision
    from .vocabulary import load_tokenizer, rows_by_token, vocabulary_names

    def tokenizer_at(source, revision=None):
        """The tokenizer saved with ``source`` (a directory or hub id, at ``revision``), or None."""
        local = local_checkpoint_or_none(source, directory=True, revision=revision)
        return None if local is None else load_tokenizer(local)

    state = model.state_dict()
    try:
        name = vocabulary_names(model, list(state))[0]
    except ValueError:  # (no token embeddings)
        return dict(experts)
    home = model_home(model)
    own = None if home is None else load_tokenizer(home)
    out, theirs_by_task = {}, {}
    for task, source in experts.items():
        out[task] = source
        if isinstance(source, OnVocabulary):
            continue
        if isinstance(source, LoraExpert):
            theirs = tokenizer_at(source.directory) or tokenizer_at(getattr(source.base, "path", None))
        elif (here := adapter_directory(source)) is not None:
            # (an adapter directory, or one named by hub id: its repository rarely holds a tokenizer)
            theirs = tokenizer_at(here) or tokenizer_at(named_base(here), named_revision(here))
        else:
            theirs = tokenizer_at(source)
        if theirs is not None:
            theirs_by_task[task] = theirs
        if own is None or theirs is None:
            continue
        weights = ExpertWeights(source, task=task)  # (its names found as the walk finds them)
        try:
            weights.bind(list(state), rename=key_renaming(model))
            rows = None if weights.key_for(name) is None else rows_by_token(own, state[name].shape[0], theirs,
                                                                             weights.shape(name)[0])
        finally:
            weights.close()
        if rows is not None:
            out[task] = OnVocabulary(source, rows)
    if own is None and len(theirs_by_task) > 1:
        vocabs = {task: t.get_vocab() for task, t in theirs_by_task.items()}
        first = next(iter(vocabs))
        differ = [task for task, v in vocabs.items() if v != vocabs[first]]
        if differ:
            raise ValueError(f"expert-path targets run each expert on the model's token ids, and the experts of "
                             f"{[first, *differ]} number the tokens differently, so some cannot match the model's "
                             f"ids; the model's own tokenizer, which would map them, is not saved where its "
                             f"name_or_path ({getattr(model, 'name_or_path', None)!r}) points, nor in the HF hub "
                             f"cache: load the model from "
                             f"its directory, or give the experts as epmq.experts.OnVocabulary(expert, "
                             f"epmq.vocabulary.rows_by_token(...))")
    return out

