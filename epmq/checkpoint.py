"""Save and load quantized models in the packed ``gptq`` checkpoint format.

A checkpoint directory holds

* ``model.safetensors``: the whole state dict; every ``QuantLinear`` as ``qweight``,
  ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) in the GPTQ layout (``epmq.qlinear``).
  Tied tensors (shared embeddings) are stored once. A state dict larger than
  ``max_shard_size`` is written as transformers shards it: ``model-00001-of-0000N.safetensors``
  and ``model.safetensors.index.json`` (each shard copied to host memory as it is written).
* ``quantize_config.json``: the GPTQ quantize config (``quant_method: gptq``, bits,
  group_size, desc_act, sym, static_groups, ``checkpoint_format``) plus an ``epmq`` section:
  every quantized module with its shape, the tied-tensor aliases, how it was quantized.
* ``config.json``: the model's HF config with that ``quantization_config`` (HF models only).

Zero points. ``checkpoint_format="gptq"`` is the original "v1" convention that serving engines
load by default: ``qzeros`` holds ``z - 1``, and loaders add 1. It cannot hold a zero point of
0 (it would wrap to ``2**bits - 1``), which an asymmetric min-max grid produces for a group
whose weights are all >= 0 (rare, but possible at 2-3 bits); asked for explicitly, v1 then
raises before anything is written. ``"gptq_v2"`` stores ``z`` itself. The default, ``"auto"``,
writes v1 and falls back to v2 (with a warning) only for a model v1 cannot hold; the format
written is recorded as ``checkpoint_format`` in both config files.

Writes are atomic: everything goes into a temporary sibling directory, is fsynced, and is then
swapped with the target directory (one ``renameat2(RENAME_EXCHANGE)`` on Linux, two renames
elsewhere), so a crash leaves the previous checkpoint in place, complete. Files a user added
beside a checkpoint (``tokenizer.save_pretrained(directory)``, a README) are carried into the
new one, and so are the files epmq wrote there itself (``.epmq_files.json`` lists them) that
were changed since, but the weights and configs; weights files epmq did not write there make
the write refuse (engines would read them), and so does another tool's GPTQ checkpoint. A
directory that is not a checkpoint is refused too, unless it holds only what a checkpoint is
served with (a tokenizer saved there first), which is kept as the user's. A
symlinked target is written where it points; the temporary directories of a killed write are
removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import filecmp
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from epmq_kernels.grid import is_integer

from ._util import (own_temporary, read_json, read_json_file, release_freed_memory, remove_stale_temporaries,
                    rescale_outside_compilation, rescaled_divisors, rescaling_modules, save_safetensors, storage_key,
                    umask, wrapped_model)
from .adapters import (Transposed, auto_beside, checkpoint_names, find_towers, named_blocks, prepare_towers,
                       remember)
from .adapters.attention import PROJECTIONS, call_projections, hands_weights_to_torch
from .adapters.moe import LinearExperts
from .checkpoint_io import (key_renaming, local_checkpoint, renamed, saved_key_renaming, shard_weight_map,
                            tie_order)
from .checks import all_finite, check_path, device_argument, is_int
from .lora import ADAPTER_CONFIG, is_lora_adapter
from .packing import SUPPORTED_BITS, pack_cols, packed_length, unpack_cols, unpack_rows
from .qlinear import (CALL_FIELDS, QuantLinear, _warn_subnormal, common_quant_config, g_idx_problem,
                      in_order_g_idx)
from .resume import hold_output

FORMATS = ("gptq", "gptq_v2")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE, TORCH_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"  # (read, never written)
CONFIG_FILE = "quantize_config.json"
MERGE_RECIPE_FILE = "epmq_merge.json"  # what epmq merge writes beside its checkpoint
HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # (open_clip's hub layout: model_cfg, preprocess_cfg)
# the weights files a checkpoint epmq writes is made of (``_Shards``)
_OWN_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


# --------------------------------------------------------------------------- save


def save_quantized(model: nn.Module, directory, *, checkpoint_format: str = "auto",
                   max_shard_size="50GB", extras: Optional[Callable[[Path], None]] = None,
                   progress: bool = True) -> Path:
    """Write ``model`` (quantized by ``epmq.quantize_model``) to ``directory``, atomically.

    ``checkpoint_format``: "gptq" (v1, qzeros = z - 1), "gptq_v2" (qzeros = z), or "auto" (v1
    unless some zero point is 0, then v2); see the module docstring. ``max_shard_size``: bytes,
    or a string like "5GB" or "500MiB" (transformers' default, "50GB", is also the hub's limit
    per file); a tensor larger than it gets a shard of its own. ``extras(path)``: writes what
    the checkpoint is served with (``tokenizer.save_pretrained``) into the new directory before
    it replaces the old one, so that an interruption leaves the old checkpoint whole; without
    it, a model ``load_quantized`` built gets the tokenizer and processor files of the
    checkpoint it was loaded from. ``progress``: a bar of the bytes written, shard by shard.
    """
    check_path(directory, "directory")
    if checkpoint_format not in FORMATS + ("auto",):
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}, got {checkpoint_format!r}")
    max_shard_bytes = _bytes(max_shard_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module quantized by epmq.quantize_model, got "
                        f"{type(model).__name__}")
    model = wrapped_model(model)  # (torch.compile's or DataParallel's wrapper: the model's own names)
    # every name of a layer shared by several (ALBERT's shared blocks): each is converted
    layers = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QuantLinear layer: quantize it first")
    if checkpoint_format == "auto":
        unfit = [name for name, m in layers.items() if bool((m.zeros() == 0).any())]
        checkpoint_format = "gptq_v2" if unfit else "gptq"
        if unfit:
            warnings.warn(
                f"{len(unfit)} layers (first: {unfit[0]}) have zero points equal to 0, which the v1 "
                f"'gptq' format cannot store: writing checkpoint_format='gptq_v2'"
            )
    ragged = [name for name, m in layers.items() if m.ragged]
    if ragged:
        m = layers[ragged[0]]
        warnings.warn(
            f"{len(ragged)} layers (first: {ragged[0]}, {m.in_features} inputs) have an input width "
            f"that group_size={m.group_size} does not divide"
            f"{' (larger than it: one group of the whole width)' if m.group_size > m.in_features else ''}: "
            f"ceil(K / g) groups, the last shorter, "
            f"as GPTQ and GPTQModel write them. epmq loads them (on CUDA it dequantizes such layers "
            f"instead of using its W4A16 kernel), and so does GPTQModel with its torch kernel "
            f"(backend=BACKEND.TORCH); its other kernels, the ones transformers picks on a CPU, and "
            f"vLLM's GPTQ layers require the group size to divide the width"
        )
    transposed = _transposed_linears(model)
    tensors, tied = _tensors(model, layers, checkpoint_format, transposed)
    # the names transformers itself would write (Mixtral's block_sparse_moe, ViT's hub naming),
    # which serving engines and older loaders look for
    to_disk = renamed([*tensors, *tied], saved_key_renaming(model))
    tensors = {to_disk[k]: t for k, t in tensors.items()}
    tied = {to_disk[alias]: to_disk[source] for alias, source in tied.items()}
    names = {name: _module_of(to_disk[f"{name}.qweight"]) for name in layers}
    qconfig = _quantize_config(model, layers, names, checkpoint_format, tied)
    ours = qconfig.pop("epmq")  # (the engines' fields first, as other writers order them)
    partial, split = _partial_fields(model, layers, to_disk)
    overrides = qconfig.pop("dynamic", {})
    qconfig.update(partial)
    if overrides:  # (after the -: rules: engines take the first rule whose regex matches a module's name)
        qconfig["dynamic"] = {**qconfig.get("dynamic", {}), **overrides}
    head = _quantized_head(model, layers)
    if head is not None:
        qconfig["lm_head"] = True
        if "modules_in_block_to_quantize" in qconfig:
            # vLLM builds the head quantized only where this list, once written, names it (else a
            # float head, and the packed tensors fail its load); transformers' (optimum) by its module name
            # (LLaVA's lm_head, saved as language_model.lm_head)
            qconfig["modules_in_block_to_quantize"].append(list(dict.fromkeys([names[head], head])))
    qconfig.update(_optimum_fields(model, layers, qconfig))
    if transposed:  # (so that load_quantized transposes these back, and only these)
        ours["transposed"] = [to_disk[key] for key in transposed.values()]
    undivided = list(rescaling_modules(model))
    if undivided:  # (RWKV's weights multiplied back, _tensors: said so, as epmq's first ones held them divided)
        ours["undivided"] = undivided
    qconfig["epmq"] = ours
    # the experts transformers holds fused (stacked tensors), rebuilt as linears for the walk
    fused = [f"{name}.{rel}" for name, m in model.named_modules() if isinstance(m, LinearExperts)
             for rel, q in m.named_modules() if isinstance(q, QuantLinear)]
    _serving_warnings(layers, qconfig, split, [disk for disk in names.values() if _experts_of(disk)], fused,
                      _built_as_linear_subclasses(model, layers), _expert_widths(model, layers, to_disk),
                      getattr(getattr(model, "config", None), "model_type", None) in _ROUTER_ON_INPUT,
                      _hidden_activation(model),
                      # (engines read act-order as off per channel: only grouped layers keep g_idx)
                      _marlin_act_order_unfit({n: m for n, m in layers.items() if m.group_size != -1}, names, head))
    _stacked_experts_warning(model, layers, to_disk)
    _main_input_warning(model)
    files = {CONFIG_FILE: qconfig}
    hf = getattr(model, "config", None)
    if hf is not None and hasattr(hf, "to_json_string"):
        config = json.loads(hf.to_json_string(use_diff=False))
        if qconfig.get("lm_head"):
            config = _untied_head(hf, config)
        config["architectures"] = [type(model).__name__]  # as save_pretrained writes them
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = {k: v for k, v in qconfig.items() if k != "epmq"}
        files[HF_CONFIG_FILE] = config
    elif isinstance(getattr(model, "epmq_open_clip_config", None), dict):  # (what load_quantized read)
        files[OPEN_CLIP_CONFIG_FILE] = model.epmq_open_clip_config
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        # what generate() and serving engines default to (EOS ids, sampling), as save_pretrained writes it
        files[GENERATION_CONFIG_FILE] = json.loads(generation.to_json_string(use_diff=True))
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        # (a 70B model's tens of GB took minutes after the walk's bar had ended, said by nothing)
        with _bytes_bar(f"save {directory.name}", sum(map(_nbytes, tensors.values())), progress) as bar:
            writer = ShardWriter(tmp, max_shard_bytes, written=bar.update)
            for name, t in tensors.items():
                writer[name] = t
            writer.finish()
        # classes a checkpoint's own code defines (trust_remote_code): config.json's auto_map names their
        # files, without which transformers and engines cannot read the checkpoint; as save_pretrained does
        for obj in (hf, model):
            if getattr(type(obj), "_auto_class", None) is not None:
                from transformers.dynamic_module_utils import custom_object_save

                custom_object_save(obj, tmp, config=files.get(HF_CONFIG_FILE))
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        if extras is not None:
            extras(tmp)
        else:  # (a model load_quantized built: its checkpoint's tokenizer, which the write would drop)
            for name, data in getattr(model, "epmq_served_with", {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
    return directory


class _SavePretrained:
    """``save_pretrained`` of a transformers model holding ``QuantLinear`` layers: writes what
    ``save_quantized`` writes. transformers' own would write the packed tensors in epmq's layout
    with no ``quantization_config``, which ``from_pretrained`` reads as a plain model whose
    linears it leaves random-initialised. Bound to the model as an instance attribute by
    ``bind_save_pretrained`` (or made for one save by ``_SavesHolders``); holds it by a weak
    reference (no reference cycle to keep a model's memory alive), and is rebuilt around the copy
    when the model is deep-copied or pickled."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __reduce__(self):  # (the model is memoised by then: the copy's own is bound)
        return type(self), (self._model(),)

    def __call__(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                 max_shard_size="50GB", variant=None, token=None, save_peft_format: bool = True,
                 save_original_format: bool = True, distributed_checkpoint: bool = False, **kwargs):
        """Write this quantized model to ``save_directory`` as ``epmq.save_quantized`` does
        (packed gptq safetensors, ``quantization_config``, atomically; ``max_shard_size`` as
        transformers takes it). Options transformers' ``save_pretrained`` has that this format
        cannot honour are refused, not ignored. ``token`` is only used to push, which is refused."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model this save_pretrained was bound to no longer exists")
        refused = []
        if state_dict is not None:
            refused.append("state_dict= (the checkpoint is the packed layers' own tensors)")
        if push_to_hub:
            refused.append("push_to_hub=True (save, then upload the directory; or call model.push_to_hub)")
        if variant is not None:
            refused.append(f"variant={variant!r} (the format's file names are fixed)")
        if not save_original_format:
            refused.append("save_original_format=False (tensors are written under the names on the hub)")
        if distributed_checkpoint:
            refused.append("distributed_checkpoint=True")
        if kwargs.pop("safe_serialization", True) is False:
            refused.append("safe_serialization=False (the format is safetensors)")
        if not _saves_quantized(model):
            return type(model).save_pretrained(
                model, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                push_to_hub=push_to_hub, max_shard_size=max_shard_size, variant=variant, token=token,
                save_peft_format=save_peft_format, save_original_format=save_original_format,
                distributed_checkpoint=distributed_checkpoint, **kwargs)
        refused += [f"{key}=" for key in kwargs]
        if refused:
            raise ValueError(f"save_pretrained of a model quantized by epmq writes epmq.save_quantized's "
                             f"checkpoint and cannot honour: {'; '.join(refused)}. Call "
                             f"epmq.save_quantized(model, directory, max_shard_size=...) directly, or "
                             f"type(model).save_pretrained(model, ...) for transformers' own (which "
                             f"from_pretrained cannot read back quantized)")
        saved = _SAVED_THROUGH_SUPER.get()
        if saved is not None:  # (within a class's own save_pretrained, which may save a model it holds)
            saved.add(id(model))
        if is_main_process:  # (as transformers: the other processes of a distributed run write nothing)
            save_quantized(model, save_directory, max_shard_size=max_shard_size)


class _ResizeTokenEmbeddings:
    """``resize_token_embeddings`` of a transformers model holding ``QuantLinear`` layers: refuses
    a vocabulary its packed head does not have before anything changes. transformers' own resizes
    the embeddings first and then fails on the head (not an ``nn.Linear``), leaving a model whose
    embeddings and logits differ in size. Bound and held as ``_SavePretrained``."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __reduce__(self):
        return type(self), (self._model(),)

    def __call__(self, *args, **kwargs):
        model = self._model()
        if model is None:
            raise RuntimeError("the model this resize_token_embeddings was bound to no longer exists")
        # (the class's own arguments passed on as given: IBert's takes new_num_tokens alone)
        new_num_tokens = args[0] if args else kwargs.get("new_num_tokens")
        pad_to_multiple_of = args[1] if len(args) > 1 else kwargs.get("pad_to_multiple_of")
        head = model.get_output_embeddings()
        if isinstance(head, QuantLinear) and (new_num_tokens is not None or pad_to_multiple_of is not None):
            n = new_num_tokens
            if n is None:
                n = model.get_input_embeddings().weight.shape[0]
            if is_int(pad_to_multiple_of) and pad_to_multiple_of > 0:  # (as transformers rounds it)
                n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
            if n != head.out_features:
                name = next((k for k, m in model.named_modules() if m is head), "the output projection")
                raise ValueError(
                    f"{name} is packed ({type(head).__name__}({head.extra_repr()})): its {head.out_features} rows "
                    f"cannot be resized to {n} tokens, and the embeddings were left as they are. Resize the "
                    f"float model before quantizing it, or replace the head with an nn.Linear of its dequantize()")
        return type(model).resize_token_embeddings(model, *args, **kwargs)


def _saves_quantized(model: nn.Module) -> bool:
    """Whether ``model.save_pretrained`` writes save_quantized's checkpoint: where it holds packed
    layers, but not where transformers loaded adapters into it (its save writes them alone, in
    PEFT's format, nothing of the quantized layers) nor where none is left (each replaced by an
    nn.Linear of its dequantize(): a float model, which save_quantized refuses)."""
    return not getattr(model, "_hf_peft_config_loaded", False) and any(
        isinstance(m, QuantLinear) for m in model.modules())


def bind_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write ``save_quantized``'s checkpoint, where ``model`` (or
    the model a ``torch.compile`` wrapper holds) is a transformers ``PreTrainedModel`` holding
    ``QuantLinear`` layers, and ``model.resize_token_embeddings`` refuse to resize a packed head
    before it resizes the embeddings. Other modules (open_clip's) are left as they are: they have no
    ``save_pretrained``. A transformers model holding the one quantized (``lm`` after
    ``quantize_model(lm.model)``), or one whose class's own save_pretrained calls super(), is saved
    through ``_bind_holders_on_save``'s; models holding no packed layer keep transformers' own.
    (Under DataParallel too: ``model.module.save_pretrained`` is what its user calls.)"""
    model = wrapped_model(model)
    transformers = sys.modules.get("transformers")  # (not imported: no model of it exists)
    if transformers is None or not any(isinstance(m, QuantLinear) for m in model.modules()):
        return
    _bind_holders_on_save(transformers.PreTrainedModel)
    if not isinstance(model, transformers.PreTrainedModel):
        return
    # (an instance attribute: found before the class's method, by the compiled wrapper's lookup too;
    # but for a class's own that calls super(), which would be skipped: it is run, super() saving here)
    if not getattr(inspect.getattr_static(type(model), "save_pretrained"), "runs_own", False):
        model.save_pretrained = _SavePretrained(model)
    model.resize_token_embeddings = _ResizeTokenEmbeddings(model)


def route_save_pretrained() -> None:
    """Route transformers' save_pretrained (``_bind_holders_on_save``) where it is not yet: in a
    process that quantized and loaded nothing, a model holding packed layers that was unpickled
    (``torch.save(lm)`` after ``quantize_model(lm.model)`` or ``quantize_model(clip.encoder)``)
    saved the packed tensors with no quantization_config. Called as a ``QuantLinear`` is unpickled,
    when the classes of the model holding it are imported."""
    transformers = sys.modules.get("transformers")  # (not imported: no model of it holds the layer)
    if transformers is not None and not isinstance(
            transformers.PreTrainedModel.__dict__.get("save_pretrained"), _SavesHolders):
        _bind_holders_on_save(transformers.PreTrainedModel)


def _bind_holders_on_save(pretrained_model: type) -> None:
    """Have transformers' ``PreTrainedModel.save_pretrained`` write save_quantized's checkpoint
    (``_SavePretrained``) for a model holding ``QuantLinear`` layers that was not bound itself. The
    quantized module may be a part of the model saved (``quantize_model(lm.model)``, then
    ``lm.save_pretrained``), which shares its config but is not reachable from it: transformers'
    own save then wrote the packed tensors in epmq's layout with no ``quantization_config``, a
    checkpoint that from_pretrained reads with its linears random and load_quantized refuses.
    Installed once per class (``_SavesHolders``); a call through the class
    (``type(model).save_pretrained(model, ...)``) and one on a model with no packed layer are
    the class's own. A subclass's own ``save_pretrained`` is installed on too, else it shadows
    transformers' for its models: one that writes the state dict itself (never reaching
    transformers') wrote the packed tensors with no ``quantization_config``. The subclasses are
    walked at each bind, so a class defined before the model it holds was quantized is one; one
    defined later (imported after the walk, then handed its packed layers) is installed on as it is
    made, by ``__init_subclass__``."""
    classes = [pretrained_model]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        _route_own_save(cls, pretrained_model)
    own = pretrained_model.__dict__.get("__init_subclass__")
    if getattr(own, "__func__", None) is not None and getattr(own.__func__, "routes_save_pretrained", False):
        return

    def __init_subclass__(cls, **kwargs):
        if own is None:
            super(pretrained_model, cls).__init_subclass__(**kwargs)
        else:
            own.__get__(None, cls)(**kwargs)
        _route_own_save(cls, pretrained_model)

    __init_subclass__.routes_save_pretrained = True
    pretrained_model.__init_subclass__ = classmethod(__init_subclass__)


def _route_own_save(cls: type, pretrained_model: type) -> None:
    """``cls``'s own ``save_pretrained`` made a ``_SavesHolders`` (``_bind_holders_on_save``)."""
    own = cls.__dict__.get("save_pretrained")
    if inspect.isfunction(own):  # (one installed already is no function)
        cls.save_pretrained = _SavesHolders(own, overrides=cls is not pretrained_model)


# the ids of the models saved through save_quantized within the class's own save_pretrained running
# (``_SavesHolders``): those of its super().save_pretrained, or of a model it holds (``self.model``'s)
_SAVED_THROUGH_SUPER = contextvars.ContextVar("epmq_saved_through_super", default=None)


class _SavesHolders:
    """A model class's ``save_pretrained`` that saves a model holding ``QuantLinear`` layers through
    ``_SavePretrained`` (``_bind_holders_on_save``). A descriptor, not a function, so that read
    from the class it is the class's own: a function cannot tell ``type(lm).save_pretrained(lm, d)``
    from ``lm.save_pretrained(d)``, and so bound ``lm`` on the first of two such calls, writing
    save_quantized's checkpoint, and was transformers' own on the second.

    ``overrides``: ``own`` is a subclass's, shadowing transformers'. One that can call
    ``super()`` (``runs_own``) is run, at every save, so that what it adds (a tokenizer, a card, a
    generation config) is kept, its ``super().save_pretrained`` writing save_quantized's checkpoint
    (or the save_pretrained of a model it holds, ``self.model.save_pretrained``: that one's checkpoint,
    as for a float model); one that returns without either wrote the packed layers itself, which is
    said. One that cannot is not run: the model is saved through save_quantized at once."""

    def __init__(self, own, overrides: bool = False):
        self.own = own
        self.runs_own = overrides and "super" in inspect.unwrap(own).__code__.co_names

        @functools.wraps(own)
        def save_pretrained(model, *args, **kwargs):
            if "save_pretrained" in vars(model) or not _saves_quantized(model):
                return own(model, *args, **kwargs)
            if not self.runs_own:
                return _SavePretrained(model)(*args, **kwargs)
            saved = _SAVED_THROUGH_SUPER.get()
            token = _SAVED_THROUGH_SUPER.set(set()) if saved is None else None  # (the outermost override's)
            try:
                result = own(model, *args, **kwargs)
                saved = _SAVED_THROUGH_SUPER.get()
                if not any(id(m) in saved for m in model.modules()):
                    raise RuntimeError(
                        f"{own.__qualname__} returned without calling super().save_pretrained (nor the "
                        f"save_pretrained of a model it holds), which epmq routes to save_quantized for a model "
                        f"holding packed layers: what it wrote holds them with no quantization_config, which "
                        f"from_pretrained and serving engines read as an unquantized model (its linears random). "
                        f"Save with epmq.save_quantized(model, directory), or have it call super().save_pretrained")
            finally:
                if token is not None:
                    _SAVED_THROUGH_SUPER.reset(token)
            return result

        self._binding = save_pretrained

    def __get__(self, model, owner=None):
        return self.own if model is None else self._binding.__get__(model, owner)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _bytes(size) -> int:
    """``size`` (an int, or a string like "5GB" or "500MiB", as transformers writes them) in
    bytes."""
    if not (is_integer(size) or isinstance(size, str)):  # (numpy's integers too, as transformers takes them)
        raise ValueError(f"max_shard_size must be a number of bytes or a string like '5GB', got {size!r}")
    size = size if isinstance(size, str) else int(size)
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        unit = text[len(digits):]
        try:
            size = int(float(digits) * _UNITS[unit])
        except (KeyError, ValueError, OverflowError):  # (OverflowError: "inf", "1e400GB")
            raise ValueError(f"max_shard_size must be a number of bytes or a string like '5GB', "
                             f"got {size!r}") from None
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return size


def _bytes_bar(desc: str, total: int, progress: bool):
    """A bar of ``total`` bytes (a checkpoint's written or read), off where ``progress`` is not."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(model, layers, checkpoint_format, transposed):
    """The state dict to write (v1 zero points converted, ``transposed`` linears in their
    family's layout, tied tensors once) and the aliases."""
    state = model.state_dict()
    # RWKV's layers as its checkpoints hold them, multiplied back: transformers' loader (a serving
    # engine's) divides them on the first forward in eval mode, and divided again they were 2 ** k off
    divisors = rescaled_divisors(model)
    for name, layer in layers.items():
        # a packed layer's multiplier (its weight's in-place writes: RWKV's division) in its scales, as the
        # format holds the weight; one rounding of the scales times both, none where they cancel
        factor = layer.weight_multiplier * divisors.pop(f"{name}.weight", 1)
        exact = layer.scales if factor == 1 else layer.scales.double() * factor
        state[f"{name}.scales"] = scales = exact.to(torch.float16)  # the format's dtype
        if not all_finite(scales):  # (a peer's fp32 scales, loaded, or a multiplier past the format's range)
            times = f" times {factor:g} (its weight_multiplier, RWKV's division undone)" if factor != 1 else ""
            raise ValueError(f"layer {name} has scales up to {float(layer.scales.abs().max()):.3g}{times}, beyond "
                             f"float16's range, the gptq format's scale dtype")
        if factor != 1:
            _warn_subnormal(scales, exact, layer.bits, f"layer {name}'s, saved times {factor:g} (its weight's "
                            f"multiplier), as the format holds the weight")
        if checkpoint_format == "gptq":
            z = layer.zeros()
            if bool((z == 0).any()):
                raise ValueError(
                    f"layer {name} has zero points equal to 0, which the v1 'gptq' format cannot "
                    f"store (it holds z - 1): save with checkpoint_format='gptq_v2'"
                )
            state[f"{name}.qzeros"] = pack_cols(z - 1, layer.bits)
    for name, divisor in divisors.items():  # (the dense ones)
        state[name] = state[name] * divisor
        if not all_finite(state[name]):
            raise ValueError(f"{name} times {divisor} (RWKV's division for inference undone, as its checkpoints "
                             f"hold the weights) overflows {str(state[name].dtype)[6:]}")
    for name, key in transposed.items():
        state[key] = state.pop(name).t()
    tensors, tied, first = {}, {}, {}
    for name, t in state.items():
        key = storage_key(t) if t.numel() else None
        if key is not None and key in first:
            tied[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        tensors[name] = t.detach()  # moved to the host shard by shard, as each is written
    return tensors, tied


def _transposed_linears(model) -> dict:
    """``{weight name: checkpoint name}`` of the linears the walk rewrote from a transposed
    layout (GPT-2's ``Conv1D``) and left in full precision: the checkpoint holds them in the
    family's own layout, which engines build (and ``load_quantized`` transposes back)."""
    found = {}
    for name, key in checkpoint_names(model).items():
        owner = name.rpartition(".")[0]
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if (isinstance(key, Transposed) and isinstance(module, nn.Linear) and not isinstance(module, QuantLinear)
                and name == f"{owner}.weight"):
            found[name] = str(key)
    return found


def _module_of(qweight_key: str) -> str:
    if not qweight_key.endswith(".qweight"):
        raise ValueError(f"a renaming rule changed the suffix of a packed weight: {qweight_key!r}")
    return qweight_key[: -len(".qweight")]


# the linears vLLM and SGLang load as one (qkv_proj, gate_up_proj; Mixtral's experts' w13):
# each shard must be quantized alike
FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})


def _fused_set(rel: str):
    return next((group for group in FUSED if rel.rpartition(".")[2] in group), None)


# a routed expert's projection in a block, ``<experts>.<e>.<projection>`` (not a shared expert's):
# vLLM and SGLang build a block's experts as one FusedMoE module named ``<experts>``, of one precision
_ROUTED_EXPERT = re.compile(r"^(.*\bexperts)\.[^.]+\.")


def _experts_of(rel: str):
    match = _ROUTED_EXPERT.match(rel)
    return match.group(1) if match else None


# the families whose experts vLLM builds as a FusedMoE that weights the tokens by the router before the experts
# (apply_router_weight_on_input: Llama 4's), which MoE Marlin does not take
_ROUTER_ON_INPUT = ("llama4", "llama4_text")
# an expert's projection as vLLM's FusedMoE loads it (its expert_params_mapping): gate/up (w1/w3) take the
# hidden states to the intermediate width, down (w2) back
_TO_INTERMEDIATE, _TO_HIDDEN = {"gate_proj", "up_proj", "w1", "w3"}, {"down_proj", "w2"}


def _expert_widths(model, layers, to_disk) -> dict:
    """``{a block's routed experts (the FusedMoE name on disk): (hidden widths, intermediate widths, the
    (bits, group_size) of those quantized)}`` from their projections, quantized or in full precision."""
    units = {}
    for name, m in model.named_modules():
        if name in layers:
            key, kind = f"{name}.qweight", (m.bits, m.group_size)
        elif type(m) is nn.Linear:
            key, kind = f"{name}.weight", None
        else:
            continue
        disk = to_disk.get(key, key).rpartition(".")[0]
        unit, last = _experts_of(disk), disk.rpartition(".")[2]
        if unit is None or last not in _TO_INTERMEDIATE | _TO_HIDDEN:
            continue
        hidden, inter, kinds = units.setdefault(unit, (set(), set(), set()))
        h, i = (m.in_features, m.out_features) if last in _TO_INTERMEDIATE else (m.out_features, m.in_features)
        hidden.add(h)
        inter.add(i)
        if kind is not None:
            kinds.add(kind)
    return units


def _marlin_act_order_unfit(layers, names, head=None) -> list:
    """``(name on disk, in_features, out_features)`` of each quantized linear (``names``: its name on disk),
    routed experts aside, as vLLM loads it (q/k/v as qkv_proj, gate/up as gate_up_proj: their widths summed, under
    the first's name), whose widths on one tensor-parallel rank vLLM's GPTQ Marlin does not take under act-order
    (verify_marlin_supports_shape, through MarlinLinearKernel.can_implement at vllm-project/vllm
    055e47c28003156421365af985d676fc921cb075): out_features a multiple of GPTQ_MARLIN_MIN_THREAD_N = 64 and
    in_features of GPTQ_MARLIN_MIN_THREAD_K = 128 (whole groups then, for the group sizes Marlin takes). Without
    act-order it pads both to its tiles; with it, none.
    ``head``: the quantized head's name, whose rows vLLM pads to a multiple of 64 (ParallelLMHead)."""
    loaded = {}
    for name, m in layers.items():
        disk = names[name]
        if _experts_of(disk) is not None:
            continue
        parent, _, rel = disk.rpartition(".")
        fused = _fused_set(rel)
        key = disk if fused is None else (parent, id(fused))
        first, k, n = loaded.get(key, (disk, m.in_features, 0))
        loaded[key] = (first, k, n + m.out_features)
    padded = None if head is None else names[head]
    return [(disk, k, n) for disk, k, n in loaded.values() if k % 128 or (n % 64 and disk != padded)]


def _hidden_activation(model) -> Optional[str]:
    """The activation a transformers config names for the model's MLPs, experts included (``hidden_act``, Gemma's
    ``hidden_activation``; a VLM's text config's), which engines build the experts with; None where it names none."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # (the decoder's: MusicGen's config holds a text encoder's too,
        # and transformers refuses to choose between them unasked)
        config = config.get_text_config(decoder=True)
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return name if isinstance(name, str) else None


def _disk_rel(disk: str, stack: str, key: str, rel: str) -> tuple:
    """``(block prefix, name in the block)`` of a linear's name on disk, ``key`` its block's name in
    the stack (renaming rules may change either part: Mixtral's ``block_sparse_moe``)."""
    parts, last = disk.split("."), stack.rpartition(".")[2]
    for j in range(1, len(parts) - 1):
        if parts[j] == key and parts[j - 1] == last:
            return ".".join(parts[:j]), ".".join(parts[j + 1:])
    return stack, rel


def _partial_fields(model, layers, to_disk) -> tuple:
    """``modules_in_block_to_quantize`` and ``dynamic`` negative rules when some linear inside
    the quantized blocks was left in full precision (``quantize_model(layers=...)``): without
    them vLLM, SGLang, GPTQModel and transformers build every linear of every block as a GPTQ
    layer, and then refuse the checkpoint, crash, or serve garbage. Returns ``(fields, split)``,
    ``split`` the linears left in full precision beside quantized ones vLLM loads fused with them,
    routed experts of one block of which some are quantized and some not (``"<experts> (MoE)"``), and a block's
    experts left in full precision (``"<experts> (MoE float)"``)."""
    try:
        towers = find_towers(model)
    except (ValueError, TypeError):  # (no registered adapter walks it: nothing is known of its blocks)
        return {}, []
    quantized = {id(m) for m in layers.values()}
    # a tower AUTO walked beside the default's (Aria's language model): its linears left in full
    # precision were named in no rule, and engines built them as GPTQ layers
    towers += auto_beside(model, towers, lambda _, blocks: any(id(m) in quantized for b in blocks for m in b.modules()))
    found = []  # (disk prefix, disk rel, block index, quantized) of the linears in the stacks holding quantized ones
    # (disk prefix, block index) -> the block's name in its stack: its index, or the child name an OrderedDict gave it
    # (torchvision's ViT's encoder_layer_0), which the rules and lists below name it by
    keys = {}
    module_names = {}  # (disk prefix, block index, disk rel) -> the module's name in the model (transformers')
    routing = set()  # those of them that are routers (JetMoE's sits among its experts: not an expert)
    for adapter, stacks in towers:
        for prefix, blocks in stacks:
            if not any(id(m) in quantized for block in blocks for m in block.modules()):
                continue
            for i, (name, block) in enumerate(named_blocks(prefix, blocks)):
                child = name[len(prefix) + 1:]
                # the adapter's linears left in full precision and the packed layers in their place
                candidates = {**adapter.linears(block), **{rel: m for rel, m in block.named_modules()
                                                           if id(m) in quantized}}
                routers = set(adapter.routers(block))
                for rel, m in candidates.items():
                    key = f"{name}.{rel}.{'qweight' if isinstance(m, QuantLinear) else 'weight'}"
                    disk = to_disk.get(key, key).rpartition(".")[0]
                    found.append((*_disk_rel(disk, prefix, child, rel), i, id(m) in quantized))
                    keys[found[-1][0], i] = child
                    module_names[found[-1][0], i, found[-1][1]] = f"{name}.{rel}"
                    if rel in routers:
                        routing.add(found[-1][:3])
    if all(q for *_, q in found):
        return {}, []
    composite = _composite(model)
    rels = list(dict.fromkeys(rel for _, rel, _, q in found if q))
    # groups of the linears that read one input (as GPTQModel lists them); transformers and
    # vLLM only flatten the list and match names ending in them
    groups = []
    for rel in rels:
        prev = groups[-1][-1] if groups else None
        group = _fused_set(rel)
        if prev is not None and group is not None and _fused_set(prev) is group \
                and prev.rpartition(".")[0] == rel.rpartition(".")[0]:
            groups[-1].append(rel)
        else:
            groups.append([rel])
    rules = []
    # (every block of a stack: by number, by any name where an OrderedDict named them)
    every = {stack: r"\d+" if all(key.isdigit() for (s, _), key in keys.items() if s == stack) else r"[^.]+"
             for stack, _ in keys}
    by_block, by_rel = {}, {}
    for stack, rel, i, q in found:
        by_block.setdefault((stack, i), []).append(q)
        by_rel.setdefault((stack, rel), []).append((i, q))
    # a block left whole: one rule for all of it, which also matches the fused names vLLM
    # gives its layers (qkv_proj); each rule matches the names engines load a VLM's layers under too
    whole = {key for key, qs in by_block.items() if not any(qs)}
    for stack, i in sorted(whole):
        rules.append(rf"{_engine_name(stack, composite)}\.{re.escape(keys[stack, i])}\.")
    # vLLM chooses a block's experts' precision by the FusedMoE module's name alone (``<experts>``),
    # which the rules per projection below do not match: experts left in full precision need a rule
    # of their own, or it builds them quantized and fails to load them (SGLang reads no rule for
    # them: _serving_warnings says so)
    experts = {}
    for stack, rel, i, q in found:
        if _experts_of(rel) is not None and (stack, rel, i) not in routing:
            experts.setdefault((stack, _experts_of(rel)), {}).setdefault(i, set()).add(q)
    mixed = []
    for (stack, module), blocks in experts.items():
        left = [i for i, qs in blocks.items() if qs == {False} and (stack, i) not in whole]
        mixed += [f"{stack}.{keys[stack, i]}.{module} (MoE)" for i, qs in blocks.items() if len(qs) > 1]
        # (those the rules keep in full precision on GPTQ Marlin only: vLLM's plain GPTQ path reads no rule for them)
        mixed += [f"{stack}.{keys[stack, i]}.{module} (MoE float)" for i, qs in blocks.items() if qs == {False}]
        if left and len(left) == len(blocks):
            rules.append(rf"{_engine_name(stack, composite)}\.{every[stack]}\.{re.escape(module)}$")
        else:
            rules += [rf"{_engine_name(stack, composite)}\.{re.escape(keys[stack, i])}\.{re.escape(module)}$"
                      for i in left]
    for (stack, rel), entries in by_rel.items():
        left = [i for i, q in entries if not q and (stack, i) not in whole]
        if not left:
            continue
        if len(left) == len(entries):
            rules.append(rf"{_engine_name(stack, composite)}\.{every[stack]}\.{re.escape(rel)}$")
        else:
            rules += [rf"{_engine_name(stack, composite)}\.{re.escape(keys[stack, i])}\.{re.escape(rel)}$"
                      for i in left]
    # vLLM takes a linear for quantized where any name listed lies inside its own (a fused qkv_proj by its
    # q/k/v names), and builds towers left whole with the same config: a name of theirs holding a
    # block's (LLaVA's vision tower's self_attn.q_proj) had GPTQ layers built for its float weights. The
    # names are then listed whole (vLLM maps them to its own, as it maps these lists).
    # transformers' GPTQ loader (optimum) ignores the rules: it builds every linear under the block name ending
    # in a listed name as a GPTQ layer (one left in full precision in some blocks: layers.1.mlp.down_proj, a
    # block left whole), so then too; and it matches transformers' module names, listed beside those on disk
    # (LLaVA's model.language_model.layers... saved as language_model.model.layers...)
    listed = [rel for group in groups for rel in group]
    floats = [name for name, m in model.named_modules()
              if type(m) in (nn.Linear, nn.Conv2d) or type(m).__name__ == "Conv1D"]
    full = [to_disk.get(f"{name}.weight", f"{name}.weight").rpartition(".")[0] for name, m in model.named_modules()
            if isinstance(m, nn.Linear)]
    if any(rel in name for name in full if not any(re.match(r, name) for r in rules) for rel in listed) \
            or any(name.endswith(rel) for name in floats for rel in listed):
        packed = {(stack, i, rel) for stack, rel, i, q in found if q}
        blocks = dict.fromkeys((stack, i) for stack, _, i, q in found if q)
        groups = [list(dict.fromkeys(whole)) for stack, i in blocks for group in groups
                  if (whole := [n for rel in group if (stack, i, rel) in packed
                                for n in (f"{stack}.{keys[stack, i]}.{rel}", module_names[stack, i, rel],
                                          *_vllm_tower_names(f"{stack}.{keys[stack, i]}.{rel}", composite))])]
    fields = {"modules_in_block_to_quantize": groups, "dynamic": {f"-:{r}": {} for r in rules}}
    return fields, _fused_splits(found, keys) + mixed


# the names vLLM and SGLang give the linears they load as one (their packed_modules_mapping)
_FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
# a block's index in a regex of a name (the first number between dots)
_ESCAPED_INDEX = re.compile(r"\\\.(\d+)\\\.")


def _composite(model) -> bool:
    """A transformers model of several configs (a VLM's text and vision configs): one whose names engines
    may load under others (``_engine_name``)."""
    return bool(getattr(getattr(model, "config", None), "sub_configs", None))


# a CLIP or SigLIP vision tower's name as transformers 5 holds and saves it, without the tower's own vision_model
# level (LLaVA's vision_tower.encoder.layers...), which vLLM's CLIPVisionModel and SiglipVisionModel keep
_TOWER_LEVEL_DROPPED = re.compile(r"^(?:model\.)?vision_tower\.(?=encoder\.)")


def _vllm_tower_names(name: str, composite: bool) -> list:
    """``name`` as vLLM names the module where it lies in such a tower (``vision_tower.vision_model.encoder...``)."""
    return [_TOWER_LEVEL_DROPPED.sub("vision_tower.vision_model.", name)] * bool(
        composite and _TOWER_LEVEL_DROPPED.match(name))


def _engine_name(name: str, composite: bool) -> str:
    """A regex of ``name`` on disk; for a ``composite`` model's, one that also matches the names engines
    match rules against: vLLM's VLMs load a checkpoint through an hf_to_vllm_mapper that moves the
    language model's leading ``model.`` (Qwen3-VL's and LLaVA's ``model.language_model.`` ->
    ``language_model.model.``, Qwen2.5-VL's ``model.`` -> ``language_model.model.``, ``lm_head`` ->
    ``language_model.lm_head``) and drops a
    tower's (``model.visual.`` -> ``visual.``), and GPTQModel matches transformers' module names
    (Qwen2.5-VL's ``model.language_model.layers``, LLaVA's ``model.vision_tower``)."""
    if not composite:
        return re.escape(name)
    swapped = r"(?:model\.language_model\.|language_model\.model\.)"
    for lead, regex in (("model.language_model.", swapped), ("language_model.model.", swapped),
                        ("model.", r"(?:model\.language_model\.|language_model\.model\.|model\.)?"),
                        ("language_model.lm_head", r"(?:language_model\.)?lm_head"),
                        ("lm_head", r"(?:language_model\.)?lm_head")):
        if name.startswith(lead):
            regex += re.escape(name[len(lead):])
            break
    else:
        regex = r"(?:model\.)?" + re.escape(name)
    if _TOWER_LEVEL_DROPPED.match(name):  # (vLLM's CLIPVisionModel keeps the tower's vision_model level)
        regex = regex.replace(r"vision_tower\.encoder\.", r"vision_tower\.(?:vision_model\.)?encoder\.", 1)
    return regex


def _dynamic_rules(layers, names, base, composite, desc_act=False) -> dict:
    """``dynamic`` ``+:`` rules giving the bits and group size of the layers quantized otherwise than
    ``base`` (the config's; ``desc_act`` its act-order), and act-order where engines would read it otherwise,
    under their names on disk (``names``: GPTQModel matches those) and under
    the names vLLM and SGLang build them by: one module of q/k/v_proj (``qkv_proj``) and of
    gate/up_proj (``gate_up_proj``), and a block's routed experts one ``FusedMoE`` named
    ``<...>.experts``. Such a module whose linears differ is warned of (the engines build it at one
    width) and its linears get rules of their own. Blocks alike share a rule (``layers\\.(?:1|3)\\.``)."""
    units = {}  # (regex, name) of a module as engines build it -> {its linear's name on disk: (bits, group)}
    for name, m in layers.items():
        disk = names[name]
        parent, _, last = disk.rpartition(".")
        if _experts_of(disk) is not None:
            unit = rf"{_engine_name(_experts_of(disk), composite)}(?:\.|$)", _experts_of(disk)
        elif last in _FUSED_NAMES and parent:
            siblings = [p for p, fused in _FUSED_NAMES.items() if fused == _FUSED_NAMES[last]]
            unit = (rf"{_engine_name(parent, composite)}\.(?:{'|'.join([*siblings, _FUSED_NAMES[last]])})$",
                    f"{parent}.{_FUSED_NAMES[last]}")
        else:
            unit = rf"{_engine_name(disk, composite)}$", disk
        units.setdefault(unit, {})[disk] = (m.bits, m.group_size)
    rules, split = {}, []
    for (unit, module), members in units.items():
        kinds = set(members.values())
        if len(kinds) == 1:
            rules[unit] = kinds.pop()
            continue
        split.append(f"{module} ({', '.join(f'{n}: {b}-bit, group {g}' for n, (b, g) in members.items())})")
        rules.update({rf"{_engine_name(disk, composite)}$": kind for disk, kind in members.items()})
    if split:
        warnings.warn(
            f"{len(split)} modules that vLLM and SGLang build as one (q/k/v_proj as qkv_proj, gate/up_proj as "
            f"gate_up_proj, a block's routed experts as one FusedMoE) hold linears of other bit widths / group "
            f"sizes (first: {split[0]}): the engines build each at one and cannot load the others; GPTQModel, "
            f"which loads them apart, follows the config's dynamic rules. Quantize the linears of each alike "
            f"(quantize_model(layers=...))", ServingWarning)
    # the same rule in several blocks: one rule of their indices (listed: a \d+ would also match
    # blocks whose linears another rule's regex names, as a qkv_proj's names q_proj)
    alike = {}  # (regex with its block index left out, kind) -> the indices
    for regex, kind in rules.items():
        found = _ESCAPED_INDEX.search(regex)
        if kind != base:
            shape = _ESCAPED_INDEX.sub(lambda _: r"\.{}\.", regex, count=1)
            alike.setdefault((shape, kind), []).append(found.group(1) if found else None)
    dynamic = {}
    for (shape, (bits, group_size)), indices in alike.items():
        if None in indices:  # (no block index: the name itself)
            regex = shape
        else:
            regex = shape.replace("{}", indices[0] if len(indices) == 1 else f"(?:{'|'.join(indices)})", 1)
        dynamic[f"+:{regex}"] = {"bits": bits, "group_size": group_size}
        # vLLM's and SGLang's GPTQ configs read desc_act as false per channel (one group, no order) and a rule
        # without desc_act keeps that: a per-channel config would build the rule's grouped act-order layers
        # without their g_idx, served wrong without an error (override_config reads desc_act from the rule)
        if desc_act and (group_size == -1) != (base[1] == -1):
            dynamic[f"+:{regex}"]["desc_act"] = group_size != -1
    return dynamic


def _fused_splits(found, keys) -> list:
    """The blocks' linears that vLLM loads fused with others of another precision (``keys``: (disk
    prefix, block index) -> the block's name in its stack)."""
    shards = {}
    for stack, rel, i, q in found:
        group = _fused_set(rel)
        if group is not None:
            shards.setdefault((stack, i, rel.rpartition(".")[0], id(group)), []).append((rel, q))
    return [f"{stack}.{keys[stack, i]}.{rel}" for (stack, i, _, _), members in shards.items()
            if len({q for _, q in members}) > 1 for rel, q in members if not q]


def _optimum_fields(model, layers, qconfig) -> dict:
    """``block_name_to_quantize``, and ``modules_in_block_to_quantize`` where it is needed, so that
    transformers' GPTQ loader (optimum's ``convert_model``) builds the packed layers and no other as GPTQ
    layers: it takes the linears (``nn.Linear``, ``Conv1D``, ``Conv2d``) whose module names start with
    the block name, then those ending in a listed name. Unsaid, the block name is guessed from a few
    decoder layouts, which missed T5's ``encoder.block`` and ``decoder.block`` (the load refused) and
    LLaVA's vision tower (its packed layers built as float linears, left randomly initialised)."""
    try:
        stacks = {prefix for _, tower in find_towers(model) for prefix, _ in tower}
    except (ValueError, TypeError):  # (no registered adapter walks it: its block indices alone are known)
        stacks = set()

    def block_at(parts):
        """Where in a name's ``parts`` its block's name in its stack lies (None: in no block): an index,
        or the child name an OrderedDict gave it, which holds no index (torchvision's encoder_layer_1)."""
        return next((i for i, part in enumerate(parts) if part.isdigit() or ".".join(parts[:i]) in stacks), None)

    names = [name.split(".") for name in layers]
    common = os.path.commonprefix(names)
    # cut before the block's name: every block of a stack shares the name ("" for T5's two stacks)
    depth = block_at(common)
    fields = {"block_name_to_quantize": ".".join(common[:len(common) if depth is None else depth])}

    linears = [name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)
               or type(m) in (nn.Linear, nn.Conv2d) or type(m).__name__ == "Conv1D"]
    under = {name for name in linears if name.startswith(fields["block_name_to_quantize"])}
    if "modules_in_block_to_quantize" not in qconfig and under != set(layers):
        # other linears under the prefix (T5's lm_head, LLaVA's projector): the packed layers' names
        # past their block index (lm_head's whole), as the rules of a model quantized in part name them
        rels = [".".join(part if block_at(part) is None else part[block_at(part) + 1:]) for part in names]
        # whole where a float linear's name holds one of them (a packed head beside LLaVA's language model:
        # its float vision tower's self_attn.q_proj), as optimum (ending in it) and vLLM (holding it) match
        if any(rel in name for name in under.difference(layers) for rel in rels):
            rels = list(layers)
        fields["modules_in_block_to_quantize"] = [list(dict.fromkeys(rels))]
    return fields


def _quantized_head(model, layers) -> Optional[str]:
    """The name of the output projection where it is a ``QuantLinear`` (else None): engines build a
    quantized head only when the config says ``lm_head: true``, and otherwise look for its ``weight``."""
    head = None
    if hasattr(model, "get_output_embeddings"):
        with contextlib.suppress(Exception):
            head = model.get_output_embeddings()
    return next((name for name, m in layers.items() if m is head or name.rpartition(".")[2] == "lm_head"), None)


def _untied_head(hf, config: dict) -> dict:
    """``config`` saying ``tie_word_embeddings: false`` where it ties the head, which is packed: vLLM
    skips every ``lm_head.*`` tensor of a tied config (the head the embeddings, the packed one dropped)
    and transformers ties it again. Set at each level the class reads it (LLaVA's and Gemma 3's text
    config too); left as it is where the class reads more from it (T5 forces the tie, and takes a saved
    false for T5 v1.1's unscaled decoder outputs)."""
    untied = json.loads(json.dumps(config))
    for c in [untied, *(v for v in untied.values() if isinstance(v, dict))]:
        if c.get("tie_word_embeddings") is True:
            c["tie_word_embeddings"] = False

    def rest(c):
        return {k: rest(v) if isinstance(v, dict) else v for k, v in c.items() if k != "tie_word_embeddings"}

    try:
        reread = type(hf).from_dict(untied)
    except Exception:  # (a config class that cannot take it back: the model's own, as it was)
        return config
    if getattr(reread, "tie_word_embeddings", False) or rest(json.loads(reread.to_json_string(use_diff=False))) \
            != rest(config):
        return config
    return untied


def _symmetric(layer: QuantLinear) -> bool:
    """Every zero point of ``layer`` at the grid's midpoint (what engines assume for sym: true)."""
    return bool((layer.zeros() == 2 ** (layer.bits - 1)).all())


# the group sizes GPTQ Marlin takes (vLLM's and SGLang's MARLIN_SUPPORTED_GROUP_SIZES)
MARLIN_GROUPS = (-1, 32, 64, 128)

# vLLM's GPTQ consolidation removed its plain GPTQ path (gptq.py, gptq_gemm): quant_method "gptq" and
# quantization='gptq' both map to AutoGPTQConfig (auto_gptq.py), whose override_quantization_method claims every
# GPTQ checkpoint, whose __init__ takes (bits, sym) of (4, True) or (8, True) only ('Unsupported quantization
# config'), and whose linear method then refuses groups off MARLIN_SUPPORTED_GROUP_SIZES (verify_marlin_supported);
# 2/3 bits are left to the opt-in Humming kernels (quantization='humming'; vllm-project/vllm#45051)
VLLM_MARLIN_ONLY = "vLLM since its GPTQ consolidation (vllm-project/vllm#38288, mid-2026)"


class ServingWarning(UserWarning):
    """A saved checkpoint that some serving engine cannot load or serves wrong (``_serving_warnings``):
    a category of its own, so that a caller saving many (``epmq run``'s) can say each once."""


def _built_as_linear_subclasses(model, layers) -> dict:
    """``{packed layer: class}`` of the layers whose modules transformers builds as subclasses of nn.Linear
    (Falcon's FalconLinear), which optimum's convert_model does not take for linears (it checks the exact
    type). Found by building the model's class on the meta device, only where its module defines one."""
    source, config = sys.modules.get(type(model).__module__), getattr(model, "config", None)
    if source is None or config is None or not any(
            inspect.isclass(c) and issubclass(c, nn.Linear) and c is not nn.Linear for c in vars(source).values()):
        return {}
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # (a class that cannot be built from its config alone: nothing is known)
        return {}
    modules = dict(fresh.named_modules(remove_duplicate=False))
    return {name: type(modules[name]).__name__ for name in layers
            if isinstance(modules.get(name), nn.Linear) and type(modules[name]) is not nn.Linear}


def _serving_warnings(layers, qconfig, split, experts, fused=(), subclassed=None, expert_widths=None,
                      router_on_input=False, activation=None, marlin_unfit=()) -> None:
    """One warning per reason an engine cannot serve the checkpoint, naming the engines and the
    fix (the engines' sources: vLLM's main as stored at 055e47c28003156421365af985d676fc921cb075, SGLang 0.5,
    GPTQModel); ``split`` as
    ``_partial_fields`` returns it, ``experts`` the quantized routed experts' names on disk,
    ``fused`` the quantized layers of experts transformers holds as stacked tensors (module names),
    ``subclassed`` as ``_built_as_linear_subclasses`` returns it, ``expert_widths`` as ``_expert_widths``,
    ``router_on_input`` whether vLLM builds the experts weighting the tokens by the router first (Llama 4),
    ``activation`` the one the model's config names for its MLPs (``_hidden_activation``), ``marlin_unfit`` as
    ``_marlin_act_order_unfit`` returns it."""
    moe = [name.removesuffix(" (MoE)") for name in split if name.endswith(" (MoE)")]
    float_experts = [name.removesuffix(" (MoE float)") for name in split if name.endswith(" (MoE float)")]
    split = [name for name in split if not name.endswith((" (MoE)", " (MoE float)"))]
    if split:
        warnings.warn(
            f"{len(split)} linears (first: {split[0]}) are left unquantized while others that vLLM and "
            f"SGLang load fused with them (q/k/v_proj as qkv_proj, gate/up_proj as gate_up_proj) are "
            f"quantized: "
            f"vLLM refuses the checkpoint ('Detected some but not all shards ... are quantized'). "
            f"Quantize all of q/k/v (and gate/up) or none of them (quantize_model(layers=...))", ServingWarning)
    if moe:
        warnings.warn(
            f"{len(moe)} blocks' routed experts (first: {moe[0]}) are quantized in part (some experts or "
            f"projections left in full precision): vLLM and SGLang build a block's experts as one FusedMoE "
            f"module of one precision and cannot load the others. Quantize all of a block's experts or none "
            f"of them (quantize_model(layers=...))", ServingWarning)
    reasons = []
    if not qconfig["sym"] and qconfig["checkpoint_format"] == "gptq":
        reasons.append("asymmetric grids (sym: false) in the v1 'gptq' format: GPTQModel refuses them (save with "
                       "checkpoint_format='gptq_v2' for it)")
    # GPTQ Marlin takes (4 or 8 bits, sym); SGLang and vLLM before VLLM_MARLIN_ONLY take other configs to their
    # plain GPTQ kernel (gptq_gemm: 2, 3, 4, 8 bits, zero points read, v1 or v2), which has no routed experts: that
    # vLLM builds them with MoE WNA16 (4 or 8 bits, told sym: true, so it drops their zero points), SGLang refuses
    # them; the newer vLLM refuses the checkpoint
    low = sorted({m.bits for m in layers.values() if m.bits not in (4, 8)})
    off_marlin = [f"{'/'.join(map(str, low))}-bit layers"] * bool(low) + ["asymmetric grids"] * (not qconfig["sym"])
    # (is_gptq_marlin_compatible checks the config's group size too: MARLIN_SUPPORTED_GROUP_SIZES)
    off_marlin += [f"groups of {qconfig['group_size']}"] * (qconfig["group_size"] not in MARLIN_GROUPS)
    # vLLM and SGLang pick GPTQ Marlin by the config's own bits, sym and group size, then build each
    # layer with its dynamic override (override_config), refusing one Marlin does not take
    marlin_refused = list(dict.fromkeys(
        (o["bits"], o["group_size"]) for rule, o in qconfig.get("dynamic", {}).items() if rule.startswith("+:")
        and (o["bits"] not in (4, 8) or o["group_size"] not in MARLIN_GROUPS)))
    if not (qconfig["sym"] and qconfig["bits"] in (4, 8) and qconfig["group_size"] in MARLIN_GROUPS):
        marlin_refused = []
    # vLLM's GPTQConfig hands every FusedMoE to MoE WNA16 built from the config's bits alone, no dynamic
    # rule nor skipped module read (MoeWNA16Config.get_quant_method): experts the -: rules keep in full
    # precision are built quantized there, and their float weights are not loaded
    if off_marlin and float_experts and not marlin_refused:
        reasons.append(
            f"{' and '.join(off_marlin)}, which {VLLM_MARLIN_ONLY} refuses and which take older vLLM off GPTQ "
            f"Marlin onto its plain GPTQ kernel, with routed "
            f"experts left in full precision (first: {float_experts[0]}): vLLM builds every block's experts there "
            f"with its MoE WNA16 kernel, which reads no dynamic rule (the -: rule that keeps them in full precision "
            f"on Marlin), so it builds them quantized and cannot load their float weights (QuantSpec(bits=4 or 8, "
            f"sym=True) in groups of 32, 64 or 128 for Marlin, or quantize the experts too)")
    # (a config Marlin takes keeps vLLM and SGLang on it: its rules' other layers are refused, not served off it)
    if off_marlin and experts and not marlin_refused:
        reasons.append(
            f"{' and '.join(off_marlin)}, which {VLLM_MARLIN_ONLY} refuses outright and which take older vLLM "
            f"and SGLang off GPTQ Marlin onto their plain GPTQ kernel, "
            f"with routed experts (first: {experts[0]}) quantized: older vLLM builds those with its MoE WNA16 kernel, "
            f"which takes 4 or 8 bits only and reads GPTQ experts as symmetric (asymmetric ones served wrong, their "
            f"zero points dropped), and SGLang refuses them (QuantSpec(bits=4 or 8, sym=True) in groups "
            f"of 32, 64 or 128 for them)")
    elif marlin_refused:
        # vLLM's plain GPTQ path builds every FusedMoE with MoE WNA16 at the config's bits, reading no rule
        ruled = [name for name, m in layers.items() if _experts_of(name) is not None
                 and (m.bits, m.group_size) != (qconfig["bits"], qconfig["group_size"])]
        caveat = "" if not ruled else (
            f" but routed experts: vLLM builds those with MoE WNA16 at the config's bits, which reads no dynamic "
            f"rule, so the experts ruled otherwise (first: {ruled[0]}) load there neither")
        warnings.warn(
            f"the config's {qconfig['bits']}-bit symmetric grids in groups of {qconfig['group_size']} make vLLM and "
            f"SGLang pick GPTQ Marlin for the whole checkpoint, and its dynamic rules then give layers "
            f"{', '.join(f'bits={o[0]}, group_size={o[1]}' for o in marlin_refused)}, which Marlin refuses "
            f"('Unsupported quantization config'): serve it with quantization='gptq' (their plain GPTQ kernel, "
            f"which takes every layer{caveat}"
            f"; not on {VLLM_MARLIN_ONLY}, where 'gptq' is GPTQ Marlin too), or quantize those layers at 4 or 8 "
            f"bits in groups of 32, 64 or 128",
            ServingWarning)
    elif off_marlin:
        warnings.warn(
            f"{' and '.join(off_marlin)}: {VLLM_MARLIN_ONLY} refuses this checkpoint (its one GPTQ path is GPTQ "
            f"Marlin: 'Unsupported quantization config', or 'Marlin does not support group_size'); older "
            f"vLLM and SGLang serve it on their plain GPTQ kernel "
            f"(gptq_gemm), not on GPTQ Marlin, which takes 4- or 8-bit symmetric grids in groups of 32, 64 or 128 "
            f"(or per channel) only: slower"
            f"{' (and vLLM logs its 4-bit gptq_gemm as buggy)' if 4 in {m.bits for m in layers.values()} else ''}; "
            f"QuantSpec(bits=4 or 8, sym=True) in groups of 32, 64 or 128 for Marlin", ServingWarning)
    # on GPTQ Marlin, vLLM builds a block's experts with MoE Marlin only where their widths fit it
    # (check_moe_marlin_supports_layer; the intermediate width is the one per tensor-parallel rank), else with
    # MoE WNA16 from the config alone (GPTQMarlinConfig.get_quant_method), which reads no dynamic rule: experts
    # a rule keeps in full precision or quantizes otherwise are built at the config's bits and fail to load.
    # Without act-order it pads the intermediate width to Marlin's tiles, which then need only hold whole groups
    # (allow_tile_padding, since vllm-project/vllm#45703); with it, the width must be a multiple of max(64, group)
    base = (qconfig["bits"], qconfig["group_size"])
    # (the config's own act-order, which AutoGPTQConfig reads as off per channel: the experts' check reads no rule)
    act_order = qconfig["desc_act"] and qconfig["group_size"] != -1
    step = max(64, qconfig["group_size"]) if act_order else max(1, qconfig["group_size"])
    unfit = {unit: (hidden, inter) for unit, (hidden, inter, kinds) in (expert_widths or {}).items()
             if router_on_input or any(h % 128 for h in hidden) or any(i % step for i in inter)}
    ruled = [(unit, kind) for unit in unfit for kind in sorted(expert_widths[unit][2] - {base})]
    floats = [unit for unit in float_experts if unit in unfit]
    if not off_marlin and not marlin_refused and (ruled or floats):
        unit = floats[0] if floats else ruled[0][0]
        hidden, inter = (min(w) for w in unfit[unit])
        which = [f"left in full precision (first: {floats[0]})"] if floats else []
        if ruled:
            which.append(f"given {ruled[0][1][0]} bits in groups of {ruled[0][1][1]} (first: {ruled[0][0]})")
        why = ("of a family whose experts vLLM weights by the router before them (apply_router_weight_on_input), "
               "which vLLM's MoE Marlin does not take" if router_on_input else
               f"of widths vLLM's MoE Marlin does not take ({unit}: {hidden} wide, intermediate {inter}; it takes a "
               f"hidden width that is a multiple of 128 and "
               + (f"an intermediate width, on each tensor-parallel rank, that is a multiple of {step}"
                  f"{' (act-order)' if act_order else ' (whole groups)'})" if step > 1 else
                  "any intermediate width)"))
        reasons.append(
            f"routed experts {' and '.join(which)} by dynamic rules, {why}: vLLM builds those blocks' experts with "
            f"MoE WNA16 from the config's {base[0]} bits in groups of {base[1]}, which reads no dynamic rule, and "
            f"cannot load them (quantize the routed experts as the config says)")
    # SGLang builds every FusedMoE on GPTQ Marlin with its Marlin MoE method from the config alone, whatever
    # their widths (GPTQMarlinConfig.get_quant_method: no width check, no fallback); only its other layers read
    # the dynamic rules
    ruled = [(unit, kind) for unit, (_, _, kinds) in (expert_widths or {}).items() for kind in sorted(kinds - {base})]
    if not off_marlin and not marlin_refused and (float_experts or ruled):
        which = [f"left in full precision (first: {float_experts[0]})"] if float_experts else []
        if ruled:
            which.append(f"given {ruled[0][1][0]} bits in groups of {ruled[0][1][1]} (first: {ruled[0][0]})")
        reasons.append(
            f"routed experts {' and '.join(which)} by dynamic rules: SGLang builds every block's experts on GPTQ "
            f"Marlin from the config's {base[0]} bits in groups of {base[1]}, reading no dynamic rule for them (its "
            f"other layers follow the rules), and cannot load them (quantize the routed experts as the config says)")
    # and its Marlin MoE kernel pads nothing: its thread tiles (sgl-kernel csrc/moe/marlin_moe_wna16/ops.cu,
    # small_ and large_batch_thread_configs, is_valid_config) span 64 or 128 of a GEMM's k and 128 or 256 of its n,
    # which must divide them; gate_up's k is the hidden width and n twice the intermediate one, down's the other way
    # round, so the hidden width must be a multiple of 128 and the intermediate one, per tensor-parallel rank, of 64
    # ('Invalid thread config' at the first forward otherwise)
    untiled = [unit for unit, (hidden, inter, kinds) in (expert_widths or {}).items()
               if kinds and (any(h % 128 for h in hidden) or any(i % 64 for i in inter))]
    if not off_marlin and not marlin_refused and untiled:
        hidden, inter = (min((n for n in w if n % tile), default=min(w))
                         for w, tile in zip(expert_widths[untiled[0]][:2], (128, 64)))
        reasons.append(
            f"routed experts (first: {untiled[0]}: {hidden} wide, intermediate {inter}) that SGLang builds with its "
            f"Marlin MoE kernel whatever their widths, which pads none and takes a hidden width that is a multiple "
            f"of 128 and an intermediate width, on each tensor-parallel rank, that is a multiple of 64: the first "
            f"forward fails ('Invalid thread config')")
    # vLLM hands MoE WNA16 every block's experts off GPTQ Marlin, and on it those MoE Marlin does not take, at the
    # config's bits and group size; its MoeWNA16Method (moe_wna16.py) builds neither 8 bits, for which it asserts
    # group_size == -1 (since vllm-project/vllm#42647), nor per-channel scales, which its create_weights sizes as
    # ceil(width / -1) < 0 (vllm-project/vllm#52715)
    wna16 = [unit for unit, (_, _, kinds) in (expert_widths or {}).items()
             if base in kinds and (off_marlin or unit in unfit)]
    if wna16 and not marlin_refused and (base[0] == 8 or (base[0] == 4 and base[1] == -1)):
        hidden, inter = (min(w) for w in expert_widths[wna16[0]][:2])
        how = ("off GPTQ Marlin" if off_marlin else "weighted by the router before them, which MoE Marlin does not "
               "take" if router_on_input else f"{hidden} wide, intermediate {inter}, which MoE Marlin does not take")
        reasons.append(
            f"routed experts (first: {wna16[0]}) that vLLM builds with its MoE WNA16 kernel ({how}) at the config's "
            f"{base[0]} bits {'per channel' if base[1] == -1 else f'in groups of {base[1]}'}: MoE WNA16 takes 8-bit "
            f"experts per channel only (an assertion) and fails on per-channel ones (a negative scale shape), so it "
            f"cannot build them (a config of 4 bits in groups of 32, 64 or 128 builds there)")
    # act-order linears (routed experts aside) whose widths GPTQ Marlin takes only padded, which it does not do
    # under act-order (_marlin_act_order_unfit); vLLM then tries its other WNA16 kernels in turn
    # (choose_mp_linear_kernel): Conch and Triton W4A16 refuse g_idx, Exllama takes float16 activations only and
    # Machete Hopper (SM 9.0) only. (per-channel layers are none of them: AutoGPTQConfig and the rules read their
    # desc_act as false, one group, no order)
    if qconfig["desc_act"] and marlin_unfit and not off_marlin and not marlin_refused:
        name, k, n = marlin_unfit[0]
        reasons.append(
            f"{len(marlin_unfit)} act-order linears of widths vLLM's GPTQ Marlin does not take with act-order "
            f"(first: {name}, {k} inputs, {n} outputs as vLLM loads it, q/k/v as qkv_proj, gate/up as "
            f"gate_up_proj): it takes in_features that are a multiple of 128 and out_features of 64 on each "
            f"tensor-parallel rank, and pads other checkpoints' widths to them but not act-order's; vLLM then builds "
            f"them with another of its kernels that reads g_idx where one takes them (Exllama: float16 activations "
            f"only; Machete: Hopper GPUs, in_features a multiple of 64 and out_features of 128) and else refuses the "
            f"checkpoint ('Failed to find a kernel that can implement the WNA16 linear layer'), a bfloat16 model on "
            f"other GPUs (QuantSpec(act_order=True, static_groups=True): no g_idx to read, the widths padded)")
    # vLLM's AutoGPTQConfig (auto_gptq.py at vllm-project/vllm 055e47c28003156421365af985d676fc921cb075) takes
    # desc_act: GPTQ Marlin and MoE Marlin read g_idx (padding no width to their tiles). MoE WNA16 reads none
    # (moe_wna16_weight_loader skips g_idx), so the experts vLLM builds there get the scales of group k // group_size,
    # not their own; older vLLM's plain GPTQ path built its experts there too. vllm-project/vllm#54809 (merged
    # 2026-09, after that source) then removed act-order from vLLM ("we ignore g_idx now", RFC #48148); its
    # opt-in Humming kernels assert desc_act false, and on ROCm only its Exllama kernel, in float16, reads g_idx
    if qconfig["desc_act"]:
        dropped = "" if not wna16 or marlin_refused else (
            f"; routed experts it builds with MoE WNA16 (first: {wna16[0]}: "
            + ("off GPTQ Marlin" if off_marlin else "weighted by the router first, which MoE Marlin does not take"
               if router_on_input else "widths MoE Marlin does not take with act-order")
            + ") lose theirs there, which reads no g_idx: each column is served with the scales of group "
            "k // group_size")
        warnings.warn(
            f"act-order without static groups (permuted g_idx, desc_act: true): vLLM reads g_idx on its (MoE) "
            f"Marlin kernels only{dropped}; vLLM since vllm-project/vllm#54809, which removed act-order, reads no "
            f"g_idx, and SGLang's CPU path cannot run them; quantize with QuantSpec(act_order=True, "
            f"static_groups=True) (g_idx stays k // group_size)", ServingWarning)
    # SGLang's Marlin MoE runner, which its GPTQ Marlin builds every FusedMoE with, asserts a gated SiLU or SiTU
    # (moe_runner/marlin.py) and then applies a gated SiLU only (fused_marlin_moe.py): Gemma 4's experts, built with
    # activation="gelu" (gemma4_causal.py), load and then fail (vLLM's MoE Marlin applies GELU too:
    # fused_moe/activation.py, apply_moe_activation_supported)
    if not off_marlin and experts and str(activation).startswith("gelu"):
        reasons.append(
            f"routed experts of a GELU activation ({activation}; first: {_experts_of(experts[0])}): SGLang builds "
            f"them on GPTQ Marlin with its Marlin MoE runner, which runs gated SiLU experts only, so the first "
            f"forward fails")
    if reasons:
        warnings.warn("engines that cannot serve this checkpoint: " + "; ".join(reasons), ServingWarning)
    # optimum's convert_model, which transformers' GPTQ loader builds the layers with, reads no dynamic rule
    base = (qconfig["bits"], qconfig["group_size"])
    other = {name: m for name, m in layers.items() if (m.bits, m.group_size) != base}
    if other:
        name, m = next(iter(other.items()))
        warnings.warn(
            f"{len(other)} layers (first: {name}, bits={m.bits}, group_size={m.group_size}) are quantized otherwise "
            f"than the config's bits={qconfig['bits']}, group_size={qconfig['group_size']}: transformers' "
            f"from_pretrained builds GPTQ layers through optimum, which reads no dynamic rule, builds every layer at "
            f"the config's and cannot load theirs; GPTQModel.load and vLLM follow the rules (SGLang but for routed "
            f"experts). For "
            f"transformers, quantize every layer alike", ServingWarning)
    if fused:
        # (optimum builds nn.Linear, Conv1D and Conv2d modules only: the fused experts' stacked tensors are none)
        warnings.warn(
            f"{len(fused)} routed experts' layers (first: {fused[0]}) belong to experts that transformers holds "
            f"as stacked tensors, one per projection: its from_pretrained builds GPTQ layers through optimum, "
            f"which finds no linear there to build, and cannot load their packed tensors; serve it with "
            f"GPTQModel.load, vLLM or SGLang", ServingWarning)
    if subclassed:
        name, cls = next(iter(subclassed.items()))
        warnings.warn(
            f"{len(subclassed)} layers (first: {name}, {cls}) are built by transformers as subclasses of nn.Linear: "
            f"its from_pretrained builds GPTQ layers through optimum, which takes nn.Linear itself only, so it "
            f"builds none there and cannot load their packed tensors; serve it with GPTQModel.load or vLLM",
            ServingWarning)
    # GPTQModel 7.7 on the CPU runs 4-bit per-channel layers with TorchFusedLinear only, whose
    # transform_cpu replaces qzeros by zeros: a grid off the midpoint is served silently wrong
    # (transformers loads through it too; logits 1.09 off on a tiny Llama, argmax 2% equal)
    off_midpoint = [name for name, m in layers.items() if m.bits == 4 and m.group_size == -1 and not _symmetric(m)]
    if off_midpoint:
        warnings.warn(
            f"{len(off_midpoint)} 4-bit per-channel layers (first: {off_midpoint[0]}) have asymmetric grids: "
            f"on the CPU, GPTQModel (and transformers through it) serves them with TorchFusedLinear, which "
            f"drops the zero points, so its outputs are wrong (epmq.load_quantized serves them right). For "
            f"GPTQModel on the CPU quantize with QuantSpec(sym=True) or a group size of 32 to 256", ServingWarning)
    odd = [name for name, m in layers.items() if (m.in_features * m.bits) % 32 or (m.out_features * m.bits) % 32]
    if odd:
        m = layers[odd[0]]
        whole = 32 // math.gcd(m.bits, 32)
        warnings.warn(
            f"{len(odd)} layers (first: {odd[0]}, {m.bits}-bit, {m.in_features}->{m.out_features}) have a "
            f"width whose codes fill no whole 32-bit words (at {m.bits} bits, a multiple of {whole} values): "
            f"epmq pads them and epmq.load_quantized loads them, but GPTQModel and transformers (buffers of "
            f"width * bits / 32 words) and vLLM (widths a multiple of its pack factor) cannot. Exclude "
            f"them (layers=) to serve the checkpoint elsewhere", ServingWarning)


def _stacked_experts_warning(model, layers, to_disk) -> None:
    """A ServingWarning where quantized experts come from tensors the family's own checkpoints
    stack by projection (Step 3.7's ``moe.gate_proj.weight [E, I, H]``: ``Part.saved`` of an
    expert's index): they are saved per expert under the module's names, which load_quantized
    reads but engines that load the stacked layout alone (vLLM's Step 3) do not."""
    stacked = {}
    for name, key in checkpoint_names(model).items():
        saved, owner = getattr(key, "saved", None), name.rpartition(".")[0]
        if saved is not None and saved.index is not None and owner in layers:
            stacked.setdefault(saved.fused, (saved, to_disk[f"{owner}.qweight"].removesuffix(".qweight")))
    if stacked:
        saved, first = next(iter(stacked.values()))
        on_disk = renamed([saved.fused], saved_key_renaming(model))[saved.fused]
        warnings.warn(
            f"quantized experts of {len(stacked)} tensors the family's own checkpoints hold stacked by "
            f"projection (first: {on_disk} {list(saved.fused_shape)}) are saved per expert under the module's "
            f"names (first: {first}): epmq.load_quantized reads them, but engines that load only the stacked "
            f"layout do not (vLLM's Step 3 loader reads moe.*_proj.weight, not GPTQ experts)", ServingWarning)


def _main_input_warning(model) -> None:
    """A ServingWarning where transformers' GPTQ loader refuses the model's class: GptqHfQuantizer's
    ``_process_model_before_weight_loading`` refuses, quantized checkpoint or not, every model whose
    ``main_input_name`` is not ``input_ids`` (a ViT's pixel_values, Whisper's input_features)."""
    transformers = sys.modules.get("transformers")
    main = getattr(type(model), "main_input_name", None)
    if transformers is None or not isinstance(model, transformers.PreTrainedModel) or main in (None, "input_ids"):
        return
    warnings.warn(
        f"transformers' from_pretrained cannot load this checkpoint: its GPTQ loader refuses every model whose "
        f"main input is not input_ids ({type(model).__name__}'s is {main}), 'We can only quantize pure text "
        f"model.', a quantized one too; epmq.load_quantized serves it", ServingWarning)


# the fields of a quantize_model call a checkpoint records per layer where the calls differ
# (bits and group_size it takes from the layers themselves; the config's sym, from their zeros)
_CALL_RECORD = tuple(field for field in CALL_FIELDS if field not in ("bits", "group_size"))


def _quantize_config(model, layers, names, checkpoint_format, tied) -> dict:
    # what each layer was quantized with (a layer built by hand: what the model says, if anything)
    fallback = dict(getattr(model, "epmq_quant_config", None) or {})
    records = {name: m.quantized_with or fallback for name, m in layers.items()}
    info = common_quant_config(records.values())
    # fields the layers differ in (quantize_model called on parts of the model with other
    # options) are None in info and written per layer
    mixed = [field for field in _CALL_RECORD if info[field] is None
             and any(r.get(field) is not None for r in records.values())]
    # the config's bits and group size: the most layers' (the first layer's where as many have
    # others); layers of other ones (quantize_model called on parts of the model with other specs)
    # get ``dynamic`` rules, which GPTQModel, vLLM and SGLang read per module
    kinds = [(m.bits, m.group_size) for m in layers.values()]
    base = max(dict.fromkeys(kinds), key=kinds.count)
    static = all(torch.equal(m.g_idx.long().cpu(), in_order_g_idx(m.in_features, m.group_size).long())
                 for m in layers.values())
    dynamic = _dynamic_rules(layers, names, base, _composite(model), desc_act=not static)
    # sym tells engines to ignore qzeros (Marlin), so every layer's zero points must be the
    # midpoint, unless a call said its grids are asymmetric (then it is not claimed)
    sym = info["sym"] is not False and all(_symmetric(m) for m in layers.values())
    for field, default in (("act_order", False), ("static_groups", False), ("true_sequential", True)):
        if field not in mixed and info[field] is None:  # (no layer says: GPTQ's defaults)
            info[field] = default
    # (the engines' fields of the calls: where the layers differ, only per layer under "epmq")
    calls = {field: info[field] for field in ("static_groups", "true_sequential") if field not in mixed}
    return {
        "quant_method": "gptq",
        # the layers' own (the last quantize_model call's spec may cover only some of them)
        "bits": base[0],
        "group_size": base[1],
        # desc_act tells loaders to honour g_idx: only needed when it is not k // group_size
        "desc_act": not static,
        "sym": sym,
        **calls,
        **({"dynamic": dynamic} if dynamic else {}),
        "checkpoint_format": checkpoint_format,
        "model_file_base_name": "model",
        "epmq": {
            "method": info["method"],
            "targets": info["targets"],
            "adapter": info["adapter"],
            "act_order": info["act_order"],
            "zero_points": "qzeros hold z - 1 (v1)" if checkpoint_format == "gptq" else "qzeros hold z (v2)",
            "modules": {  # under their names in the checkpoint
                names[name]: dict(in_features=m.in_features, out_features=m.out_features,
                                  bits=m.bits, group_size=m.group_size, bias=m.bias is not None,
                                  # (a model may keep some layers in float32, as T5's wo in fp16)
                                  dtype=str(m.weight.dtype).removeprefix("torch."),
                                  **{field: records[name].get(field) for field in mixed})
                for name, m in layers.items()
            },
            "tied": tied,
        },
    }


def _write_tensors(tensors, path) -> None:
    save_safetensors(tensors, path, metadata={"format": "pt"})


class ShardWriter:
    """Receives a state dict's tensors one by one (``writer[name] = tensor``) and writes them
    into ``directory`` as transformers shards them: ``model.safetensors`` if they fit in
    ``max_bytes``, else consecutive runs of them, each as large as fits (a larger tensor alone),
    as ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``. Each tensor
    is copied to host memory (in ``dtype`` if given, for floating point) as it arrives, so at
    most one shard is held there; ``finish()`` writes the last one. ``progress``: a bar advanced
    by each tensor received; ``written(size)``: called with each shard's bytes once it is written."""

    def __init__(self, directory: Path, max_bytes: int, *, dtype: Optional[torch.dtype] = None,
                 progress=None, written: Optional[Callable[[int], object]] = None):
        self.directory, self.max_bytes, self.dtype, self.progress = directory, max_bytes, dtype, progress
        self.written = written
        self.pending, self.size, self.parts, self.total = {}, 0, [], 0

    def __setitem__(self, name: str, t: torch.Tensor):
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.to("cpu").contiguous()
        if self.pending and self.size + _nbytes(t) > self.max_bytes:
            self._flush()
        self.pending[name] = t
        self.size += _nbytes(t)
        self.total += _nbytes(t)
        if self.progress is not None:
            self.progress.update(1)

    def _flush(self):
        part = self.directory / f".part-{len(self.parts):05d}.safetensors"
        _write_tensors(self.pending, part)
        if self.written is not None:
            # (counted once on disk: else the page cache's flush of tens of GB came after the bar had ended,
            # in atomic_directory's fsync, said by nothing)
            _fsync(part)
            self.written(self.size)
        self.parts.append((part, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.directory / WEIGHTS_FILE)
            return
        weight_map = {}
        for i, (part, names) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{len(self.parts):05d}.safetensors"
            part.rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def is_quantized(directory: Path) -> bool:
    """Whether the checkpoint directory holds a quantized model (GPTQ's ``quantize_config.json``,
    or a ``quantization_config`` in its ``config.json``, as transformers writes any method's)."""
    if (directory / CONFIG_FILE).is_file():
        return True
    try:
        config = json.loads((directory / HF_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("quantization_config"))


def check_output(directory, *, marker: str = CONFIG_FILE) -> Path:
    """Where a checkpoint written to ``directory`` goes (absolute; a link's target), or a
    ValueError if that is a directory epmq may not replace (the user's): checked before hours of
    work as well as when writing."""
    directory = Path(os.path.abspath(directory))  # ("." has no name to make a sibling of)
    if directory.is_symlink():  # the checkpoint goes where the link points; the link stays
        directory = directory.resolve()
    above = directory.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{directory} cannot be made: {above} is " + ("a file, not a directory" if not above.is_dir()
                                                                       else "not writable"))
    if directory.exists() and not _replaceable(directory, marker):
        # (the other command's output: epmq's, but not of the kind this one replaces)
        other = {CONFIG_FILE: "a quantized checkpoint (epmq quantize)",
                 MERGE_RECIPE_FILE: "a merged checkpoint (epmq merge)"}
        holds = next((what for name, what in other.items() if name != marker and (directory / name).is_file()),
                     None)
        if holds is None and (directory / marker).is_file():
            holds = f"a checkpoint epmq did not write (its {marker}, no {MANIFEST_FILE})"
        if holds is None and marker == CONFIG_FILE and is_lora_adapter(directory):
            # (a model's own save_pretrained writes its PEFT adapters there first, then the base model, as
            # GraniteSpeech's does: the directory given empty, "choose a new or empty directory" misled)
            raise ValueError(
                f"{directory} holds a PEFT adapter ({ADAPTER_CONFIG}; a model class's own save_pretrained, "
                f"GraniteSpeech's, writes its loaded adapters there before the base model): a quantized checkpoint "
                f"is not written beside it, as engines read every weights file in the directory. Save the "
                f"adapters apart (transformers.PreTrainedModel.save_pretrained(model, directory), with them loaded, "
                f"writes them alone; such a class's own save_pretrained writes the base model after them) and the "
                f"quantized model to another directory (epmq.save_quantized(model, directory))")
        raise ValueError(
            f"{directory} exists and " + (f"holds {holds}" if holds else f"is not an epmq checkpoint (no {marker})")
            + ": refusing to replace it; choose a new or empty directory")
    if directory.is_dir():
        # (vLLM reads every *.safetensors beside the checkpoint, so they cannot stay; nor be lost.
        # Without a manifest, from epmq before 2026-12-02 or copied without its dot-files: the
        # weights files epmq's own naming makes)
        manifest = (directory / MANIFEST_FILE).is_file()
        ours = _read_manifest(directory) if manifest else {}
        foreign = sorted(p.name for p in directory.iterdir()
                         if p.name.endswith(WEIGHT_SUFFIXES) and p.name not in ours
                         and (manifest or not _OWN_WEIGHTS.fullmatch(p.name)))
        if foreign:
            raise ValueError(f"{directory} holds weights files epmq did not write there ({', '.join(foreign[:5])}): "
                             f"a new checkpoint would drop them (engines read every weights file beside it); "
                             f"move them out of the directory first")
    return directory


@contextlib.contextmanager
def atomic_directory(directory: Path, *, marker: str = CONFIG_FILE):
    """A fresh temporary sibling of ``directory`` to write a checkpoint into. When the block
    ends without an error, the user's files in the old ``directory`` are carried over, all is
    fsynced and the new directory replaces the old one; on an error it is deleted and
    ``directory`` is untouched. An existing ``directory`` is only replaced if it is empty or
    holds ``marker`` (a checkpoint epmq wrote)."""
    directory = check_output(directory, marker=marker)
    # (another process's write into it is refused: each replaced the other's, and one's _carry_over
    # read the directory the other was replacing)
    with hold_output(directory, job=False):
        parent = directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, glob.escape(directory.name))
        tmp = own_temporary(Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=parent)))
        try:
            mask = umask()
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would become the checkpoint's mode
            yield tmp
            for path in tmp.iterdir():  # safetensors >= 0.8 writes 0600: a server running as
                if path.is_file() and not path.is_symlink():  # another user could not read it
                    os.chmod(path, 0o666 & ~mask)
            _write_manifest(tmp)
            _carry_over(directory, tmp)
            # (folders' files too, a tokenizer's additional_chat_templates/: the old checkpoint is deleted
            # once swapped, and a power loss must find them whole; each folder after its files)
            for path in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if not path.is_symlink():
                    _fsync(path)
            _fsync(tmp)
            cwd = _working_directory()
            _replace_dir(tmp, directory)
            _fsync(parent)
            _follow_into(cwd, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _working_directory() -> Optional[Path]:
    try:
        return Path(os.getcwd())
    except OSError:  # (already a deleted directory)
        return None


def _follow_into(cwd: Optional[Path], directory: Path) -> None:
    """A process working in ``directory`` (or in a folder of it) when it was replaced is left in
    the deleted old one, where "." lists nothing and ``os.getcwd()`` fails: it is moved to the
    same path in the new one (another process's working directory cannot be moved)."""
    real = Path(os.path.realpath(directory))  # (getcwd gives the path with links resolved)
    if cwd is not None and (cwd == real or real in cwd.parents):
        os.chdir(cwd if cwd.is_dir() else real)


# The files epmq wrote into a checkpoint directory, with their size and time: the next write
# replaces them (a re-merge onto another base must not keep the first base's tokenizer, nor a
# re-save the first run's report), and carries over only what the user added or changed.
MANIFEST_FILE = ".epmq_files.json"


def _signature(path: Path) -> list:
    """Size and content hash (a copy with cp -r, scp or a hub download changes every file's
    time, not its content); weights, never carried over, by their size alone."""
    size = path.stat(follow_symlinks=False).st_size
    if path.name.endswith(WEIGHT_SUFFIXES):
        return [size]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return [size, digest.hexdigest()]


def _tree_signature(directory: Path) -> dict:
    """``_signature`` of every file under ``directory`` (a tokenizer's additional_chat_templates/),
    by its path there."""
    return {p.relative_to(directory).as_posix(): _signature(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def _unchanged(path: Path, recorded) -> bool:
    if isinstance(recorded, dict):  # (a directory epmq wrote)
        return (path.is_dir() and not path.is_symlink() and isinstance(recorded.get("tree"), dict)
                and _tree_signature(path) == recorded["tree"])
    if not path.is_file() or path.is_symlink() or not isinstance(recorded, list) or not recorded:
        return False
    if len(recorded) == 2 and isinstance(recorded[1], int):  # (manifests of 2026-12-02: size, time)
        stat = path.stat(follow_symlinks=False)
        return recorded == [stat.st_size, stat.st_mtime_ns]
    return _signature(path) == recorded


def _write_manifest(directory: Path) -> None:
    files = {p.name: _signature(p) if p.is_file() else {"tree": _tree_signature(p)}
             for p in directory.iterdir() if not p.is_symlink() and (p.is_file() or p.is_dir())}
    (directory / MANIFEST_FILE).write_text(json.dumps(files, indent=1) + "\n", encoding="utf-8")


def _read_manifest(directory: Path) -> dict:
    files = read_json(directory / MANIFEST_FILE)
    return files if isinstance(files, dict) else {}


# what a checkpoint is, which a new write always makes anew (a user's edit of them is replaced)
_DEFINING_FILES = (CONFIG_FILE, HF_CONFIG_FILE, MERGE_RECIPE_FILE, MANIFEST_FILE)


def _same_file(a: Path, b: Path) -> bool:
    """Two regular files of the same content, or two folders of the same such files (a
    tokenizer's additional_chat_templates/, saved first and saved again by the write)."""
    if a.is_symlink() or b.is_symlink():
        return False
    if a.is_dir() and b.is_dir():
        names = [sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) for d in (a, b)]
        return names[0] == names[1] and _tree_signature(a) == _tree_signature(b)
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def _carry_over(old: Path, new: Path) -> None:
    """Copy into ``new`` what a user put beside the checkpoint in ``old`` (a tokenizer, a
    README, training files) or changed there since epmq wrote it (``MANIFEST_FILE``; a changed
    file the new write also made is kept in place of it, with a warning); not the checkpoint's
    own weights and configs (``_DEFINING_FILES``). Without a manifest (epmq before 2026-12-02)
    the new write's files stand."""
    if not old.is_dir():
        return
    # (a directory of the user's files alone, a tokenizer saved first: each is theirs, kept)
    manifest = (old / MANIFEST_FILE).is_file() or _served_with_only(old)
    ours = _read_manifest(old)
    kept = []
    for entry in old.iterdir():
        name, target = entry.name, new / entry.name
        if name in _DEFINING_FILES or name.endswith(WEIGHT_SUFFIXES):
            continue  # (weights epmq did not write there were refused by check_output)
        if name in ours and _unchanged(entry, ours[name]):
            continue  # ours, unchanged: the new write's version, or none, stands
        if target.exists() or target.is_symlink():
            if not manifest or _same_file(entry, target):
                continue  # (the same file as the write made: nothing to keep, nor to warn of)
            kept.append(name)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target, follow_symlinks=False)
    if kept:
        warnings.warn(f"{old}: kept your changed {', '.join(sorted(kept))} in place of the one(s) this write made "
                      f"(delete them first to take the new ones)")


def _replaceable(directory: Path, marker: str = CONFIG_FILE) -> bool:
    """Empty, or a checkpoint of ``marker``'s kind that epmq wrote: every GPTQ tool writes a
    quantize_config.json, so that one counts with epmq's manifest or its own section in it."""
    if not directory.is_dir():
        return False
    if not any(directory.iterdir()):
        return True
    if marker == CONFIG_FILE and _served_with_only(directory):  # (not a merge's: its tokenizer is made
        return True  # anew, a union vocabulary's, which a user's older one kept in its place would undo)
    if not (directory / marker).is_file():
        return False
    if marker != CONFIG_FILE or (directory / MANIFEST_FILE).is_file():
        return True
    config = read_json(directory / CONFIG_FILE)  # (epmq before the manifest: its own section)
    return isinstance(config, dict) and isinstance(config.get("epmq"), dict)


# what tokenizers', processors' and hub repositories' save_pretrained write beside a model (the
# tokenizers' own files too: Marian's source.spm and target.spm, DeBERTa-v2's spm.model, Whisper's
# normalizer.json; a video-capable processor's config, Qwen2-VL's; FSMT's vocab-src.json and
# vocab-tgt.json, LUKE's entity_vocab.json, PhoBERT's bpe.codes, BARTpho's dict.txt, ProphetNet's
# prophetnet.tokenizer, GPT-NeoX-Japanese's emoji.json, RoCBert's and MyT5's tables): a folder of them alone was refused
_SERVED_WITH = re.compile(r"(tokenizer.*|special_tokens_map|added_tokens|vocab|merges|spiece|sentencepiece.*"
                          r"|source\.spm|target\.spm|target_vocab|spm|spm_char|normalizer"
                          r"|vocab-src|vocab-tgt|entity_vocab|bpe\.codes|dict\.txt|prophetnet\.tokenizer|emoji"
                          r"|word_shape|word_pronunciation|byte_maps"
                          # Mistral's native vocabulary (any *tekken*.json, as transformers finds it), a legacy
                          # tiktoken model: transformers 5 builds tokenizers of both
                          r"|\w*tekken\w*|tiktoken"
                          r"|chat_template|generation_config|preprocessor_config|processor_config"
                          r"|video_preprocessor_config|audio_tokenizer_config"
                          r"|README|\.gitattributes|\.DS_Store)(\.[A-Za-z0-9]+)*")
_SERVED_WITH_FOLDERS = ("additional_chat_templates",)  # (tokenizers' save_pretrained, transformers >= 4.54)


# the served-with files a loaded model carries (not its generation config, which it holds as an
# object, nor a README or a hub repository's own files)
_CARRIED = re.compile(r"(?!generation_config|README|\.gitattributes|\.DS_Store)" + _SERVED_WITH.pattern)


def _served_with_files(directory: Path) -> dict:
    """A checkpoint directory's tokenizer and processor files (``_CARRIED``; a tokenizer's
    ``additional_chat_templates/`` too), ``{path there: bytes}``: a model ``load_quantized`` built
    carries them and ``save_quantized`` writes them again, so that saving it back in place (to
    rewrite it as gptq_v2, say) or elsewhere keeps what it is served with."""
    # (links are followed: the HF hub's cache, which load_quantized reads an org/name from, holds
    # every file of a snapshot as a link to its blob; what is carried is the bytes, not the link)
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and _CARRIED.fullmatch(p.name):
            files[p.name] = p.read_bytes()
        elif p.is_dir() and p.name in _SERVED_WITH_FOLDERS:
            files.update({q.relative_to(directory).as_posix(): q.read_bytes() for q in sorted(p.rglob("*"))
                          if q.is_file()})
    return files


def _served_with_only(directory: Path) -> bool:
    """Whether ``directory`` holds only files a checkpoint is served with, saved first (as
    ``tokenizer.save_pretrained(d); model.save_pretrained(d)`` does): a tokenizer, processor and
    generation configs, a README. A checkpoint written there carries them over as the user's.
    (Not any folder of files: each would be copied into the new one.)"""
    return all(not p.is_symlink() and (p.is_file() and _SERVED_WITH.fullmatch(p.name)
                                       or p.is_dir() and p.name in _SERVED_WITH_FOLDERS)
               for p in directory.iterdir())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; the old ``target`` (if any) is deleted afterwards."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):  # atomic: ``new`` now names the old checkpoint
        shutil.rmtree(new, ignore_errors=True)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


# --------------------------------------------------------------------------- load


def _read_qconfig(directory: Path) -> dict:
    """The GPTQ quantize config: ``quantize_config.json``, else ``config.json``'s
    ``quantization_config`` (checkpoints written by transformers' GPTQ integration)."""
    def read(file: Path):
        content = read_json_file(file)
        if not isinstance(content, dict):
            raise ValueError(f"{file} does not hold a JSON object")
        return content

    path = directory / CONFIG_FILE
    if path.is_file():
        qconfig = read(path)
    else:
        hf = directory / HF_CONFIG_FILE
        qconfig = read(hf).get("quantization_config") if hf.is_file() else None
        if not isinstance(qconfig, dict):
            raise FileNotFoundError(f"{directory} is not a GPTQ checkpoint: no {CONFIG_FILE}, and no "
                                    f"quantization_config in a {HF_CONFIG_FILE}")
    # GPTQModel's own names for them are "method" and "format" (it writes both pairs; its
    # readers take either): a "format": "gptq_v2" alone read as v1 shifted every zero point
    for field, alias in (("quant_method", "method"), ("checkpoint_format", "format")):
        if alias in qconfig and field in qconfig and qconfig[alias] != qconfig[field]:
            raise ValueError(f"{directory}: the quantization config says {field} {qconfig[field]!r} but "
                             f"{alias} {qconfig[alias]!r}")
    # writers before the field existed (AutoGPTQ) meant GPTQ in the v1 convention
    method = qconfig.get("quant_method", qconfig.get("method", "gptq"))
    fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
    if method != "gptq" or fmt not in FORMATS:
        raise ValueError(f"{directory}: unsupported quant_method {method!r} / checkpoint_format {fmt!r} "
                         f"(GPTQ in {FORMATS} only)")
    bits = qconfig.get("bits")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{directory}: the quantization config's bits must be one of {SUPPORTED_BITS}, got "
                         f"{bits!r}")
    group_size = qconfig.get("group_size", -1)
    if isinstance(group_size, float) and group_size.is_integer():  # (128.0: as bits 4.0 is taken)
        group_size = int(group_size)
    if not is_int(group_size) or (group_size != -1 and group_size <= 0):
        # (it decides how the layers' scales are read: 0, null or "128" gave tracebacks)
        raise ValueError(f"{directory}: the quantization config's group_size must be -1 or a positive "
                         f"integer, got {group_size!r}")
    _check_epmq_section(directory, qconfig.get("epmq"))
    return dict(qconfig, quant_method=method, checkpoint_format=fmt, group_size=group_size)


def _refuse_unsaid_rescaling(directory: Path, model: nn.Module, ours, modules) -> None:
    """epmq's GPTQ and E-PMQ checkpoints of an RWKV (``rescale_every`` > 0) held its weights divided for
    inference (its calibration had run the model in eval mode) and said nothing of it until it
    recorded "rescaled" (2026-12-07 07:35 UTC); since 09:13 they hold them multiplied back, as RWKV's
    own do, and say so as "undivided" (only since a later change: between, nothing). Loaded as if
    undivided, a divided one was divided again by the first forward in eval mode, 2 ** k off; one
    that says neither is refused, saying how to tell it. RTN ran no model: its weights undivided but
    where the model given had already run in eval mode, which nothing in the file tells (the sizes of
    its scales across blocks are the training's as much as the division's): loaded as undivided, with
    a warning saying how to say which. ``modules``: the checkpoint's layers by the model's names; an
    RWKV module holding none of them is not the checkpoint's (a bare RwkvModel given a RwkvForCausalLM's,
    refused later as not having its layers)."""
    if not isinstance(ours, dict):  # (another tool's checkpoint: none of epmq's walks)
        return
    said = {*ours.get("rescaled", []), *ours.get("undivided", [])}
    unsaid = {name: every for name, every in rescaling_modules(model).items()
              if name not in said and any(m.startswith(f"{name}.blocks.".lstrip(".")) for m in modules)}
    if not unsaid:
        return
    name, every = next(iter(unsaid.items()))
    methods = {info.get("method", ours.get("method")) for info in ours["modules"].values()}
    walked = methods & {"gptq", "epmq"}
    unknown = (f"{directory}: {type(model).__name__}'s {name or 'model'!r} divides its weights for inference "
               f"(RWKV's rescale_every={every}), and this {'/'.join(sorted(map(str, walked or methods)))} checkpoint "
               f"does not say whether it holds them divided")

    def entries(divided: str, undivided: str) -> str:
        return (f"In the epmq section of its {CONFIG_FILE} add \"rescaled\": [\"{name}\"] for one written "
                f"{divided}, \"undivided\": [\"{name}\"] {undivided}")

    if walked:
        raise ValueError(
            f"{unknown}: epmq wrote them divided, saying nothing, before 2026-12-07 07:35 UTC (loaded as they are, "
            f"its first forward in eval mode would divide them again), and later multiplied back, as RWKV's own "
            f"checkpoints hold them. " + entries("before", "for one written after"))
    warnings.warn(
        f"{unknown}: loaded as undivided, as epmq writes them. Before 2026-12-07 07:35 UTC its RTN wrote them as "
        f"the model held them, saying nothing: divided where the model had run in eval mode before quantize_model "
        f"(loaded as they are, its first forward in eval mode divides them again, 2 ** k off), and nothing in the "
        f"file tells the two apart. " + entries("so", "otherwise"))


def _held_under_hint(model: nn.Module, name: str) -> str:
    """Where ``model`` has checkpoint layer ``name`` less its first part (``rwkv.blocks.0.attention.key``
    in a bare RwkvModel): a hint that the checkpoint is of a model holding this one under that part
    (RwkvForCausalLM's), which ``load_quantized`` does not strip; else nothing."""
    head, _, rest = name.partition(".")
    if not rest:
        return ""
    try:
        model.get_submodule(rest)
    except AttributeError:
        return ""
    return (f" (it has {rest!r}: the checkpoint is of a model that holds a {type(model).__name__} as {head!r}; "
            f"load it into one of that class, as its {HF_CONFIG_FILE} names it)")


_MODULE_FIELDS = ("in_features", "out_features", "bits", "group_size", "bias")  # (what load_quantized reads)


def _check_epmq_section(directory: Path, ours) -> None:
    """A clear error for an ``epmq`` section (save_quantized's) that is not as it writes it (a
    hand-edited or damaged file): its layers are read from it, and a module entry without
    ``bias``, or a list in place of ``modules``, ended in a bare KeyError or AttributeError."""
    if ours is None:
        return
    where = f"{directory}: the epmq section of its quantization config"
    modules = ours.get("modules") if isinstance(ours, dict) else None
    if not isinstance(modules, dict):
        raise ValueError(f"{where} has no modules (layer name -> its sizes)")
    for name, info in modules.items():
        lacking = [f for f in _MODULE_FIELDS if f not in info] if isinstance(info, dict) else list(_MODULE_FIELDS)
        if lacking:
            raise ValueError(f"{where}: module {name!r} lacks {', '.join(lacking)}")
    tied, transposed = ours.get("tied", {}), ours.get("transposed", [])
    for field in ("rescaled", "undivided"):
        names = ours.get(field, [])
        if not (isinstance(names, list) and all(isinstance(v, str) for v in names)):
            raise ValueError(f"{where}: {field} must be a list of module names, got {names!r}")
    if not (isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values())):
        raise ValueError(f"{where}: tied must map names to names, got {tied!r}")
    if not (isinstance(transposed, list) and all(isinstance(v, str) for v in transposed)):
        raise ValueError(f"{where}: transposed must be a list of names, got {transposed!r}")


def _check_layer_tensors(directory: Path, name: str, tensors: dict, G: int,
                         scales_dtype: Optional[torch.dtype] = None) -> None:
    """A clear error, naming the layer, for a packed layer's tensors that are missing, of the
    wrong dtype or out of range (a corrupt or hand-edited file), before any is unpacked: a
    ``g_idx`` out of ``[0, G)`` would be read as another group on the CPU, a NaN scale give
    NaN or wrong outputs. ``scales_dtype``: the dtype the layer holds its scales in, where
    loading casts them to it (a scale finite in the file's float32 may be inf in float16)."""
    for part in ("qweight", "qzeros", "scales"):
        if f"{name}.{part}" not in tensors:
            raise ValueError(f"{directory}: the checkpoint has no {name}.{part}")
    for part in ("qweight", "qzeros"):
        if tensors[f"{name}.{part}"].dtype != torch.int32:
            raise ValueError(f"{directory}: {name}.{part} must be int32 (packed words), got "
                             f"{tensors[f'{name}.{part}'].dtype}")
    scales = tensors[f"{name}.scales"]
    held = scales.to(scales_dtype) if scales_dtype is not None and scales.is_floating_point() else scales
    if not scales.is_floating_point() or not all_finite(held):
        raise ValueError(f"{directory}: {name}.scales must be finite floats, got "
                         + (f"{scales.dtype}" if not scales.is_floating_point() else
                            "NaN or inf" + (f" (as the layer's {held.dtype})" if held is not scales else "")))
    g_idx = tensors.get(f"{name}.g_idx")
    problem = None if g_idx is None else g_idx_problem(g_idx, G, "its scales")
    if problem is not None:
        raise ValueError(f"{directory}: {name}.{problem}")


def _weights_file(directory: Path, qconfig: dict) -> Path:
    """The one weights file of an unsharded checkpoint (AutoGPTQ named it after
    ``model_file_base_name``)."""
    base = str(qconfig.get("model_file_base_name") or "model")
    # (the config comes with the checkpoint: "../x" or an absolute path read another file of the
    # machine as its weights; a base name is a file of the directory)
    if Path(base).anchor or len(Path(base).parts) != 1 or base in (".", ".."):
        raise ValueError(f"{directory}: the quantization config's model_file_base_name {base!r} is no file "
                         f"name of the checkpoint's directory")
    for name in (WEIGHTS_FILE, f"{base}.safetensors"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    # torch's pickle, as AutoGPTQ writes it with use_safetensors=False (its default in early releases) and
    # transformers with safe_serialization=False: by name only (training_args.bin is no weights file)
    for name in (TORCH_WEIGHTS_FILE, f"{base}.bin"):
        if not found and (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}, and {len(found)} other "
                            f".safetensors files" + ("" if found else f" (nor {TORCH_WEIGHTS_FILE}, {base}.bin or "
                                                                      f"{TORCH_INDEX_FILE})"))


def _group_size_of(name: str, K: int, G: int, config_group: int) -> int:
    """The group size that gives ``G`` groups of ``K`` inputs (the config's where it does)."""
    if config_group != -1 and G == -(-K // config_group):  # (a layer of one group included)
        return config_group
    if G == 1:
        return -1
    if K % G == 0:
        return K // G
    raise ValueError(f"{name}: scales for {G} groups of {K} inputs: no group size gives that")


def _dynamic_override(qconfig: dict, name: str) -> dict:
    """The bits and group size the config's ``dynamic`` rules give the layer ``name``, as GPTQModel and
    vLLM read them (the first rule whose regex matches the name from its start; {} for none, or a
    ``-:`` rule's)."""
    rules = qconfig.get("dynamic") or {}
    for rule, override in (rules.items() if isinstance(rules, dict) else ()):
        try:
            found = isinstance(rule, str) and re.match(rule[2:] if rule[:2] in ("-:", "+:") else rule, name)
        except re.error as e:
            raise ValueError(f"the quantization config's dynamic rule {rule!r} is no regular expression: {e}") \
                from None
        if not found:
            continue
        said = {key: override[key] for key in ("bits", "group_size")
                if not rule.startswith("-:") and isinstance(override, dict) and key in override}
        if "bits" in said and (not is_int(said["bits"]) or said["bits"] not in SUPPORTED_BITS) \
                or "group_size" in said and not is_int(said["group_size"]):
            raise ValueError(f"the quantization config's dynamic rule {rule!r} gives {name} {said}: bits must be one "
                             f"of {SUPPORTED_BITS} and group_size an integer")
        return said
    return {}


def _modules_from_tensors(tensors: dict, qconfig: dict) -> dict:
    """A checkpoint written by another tool lists no modules: every ``X.qweight`` is one, read
    off its tensors (``g_idx [K]``, ``qweight [K * bits / 32, N]``, ``scales [G, N]``), so that
    layers whose bits or groups differ from the config's (GPTQModel's ``dynamic`` rules) load
    as they were written."""
    modules = {}
    for key, qweight in tensors.items():
        if not key.endswith(".qweight"):
            continue
        name = _module_of(key)
        if f"{name}.scales" not in tensors:
            raise ValueError(f"the checkpoint has {key} but no {name}.scales")
        # (the layer's sizes are read off these shapes: a 1-D qweight or qzeros of a damaged or
        # hand-made file ended in a bare IndexError)
        for part, layout in (("qweight", "[K * bits / 32, N]"), ("qzeros", "[G, N * bits / 32]"),
                             ("scales", "[G, N]"), ("g_idx", "[K]")):
            t = tensors.get(f"{name}.{part}")
            if t is not None and t.dim() != layout.count(",") + 1:
                raise ValueError(f"{name}.{part} is {tuple(t.shape)}: a packed layer's {part} is {layout}")
        # (a layer a dynamic rule gives other bits or groups: the rule's, as engines read it)
        said = {**qconfig, **_dynamic_override(qconfig, name)}
        g_idx = tensors.get(f"{name}.g_idx")
        K = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // said["bits"]
        N = qweight.shape[1]
        # the bit width whose packing of K inputs (and N zero points) the words fit; a width
        # that fills no whole words is padded (epmq writes ceil(K * bits / 32) words), so two
        # widths may fit: the config's first
        qzeros = tensors.get(f"{name}.qzeros")
        fit = [b for b in dict.fromkeys([said.get("bits"), *SUPPORTED_BITS]) if b in SUPPORTED_BITS
               and packed_length(K, b) == qweight.shape[0]
               and (qzeros is None or packed_length(N, b) == qzeros.shape[1])]
        if not fit:
            raise ValueError(f"{name}: qweight {tuple(qweight.shape)} packs no whole bit width for {K} inputs")
        bits = fit[0]
        group_size = _group_size_of(name, K, tensors[f"{name}.scales"].shape[0], said.get("group_size", -1))
        modules[name] = dict(in_features=K, out_features=N, bits=bits, group_size=group_size,
                             bias=f"{name}.bias" in tensors)
    return modules


def _aligned(tensors: dict) -> dict:
    """``tensors`` with each CPU tensor whose data does not start on a 64-byte boundary copied to one
    that does. safetensors hands CPU tensors at the file's own alignment (4 bytes, 2 for float16);
    a model built on meta takes them as its weights (assign), where CPU BLAS sums in another order than for
    the same weight allocated by torch: a full-precision layer of the loaded model differed from the
    saved one in the last bit (7e-9 in LongCat-Flash's unquantized experts), and ran slower."""
    for key, t in tensors.items():
        if t.device.type == "cpu" and t.data_ptr() % 64:
            tensors[key] = t.clone()  # (one at a time: the file's copy of each is freed as it goes)
    return tensors


def _load_tensors(directory: Path, qconfig: dict, device="cpu", progress: bool = False,
                  title: Optional[str] = None) -> dict:
    """Every tensor of the checkpoint: from its one file, else from the shards of its index (the
    order ``from_pretrained`` takes: ``save_pretrained`` leaves an earlier sharded save's index
    beside the single file it writes). ``progress``: a bar of the bytes read, file by file, named
    ``title`` (default: the directory's name)."""
    from safetensors.torch import load_file

    device = torch.device(device)
    device = "cpu" if device.type == "cpu" else str(device)  # (safetensors refuses "cpu:0")

    def read(file: Path) -> dict:
        try:
            if file.suffix == ".bin":  # (weights_only: a checkpoint's pickle runs no code of its own)
                tensors = torch.load(file, map_location=device, weights_only=True)
                if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
                    raise ValueError("not a state dict (tensor name -> tensor)")
                return tensors
            return load_file(str(file), device=device)
        except FileNotFoundError:
            raise
        except Exception as e:  # (SafetensorError: a truncated or foreign file; the reader names none)
            raise ValueError(f"cannot read {file}: {type(e).__name__}: {e}") from e

    index = directory / INDEX_FILE
    if not index.is_file() and not any(directory.glob("*.safetensors")) and (directory / TORCH_INDEX_FILE).is_file():
        index = directory / TORCH_INDEX_FILE  # (transformers' shards of safe_serialization=False)
    sharded = index.is_file() and not (directory / WEIGHTS_FILE).is_file()
    if sharded:
        weight_map = shard_weight_map(index)
        # (each shard read in turn: the first missing one was met after those before it were read,
        # as safetensors' bare 'No such file or directory', naming no index)
        missing = sorted(str(directory / f) for f in set(weight_map.values()) if not (directory / f).is_file())
        if missing:
            raise FileNotFoundError(f"{directory}: shard(s) listed in {index} are missing: {missing[:5]} (a download "
                                    f"cut short, or shards deleted)")
    files = [directory / name for name in sorted(set(weight_map.values()))] if sharded else [
        _weights_file(directory, qconfig)]
    tensors = {}
    # (tens of GB of shards took minutes, said by nothing)
    with _bytes_bar(f"load {title or directory.name}", sum(f.stat().st_size for f in files), progress) as bar:
        for file in files:
            tensors.update(read(file))
            bar.update(file.stat().st_size)
    if not sharded:
        return tensors
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index} lists tensors its shards do not hold: {missing[:5]}")
    return tensors


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device, so no full-precision weight
    is ever initialised; buffers are built as usual (rotary tables and other non-persistent
    buffers are computed, not read from checkpoints)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _empty_open_clip_model(directory: Path) -> nn.Module:
    """The open_clip model (or its vision tower: ``"tower": "visual"``) that
    ``directory/open_clip_config.json`` describes (open_clip's own ``model_cfg`` and
    ``preprocess_cfg``), its parameters on meta."""
    import open_clip
    from open_clip import model as open_clip_model

    path = directory / OPEN_CLIP_CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        model_cfg = dict(cfg["model_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is no open_clip config (a model_cfg): {e}") from None
    with _parameters_on_meta():
        if cfg.get("tower") == "visual":  # (the text tower is not built: an HF one would download)
            model = open_clip_model._build_vision_tower(
                model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=model_cfg.get("quick_gelu", False))
        elif "multimodal_cfg" in model_cfg:
            model_cfg.pop("custom_text", None)
            model = open_clip.CoCa(**model_cfg)
        else:
            custom = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
            model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**model_cfg)
    if cfg.get("preprocess_cfg"):
        (model if cfg.get("tower") == "visual" else model.visual).preprocess_cfg = cfg["preprocess_cfg"]
    return model.eval()


def _check_given_config(model: nn.Module, directory: Path) -> None:
    """Refuse a transformers model given to ``load_quantized`` whose config reads the checkpoint's
    weights as other computations than its config.json says (another activation, head count,
    softcapping, ...), and warn where it runs them a little otherwise (another norm epsilon, RoPE,
    sliding window): the tensors fit either way, so the outputs would be silently another model's."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict") or not (directory / HF_CONFIG_FILE).is_file():
        return
    from .merge_checkpoint import _check_reading  # (it imports this module)

    _check_reading(config.to_dict(), read_json(directory / HF_CONFIG_FILE), "the model given", "checkpoint",
                   "pass a model of the checkpoint's {} (or model=None, built from its config.json)", experts=True)


def _empty_hf_model(directory: Path) -> nn.Module:
    """The transformers model that ``directory/config.json`` names, its parameters on meta."""
    if not (directory / HF_CONFIG_FILE).is_file():
        if (directory / OPEN_CLIP_CONFIG_FILE).is_file():
            return _empty_open_clip_model(directory)
        raise ValueError(f"{directory} has no {HF_CONFIG_FILE} (not a transformers model) nor "
                         f"{OPEN_CLIP_CONFIG_FILE}: pass load_quantized a fresh instance of the model's "
                         f"architecture")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # (AutoConfig would ask on a terminal whether to run the checkpoint's code, reading the answer from
    # stdin, and then ask for a trust_remote_code=True that load_quantized does not take)
    content = read_json(directory / HF_CONFIG_FILE)
    if isinstance(content, dict) and isinstance(content.get("auto_map"), dict) \
            and content.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(
            f"{directory / HF_CONFIG_FILE} names classes its own code defines (model_type "
            f"{content.get('model_type')!r}, auto_map: {', '.join(content['auto_map'])}), which epmq does not run: "
            f"build the model with transformers (AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("
            f"directory, trust_remote_code=True), trust_remote_code=True), or the auto class the model's is) and "
            f"pass it: load_quantized(directory, model)")
    config = transformers.AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise ValueError(f"{directory / HF_CONFIG_FILE} names no transformers model class "
                         f"(architectures: {names}): pass load_quantized the model")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours: the model is built plain, then packed below
    with _parameters_on_meta():
        model = model_class(config).eval()
    if (directory / GENERATION_CONFIG_FILE).is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _layer_dtype(info) -> Optional[torch.dtype]:
    """The dtype ``save_quantized`` recorded for a layer (None for other writers' checkpoints)."""
    dtype = getattr(torch, str(info.get("dtype")), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _untie_held_apart(model: nn.Module, tensors: Mapping[str, torch.Tensor], tied: Mapping[str, str]) -> None:
    """Give each name of one parameter of ``model`` its own parameter where the checkpoint holds
    them as different tensors, as ``from_pretrained`` unties them: transformers 5 ties every
    T5's ``lm_head`` to ``shared``, and FLAN-T5's (T5 v1.1's) are two tensors. Loaded into the
    one parameter, the second copy overwrote the first: the embeddings took the head's values."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        held = [n for n in group if n in tensors and n not in tied]
        apart = {}  # a name of each other value -> its own parameter (names of one value share it)
        for name in held[1:]:
            if torch.equal(tensors[name], tensors[held[0]]):
                continue
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent)
            first = next((n for n in apart if torch.equal(tensors[n], tensors[name])), None)
            if first is None:
                shared = owner._parameters[attr]
                first, apart[name] = name, nn.Parameter(torch.empty_like(shared), requires_grad=shared.requires_grad)
            owner.register_parameter(attr, apart[first])


def load_quantized(directory, model: Optional[nn.Module] = None, *, adapter=None,
                   device=None, progress: bool = True) -> nn.Module:
    """Load a checkpoint written by ``save_quantized``: the layers it lists become
    ``QuantLinear`` and every tensor is loaded. GPTQ checkpoints of other tools (GPTQModel,
    AutoGPTQ, transformers' GPTQ integration: v1 or v2, any bit width ``QuantLinear`` holds)
    load too: every ``qweight`` in them is a layer.

    ``model``: a fresh instance of the checkpoint's architecture, whose tensors are overwritten
    (a transformers model whose config computes otherwise than the checkpoint's config.json is
    refused, or warned of where it runs the weights a little otherwise: ``_check_given_config``).
    ``adapter``: the ``epmq.Adapter`` (or list of them) the model was quantized with, if it is not
    registered (default: the registered ones whose blocks hold the checkpoint's layers).
    ``None`` (transformers models, and open_clip ones with an ``open_clip_config.json``): the
    class ``config.json`` names is built with its parameters on the meta device, so no
    full-precision weight is initialised or kept, and every parameter comes from the
    checkpoint, onto ``device`` (default: the CPU).

    ``directory``: a local directory, or an HF hub id (``org/name``, ``org/name@revision``) that
    is none, read from its snapshot in the hub's cache (downloaded there once, never written to).
    ``progress``: a bar of the bytes read, shard by shard.
    """
    # (a device it cannot load onto was reported as the safetensors file not read, or torch's bare
    # error: said of the device, before anything is read or fetched)
    device = device_argument(device)
    if model is not None and not isinstance(model, nn.Module):  # (a bare AttributeError on .parameters)
        hint = (": the model is built from the checkpoint's config with model=None"
                if isinstance(model, (str, os.PathLike)) else "")
        raise TypeError(f"model must be a torch nn.Module of the checkpoint's architecture (or None), got "
                        f"{type(model).__name__}{hint}")
    # (a path that does not exist is said to be missing, not "not a GPTQ checkpoint"; another
    # tool's GPTQ checkpoint is usually a hub repository: read from its snapshot, as experts are)
    check_path(directory, "directory")
    asked, directory = directory, local_checkpoint(directory, directory=True)
    # (a hub id's snapshot directory is named by its commit hash, which the user never gave)
    title = Path(os.path.abspath(directory)).name if directory == Path(asked) else str(asked)
    qconfig = _read_qconfig(directory)
    checkpoint_format = qconfig["checkpoint_format"]
    if model is None:
        model = _empty_hf_model(directory)
    elif device is not None:
        raise ValueError("device= is for a model built from the checkpoint (model=None); move a "
                         "model of your own with .to()")
    given, model = model, wrapped_model(model)  # (into a torch.compile'd or DataParallel model's own)
    if given is not None:
        _check_given_config(model, directory)
    empty = any(p.is_meta for p in model.parameters())
    device = torch.device("cpu" if device is None else device)
    tensors = _load_tensors(directory, qconfig, device if empty else "cpu", progress, title)
    if empty:  # (a model given copies them into its own parameters)
        _aligned(tensors)
    ours = qconfig.get("epmq")
    listed = ours["modules"] if ours else _modules_from_tensors(tensors, qconfig)
    tied = ours.get("tied", {}) if ours else {}
    rename = key_renaming(model)
    to_model = renamed([*tensors, *tied], rename)  # the checkpoint's names -> model's
    # a name the model has kept as it is where its renaming leads to none, as transformers keeps
    # it (DeepSeek-V4's rule for its attention's ``.norm.`` would take the final model.norm too)
    own = set(model.state_dict())
    to_model = {k: k if new not in own and k in own else new for k, new in to_model.items()}
    # a packed layer's tensors are renamed by rules written for its weight's key, which may name
    # them otherwise than the module (Inkling 2's hub stores a convolution's weight_proj bare:
    # 'sconv.weight_proj' -> 'sconv.weight_proj.weight' made its qweight '...weight.qweight');
    # such a layer takes the module its weight's key leads to
    own_modules = dict(model.named_modules())
    for name in listed:
        key = to_model.get(f"{name}.qweight")
        if rename is None or key is None or key.removesuffix(".qweight") in own_modules:
            continue
        weights = (rename(name), rename(f"{name}.weight"))
        module = next((w.removesuffix(".weight") for w in weights
                       if w.endswith(".weight") and w.removesuffix(".weight") in own_modules), None)
        if module is not None:
            for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                if f"{name}.{part}" in to_model:
                    to_model[f"{name}.{part}"] = f"{module}.{part}"
    tensors = {to_model[k]: t for k, t in tensors.items()}
    tied = {to_model[alias]: to_model[source] for alias, source in tied.items()}
    modules = {}
    for name, info in listed.items():
        if f"{name}.qweight" not in to_model:
            raise ValueError(f"the tensors in {directory} have no {name}.qweight, which {CONFIG_FILE} lists")
        modules[_module_of(to_model[f"{name}.qweight"])] = info
    _refuse_unsaid_rescaling(directory, model, ours, modules)
    if not ours:  # tied tensors stored once, under any of their names
        for name, aliases in tie_order(model, own_checkpoint=True).items():
            # (not a quantized layer's weight: an lm_head tied by default, quantized by its writer)
            if name not in tensors and name.rpartition(".")[0] not in modules:
                source = next((a for a in aliases if a in tensors), None)
                if source is not None:
                    tied[name] = source

    from .walker import keep_call_hooks  # (walker imports this module)

    def swap(name, new):
        # a packed layer (or rebuilt attention) is called as the module it replaces was: the
        # hooks the caller registered on the model's layers go with it, as in quantize_model
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        keep_call_hooks(old, new)
        setattr(parent, attr, new.train(old.training))

    # the towers holding quantized layers are rebuilt as the walk rebuilt them (open_clip's
    # attention, GPT-2's Conv1D, fused MoE experts); the others keep their own layout
    towers = all_towers = find_towers(model, adapter)
    if adapter is None:
        held = [stack for _, stacks in towers for stack, _ in stacks]
        towers = [(a, stacks) for a, stacks in towers
                  if any(name.startswith(f"{stack}.") for stack, _ in stacks for name in modules)]
        # layers in stacks no registered adapter takes were walked by AUTO beside them (adapter=[...,
        # AUTO], as the default walk's warning says): its rebuilt experts were refused as missing
        if any(not any(name.startswith(f"{stack}.") for stack in held) for name in modules):
            towers += auto_beside(model, all_towers,
                                  lambda stack, _: any(name.startswith(f"{stack}.") for name in modules))
    prepared = prepare_towers(model, towers, swap)
    remember(model, prepared)
    # WavLM's attention whose projections are loaded packed calls them, whichever tower holds it:
    # by default no registered adapter's (a WavLM large encoder walked by AUTO beside GPT-2), it
    # handed their weights, the meta stand-ins, to torch, and every logit was NaN
    for name, attention in model.named_modules():
        if hands_weights_to_torch(attention) and any(f"{name}.{p}" in modules for p in PROJECTIONS):
            call_projections(attention)
    # a rebuilt module whose tower was saved unprepared (open_clip's text tower beside a quantized
    # vision tower) holds its tensors under their own names: in_proj_weight for in_proj.weight
    for name, key in prepared.items():
        if type(key) is str and key in tensors and name not in tensors:
            tensors[name] = tensors.pop(key)
    # a model built on meta takes the dtype each layer was saved in (else config.json's), which
    # a QuantLinear reports as its weight's (model code casts activations to it)
    dtype = getattr(getattr(model, "config", None), "dtype", None) if empty else None
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    replacements, made = {}, {}  # made: a module shared under several names stays one module
    for name, info in list(modules.items()):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            alias = next(filter(None, (found.module_alias(model, name) for found, _ in towers)), None)
            if alias is None:
                raise ValueError(f"the checkpoint quantizes {name!r}, which {type(model).__name__} does not "
                                 f"have{_held_under_hint(model, name)}") from None
            # a module the checkpoint names otherwise: it and its tensors take the model's name
            modules[alias] = modules.pop(name)
            for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                if f"{name}.{part}" in tensors:
                    tensors[f"{alias}.{part}"] = tensors.pop(f"{name}.{part}")
            name, old = alias, model.get_submodule(alias)
        if (not ours and f"{name}.g_idx" not in tensors and isinstance(old, nn.Linear)
                and old.in_features < info["in_features"] and old.out_features == info["out_features"]
                and old.in_features * info["bits"] % 32
                and packed_length(old.in_features, info["bits"]) == tensors[f"{name}.qweight"].shape[0]
                and not bool(unpack_rows(tensors[f"{name}.qweight"], info["bits"],
                                         info["in_features"])[old.in_features:].any())):
            # without g_idx the inputs were counted off the packed words, which a width filling no
            # whole words pads with zero codes (3 bits, 48 inputs: 5 words, read as 53): the
            # model's count fits them (codes past it that are not all zero: another layer's)
            info["in_features"] = old.in_features
            # (the group size a dynamic rule gives the layer, as its inputs were counted by: the config's
            # may give as many groups of them, 16 where the rule says 20 for 48 inputs)
            info["group_size"] = _group_size_of(name, old.in_features, tensors[f"{name}.scales"].shape[0],
                                                {**qconfig, **_dynamic_override(qconfig, name)}.get("group_size", -1))
        if isinstance(old, QuantLinear):
            # (a model quantized or loaded before: its layers were said to differ from a linear of their own
            # shape, "QuantLinear(in_features=32, out_features=32, ...) in the model, the checkpoint has a 32->32
            # linear", naming no cause)
            raise ValueError(f"{name!r} is packed already in the model given ({old}): load_quantized fills a fresh, "
                             f"unquantized instance of the checkpoint's architecture, or builds one from its "
                             f"{HF_CONFIG_FILE} with model=None")
        shape = (info["in_features"], info["out_features"])
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != shape:
            raise ValueError(
                f"{name!r} is {old} in the model, the checkpoint has a "
                f"{info['in_features']}->{info['out_features']} linear"
            )
        if id(old) not in made:
            # (a model built on meta takes the checkpoint's tensors (assign): its packed layers on
            # meta too, where zero-filled buffers of them all, as large as the checkpoint, were
            # made on the device and dropped at the load)
            made[id(old)] = new = QuantLinear(
                info["in_features"], info["out_features"], bits=info["bits"], group_size=info["group_size"],
                bias=info["bias"], dtype=(empty and (_layer_dtype(info) or dtype)) or old.weight.dtype,
                device="meta" if empty else old.weight.device,
            )
            if empty:  # (the one buffer no checkpoint holds: the dtype the layer reports)
                new._dtype_probe = torch.empty(0, dtype=new._dtype_probe.dtype, device=device)
        replacements[name] = made[id(old)]
    for name, new in replacements.items():
        swap(name, new)
    # the linears left in full precision under the other naming too (GPTQModel's Mixtral experts
    # as gate_proj, up_proj, down_proj, the model's w1, w3, w2): else "missing" and "unexpected"
    own = set(model.state_dict())
    for key in [k for k in tensors if k not in own]:
        module, _, part = key.rpartition(".")
        alias = next(filter(None, (found.module_alias(model, module) for found, _ in towers)), None)
        if alias is not None and f"{alias}.{part}" in own and f"{alias}.{part}" not in tensors:
            tensors[f"{alias}.{part}"] = tensors.pop(key)

    for name, info in modules.items():  # (before any unpacking: a clear error, naming the layer)
        new = replacements.get(name) or model.get_submodule(name)
        if f"{name}.qweight" not in tied:  # (a tied layer's: checked as its source's)
            # (a model given keeps its layers' float16 scales, which load_state_dict copies into;
            # one built on meta takes the file's tensors as they are)
            _check_layer_tensors(directory, name, tensors, new.scales.shape[0],
                                 None if empty else new.scales.dtype)
        for part in ("qweight", "qzeros", "scales"):
            got, want = tensors.get(f"{name}.{part}"), getattr(new, part)
            if got is not None and tuple(got.shape) != tuple(want.shape):
                raise ValueError(
                    f"{directory}: {name}.{part} is {tuple(got.shape)}, but {CONFIG_FILE} describes a "
                    f"{info['bits']}-bit layer of {info['in_features']}->{info['out_features']} with "
                    f"group_size {info['group_size']}, which holds {tuple(want.shape)}")
    if checkpoint_format == "gptq":
        for name, info in modules.items():
            bits, key = info["bits"], f"{name}.qzeros"
            # z - 1 in ``bits`` bits: other v1 writers stored a zero point of 0 as 2^bits - 1
            z = (unpack_cols(tensors[key], bits, info["out_features"]) + 1) % (1 << bits)
            tensors[key] = pack_cols(z, bits)
    written = {to_model.get(key, key) for key in (ours or {}).get("transposed", [])}
    for name, key in _transposed_linears(model).items():
        # (epmq before 2026-12-03 wrote them untransposed, unlisted; other writers in the
        # family's own layout, as transformers saves it)
        if key in tensors and (key in written or not ours):
            tensors[name] = tensors.pop(key).t()
    for alias, source in tied.items():
        tensors[alias] = tensors[source]
    for name, info in modules.items():
        if f"{name}.g_idx" not in tensors and f"{name}.qweight" in tensors:
            # writers leave g_idx out without act-order (GPTQ-for-LLaMa, exllama exports): the
            # groups are then in order, as serving engines take them
            K, group = info["in_features"], info["group_size"]
            if qconfig.get("desc_act") and group != -1 and group < K:
                raise ValueError(f"{directory}: {name} has no g_idx, which act-order (desc_act) checkpoints "
                                 f"of several groups need: the order of its input features is unknown")
            tensors[f"{name}.g_idx"] = in_order_g_idx(K, group)
        # (an int64 g_idx, as some writers' files hold, QuantLinear's load makes the layout's int32 itself)
    if not empty:
        _untie_held_apart(model, tensors, tied)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=empty)
    if missing or unexpected:
        raise ValueError(
            f"{directory} does not fit {type(model).__name__}: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    for alias, source in tied.items():  # one tensor again, as from_pretrained leaves them
        parent, _, attr = alias.rpartition(".")
        owner = model.get_submodule(parent)
        if attr in owner._parameters:
            shared = model.get_parameter(source)
            if owner._parameters[attr] is not shared:
                owner.register_parameter(attr, shared)
        elif attr in owner._buffers:  # (a packed layer's, shared with its module)
            owner._buffers[attr] = model.get_buffer(source)
    if empty:
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{directory} holds no values for {left[:5]} of {type(model).__name__}")
        model.to(device)  # the buffers built on the CPU
    ours = ours or {}
    # (the weights as the file holds them, undivided but where "rescaled" says otherwise: a model given that
    # ran in eval mode said they were divided, and its first forward left the file's undivided)
    for name in rescaling_modules(model):
        model.get_submodule(name).layers_are_rescaled = False
    rescale_outside_compilation(model)
    for name in ours.get("rescaled", []):
        # (a checkpoint epmq wrote before it saved RWKV's weights multiplied back holds them as its
        # eval-mode forward divides them: a fresh model would divide them again on its first forward)
        owner = dict(model.named_modules()).get(name)
        if not hasattr(owner, "layers_are_rescaled"):
            raise ValueError(f"{directory}: its weights were saved as module {name!r} rescales them for inference "
                             f"(RWKV's layers_are_rescaled), and {type(model).__name__} has no such module there")
        owner.layers_are_rescaled = True
    kinds = {(m["bits"], m["group_size"]) for m in modules.values()}
    if len(kinds) == 1 and next(iter(kinds)) != (qconfig["bits"], qconfig.get("group_size", -1)):
        bits, group_size = next(iter(kinds))
        warnings.warn(f"{directory}: {CONFIG_FILE} says {qconfig['bits']} bits, group_size "
                      f"{qconfig.get('group_size', -1)}; every layer holds {bits} bits, group_size "
                      f"{group_size}: the layers' are used (and written by save_quantized)")
        qconfig = dict(qconfig, bits=bits, group_size=group_size)
    # what each layer was quantized with: the config's, but where the layers differ (the fields
    # save_quantized writes per layer)
    said = {"sym": qconfig.get("sym", False), "static_groups": qconfig.get("static_groups", False),
            "act_order": ours.get("act_order", qconfig.get("desc_act", False)),
            "method": ours.get("method", "gptq"), "targets": ours.get("targets"), "adapter": ours.get("adapter"),
            "true_sequential": qconfig.get("true_sequential", True)}
    records = []
    for name, info in modules.items():
        record = dict(said, **{field: info[field] for field in CALL_FIELDS if field in info})
        (replacements.get(name) or model.get_submodule(name)).quantized_with = record
        records.append(record)
    model.epmq_quant_config = common_quant_config(records)
    model.epmq_served_with = _served_with_files(directory)
    if (directory / OPEN_CLIP_CONFIG_FILE).is_file():
        # (written back by save_quantized, as a transformers model's config.json, whether the
        # model was built from it or given: the file is epmq's once written, and a save that did
        # not make it again would drop it; load_quantized(directory) would find nothing to build)
        cfg = read_json(directory / OPEN_CLIP_CONFIG_FILE)
        if isinstance(cfg, dict):
            model.epmq_open_clip_config = cfg
    bind_save_pretrained(model)
    del tensors  # (a model given holds copies of them)
    release_freed_memory()  # (what the load read and converted, freed between the model's tensors)
    return given
