"""Merge checkpoints on disk (or on the HF hub) into a checkpoint on disk.

    epmq.merge_checkpoints("ties", base="meta-llama/Llama-3.1-8B",
                           models=["ckpt/math", "ckpt/code"], out="merged/ties",
                           params={"density": 0.2}, dtype="bfloat16")

or ``epmq merge CONFIG.yaml OUT``. Every source is read lazily, tensor by tensor
(``checkpoint_io.CheckpointReader``: safetensors, shards with an index, torch files), and the
merged tensors go into safetensors shards as they are made (``checkpoint.ShardWriter``), so
memory holds a few tensors of each source and at most one shard of the result. The output is
what ``save_pretrained`` writes: the same tensor names as the sources, ``model.safetensors`` or ``max_shard_size`` shards with
``model.safetensors.index.json``, and the non-weight files of the base (or first model)
directory: ``config.json`` (its ``dtype`` updated), tokenizer and generation config. It loads
with ``from_pretrained`` and is a ready input to ``epmq.quantize_model``. An open_clip model's (its
weights read beside its ``open_clip_config.json``) is written as open_clip's hub layout:
``open_clip_model.safetensors`` and that config, without the transformers config.json of a LAION
checkpoint's other copy. The models' tensors
are found under the base's names (one prefix rewrite per model: ``CLIPVisionModel`` checkpoints
of transformers 4 and 5 differ by ``vision_model.``; Qwen3-VL-MoE's fused experts, which
transformers 4 saved transposed, are read in the layout of the checkpoint whose config the output
carries); tensors of the base that the models lack
are copied from the base and tensors of a model the base lacks are ignored, each with a
warning: FusionBench's CLIP experts are ``CLIPVisionModel`` checkpoints fine-tuned from the
vision tower of a ``CLIPModel`` base, and the merge of their towers keeps the base's text tower
(the zero-shot heads). A model of the base's own ``model_type`` without a matrix the others
have, of another layer count, or quantized, is refused instead. A tied expert's head is its
embeddings; experts with their own trained heads over a base with tied word embeddings untie
the output (``tie_word_embeddings: false``, the head written: the merge of theirs), as PEFT's
``merge_and_unload`` unties a trained head. Experts with added tokens
merge with ``tokenizer_source`` (``epmq.vocabulary``). ``epmq_merge.json``
records the recipe (method, parameters, sources). The directory is written atomically
(``checkpoint.atomic_directory``): an interrupted merge leaves the previous output intact.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import operator
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import merge as merge_lib
from ._util import check_json_file, loading_bars, read_json_file
from .checkpoint import (MERGE_RECIPE_FILE, OPEN_CLIP_CONFIG_FILE, WEIGHT_SUFFIXES, WEIGHTS_FILE, ShardWriter, _bytes,
                         _signature, atomic_directory, check_output, is_quantized)
from .checkpoint_io import (DTYPES, Binding, CheckpointError, CheckpointReader, LazyStateDict, hub_reference,
                            json_files, key_renaming, loads_transposed, local_checkpoint, tie_order, weights_in)
from .checks import all_finite, check_calibration_paths, check_outside_calibration, check_path, device_argument
from .lora import (adapter_directory, checkpoint_ties, is_lora_adapter, model_skeleton, named_base, named_revision,
                   open_expert)
from .resume import hold_output
from .vocabulary import (Aligner, build_vocabulary, check_tokenizer_source, check_tokens, checkpoint_tokenizer,
                         holds_no_vocabulary, load_tokenizer, text_tower_embeddings, vocabulary_columns,
                         vocabulary_names)

RECIPE_FILE = MERGE_RECIPE_FILE
CARD_MARK = "<!-- model card written by epmq merge; a README without this line is the user's -->"
# merge -> whether it takes a base model (slerp: two models, the first at t = 0; None: optional)
METHODS = {"task_arithmetic": True, "ties": True, "dare": True, "breadcrumbs": True,
           "della": True, "sce": True, "tsv": True, "iso_c": True, "model_stock": True, "average": False,
           "slerp": False, "nuslerp": None, "multislerp": None, "karcher": False, "nearswap": True,
           "ram": True, "ram_plus": True, "arcee_fusion": True, "regmean": False}

Source = Union[str, Path]


class _View(Mapping):
    """Some of a lazy state dict's tensors (``names``; default all), moved to ``device`` (if
    given) as they are read."""

    def __init__(self, state: Mapping, device=None, names=None, label=None, aligned=None):
        self.state, self.device = state, None if device is None else torch.device(device)
        self.label = label  # (what epmq.merge's errors call it)
        self.names = dict.fromkeys(state if names is None else names)  # ordered, O(1) lookups
        self.aligned = aligned  # (vocabulary.Aligner, this model's key): its vocabulary-indexed tensors

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        if self.aligned is not None and name in self.aligned[0].names:
            t = self.aligned[0].get(self.aligned[1], name)
        else:
            if self.aligned is not None:  # (the merges go name by name: the laid-out ones are done)
                self.aligned[0].let_go()
            t = self.state[name]
        return t if self.device is None else t.to(self.device)

    def _header(self, name, what: str):
        """Tensor ``name``'s ``what`` (``dtype_of``, ``shape_of``) from the checkpoint's header
        where the state reads one; else (a vocabulary-aligned tensor) from the tensor."""
        if name not in self.names:
            raise KeyError(name)
        if (self.aligned is not None and name in self.aligned[0].names) or not hasattr(self.state, what):
            t = self[name]
            return t.dtype if what == "dtype_of" else tuple(t.shape)
        return getattr(self.state, what)(name)

    def dtype_of(self, name) -> torch.dtype:
        return self._header(name, "dtype_of")

    def shape_of(self, name) -> tuple:
        return self._header(name, "shape_of")

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self.names


class _TiedWriter:
    """``writer``, which also stores each tensor under the names tied to it (``ties``: name ->
    names): the merged value goes to both."""

    def __init__(self, writer: ShardWriter, ties: Mapping[str, list]):
        self.writer, self.ties, self.dtype, self.progress = writer, ties, writer.dtype, writer.progress

    def __setitem__(self, name: str, t: torch.Tensor):
        self.writer[name] = t
        for tied in self.ties.get(name, ()):
            self.writer[tied] = t.clone()  # (safetensors stores no shared memory)

    def finish(self) -> None:
        self.writer.finish()


def _tied_in_base(base_path: Path, base_state: Mapping, merged: list, apart=()) -> dict:
    """Tensors of the base tied to another it has: merged name -> [tied names], each tied name
    written with the merged tensor's value. Tied by the base's config (``tie_order`` of its
    skeleton) and equal in the base; with no config, none. Both the tensors the models lack (a
    tied lm_head the base's raw state dict stores beside the embeddings, which save_pretrained
    experts omit) and those every model stores twice (raw ``torch.save`` checkpoints): merged
    under each name, a random merge (DARE) would write two values, and transformers would then
    leave the model untied. ``apart``: names the merge unties (``_untie``), each merged on its own."""
    skeleton = model_skeleton(base_path)
    if skeleton is None:
        return {}
    # (own_checkpoint: a head the config unties is not tied, whatever transformers' defaults)
    order, merged = tie_order(skeleton, own_checkpoint=True), set(merged)
    # names of one tensor (union-find: the orders list a tied head's embeddings under it, not
    # always the reverse)
    group = {name: name for name in base_state if name not in apart}

    def root(name):
        while group[name] != name:
            name = group[name]
        return name

    for name in group:
        for alias in order.get(name, ()):
            if alias in group:
                group[root(alias)] = root(name)
    members = {}
    for name in group:
        members.setdefault(root(name), []).append(name)
    position = {name: i for i, name in enumerate(base_state)}
    ties = {}
    for names in members.values():
        candidates = [n for n in names if n in merged]
        if len(names) < 2 or not candidates:
            continue
        first = min(candidates, key=position.get)  # (merged; the others written with its value)
        for name in names:
            if name != first and torch.equal(base_state[name], base_state[first]):
                ties.setdefault(first, []).append(name)
    return ties


def _tied_followers(view) -> dict:
    """The reference's tied tensors past the first of each (by its own config.json): name ->
    the name it is a copy of (the first the reference's checkpoint stores). A tied head,
    which save_pretrained leaves out, is one."""
    own, position = checkpoint_ties(view.state.reader), {n: i for i, n in enumerate(view)}
    out, apart = {}, {}
    for name, others in own.items():
        stored = sorted((m for m in [name, *others] if m in position), key=position.get)
        if not stored or name == stored[0]:
            continue
        group = tuple(stored)
        if group not in apart:
            apart[group] = _stored_apart(view, stored)
        if not apart[group]:
            out[name] = stored[0]
    return out


def _stored_apart(view, names: list) -> bool:
    """Whether the checkpoint behind ``view`` stores two of ``names`` (names of one tensor by its
    config) with different values: they are not tied in it, as from_pretrained leaves two stored
    tensors that differ untied. FLAN-T5 as transformers 4.x wrote it (the hub's) stores lm_head
    beside shared, and transformers 5 builds T5 tied whatever its config says. A LoRA adapter's
    are its base checkpoint's (a head it saved whole, modules_to_save, is a trained head over
    its base's tie, untied by ``_untie``)."""
    key, lora = view.state.checkpoint_key, view.state.reader.lora
    if lora is not None:
        names = [n for n in names if key(n) in lora.base]
        read = lambda n: lora.base.get(key(n))  # noqa: E731
    else:
        read = view.state.__getitem__
    return any(key(n) != key(names[0]) and not torch.equal(read(n), read(names[0])) for n in names[1:])


def _own_copy(view, name: str, leader: str) -> bool:
    """Whether a model holds its own tensor ``name``, other than its ``leader`` (an untied
    expert's trained head, a LoRA adapter's ``modules_to_save: [lm_head]``)."""
    if name not in view:
        return False
    if leader not in view:
        return True
    if view.state.checkpoint_key(name) == view.state.checkpoint_key(leader):
        return False  # (its own tie: the one tensor)
    return not torch.equal(view.state[name], view.state[leader])


def _untied(config: dict) -> dict:
    """``config`` (config.json's content) with its word embeddings untied: ``tie_word_embeddings``
    false at its top and in each tower's config that sets it (transformers then ties none of
    its ``_tied_weights_keys``)."""
    config = dict(config, tie_word_embeddings=False)
    for key, value in config.items():
        if isinstance(value, dict) and "tie_word_embeddings" in value:
            config[key] = dict(value, tie_word_embeddings=False)
    return config


def _check_untie(path: Path, followers: Mapping, why: str) -> None:
    """ValueError unless ``_untied`` of the config of the reference at ``path`` unties every one of
    ``followers`` (a model that ties them whatever its config says cannot keep the models' own)."""
    import tempfile

    directory = path if path.is_dir() else path.parent
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(_untied(read_json_file(directory / "config.json"))),
                                               encoding="utf-8")
        skeleton = model_skeleton(Path(tmp))
        order = {} if skeleton is None else tie_order(skeleton, own_checkpoint=True)
    still = [n for n in followers if skeleton is None or len(order.get(n, [n])) > 1]
    if still:
        raise ValueError(f"{why}, but the reference's model ({path}) ties {still[:3]} to "
                         f"{[followers[n] for n in still[:3]]} even with tie_word_embeddings: false, so the "
                         f"merge cannot keep them apart: merge models whose heads are their embeddings, or a "
                         f"base whose head is untied")


def _open(path: Path, what: str, device, names=None, lora_base=None, rename=None) -> Mapping:
    """A checkpoint as a lazy state dict; with ``names`` (the reference's), under those names:
    its keys are found under one prefix rewrite (``checkpoint_io.Binding``: transformers 5
    saves ``CLIPVisionModel`` without the ``vision_model.`` that 4.x and ``CLIPModel`` write),
    and the tensors of its own that no name reaches are ignored, with a warning. A name the
    checkpoint does not store but ties, by its own config, to one it does (the head of an
    expert with tied embeddings, saved without it) is that tensor. ``rename``: the reference
    model's loading renames (``key_renaming``); a name and a key that it renames alike are one
    tensor (LLaVA saved as ``language_model.model.*`` and as its modules' ``model.language_model.*``,
    which from_pretrained loads alike). A LoRA adapter is the whole expert on ``lora_base``
    (default: the base its config names)."""
    reader = CheckpointReader(open_expert(path, lora_base), what)
    if names is None:
        return _View(LazyStateDict(reader, {key: key for key in reader.keys()}), device, label=what)
    own = checkpoint_ties(reader)  # (its own name first: a raw save stores a tied head beside its source)
    order = {n: [n, *own.get(n, ())] for n in names}
    if rename is not None:
        order = {n: list(dict.fromkeys([*aliases, *map(rename, aliases)])) for n, aliases in order.items()}
    binding = Binding(reader.keys(), {n: a for n, a in order.items() if len(a) > 1}, names=names, rename=rename)
    binding.refuse_ambiguity(lambda message: ValueError(f"{what} {message}"))
    found = {n: binding.key_for(n) for n in names}
    found = {n: k for n, k in found.items() if k is not None}
    ignored = sorted(set(reader.keys()) - set(found.values()))
    if ignored:
        warnings.warn(f"{what}: {len(ignored)} tensors with no counterpart in the reference "
                      f"checkpoint are ignored (e.g. {ignored[:3]})")
    return _View(LazyStateDict(reader, found), device, label=what)


def _lay_out_vocabulary(source, pad_to_multiple_of, base_state, sources, base_path, model_paths, lora_base,
                        base_only, tokens=None, key_of=None):
    """The models' vocabulary-indexed tensors laid out by ``source``'s tokenizer (the views in
    ``sources`` and ``base_state`` then hand those out; ``epmq.vocabulary``), after checking,
    without a source, that the models' vocabularies agree (refused where their embedding rows
    differ, warned where one row means different tokens). Returns ``(Vocabulary or None, the
    models' tokenizers by key)``."""
    reference = base_state if base_state is not None else sources[0]
    views = ([("base", base_state)] if base_state is not None else []) + list(enumerate(sources))
    paths = dict(([("base", base_path)] if base_state is not None else []) + list(enumerate(model_paths)))
    # a LoRA adapter's config.json and tokenizer are its base's, where it has none of its own
    homes = {k: _adapter_base(p, v, lora_base) for k, v in views for p in [paths[k]]}
    tokenizers = {k: load_tokenizer(paths[k]) or (load_tokenizer(homes[k]) if homes[k] != paths[k] else None)
                  for k, _ in views}
    try:  # (among all of the reference's tensors: those copied from the base alone count too)
        skeleton = model_skeleton(homes[views[0][0]])
        names = vocabulary_names(skeleton, list(reference.state))
        columns = vocabulary_columns(skeleton, list(reference.state))
    except ValueError:
        # (a CLIPModel's own get_input_embeddings is none: its text tower's, beside experts of that tower or
        # a vision tower's, which lack it, are checked as a model's; laid out by a tokenizer, they are not)
        if source is not None:
            raise
        tower = text_tower_embeddings(skeleton, list(reference.state))
        if tower is None:
            return None, tokenizers  # (without a source: nothing to check against, as before)
        names, columns = [tower], []
    label = {k: "the base" if k == "base" else v.label for k, v in views}
    lacking = [k for k, v in views if names[0] not in v.state]
    if lacking and source is not None:
        raise ValueError(f"tokenizer_source: {label[lacking[0]]} has no {names[0]} (the token embeddings) to lay out")
    views = [(k, v) for k, v in views if k not in lacking]  # (a partial checkpoint: refused later, by name)
    rows = {k: v.state.reader.shape(v.state.checkpoint_key(names[0]))[0] for k, v in views}
    # (a LoRA adapter trained on resized embeddings saving those but not its untied head, which PEFT leaves out
    # unless it is targeted: its head's rows the base's, fewer than its tokens. Laid out by its tokenizer, the
    # head's rows were read past their end, an IndexError; without, the refusal asked for a tokenizer_source)
    # (by the rows the model's own modules give them: a head may be built of another count than its embeddings)
    built = {**dict(skeleton.named_parameters(remove_duplicate=False)), **dict(skeleton.named_buffers())}
    for k, v in views:
        for name, dim in [*((n, 0) for n in names[1:]), *((n, -1) for n in columns)]:
            if name not in v.state or name not in built:
                continue
            n = v.state.reader.shape(v.state.checkpoint_key(name))[dim]
            if n - rows[k] != built[name].shape[dim] - built[names[0]].shape[0]:
                raise ValueError(f"{label[k]} has {rows[k]} embedding rows ({names[0]}) but {n} in {name}: its "
                                 f"tensors indexed by the vocabulary disagree (a LoRA adapter trained with added "
                                 f"tokens that saved its resized embeddings but not its resized output head: PEFT "
                                 f"saves it only where modules_to_save or target_modules names it); save the "
                                 f"adapter with its head, or merge it into the model it was trained in "
                                 f"(merge_and_unload()) and pass that")
    if source is None:
        first = views[0][0]
        for k, _ in views[1:]:
            if rows[k] != rows[first]:
                raise ValueError(f"{label[k]} has {rows[k]} embedding rows ({names[0]}), {label[first]} {rows[first]}: "
                                 f"their vocabularies differ (added tokens?); give tokenizer_source='union' (or "
                                 f"'base') to lay every model's embeddings out by one tokenizer")
            if tokenizers[k] is not None and tokenizers[first] is not None:
                mine = {t: i for t, i in tokenizers[k].get_vocab().items() if i < rows[k]}
                theirs = {t: i for t, i in tokenizers[first].get_vocab().items() if i < rows[first]}
                if mine != theirs:
                    differ = sorted({t for t in mine.keys() | theirs.keys() if mine.get(t) != theirs.get(t)})[:3]
                    differ = ", ".join(f"{t!r}: {theirs.get(t)} there, {mine.get(t)} here" for t in differ)
                    warnings.warn(f"the tokenizer of {label[k]} is not that of {label[first]} ({differ}): an "
                                  f"embedding row may stand for different tokens in the two; tokenizer_source='union' "
                                  f"lays every model's rows out by token")
        return None, tokenizers
    unaligned = sorted(set(names + columns) & set(base_only))
    if unaligned:
        raise ValueError(f"tokenizer_source: {unaligned} indexed by the vocabulary are the base's alone (the models "
                         f"lack them, and they are not tied to a tensor the models have): they cannot be laid out by "
                         f"the models' vocabulary")
    names = [n for n in names if n in reference]  # (tied copies take the merged tensor's value)
    columns = [n for n in columns if n in reference]
    if not names:
        raise ValueError("tokenizer_source: the models share none of the tensors indexed by the vocabulary")
    vocabulary = build_vocabulary(source, {k: tokenizers[k] for k, _ in views}, rows,
                                  base="base" if base_state is not None else None,
                                  pad_to_multiple_of=pad_to_multiple_of, names=names + columns, columns=columns,
                                  tokens=tokens, key_of=key_of)
    aligner = Aligner(vocabulary, {k: v.state for k, v in views})
    for k, v in views:
        v.aligned = (aligner, k)
    return vocabulary, tokenizers


def _adapter_base(path: Path, view, lora_base) -> Path:
    """``path``, or for a LoRA adapter the base model it makes an expert of (``lora_base``, else
    the one its config names), whose config.json and tokenizer it shares."""
    if not is_lora_adapter(path):
        return path
    lora = getattr(view.state.reader, "lora", None)
    named = getattr(getattr(lora, "base", None), "path", None)
    return Path(lora_base) if lora_base is not None else Path(named) if named is not None else path


def _check_output_tokenizer(template: Optional[str], output, tokenizers: Mapping, reference) -> None:
    """Warn of what the written tokenizer ``output`` (with the chat template ``template`` set on
    it, if any) loses of the models' (``tokenizers``, ``reference`` among them: the one copied):
    special tokens the chat template spells that it lacks (ChatML's ``<|im_end|>``), the chat
    template the models carry where none is set, and the end-of-sequence token the models
    (the reference aside) agree on where it has another: mergekit loses them too."""
    if output is None:
        return
    vocab = output.get_vocab()
    others = [t for k, t in tokenizers.items() if t is not None and k != reference]
    if template is not None:
        specials = {a.content for t in tokenizers.values() if t is not None for a in t.added_tokens_decoder.values()}
        missing = sorted(t for t in specials if t in template and t not in vocab)
        if missing:
            warnings.warn(f"the chat template uses {missing}, which the written tokenizer lacks (the models that "
                          f"have them added them): they become ordinary text; tokenizer_source='union' adds them")
    elif not output.chat_template and any(t.chat_template for t in others):
        warnings.warn("the models carry a chat template, the written tokenizer (the "
                      f"{'base' if reference == 'base' else 'first model'}'s) none: give chat_template='auto' to "
                      f"write the one most models carry")
    eos = {t.eos_token for t in others}
    if len(eos) == 1 and None not in eos and eos != {output.eos_token}:
        warnings.warn(f"the models end their texts with {eos.pop()!r}, the written tokenizer with "
                      f"{output.eos_token!r} (and generation_config.json is the reference's): set the EOS token "
                      f"the merged model should stop at")


def _save_tokenizer(tokenizer, target: Path) -> None:
    """``tokenizer`` saved to ``target``, without the loading options transformers writes into
    tokenizer_config.json (``is_local``, ``local_files_only``: where it was read from, not what it is)."""
    tokenizer.save_pretrained(target)
    config = target / "tokenizer_config.json"
    if config.is_file():
        content = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(content, dict) and {"is_local", "local_files_only"} & set(content):
            for key in ("is_local", "local_files_only"):
                content.pop(key, None)
            config.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_vocabulary(vocabulary, target: Path, template: Optional[str]) -> None:
    """The output tokenizer of ``vocabulary`` (with the chat template ``template``, if any)
    written to ``target`` over the copied one, and config.json's vocabulary size set to its rows."""
    tokenizer = vocabulary.tokenizer
    if template is not None:
        tokenizer.chat_template = template
    # the copied chat templates are another model's where files_from names one: the written
    # tokenizer's are its own (it saves those it carries), not a template spelling tokens it lacks
    for name in ("chat_template.jinja", "chat_template.json"):
        (target / name).unlink(missing_ok=True)
    for name in COMPANION_DIRS:
        shutil.rmtree(target / name, ignore_errors=True)
    _save_tokenizer(tokenizer, target)
    config = target / "config.json"
    if config.is_file():
        content = json.loads(config.read_text(encoding="utf-8"))
        scopes = [content] + [v for v in content.values() if isinstance(v, dict) and "vocab_size" in v]
        for scope in scopes:
            if "vocab_size" in scope:
                scope["vocab_size"] = vocabulary.rows
        config.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _json_value(value):
    """A recipe's value JSON has no type for: numpy's numbers (a sweep's parameters, which the
    checks take) as the Python number they are, not str()'s string, which the same recipe given
    again is refused for, and their arrays (weights as read) as lists; anything else (a Path) as
    its string."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()  # (.item() of an array of weights failed once the merge was done)
    return str(value)


def _model_card(recipe: dict) -> str:
    """A README whose metadata the HF hub reads (``base_model``, ``tags``), with the recipe."""
    import yaml

    sources = ([recipe["base"]] if recipe["base"] else []) + recipe["models"]
    # the hub refuses a commit whose README names anything but model ids there (a local path, an
    # org/name@revision): the hub models only, by their id; the recipe below names every source
    hub_ids = [ref[0] for source in map(str, sources) if not Path(source).expanduser().exists()
               and (ref := hub_reference(source)) is not None and not Path(ref[0]).expanduser().exists()]
    hub_ids = list(dict.fromkeys(hub_ids))
    meta = yaml.safe_dump({**({"base_model": hub_ids} if hub_ids else {}), "tags": ["merge", "epmq"]},
                          sort_keys=False)
    return (f"---\n{meta}---\n{CARD_MARK}\n\n# Merged with epmq ({recipe['method']})\n\n"
            f"This model merges {len(recipe['models'])} models"
            f"{' into the base ' + recipe['base'] if recipe['base'] else ''} with "
            f"`epmq.merge.{recipe['method']}`. The recipe (`{RECIPE_FILE}`):\n\n"
            f"```json\n{json.dumps(recipe, indent=2, default=_json_value)}\n```\n")


# weights in other frameworks' formats (hub repositories often hold TF / Flax / ONNX copies)
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".ot", ".onnx", ".gguf", ".ckpt", ".pkl", ".npz")


# folders of a checkpoint that belong to its tokenizer (transformers saves the named chat templates
# but the default in additional_chat_templates/); no other folder is copied (a hub repository's
# original/ holds another copy of the weights)
COMPANION_DIRS = ("additional_chat_templates",)


def _companions(source: Path) -> Optional[list]:
    """The non-weight files of a checkpoint directory (config, tokenizer, generation config) and its tokenizer's
    folders, which a merge's output carries: not its weights in any format, nor its model card, which describe
    another model. A weights file's directory counts if it holds a ``config.json`` (None where it does not: the
    merge has no config). ``_check_companions`` checks these, so a file left behind stops no merge."""
    open_clip = _reads_open_clip(source)
    if not source.is_dir():
        if not (source.parent / "config.json").is_file() and not open_clip:
            return None
        source = source.parent

    def carried(entry: Path) -> bool:
        if entry.name in COMPANION_DIRS and entry.is_dir() and not entry.is_symlink():
            return True
        return not (entry.name.startswith(".") or not entry.is_file()
                    or entry.name.endswith(WEIGHT_SUFFIXES + OTHER_WEIGHT_SUFFIXES)
                    or entry.name in (RECIPE_FILE, "README.md")
                    # (transformers' config of a LAION checkpoint's other copy: from_pretrained built its CLIPModel
                    # from it and left every weight random, the merged tensors bearing open_clip's names; and
                    # open_clip's, of the copy not read: its loader of a directory built open_clip's CLIP from it
                    # and failed on the merged tensors' transformers names)
                    or entry.name == ("config.json" if open_clip else OPEN_CLIP_CONFIG_FILE))

    return sorted(filter(carried, source.iterdir()))


def _copy_companions(source: Path, target: Path, dtype: Optional[str]) -> None:
    """``_companions`` of checkpoint ``source`` copied into ``target``, its config saying ``dtype``."""
    companions = _companions(source)
    if companions is None:
        warnings.warn(f"{source} is a weights file with no config.json beside it: the merge "
                      f"has no config, so from_pretrained cannot load it (add one)")
        return
    for entry in companions:
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
    config = target / "config.json"
    if dtype is not None and config.is_file():
        content = json.loads(config.read_text(encoding="utf-8"))
        if content.get("dtype") == dtype and content.get("torch_dtype", dtype) == dtype:
            return  # (said already: the file as it came)
        content["dtype"] = dtype
        if "torch_dtype" in content:
            content["torch_dtype"] = dtype
        config.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _written_dtype(state, names) -> Optional[str]:
    """The name (``DTYPES``') of the one floating dtype of the tensors ``names`` of ``state``
    (from its header), which a merge without ``dtype`` writes them in; None where they have
    several (the config copied then says what it says)."""
    dtypes = {dtype for dtype in map(state.dtype_of, names) if dtype.is_floating_point}
    return next((name for name, dtype in DTYPES.items() if {dtype} == dtypes), None)


def _as_open_clip_weights(directory: Path) -> None:
    """The merged weights in ``directory`` under open_clip's name for them, which its hub loader fetches
    (``create_model("hf-hub:...")`` fetches no other file, and built the model random-initialised, a log line
    aside); shards, which no open_clip loader reads, warned of."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    if (directory / WEIGHTS_FILE).is_file():
        (directory / WEIGHTS_FILE).rename(directory / HF_SAFE_WEIGHTS_NAME)
    else:
        warnings.warn(f"the merged open_clip model is written in shards (max_shard_size), which open_clip does not "
                      f"load (it reads one weights file, {HF_SAFE_WEIGHTS_NAME}): give a max_shard_size above the "
                      f"model's size to write it whole")


def _check_companions(source: Path) -> None:
    """A ValueError naming a JSON file ``_copy_companions`` would carry that is empty or no JSON
    (an interrupted copy or download of a tokenizer.json): the merge wrote it into its output,
    whose tokenizer then did not load, after all its work."""
    for entry in _companions(source) or ():  # (None: no files are copied, warned as they are)
        if entry.suffix != ".json":
            continue
        try:
            check_json_file(entry)
        except ValueError as e:
            raise ValueError(f"{e} (an interrupted copy or download?): the merged model carries this file "
                             f"and would not load; copy it again") from None


def check_chat_template(chat_template) -> None:
    """ValueError unless ``chat_template`` is Jinja text or "auto"."""
    if not isinstance(chat_template, str) or (chat_template != "auto" and "{" not in chat_template):
        raise ValueError(f"chat_template must be Jinja text or 'auto', got {chat_template!r} (a template named "
                         f"after a format, such as mergekit's 'chatml', is not known here: give its text)")


def check_merge(method: str, models: Sequence[Source], *, base: Optional[Source] = None,
                params: Optional[dict] = None, dtype: Optional[str] = None,
                calibration: Optional[Sequence] = None, chat_template: Optional[str] = None,
                tokenizer_source: Optional[str] = None, pad_to_multiple_of: Optional[int] = None,
                tokens: Optional[Mapping] = None, files_from: Optional[Source] = None) -> None:
    """Raise ValueError for a merge ``merge_checkpoints`` cannot run, before anything is read."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a name, one of {', '.join(METHODS)}; got {method!r}")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping name -> value, got {params!r}")
    if method == "regmean" and (not isinstance(calibration, (list, tuple)) or len(calibration) != len(models)):
        raise ValueError("regmean needs each model's activations on its task's data: give "
                         "calibration=[files of model 0, files of model 1, ...], a list, one per model"
                         + (f"; got {type(calibration).__name__} {calibration!r}" if calibration is not None else ""))
    for k, files in enumerate(calibration if method == "regmean" else ()):
        # (as epmq quantize's tasks: a path, or a non-empty list of them; a number, null or a
        # mapping failed as a TypeError traceback once every model had been loaded)
        if not (isinstance(files, (str, Path)) or isinstance(files, (list, tuple)) and files
                and all(isinstance(f, (str, Path)) for f in files)):
            raise ValueError(f"calibration[{k}] (model {k}'s files) must be file(s) or a directory, got {files!r}")
    if method != "regmean" and calibration is not None:
        raise ValueError(f"merge {method} takes no calibration data (only regmean does)")
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}: one of {', '.join(METHODS)}")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if METHODS[method] is True and base is None:
        raise ValueError(f"merge {method} needs the base model (base=...)")
    if METHODS[method] is False and base is not None:
        raise ValueError(f"merge {method} takes no base model: give the models to merge only")
    if method in ("slerp", "nuslerp") and len(models) != 2:
        raise ValueError(f"{method} interpolates two models, got {len(models)}")
    if not models:
        raise ValueError("no models to merge")
    if chat_template is not None:
        check_chat_template(chat_template)
    if files_from is not None and str(files_from) not in {str(m) for m in [*models, *([base] if base else [])]}:
        raise ValueError(f"files_from must be the base or one of the models (as given), got {files_from!r}")
    check_tokenizer_source(tokenizer_source, pad_to_multiple_of)
    check_tokens(tokens)
    if tokens and tokenizer_source is None:
        raise ValueError("tokens names rows of the vocabulary tokenizer_source lays out: give one")
    named = {m if isinstance(m, str) else m["model"] for spec in (tokens or {}).values() for m in [spec.get("source")]
             if m is not None and not (isinstance(m, Mapping) and m.get("kind") == "zero")}
    given = {str(m) for m in models} | ({str(base)} if base is not None else set())
    if named - given:
        raise ValueError(f"tokens: {sorted(named - given)} is not the base or one of the models (as given: "
                         f"{sorted(given)})")
    if tokenizer_source is not None and method == "regmean":
        raise ValueError("regmean with tokenizer_source: its statistics are taken on each model's own "
                         "vocabulary; merge models of one vocabulary")
    check_merge_params(method, params or {})


def check_merge_params(method: str, params: Mapping, reserved=()) -> None:
    """ValueError for parameters ``epmq.merge``'s ``method`` does not take (or ``reserved``:
    set by the caller itself), and for numbers written as strings."""
    # (the inputs each merge takes, and its bar, the caller gives: karcher's list is named models)
    accepted = set(inspect.signature(getattr(merge_lib, method)).parameters) - {
        "base", "experts", "models", "a", "b", "out", "grams", "transposed", "progress", *reserved}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"merge {method}: unknown parameters {unknown}; it takes {sorted(accepted)}")
    signature = inspect.signature(getattr(merge_lib, method)).parameters
    for name, value in params.items():
        # (a switch, per_row, row_wise, flatten, normalize_weights: the string "false" is true in
        # Python, and merged as the opposite of what it says)
        if isinstance(signature[name].default, bool) and not isinstance(value, bool):
            raise ValueError(f"params.{name} must be true or false, got {value!r}")
        if isinstance(value, str):
            try:
                read = float(value)
            except ValueError:
                continue
            # (YAML reads nan and inf as strings too, which no writing of 1e-1 mends)
            raise ValueError(f"params.{name} is the string {value!r}, not a number " + (
                "(YAML reads 1e-1 as a string: write 1.0e-1 or 0.1)" if math.isfinite(read)
                else "(NaN and inf are not numbers it can take: give a finite one)"))


class _SpilledGrams(Sequence):
    """One weight's Gram matrices, one per model, read from the files each model's were
    written to when indexed (``merge.regmean`` reads one weight's at a time); fused experts'
    ``[E, in, in]`` one expert's matrix at a time (``_SpilledExperts``)."""

    def __init__(self, entries):
        self.entries = entries  # [[(file, key)]], one list per model (fused experts': a few experts each)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, k):
        from safetensors import safe_open

        (file, key), *more = self.entries[k]
        with safe_open(str(file), framework="pt") as f:
            if more or len(f.get_slice(key).get_shape()) == 3:
                return _SpilledExperts(self.entries[k])
            return f.get_tensor(key)


class _SpilledExperts:
    """One model's Gram matrices of a fused experts parameter, ``[E, in, in]`` in ``parts``, the
    ``(file, key)`` of each stack of consecutive experts: expert ``e``'s read when indexed. Read
    whole, each model's were held at once by the merge of one fused weight (gpt-oss-120b's: 8.5 GB a
    model in float64), where it solves one expert at a time."""

    def __init__(self, parts):
        from safetensors import safe_open

        self.parts = []  # [(file, key, experts)]
        for file, key in parts:
            with safe_open(str(file), framework="pt") as f:
                shape = f.get_slice(key).get_shape()
            self.parts.append((file, key, shape[0]))
        self.shape = torch.Size([sum(n for *_, n in self.parts), *shape[1:]])

    def dim(self) -> int:
        return len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        from safetensors import safe_open

        if not 0 <= e < self.shape[0]:
            raise IndexError(f"expert {e} of {self.shape[0]}")
        for file, key, n in self.parts:
            if e < n:
                with safe_open(str(file), framework="pt") as f:
                    return f.get_slice(key)[e]
            e -= n


def _spill(grams: Mapping[str, torch.Tensor], file: Path) -> dict:
    """Write one model's Gram matrices to ``file`` (a matrix shared by several weights, q/k/v's,
    once); ``{weight name: its key there}``."""
    from ._util import save_safetensors

    key_of, unique, keys = {}, {}, {}
    for name, G in grams.items():
        keys[name] = key_of.setdefault(id(G), f"g{len(key_of)}")
        unique[keys[name]] = G
    save_safetensors({key: G.contiguous() for key, G in unique.items()}, file)
    return keys


def _expert_grams(sources, model_paths, calibration, device, options, spill_dir: Path, out,
                  progress: bool = False) -> dict:
    """RegMean's statistics: for each reference tensor name, each model's ``X^T X`` at that
    linear on its own calibration data (the model loaded whole, one at a time); and the names
    of the weights stored ``[in, out]`` (GPT-2's ``Conv1D``). Each model's are written to a file
    in ``spill_dir`` once computed and read back a weight at a time by the merge: held, they grew
    with layers times models (a 7B Llama's are 44 GB a model in float64). ``out``: the output,
    refused inside a model's directory of texts or pairs (``check_outside_calibration``).
    ``progress``: a bar of each pass's batches."""
    from tqdm.auto import tqdm

    from .checkpoint_io import renamed, saved_key_renaming
    from .quantize_files import (PREPROCESSOR_FILES, _check_decoder_start, _forward_takes, _modality, _model_class,
                                 _reads_labels, _vision_tower_class, calibrated)
    from .stats import gram_matrices, rebuilt_experts
    from .walker import _input_embeddings

    # an adapter's model is its base's, with the expert's tensors (W_0 + s B A) put in
    homes = [source.state.reader.lora.base.path if is_lora_adapter(path) else path
             for source, path in zip(sources, model_paths)]
    if not all(h is not None and h.is_dir() for h in homes):
        raise ValueError("regmean: every model must be a checkpoint directory, or a LoRA adapter whose "
                         "base is one (its config builds the model whose activations are collected)")
    for k, (home, files) in enumerate(zip(homes, calibration)):
        # (the output inside a model's directory of texts or pairs: its config.json, tokenizer files and
        # model card that model's documents next time; an image or audio folder's reader takes none of them)
        cls, encoder_decoder = _model_class(home, None, walked=False)
        if {"input_ids", "pixel_values"} <= _forward_takes(cls):  # (quantize's refusal said 'tower: ...')
            tower = _vision_tower_class(cls)
            raise ValueError(f"regmean: {cls.__name__} (model {k}) takes both texts and images, and RegMean of "
                             f"checkpoints reads one kind of calibration data a model: merge it with "
                             f"epmq.merge.regmean on the Gram matrices of (input_ids, pixel_values) batches "
                             f"(epmq.stats.gram_matrices), "
                             + (f"its vision tower's checkpoints ({tower.__name__}) calibrated on images, "
                                if tower is not None else "")
                             + "or by a method that reads no data (average, task_arithmetic, ties)")
        modality = _modality(cls, encoder_decoder)
        if modality == "audio" and encoder_decoder:  # (quantize's refusal said 'or with method: rtn')
            raise ValueError(f"regmean: {cls.__name__} (model {k}) is an encoder-decoder whose decoder reads "
                             f"transcripts, which audio files do not hold, and its decoder's Gram matrices need "
                             f"them: merge it with epmq.merge.regmean on the Gram matrices of (input_features or "
                             f"input_values, labels) batches (epmq.stats.gram_matrices), or by a method that reads "
                             f"no data (average, task_arithmetic, ties)")
        if modality == "pairs" and not _reads_labels(cls):
            raise ValueError(f"regmean: {cls.__name__} (model {k})'s forward takes no labels, so the pairs' targets "
                             f"would not reach its decoder: merge it with epmq.merge.regmean on the Gram matrices of "
                             f"(input_ids, decoder_input_ids) batches (epmq.stats.gram_matrices), or by a method "
                             f"that reads no data (average, task_arithmetic, ties)")
        if modality not in ("images", "audio"):
            check_outside_calibration(out, {f"model {k}": files})
    # experts saved without their tokenizer use another model's (they share the base's)
    with_preprocessor = [p for p in [*model_paths, *homes] if any((p / f).is_file() for f in PREPROCESSOR_FILES)]
    if not with_preprocessor:
        # (what the models' calibration is read with: audio asked for 'a tokenizer or image processor')
        what, files = {"images": ("image processor", ("preprocessor_config.json",)),
                       "audio": ("feature extractor", ("preprocessor_config.json",))}.get(
                           modality, ("tokenizer", ("tokenizer.json", "tokenizer_config.json")))
        raise ValueError(f"regmean: no model directory holds a {what} to prepare the calibration {modality} "
                         f"with: copy the base model's {what} files ({', '.join(files)}, ...) into one of "
                         f"{', '.join(str(p) for p in model_paths)}")
    # every model's batches read before the first pass, as epmq quantize reads its tasks': a later
    # model's missing or unreadable file was found after the passes of those before it (hours at 7B)
    prepared = []
    for k, (path, home, files) in enumerate(zip(model_paths, homes, calibration)):
        own = next((p for p in (path, home) if p in with_preprocessor), with_preprocessor[0])
        # (one forward of each batch, no walk: layers that no input reaches, as Mllama's
        # cross-attention on texts, have zero Gram matrices, and RegMean averages them)
        cls, _, batches = calibrated(home, {f"model {k}": files}, preprocessor_dir=own, walked=False, **options)
        prepared.append((cls, batches))
    per_model = []
    for k, (view, path, home, (cls, batches)) in enumerate(zip(sources, model_paths, homes, prepared)):
        prepared[k] = None  # (its batches dropped with its pass)
        model = cls.from_pretrained(home, dtype=torch.float32).eval()
        _check_decoder_start(model, batches, home)  # (named before its activations are collected)
        if device is not None:
            model.to(device)
        to_reference = {view.state.checkpoint_key(n): n for n in view}
        if home != path:
            params = dict(model.named_parameters(remove_duplicate=False))  # (a tied head's too)
            on_disk = renamed(list(params), saved_key_renaming(model))
            # a tied tensor is written once, by its first name, the input embeddings' where the
            # model says which they are: an expert with its embeddings saved whole (modules_to_save)
            # has the base's head beside them, which, written last, left every activation on the
            # base's embeddings (the head shapes no linear's input)
            order = list(params)
            fed = _input_embeddings(model)
            if fed is not None and fed[0] in params:
                order.insert(0, order.pop(order.index(fed[0])))
            written = set()
            with torch.no_grad():
                for n in order:
                    p = params[n]
                    if on_disk[n] in to_reference and id(p) not in written:
                        written.add(id(p))
                        p.copy_(view[to_reference[on_disk[n]]])
        if k == 0:  # (the models share one architecture)
            shapes = fused = _fused_expert_gram_shapes(model)
            sizes = {n: experts * d_in ** 2 * 8 for n, (experts, d_in) in shapes.items()}
            # over the budget, the experts' matrices are collected a few fused parameters' experts at a
            # time, a calibration pass each (the first's with the other matrices), spilled in between
            if sum(sizes.values()) > EXPERT_GRAM_BYTES:  # (those the passes call one linear per expert)
                called = rebuilt_experts(model)
                shapes = {n: shape for n, shape in shapes.items() if n in called}
                sizes = {n: size for n, size in sizes.items() if n in called}
            chunks = _chunks(shapes, EXPERT_GRAM_BYTES) if sum(sizes.values()) > EXPERT_GRAM_BYTES else [True]
            runs = [dict(experts=chunks[0] if chunks else False), *(dict(names=set(chunk), experts=chunk)
                                                                    for chunk in chunks[1:])]
            # the other matrices (linears', routers') over GRAM_BYTES: a few layers' a pass (a 70B Llama's
            # are ~650 GB a model in float64), the first's with the first experts' (named: names= takes them)
            dense = _gram_sizes(model, fused)
            if sum(dense.values()) > GRAM_BYTES:
                parts = _dense_chunks(dense, GRAM_BYTES)
                first = runs[0]["experts"]
                runs[0] = dict(names=set(parts[0]) | (set(fused) if first is True else set(first or ())),
                               experts=first)
                runs[1:1] = [dict(names=set(part), experts=False) for part in parts[1:]]
            alone = [n for n, (_, d_in) in shapes.items() if d_in ** 2 * 8 > EXPERT_GRAM_BYTES]
            if alone:
                warnings.warn(f"regmean: the Gram matrix of one expert of {len(alone)} of {type(model).__name__}'s "
                              f"fused expert parameters would take up to "
                              f"{max(shapes[n][1] ** 2 * 8 for n in alone) / 2**30:.1f} GiB in float64 (over "
                              f"epmq.merge_checkpoint.EXPERT_GRAM_BYTES, {EXPERT_GRAM_BYTES / 2**30:.1f} GiB; e.g. "
                              f"{alone[0]}): those experts are merged by their plain average; raise it to merge them "
                              f"by RegMean where memory allows")
            seen, transposed = set(), set()
        entries = {}
        for c, run in enumerate(runs):
            # (fused experts' under the fused name and each expert's: a checkpoint holds either)
            # (the merge's own bar stands at its first tensor meanwhile: a pass is minutes to hours at 7B)
            passes = f" (pass {c + 1} of {len(runs)})" if len(runs) > 1 else ""
            items = tqdm(batches[f"model {k}"], desc=f"regmean: model {k}'s Gram matrices{passes}", unit="batch",
                         leave=False, disable=not progress)
            grams = gram_matrices(model, items, each_expert=True, **run)
            on_disk = renamed(list(grams), saved_key_renaming(model))  # model name -> checkpoint key
            if k == 0:  # (the models share one architecture)
                seen.update(grams)
                transposed |= {to_reference[on_disk[n]] for n in merge_lib.conv1d_weights(model)
                               if n in grams and on_disk[n] in to_reference}
            file = spill_dir / (f"grams-{k}.safetensors" if len(runs) == 1 else f"grams-{k}-{c}.safetensors")
            keys = _spill({to_reference[on_disk[n]]: G for n, G in grams.items() if on_disk[n] in to_reference}, file)
            for n, key in keys.items():  # (a fused parameter's: a few experts' in each of its runs)
                entries.setdefault(n, []).append((file, key))
            del grams
        if k == 0:  # (those averaged over the budget, DBRX's v1 with its w1, were warned of above, with their size)
            over = {*alone, *(n[:-len("w1")] + "v1" for n in alone if n.endswith(".mlp.w1"))}
            _warn_averaged_matrices(model, seen | over)
        del model
        per_model.append(entries)
    shared = [n for n in per_model[0] if all(n in g for g in per_model)]
    return {n: _SpilledGrams([g[n] for g in per_model]) for n in shared}, transposed & set(shared)


# the most memory one model's per-expert Gram matrices of fused experts may take at once (~E
# times its dense layers': Mixtral-8x7B's are ~450 GB); over it they are collected a few fused
# parameters' experts at a time, a calibration pass each (a fused parameter whose own matrices pass
# it, a DeepSeek-V3 layer's gate_up_proj, 256 experts of 7168 inputs: 105 GB, across passes), and
# one whose single expert's matrix passes it is averaged, warned
EXPERT_GRAM_BYTES = 32 * 2**30


# the most memory one model's Gram matrices of its linears (and routers), fused experts' apart, may
# take at once (a 7B Llama's 44 GB, a 70B's ~650 GB); over it they are collected a few layers at a
# time, a calibration pass each (the same matrices: the same batches, each under its seed)
GRAM_BYTES = 32 * 2**30


def _gram_sizes(model, fused) -> dict:
    """``{weight: bytes}`` of the float64 Gram matrices ``gram_matrices`` collects for ``model``'s
    weights but its fused experts' (``fused``), ``[in, in]`` each, in order: its untied linears'
    (``Conv1D``'s, stored ``[in, out]``, too) and the other 2-D weights of its blocks (routers);
    linears that turn out to read one tensor (q/k/v) counted apart, as the first batch alone tells
    them. (A pass given names of none of them, embeddings or a tied head alone, is refused.)"""
    from torch import nn

    from .adapters import named_blocks
    from .checkpoint_io import parameter_aliases
    from .stats import stacks_of

    tied = {name for names in parameter_aliases(model) if len(names) > 1 for name in names}
    # (by the blocks' names: an OrderedDict's are not their index)
    in_blocks = {f"{block_name}.{rel}" if rel else block_name for _, tower in stacks_of(model)
                 for prefix, blocks in tower for block_name, block in named_blocks(prefix, blocks)
                 for rel, _ in block.named_modules()}
    sizes, left = {}, {*fused, *tied}
    for module_name, module in model.named_modules():
        conv1d = type(module).__name__ == "Conv1D"
        W = module._parameters.get("weight")
        name = f"{module_name}.weight" if module_name else "weight"
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point() or name in left:
            continue
        if isinstance(module, nn.Linear) or conv1d or module_name in in_blocks and not isinstance(module, nn.Embedding):
            sizes[name] = (W.shape[0] if conv1d else W.shape[1]) ** 2 * 8
    return sizes


def _dense_chunks(sizes: Mapping[str, int], budget: int) -> list:
    """``sizes`` (of ``_gram_sizes``) cut in order into lists of names each within ``budget`` bytes
    (one over it alone in its own)."""
    chunks, room = [], 0
    for name, size in sizes.items():
        if not chunks or size > room:
            chunks.append([])
            room = budget
        chunks[-1].append(name)
        room -= size
    return chunks


def _fused_expert_gram_shapes(model) -> dict:
    """``{fused parameter: (experts, inputs)}`` of ``model``'s fused experts, whose Gram matrices
    are one ``[inputs, inputs]`` per expert (DBRX's too: w1's and v1's one stack, counted under w1,
    v1's of no inputs; JetMoE's one ``weight [E, out, in]``), in order."""
    from .adapters.moe import _rebuilt_as, is_fused_experts, is_split_experts

    shapes = {}
    for name, module in model.named_modules():
        if is_split_experts(module):
            shapes[f"{name}.weight"] = module.weight.shape[0], module.weight.shape[2]
        elif is_fused_experts(module):
            flip = _rebuilt_as(module).transposed  # ([E, in, out])
            for p in ("gate_up_proj", "up_proj", "down_proj"):
                W = getattr(module, p, None)
                if isinstance(W, torch.Tensor) and W.dim() == 3:
                    shapes[f"{name}.{p}"] = W.shape[0], W.shape[1 if flip else 2]
        elif type(module).__name__ == "DbrxExperts":
            shapes[f"{name}.mlp.w1"] = module.num_experts, module.hidden_size
            shapes[f"{name}.mlp.v1"] = module.num_experts, 0  # (w1's)
            shapes[f"{name}.mlp.w2"] = module.num_experts, module.ffn_hidden_size
    return shapes


def _fused_expert_gram_sizes(model) -> dict:
    """``{fused parameter: bytes}`` of the float64 Gram matrices, one per expert and input, of
    ``model``'s fused experts (``_fused_expert_gram_shapes``), in order."""
    return {n: experts * d_in ** 2 * 8 for n, (experts, d_in) in _fused_expert_gram_shapes(model).items()}


def _fused_expert_gram_bytes(model) -> int:
    """Bytes of the float64 Gram matrices, one per expert and input, of ``model``'s fused experts."""
    return sum(_fused_expert_gram_sizes(model).values())


def _chunks(shapes: Mapping[str, tuple], budget: int) -> list:
    """The fused parameters (of ``_fused_expert_gram_shapes``) whose Gram matrices are collected in
    one pass, each with the range of its experts there: ``[{name: experts}]``, each chunk within
    ``budget`` bytes, filled in order (a parameter over what is left of one goes on in the next,
    so the passes are as few as the budget allows), DBRX's v1 with its w1 (one stack, counted under
    w1); a parameter whose single expert's matrix passes the budget in none."""
    chunks, room = [], 0
    for name, (experts, d_in) in shapes.items():
        each = d_in ** 2 * 8
        if name.endswith(".mlp.v1") or each > budget:
            continue
        v1 = name[:-len("w1")] + "v1" if name.endswith(".mlp.w1") else None
        e = 0
        while e < experts:
            if room < each:
                chunks.append({})
                room = budget
            n = min(experts - e, room // each)
            chunks[-1].update({p: range(e, e + n) for p in (name, v1) if p in shapes})
            room -= n * each
            e += n
    return chunks


def _warn_averaged_matrices(model, grams) -> None:
    """Warn of the weight matrices in ``model``'s blocks that RegMean has no Gram matrix for,
    being no linear layer (fused MoE experts, which transformers 5 holds as 3-D parameters, and
    their routers): merged by their plain average, most of a mixture-of-experts model's weights,
    which nothing else would say."""
    from torch import nn

    from .adapters import find_towers, named_blocks

    try:
        stacks = [(prefix, blocks) for _, tower in find_towers(model) for prefix, blocks in tower]
    except ValueError:  # (blocks no adapter knows)
        return
    layers = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
    left = []
    for prefix, blocks in stacks:
        for block_name, block in named_blocks(prefix, blocks):  # (an OrderedDict's names: not their index)
            for rel, module in block.named_modules():
                for name, p in module.named_parameters(recurse=False):
                    full = f"{block_name}.{rel + '.' if rel else ''}{name}"
                    if p.dim() >= 2 and p.is_floating_point() and not isinstance(module, layers) and full not in grams:
                        left.append(f"{full} {tuple(p.shape)}")
    if left:
        warnings.warn(f"regmean: {len(left)} weight matrices of the blocks are no linear layer whose inputs it "
                      f"collects (e.g. {', '.join(left[:3])}; fused experts and routers of a mixture of experts): "
                      f"they have no Gram matrix and are merged by their plain average")


def _reads_open_clip(path: Path) -> bool:
    """Whether the weights read of checkpoint ``path`` (a directory or a weights file) are open_clip's: an
    open_clip_config.json beside them, and no config.json or an open_clip weights file read. (LAION's hub
    checkpoints hold transformers' copy and open_clip's, each with its config: the one of the weights read, or
    an open_clip file read by transformers' config was another architecture than its fine-tunes.)"""
    home = path if path.is_dir() else path.parent
    if not (home / OPEN_CLIP_CONFIG_FILE).is_file():
        return False
    weights = weights_in(path) if path.is_dir() else path
    return not (home / "config.json").is_file() or (weights is not None and weights.name.startswith("open_clip_"))


def _config(path: Path, base: Optional[Path] = None) -> dict:
    """A checkpoint's ``config.json`` ({} if none; open_clip's open_clip_config.json as
    ``_open_clip_config`` reads it, where there is no config.json or the weights read are open_clip's
    file); of a LoRA adapter, its base's (``_adapter_home``: the one it is read on, where ``base`` gives one)."""
    if is_lora_adapter(path):
        home = _adapter_home(path, base)
        return _config(home) if home is not None and home.exists() else {}
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if _reads_open_clip(path):
        return _open_clip_config(read_json_file(config.with_name(OPEN_CLIP_CONFIG_FILE)))
    if not config.is_file():
        return {}
    content = read_json_file(config)
    return content if isinstance(content, dict) else {}


def _timm_read(config: dict) -> dict:
    """``config`` as timm builds its model, where it is timm's (its ``architecture`` a name: timm's
    hub config.json, transformers' TimmWrapper's): its ``model_args`` at its top, its architecture the
    model_type where it gives none; the global_pool beside them, which says what the exported model
    pooled and which loading it does not read, left out. Another config as it is."""
    if not isinstance(config.get("architecture"), str):
        return config
    model_args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    return {"model_type": config["architecture"],
            **{k: v for k, v in config.items() if k not in ("global_pool", "model_args")}, **model_args}


# open_clip's defaults of the fields compared (its CLIPVisionCfg's, CLIPTextCfg's and CoCa's decoder's
# MultimodalCfg's), which its configs leave out: ViT-B-32's config gives no quick_gelu, ViT-B-32-quickgelu's
# gives true; an image tower naming a timm model (timm_model_name) is built by its timm fields, no head_width,
# a text tower naming a HF model (hf_model_name) by its hf_ fields; an image tower's attention pool's heads
# (attn_pooler_heads) are those of one built with it (attentional_pool)
OPEN_CLIP_DEFAULTS = {"quick_gelu": False, "vision_cfg": {"head_width": 64, "pool_type": "tok", "no_ln_pre": False,
                                                          "attentional_pool": False},
                      "attentional_pool": {"attn_pooler_heads": 8},
                      "text_cfg": {"heads": 8, "no_causal_mask": False, "pool_type": "argmax", "proj_type": "linear",
                                   "proj_bias": False},
                      "multimodal_cfg": {"heads": 8, "ls_init_value": None},
                      "timm": {"timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False},
                      "hf": {"hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}}

# open_clip's defaults of how its own transformer's blocks are built (an image or text tower's; CoCa's decoder
# reads ls_init_value alone): each other one adds weights (LayerScale's gammas, q and k norms, a cosine
# attention's scales, per-head scales, norms inside the attention, after it, inside the MLP), which merged
# beside a model without them were copied from the base, or dropped, with a warning
OPEN_CLIP_BLOCKS = {"ls_init_value": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}

# CLIPVisionCfg's and CLIPTextCfg's fields that build open_clip's own transformer, which a tower built by timm
# or transformers (timm_model_name, hf_model_name) does not read: its sizes, blocks, pool and projection
OPEN_CLIP_TRANSFORMER = ("layers", "heads", "head_width", *OPEN_CLIP_BLOCKS, "no_ln_pre", "attentional_pool",
                         "proj_type", "proj_bias")

# open_clip's defaults of a ViT image tower's image and patch sizes (CLIPVisionCfg's), which its configs may leave out
OPEN_CLIP_VIT_SIZES = {"image_size": 224, "patch_size": 16}

# open_clip's default eos_id, the token a text tower pooling at its EOS (pool_type "eos") reads
OPEN_CLIP_EOS_ID = 2


# open_clip's defaults of the tokenizer_kwargs its tokenizers take (get_tokenizer builds a HF one where a
# text_cfg names one, hf_tokenizer_name, its own BPE otherwise: HFTokenizer's and SimpleTokenizer's), and of
# the context length they cut texts at
OPEN_CLIP_TOKENIZER_KWARGS = {"hf": {"clean": "whitespace", "strip_sep_token": False, "language": None},
                              "bpe": {"clean": "lower", "additional_special_tokens": None, "reduction_mask": ""}}
OPEN_CLIP_CONTEXT_LENGTH = 77


# torch's defaults of what open_clip passes a tower's GELU and LayerNorms as act_kwargs and norm_kwargs
# (CoCa's decoder is built without them): a config writing one out says what one leaving it out does
OPEN_CLIP_KWARGS = {"act_kwargs": {"approximate": "none"}, "norm_kwargs": {"eps": 1e-5}}


def _timm_architecture(name: str) -> str:
    """The timm architecture that ``timm_model_name`` builds, as far as the name says it: a registry
    name's, its pretrained tag split off (it names weights, not another model, as timm splits it); a hub
    name of timm's own repositories (``hf-hub:timm/<architecture>.<tag>``, as timm names them), whose
    config.json timm builds by, the same; a local directory's (``local-dir:<directory>``) the architecture
    its config.json names, where it is here; another hub repository's name, or a directory's not here, as
    it is written (its architecture is in its config.json alone, and a dot in it is no tag;
    ``_same_timm_model`` compares a directory's by its path)."""
    if ":" not in name:
        return name.partition(".")[0]
    hub = _timm_hub_model(name)
    if hub is not None and hub[0].startswith("timm/"):  # (timm's architectures are in lower case)
        return hub[0].removeprefix("timm/").partition(".")[0]
    directory = _timm_local_dir(name)
    if directory is not None and (Path(directory) / "config.json").is_file():
        content = read_json_file(Path(directory) / "config.json")
        if isinstance(content, dict) and isinstance(content.get("architecture"), str):
            return content["architecture"]
    return name


def _timm_local_dir(name) -> Optional[str]:
    """The directory a ``timm_model_name`` of ``local-dir:<directory>`` names (its prefix in any case, as
    timm reads it), None for another name."""
    source, colon, directory = name.partition(":") if isinstance(name, str) else ("", "", "")
    return directory if colon and source.lower() == "local-dir" else None


def _timm_hub_model(name) -> Optional[tuple]:
    """The hub repository and revision a ``timm_model_name`` of the hub names (``hf-hub:<repository>@<revision>``,
    its prefix in any case, or the ``hf_hub:`` timm reads as it), the repository in lower case: the hub reads
    its ids in any case (huggingface_hub#2090), a revision it does not; none given, the hub's default branch,
    "main", which timm downloads then. None for another name."""
    source, colon, model_id = name.partition(":") if isinstance(name, str) else ("", "", "")
    if not colon or source.lower() not in ("hf-hub", "hf_hub"):
        return None
    repository, at, revision = model_id.partition("@")  # (@: a revision, as timm reads one)
    return repository.lower(), revision if at else "main"


def _same_timm_model(mine, theirs) -> bool:
    """Whether two ``_timm_architecture`` names build one timm model: alike, one hub repository at one revision
    however its name and prefix are cased (``_timm_hub_model``), or one local directory that is not here to say
    its architecture, however its path is spelled (``_same_path``)."""
    mine_dir, theirs_dir = _timm_local_dir(mine), _timm_local_dir(theirs)
    if mine_dir is not None and theirs_dir is not None:
        return _same_path(mine_dir, theirs_dir)
    mine_hub = _timm_hub_model(mine)
    if mine_hub is not None:
        return mine_hub == _timm_hub_model(theirs)
    return mine == theirs


def _same_path(mine: str, theirs: str) -> bool:
    """Whether two paths name one file or directory, however they are spelled: relative to the working
    directory (as transformers and timm read them) or not, through links."""
    return os.path.realpath(mine) == os.path.realpath(theirs)


def _open_clip_config(content) -> dict:
    """An open_clip_config.json's ``model_cfg`` in config.json's terms, open_clip's defaults filled
    in: ``model_type`` open_clip, its towers' configs with theirs (``vision_cfg``, ``text_cfg``, CoCa's
    decoder's ``multimodal_cfg``), so that its activation (QuickGELU), heads and layers are compared as
    a HF model's. {} where it gives no model_cfg."""
    model_cfg = content.get("model_cfg") if isinstance(content, dict) else None
    if not isinstance(model_cfg, dict):
        return {}
    # (init_logit_bias builds a logit_bias parameter, SigLIP's, which a model without it lacks; custom_text a text
    # tower of its own, its tensors named text.*, where a CLIP holds them at its top: as open_clip builds them;
    # multimodal_cfg CoCa's decoder, text_decoder.*, which a CustomTextCLIP, custom_text too, lacks)
    config = {"model_type": "open_clip", "quick_gelu": OPEN_CLIP_DEFAULTS["quick_gelu"], "init_logit_bias": None,
              "multimodal_cfg": None, **model_cfg, "custom_text": _open_clip_custom_text(model_cfg)}
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        if not isinstance(model_cfg.get(tower), dict):
            continue
        timm_name = model_cfg[tower].get("timm_model_name")
        timm = isinstance(timm_name, str) and bool(timm_name)
        hf_name = model_cfg[tower].get("hf_model_name") if tower == "text_cfg" else None
        hf = isinstance(hf_name, str) and bool(hf_name)
        own = not (timm or hf)
        resnet = isinstance(model_cfg[tower].get("layers"), (list, tuple))
        blocks = OPEN_CLIP_BLOCKS if own and not resnet and tower != "multimodal_cfg" else {}
        config[tower] = {"model_type": f"open_clip_{tower}",
                         **OPEN_CLIP_DEFAULTS["timm" if timm else "hf" if hf else tower], **blocks, **model_cfg[tower]}
        # (multimodal_cfg: a CoCa, which open_clip builds with custom_text alone, a CLIP taking no decoder)
        _open_clip_pool(config[tower], tower, own=own, custom_text=config["custom_text"])
        if tower == "vision_cfg" and not timm and config[tower].get("attentional_pool"):
            config[tower] = {**OPEN_CLIP_DEFAULTS["attentional_pool"], **config[tower]}
        elif tower != "text_cfg":  # (no attention pool built of them: its heads say nothing)
            config[tower].pop("attn_pooler_heads", None)
        # (a CLIPTextCfg's field, without which open_clip builds CoCa's decoder, causal, and which a HF
        # text tower, built from its hf_model_name alone, does not read)
        if tower == "multimodal_cfg" or hf:
            config[tower].pop("no_causal_mask", None)
        # (nor what builds open_clip's own transformer, which they are not; a ResNet and CoCa's decoder are
        # built of none of its blocks' options, an explicitly "default" block of none but its LayerScale)
        unread = ()
        if not own:
            unread = OPEN_CLIP_TRANSFORMER
        elif resnet:
            unread = ("no_ln_pre", "attentional_pool", *OPEN_CLIP_BLOCKS)
        elif tower == "multimodal_cfg":
            unread = ("proj_type", "proj_bias", *OPEN_CLIP_BLOCKS.keys() - {"ls_init_value"})
        elif config[tower].get("block_type") == "default":
            unread = OPEN_CLIP_BLOCKS.keys() - {"ls_init_value"}
        for field in unread:
            config[tower].pop(field, None)
        if config[tower].get("attentional_pool") == "":  # (no pool, as open_clip tests it)
            config[tower]["attentional_pool"] = False
        # (no projection: no bias of it; timm's "" projects by its trunk's head, whose bias is its own)
        if tower == "text_cfg" and config[tower].get("proj_type") == "none":
            config[tower].pop("proj_bias", None)
        if timm and config[tower].get("timm_proj") not in ("linear", "mlp"):
            config[tower].pop("timm_proj_bias", None)
        # (a class token appended masks the padding, which the pad_id says; a CLIP keeps no class token)
        pad_id = config[tower].pop("pad_id", None)
        if tower == "text_cfg" and own and config[tower].get("embed_cls") and config["custom_text"]:
            config[tower]["pad_id"] = 0 if pad_id is None else pad_id
        # (a ResNet image tower, layers per stage, is built of ReLUs and BatchNorms without them, a HF text
        # tower of its HF model's modules)
        for field, defaults in OPEN_CLIP_KWARGS.items():
            given = config[tower].pop(field, None)
            if not (timm or hf or resnet) and tower != "multimodal_cfg":
                config[tower][field] = {k: v for k, v in (given or {}).items() if k not in defaults or defaults[k] != v}
        if timm:
            config[tower]["timm_model_name"] = _timm_architecture(timm_name)
            if config[tower]["timm_pool"] == "":  # (the trunk's own pooling, or none: which, it does not say)
                del config[tower]["timm_pool"]
        if hf:
            config[tower]["hf_model_name"] = _hf_model_repository(hf_name)
        if tower == "text_cfg":
            _open_clip_tokenizer(config[tower], hf)
        if tower == "vision_cfg" and own and not resnet:
            _open_clip_grid(config[tower])
    # (QuickGELU or GELU is the activation of open_clip's own transformers alone: a timm or ResNet image tower and
    # a HF text tower are built without it;
    # a CLIP's towers left out are its own transformers, by default; a CLIP has no decoder)
    towers = [config.get("vision_cfg", {}), config.get("text_cfg", {}), config["multimodal_cfg"]]
    if not any(isinstance(tower, dict) and _reads_quick_gelu(tower) for tower in towers):
        config.pop("quick_gelu")
    return config


def _open_clip_custom_text(model_cfg: dict) -> bool:
    """Whether open_clip builds ``model_cfg`` with a text tower of its own (CustomTextCLIP, CoCa): ``custom_text``,
    a HF text tower (``hf_model_name``), or CoCa's decoder (``multimodal_cfg``), as its factory chooses."""
    text_cfg = model_cfg.get("text_cfg")
    return (bool(model_cfg.get("custom_text")) or "multimodal_cfg" in model_cfg
            or isinstance(text_cfg, dict) and "hf_model_name" in text_cfg)


def _reads_quick_gelu(tower: dict) -> bool:
    """Whether an ``_open_clip_config`` tower is built with the activation ``quick_gelu`` picks: open_clip's own
    transformer (an absent tower: its default, a ViT or text transformer), not timm's, HF's or a ResNet."""
    return not (tower.get("timm_model_name") or tower.get("hf_model_name")
                or isinstance(tower.get("layers"), (list, tuple)))


def _open_clip_grid(cfg: dict) -> None:
    """An open_clip ViT's ``grid_size``, its patches per column and row (``image_size // patch_size`` per side,
    a number either's side for both), set in its tower's ``cfg``: its learned position embeddings are one per
    patch of that grid, so that a grid transposed (an image_size of [16, 32] against [32, 16]) holds tensors
    of the same shapes for other positions. Left out where either is no size."""
    def sides(field):
        size = cfg.get(field, OPEN_CLIP_VIT_SIZES[field])
        size = [size, size] if isinstance(size, int) else size
        if (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
            return size
        return None

    image, patch = sides("image_size"), sides("patch_size")
    if image is not None and patch is not None:
        cfg["grid_size"] = [image[0] // patch[0], image[1] // patch[1]]


def _hf_model_repository(name: str) -> str:
    """The HF model (or tokenizer) an open_clip text tower's ``hf_model_name`` (``hf_tokenizer_name``) names,
    as far as the name says it: its hub repository, or a local directory's path, as written
    (``_same_hf_model`` compares them)."""
    return name.rstrip("/\\") or name


def _open_clip_tokenizer(cfg: dict, hf: bool) -> None:
    """A text tower's ``cfg`` with its tokenizer's fields as open_clip's get_tokenizer reads them: a HF
    tokenizer where it names one (``hf_tokenizer_name``; "": open_clip's own BPE) in the ``tokenizer_mode``
    given ("": none), the ``tokenizer_kwargs`` that tokenizer takes less its defaults, and the
    ``context_length`` it cuts texts at where that sizes no weights (a HF text tower, ``hf``: open_clip's own
    holds a position embedding per token, whose shape says it)."""
    name = cfg.get("hf_tokenizer_name") or ""
    cfg["hf_tokenizer_name"] = _hf_model_repository(name) if isinstance(name, str) else name
    mode = cfg.pop("tokenizer_mode", None)
    if name:  # (the BPE takes no mode)
        cfg["tokenizer_mode"] = mode or ""
    kwargs, defaults = cfg.get("tokenizer_kwargs") or {}, OPEN_CLIP_TOKENIZER_KWARGS["hf" if name else "bpe"]
    if isinstance(kwargs, dict):  # (other than a dict: a config written wrong, compared as it is)
        cfg["tokenizer_kwargs"] = {k: v for k, v in kwargs.items() if k not in defaults or defaults[k] != v}
    context_length = cfg.pop("context_length", None)
    if hf:
        cfg["context_length"] = OPEN_CLIP_CONTEXT_LENGTH if context_length is None else context_length


def _local_hf_model(name: str) -> bool:
    """Whether an ``hf_model_name`` is a local directory's path, which transformers reads before the hub."""
    return name.startswith((".", "/", "~", "\\")) or os.path.isabs(name) or os.path.isdir(name)


# the hub's legacy names (repositories without an owner, moved under one in 2024: the hub redirects them
# there) of the HF models open_clip's text towers and tokenizers are built of, and their siblings, by that owner
HUB_LEGACY_OWNERS = {name: owner for owner, names in (
    ("google-bert", ("bert-base-uncased", "bert-base-cased", "bert-large-uncased", "bert-large-cased",
                     "bert-base-multilingual-uncased", "bert-base-multilingual-cased")),
    ("FacebookAI", ("roberta-base", "roberta-large", "xlm-roberta-base", "xlm-roberta-large")),
    ("distilbert", ("distilbert-base-uncased", "distilbert-base-cased", "distilbert-base-multilingual-cased",
                    "distilroberta-base"))) for name in names}


def _hub_repository(name: str) -> str:
    """The hub repository a hub name reads: a legacy name's (``HUB_LEGACY_OWNERS``, in any case) under its owner."""
    owner = HUB_LEGACY_OWNERS.get(name.lower())
    return f"{owner}/{name}" if owner else name


def _same_hf_model(mine: str, theirs: str) -> bool:
    """Whether two ``_hf_model_repository`` names name one hub model: the same repository in any case (the
    hub's repository ids are, as it reads Google-Bert/bert-base-uncased as google-bert/bert-base-uncased), a
    legacy name its owner's alone (``HUB_LEGACY_OWNERS``). A local directory (a copy of any model) is known to be the
    same one as itself alone, however its path is spelled (relative to the working directory, as
    transformers reads it, or not; through links)."""
    if not (isinstance(mine, str) and isinstance(theirs, str)):  # (no name: a config written wrong, as it is)
        return mine == theirs
    if _local_hf_model(mine) or _local_hf_model(theirs):
        return _local_hf_model(mine) == _local_hf_model(theirs) and _same_path(mine, theirs)
    return _hub_repository(mine).lower() == _hub_repository(theirs).lower()


def _hf_models_apart(mine, theirs) -> Optional[str]:
    """Why two names ``_same_hf_model`` does not call one model may still be, where they may: a local
    directory beside a hub name, a legacy name (no owner) beside another owner's repository of its name."""
    if not (isinstance(mine, str) and isinstance(theirs, str)):
        return None
    if _local_hf_model(mine) != _local_hf_model(theirs):
        local, hub = (mine, theirs) if _local_hf_model(mine) else (theirs, mine)
        return (f"the local directory {local!r} (a copy of any model) is not known to hold the hub's {hub!r}: "
                f"name it alike in both configs")
    if _local_hf_model(mine):
        return None
    legacy, owned = (mine, theirs) if "/" not in mine else (theirs, mine)
    if "/" in legacy or owned.rpartition("/")[2].lower() != legacy.lower():
        return None
    if legacy.lower() in HUB_LEGACY_OWNERS:
        return f"the hub reads {legacy!r} as {_hub_repository(legacy)!r}"
    return (f"{legacy!r} is a legacy hub name (no owner), which the hub redirects to the owner it moved under, "
            f"not known here (HUB_LEGACY_OWNERS): write that owner's name in both configs")


def _open_clip_pool(cfg: dict, tower: str, own: bool, custom_text: bool) -> None:
    """``cfg``'s ``pool_type`` made the one its open_clip tower pools its tokens by, its ``eos_id`` kept
    where that pool reads it ("eos") and its ``final_ln_after_pool`` where it tells (an image tower's mean):
    a string ``attentional_pool`` (its attention pools read every token) makes an image tower's "none";
    ``embed_cls`` makes a text tower's "last" (the class token it appends) where open_clip builds the text
    tower whole (``custom_text``: a CLIP keeps no class token, and pools by pool_type). All left out where
    no pool_type pools: a tower not ``own`` (not open_clip's transformer: timm's pools by its timm_pool,
    HF's by its hf_pooler_type), a ResNet, CoCa's decoder."""
    pool, eos_id = cfg.pop("pool_type", None), cfg.pop("eos_id", None)
    ln_after_pool = cfg.pop("final_ln_after_pool", None)
    if not own or tower == "multimodal_cfg" or isinstance(cfg.get("layers"), (list, tuple)):
        return
    attentional = cfg.get("attentional_pool")
    if tower == "vision_cfg" and isinstance(attentional, str) and attentional:  # ("": no pool, as open_clip tests it)
        pool = "none"
    elif tower == "text_cfg" and cfg.get("embed_cls") and custom_text:
        pool = "last"
    cfg["pool_type"] = pool
    if pool == "eos":
        cfg["eos_id"] = OPEN_CLIP_EOS_ID if eos_id is None else eos_id
    # (a LayerNorm before or after taking one token is alike; before or after their mean is not. An
    # attention pool, and open_clip's text towers, take no final_ln_after_pool)
    if tower == "vision_cfg" and pool == "avg" and not cfg.get("attentional_pool"):
        cfg["final_ln_after_pool"] = bool(ln_after_pool)


def _model_type(config: dict) -> tuple:
    """A checkpoint's ``model_type`` and those of its towers, from its ``config.json`` (``_config``)."""
    towers = {v.get("model_type") for v in config.values() if isinstance(v, dict)}
    return config.get("model_type"), towers


def _check_architectures(base_path, model_paths, models, *, experts: bool = False,
                         reference: Optional[dict] = None, warn: bool = True,
                         configs: Optional[Sequence[Optional[dict]]] = None, ref_name: Optional[str] = None,
                         lora_base: Optional[Path] = None) -> list:
    """Models of another architecture than the reference's are refused (tensors of one name and
    shape in two architectures mean different things: a Qwen3-MoE's attention merged into a
    Llama's), a tower of it accepted (CLIPVisionModel experts of a CLIPModel base), quantized
    checkpoints refused. Returns, per model, whether it is known to be of the reference's own
    architecture (then it must hold every tensor the others share with the reference).
    ``experts``: the models are E-PMQ's experts of the model ``base_path`` to quantize (the
    messages say so). ``reference``: the reference's config (a model in memory's), in place of
    ``base_path``'s config.json. ``warn``: another RoPE is warned of (else only refusals). ``configs``:
    per model, its config (a module's) in place of its path's config.json, or None. ``ref_name``: what
    the messages call the reference, where another than the model, base or first model. ``lora_base``: the
    base LoRA adapters among them are read on (a merge's lora_base or base), where not the one each names."""
    ref_name = ref_name or ("model" if experts else ("base" if base_path else "first model"))
    what_of = (lambda source: f"the expert {source}") if experts else (lambda source: f"model {source}")
    goal = "E-PMQ's experts must be of the model's {}" if experts else "merge models of one {}"
    named = [*([(base_path, f"the {ref_name}")] if base_path is not None else []),
             *((path, what_of(source)) for path, source in zip(model_paths, models) if path is not None)]
    for path, what in named:
        if not is_lora_adapter(path) and is_quantized(path if path.is_dir() else path.parent):
            raise ValueError(f"{what} is a quantized checkpoint (quantization_config in its config.json, or a "
                             f"quantize_config.json): {'give' if experts else 'merge'} the full-precision models")
    reference_path = None  # (a model in memory's config: no directory of files)
    if reference is None:
        reference_path = base_path if base_path is not None else model_paths[0]
        reference = _config(reference_path, lora_base)
    reference = _timm_read(reference)
    kind, towers = _model_type(reference)
    theirs = _layer_counts(reference)
    same = []
    for path, source, given in zip(model_paths, models, configs or [None] * len(models)):
        if given is None and lora_base is not None and path is not None and is_lora_adapter(path):
            _check_trained_on(path, source, lora_base, "base" if lora_base == base_path else "lora_base")
        config = _timm_read(given if given is not None else _config(path, lora_base))
        other, other_towers = _model_type(config)
        if kind and other and other != kind and other not in towers and kind not in other_towers:
            raise ValueError(f"{what_of(source)} is a {other!r} checkpoint, the {ref_name} a {kind!r} one "
                             f"(config.json's model_type, timm's architecture; an open_clip_config.json's is "
                             f"open_clip): {goal.format('architecture')}")
        same.append(bool(kind) and other == kind)
        mine = _layer_counts(config)
        if same[-1]:
            _check_layer_counts(mine, theirs, what_of(source), ref_name, goal)
            _check_reading(config, reference, what_of(source), ref_name, goal, experts, warn=warn)
            if given is None and None not in (path, reference_path) and _reads_own_tokenizer(reference):
                _check_tokenizer_files(_tokenizer_home(path, lora_base), _tokenizer_home(reference_path, lora_base),
                                       what_of(source), ref_name, goal)
        elif kind and other and other in towers:  # (a tower of the reference: its own config's counts)
            _check_layer_counts(_layer_counts(config, nested=False),
                                _layer_counts(_tower_config(reference, other), nested=False),
                                what_of(source), f"{ref_name}'s {other} tower", goal)
            _check_reading(config, _tower_config(reference, other), what_of(source), f"{ref_name}'s {other} tower",
                           goal, experts, nested=False, warn=warn)
        elif kind and other and kind in other_towers:  # (the reference is a tower of it)
            _check_layer_counts(_layer_counts(_tower_config(config, kind), nested=False),
                                _layer_counts(reference, nested=False), f"{what_of(source)}'s {kind} tower",
                                ref_name, goal)
            _check_reading(_tower_config(config, kind), reference, f"{what_of(source)}'s {kind} tower", ref_name,
                           goal, experts, nested=False, warn=warn)
    return same


def _check_trained_on(adapter: Path, source, base: Path, base_name: str, experts: bool = False) -> None:
    """A LoRA adapter read on ``base`` (``base_name``: the merge's base, or lora_base) whose config names another
    base that is found, the one it was trained on: refused where the two are of other architectures or read their
    weights otherwise (config.json's), as a full model of another architecture is (its config and tokenizer are
    those of the base it is read on, ``_adapter_home``; its update is of the one it names). ``experts``: it is
    E-PMQ's expert (the messages say so)."""
    named = _named_base_home(adapter)
    if named is None or not named.is_dir() or named.resolve() == (base if base.is_dir() else base.parent).resolve():
        return
    # (its config given: the named base's tokenizer files are not compared, the one it is read on tokenizes it)
    _check_architectures(base, [named], [f"{source} (a LoRA adapter of {named}, its config's base)"],
                         ref_name=base_name, warn=False, experts=experts, configs=[_config(named)])


# config.json's fields by which weights of the same shapes compute other things: their rows split
# into other heads, another activation, logits capped or scaled otherwise (Gemma 2's softcapping and
# query scale, Granite's and Cohere's multipliers), another residual form (GPT-NeoX's and Falcon's
# parallel attention, Falcon's and MPT's ALiBi and its slopes, MPT's and DBRX's clipped q, k and v, or
# attention scale), a mixture of experts routing tokens to another number of experts or weighing them
# otherwise, timm's model pooling its tokens otherwise (its global_pool: the class token or their
# mean), an open_clip image tower built as another timm model or pooling its features otherwise
# (timm_model_name, timm_pool) or by other heads (attn_pooler_heads), an open_clip text tower attending
# both ways (no_causal_mask), an open_clip tower's GELU approximated otherwise (act_kwargs) or pooling
# other tokens (pool_type: its class token, the last, the EOS's, eos_id; its mean normed after it or
# before, final_ln_after_pool), an open_clip text tower built of another HF model or pooling or
# projecting its features otherwise (hf_model_name, hf_pooler_type, hf_proj_type), an open_clip tower
# of other blocks, pre-norm, attention pool or projection (OPEN_CLIP_BLOCKS, no_ln_pre, attentional_pool,
# proj_type, proj_bias, timm_proj, timm_proj_bias: other weights, which the merge copies from the base or
# drops with a warning) or masking its padding otherwise (pad_id), an open_clip ViT's patches on another
# grid (grid_size: its position embeddings, of one shape for [16, 32] and [32, 16] images), an open_clip
# model with or without a logit bias (init_logit_bias, SigLIP's), holding its text tower apart or at its
# top (custom_text: its tensors named otherwise) or a CoCa's decoder or none (multimodal_cfg: its text_decoder.*),
# T5's position bias read at other distances (relative_attention_max_distance: its buckets' table of one shape)
# or its tied head scaled otherwise (transformers 5's scale_decoder_outputs, t5-small's true, FLAN-T5's false)
# (refused, as another layer count); or
# positions turned by another RoPE (a long-context fine-tune's: warned of, the output or the walk reading one
# config)
READ_AS = ("num_attention_heads", "num_key_value_heads", "head_dim", "n_head", "num_heads", "n_heads",
           "attention_heads", "encoder_attention_heads", "decoder_attention_heads", "num_encoder_attention_heads",
           "encoder_num_attention_heads", "decoder_num_attention_heads", "num_kv_heads", "n_head_kv",
           "num_attention_groups", "multi_query_group_num", "decoder_num_key_value_heads", "kv_channels", "d_kv",
           "attention_head_dim", "heads", "head_width", "hidden_act", "hidden_activation", "activation_function",
           "decoder_hidden_act", "activation", "quick_gelu", "feed_forward_proj", "projector_hidden_act",
           "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "embedding_multiplier",
           "residual_multiplier", "attention_multiplier", "logits_scaling", "logit_scale", "scale_embedding",
           "use_parallel_residual", "parallel_attn", "alibi", "num_experts_per_tok", "norm_topk_prob",
           "routed_scaling_factor", "n_group", "topk_group", "topk_method", "scoring_func", "moe_k", "moe_topk",
           "moe_top_k", "num_experts_per_token", "moe_renormalize", "act_layer", "global_pool", "kv_n_heads",
           "clip_qkv", "alibi_bias_max", "softmax_scale", "ffn_act_fn", "moe_normalize_expert_weights",
           "timm_model_name", "timm_pool", "no_causal_mask", "attn_pooler_heads", "act_kwargs", "pool_type", "eos_id",
           "final_ln_after_pool", "hf_model_name", "hf_pooler_type", "hf_proj_type", *OPEN_CLIP_BLOCKS, "no_ln_pre",
           "attentional_pool", "proj_type", "proj_bias", "pad_id", "timm_proj", "timm_proj_bias", "grid_size",
           "init_logit_bias", "custom_text", "multimodal_cfg", "relative_attention_max_distance",
           "scale_decoder_outputs")

# fields of READ_AS whose values read the weights alike, though they differ: open_clip's ls_init_value
# initializes LayerScale, and init_logit_bias the logit bias, which any value builds (None: none), a
# multimodal_cfg builds CoCa's decoder (None: none; its own fields compared as its tower's), its text
# tower's proj_type any other than "none" is one linear projection, a HF text tower's hf_model_name may
# leave out the hub owner of a legacy name, and a local directory it or a timm_model_name names may be
# spelled otherwise
READ_ALIKE = {"ls_init_value": lambda mine, theirs: (mine is None) == (theirs is None),
              "init_logit_bias": lambda mine, theirs: (mine is None) == (theirs is None),
              "multimodal_cfg": lambda mine, theirs: (mine is None) == (theirs is None),
              "proj_type": lambda mine, theirs: (mine == "none") == (theirs == "none"),
              "hf_model_name": _same_hf_model, "hf_tokenizer_name": _same_hf_model, "timm_model_name": _same_timm_model}

# fields of READ_AS (TOKENIZED_BY) whose values READ_ALIKE calls apart though they may be alike: why, in a refusal
READ_APART = {"hf_model_name": _hf_models_apart, "hf_tokenizer_name": _hf_models_apart}

# an open_clip text tower's tokenizer (_open_clip_tokenizer): another one reads a text as other tokens, an
# embedding row standing for another token in each (refused); another context_length cuts long texts
# elsewhere (warned of, as another sliding window is)
TOKENIZED_BY = ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")

# fields whose None turns what they do off (no softcapping, no sliding window, no clipping), where others'
# None stands for their model's default (num_key_value_heads: as many as the heads): written None, compared
OFF_WHEN_NONE = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "clip_qkv", "ls_init_value",
                 "init_logit_bias", "multimodal_cfg")

# other spellings of one field, as transformers' attribute_maps read them (GPT-2's and Bloom's n_head
# and n_layer, T5's num_heads, num_layers and d_kv, MPT's n_heads and n_layers, XGLM's and Mllama's
# vision attention_heads, the Qwen-VL vision towers' depth; Falcon's num_kv_heads, old Falcon configs'
# n_head and n_head_kv; open_clip's heads, head_width and layers; ERNIE's and Hunyuan's experts per
# token, RecurrentGemma's window): a config spelling one is compared with another spelling it otherwise.
# (An encoder-decoder's encoder_/decoder_ fields are each compared as spelled: transformers maps
# num_attention_heads to BART's encoder heads, num_key_value_heads to Whisper's.)
SPELLINGS = {"n_head": "num_attention_heads", "num_heads": "num_attention_heads", "n_heads": "num_attention_heads",
             "attention_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "n_head_kv": "num_key_value_heads",
             "num_attention_groups": "num_key_value_heads", "multi_query_group_num": "num_key_value_heads",
             "kv_channels": "head_dim", "d_kv": "head_dim", "attention_head_dim": "head_dim",
             "n_layer": "num_hidden_layers", "num_layers": "num_hidden_layers", "n_layers": "num_hidden_layers",
             "depth": "num_hidden_layers", "heads": "num_attention_heads", "head_width": "head_dim",
             "layers": "num_hidden_layers",
             "moe_k": "num_experts_per_tok", "moe_topk": "num_experts_per_tok", "moe_top_k": "num_experts_per_tok",
             "num_experts_per_token": "num_experts_per_tok", "moe_renormalize": "norm_topk_prob",
             "sliding_window_size": "sliding_window", "attention_window_size": "sliding_window",
             "local_attention_window": "sliding_window"}


def _differing(mine: dict, theirs: dict, differ: Callable = operator.ne, alike: Mapping = {}) -> list:
    """The pairs (my key, their key) of ``scope.field`` keys that name one field (each spelled
    as its config spells it: a scope spelling two spellings of one field keeps them apart) and
    whose values ``differ`` (where ``alike`` gives the field, whose values it does not call alike)."""
    def common(fields: dict) -> dict:  # (scope, the field's name to compare by) -> its key
        by = {}  # (scope, the field's common name) -> the keys spelling it
        for key in fields:
            scope, _, field = key.rpartition(".")
            by.setdefault((scope, SPELLINGS.get(field, field)), []).append(key)
        return {(scope, key.rpartition(".")[2]) if len(keys) > 1 else (scope, field): key
                for (scope, field), keys in by.items() for key in keys}

    mine_by, theirs_by = common(mine), common(theirs)
    def differs(k):
        values = mine[mine_by[k]], theirs[theirs_by[k]]
        return not alike[k[1]](*values) if k[1] in alike else differ(*values)

    return sorted((mine_by[k], theirs_by[k]) for k in mine_by.keys() & theirs_by.keys() if differs(k))


# config.json's nested settings that are no tower's config (no model_type): MPT's and DBRX's attention
# (ALiBi, clip_qkv, kv_n_heads, DBRX's RoPE), DBRX's feed-forward (its experts per token and activation)
SETTINGS = ("attn_config", "ffn_config")


def _scopes(config: dict, nested: bool) -> dict:
    """The parts of ``config`` whose fields are compared, by name: its top, its nested settings
    (``SETTINGS``) and, where ``nested``, its towers' configs."""
    return {"": config, **{k: v for k, v in config.items() if isinstance(v, dict)
                           and (k in SETTINGS or nested and "model_type" in v)}}


def _config_fields(config: dict, fields: Sequence[str], nested: bool) -> dict:
    """``{field: value}`` of ``fields`` that ``config`` spells out (not None, but for ``OFF_WHEN_NONE``), at
    its top, in its nested settings (``attn_config.alibi``) and, where ``nested``, in its towers' configs
    (``text_config.num_attention_heads``)."""
    return {f"{scope}.{field}".lstrip("."): c[field] for scope, c in _scopes(config, nested).items() for field in fields
            if c.get(field) is not None or (field in OFF_WHEN_NONE and field in c)}


# the RoPE fields transformers 4 wrote at a config's top, by each spelling transformers 5 reads into
# rope_parameters (GPT-NeoX's rotary_emb_base and rotary_pct)
ROPE_SPELLINGS = {"rope_theta": ("rope_theta", "rotary_emb_base"),
                  "partial_rotary_factor": ("partial_rotary_factor", "rotary_pct")}


def _rope(config: dict) -> Optional[dict]:
    """``config``'s RoPE as transformers 5 reads it (``rope_parameters``, keys sorted), from either
    version's fields: 4.x wrote ``rope_theta`` and ``partial_rotary_factor`` (``ROPE_SPELLINGS``) at the
    top and the scaling apart, as ``rope_scaling`` (its kind as ``type`` or ``rope_type``); 5.x writes them all in
    ``rope_parameters``, per layer type where layers turn positions apart. None where it gives none."""
    given = config.get("rope_scaling") or config.get("rope_parameters")
    if not isinstance(given, dict):
        if all(config.get(s) is None for spellings in ROPE_SPELLINGS.values() for s in spellings):
            return None
        given = {}

    def standard(parameters: dict) -> dict:
        parameters = {k: v for k, v in parameters.items() if v is not None}  # (None: the default, as unwritten)
        parameters.setdefault("rope_type", parameters.pop("type", "default"))  # (the 4.x name, popped either way)
        # (a model's own default, by other names: Qwen2-VL's 4.x mrope, which 5.x reads as default, and
        # "axial", which 5.x writes for a default of the classes that turn positions by axes: Qwen3-VL's vision)
        if parameters["rope_type"] in ("mrope", "axial"):
            parameters["rope_type"] = "default"
        for field, spellings in ROPE_SPELLINGS.items():
            written = next((config[s] for s in spellings if config.get(s) is not None), None)
            if written is not None:
                parameters.setdefault(field, written)
        return dict(sorted(parameters.items()))

    if given and all(isinstance(v, dict) or v is None for v in given.values()):  # (per layer type)
        return {kind: standard(v) if v is not None else None for kind, v in sorted(given.items())}
    return standard(given)


def _ropes_differ(mine: dict, theirs: dict) -> bool:
    """Whether two ``_rope``s turn positions otherwise, by the fields both give (a field one leaves
    out is its model's default, which the config does not say); per layer type where both give those."""
    def per_type(rope):
        return "rope_type" not in rope  # (a flat one has it: _rope fills it in)

    if per_type(mine) != per_type(theirs):
        return False  # (a 4.x config's one RoPE and 5.x's per layer type: read apart by the model's class)
    if per_type(mine):
        return any(_ropes_differ(mine[k], theirs[k]) for k in mine.keys() & theirs.keys()
                   if mine[k] is not None and theirs[k] is not None)
    return any(mine[f] != theirs[f] for f in mine.keys() & theirs.keys())


def _ropes(config: dict, nested: bool) -> dict:
    """``{"rope_parameters": _rope}`` of ``config``'s ``_scopes``."""
    return {f"{scope}.rope_parameters".lstrip("."): rope for scope, c in _scopes(config, nested).items()
            if (rope := _rope(c)) is not None}


# a HF tokenizer's files, as transformers and the tokenizers library save them (a vocabulary's, merges' or
# SentencePiece model's by the names transformers' tokenizers give them)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                      "tokenizer.model")


def _reads_own_tokenizer(config: dict) -> bool:
    """Whether open_clip tokenizes a model of ``config`` loaded from its directory (local-dir:) by that
    directory's tokenizer files: its text tower's tokenizer is a HF one (hf_tokenizer_name; open_clip's own BPE
    reads no files), which get_tokenizer then loads from there, not from the name."""
    return any(_text_tokenizer(config, ("hf_tokenizer_name",), nested=True).values())


def _tokenizer_home(path: Path, base: Optional[Path] = None) -> Path:
    """The directory whose tokenizer files tokenize the texts of the model at ``path``: its own; a LoRA
    adapter's where it saves some (tokens added in training), else its base's (``_adapter_home``, whose
    config ``_config`` reads)."""
    directory = path if path.is_dir() else path.parent
    if not is_lora_adapter(directory) or any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        return directory
    home = _adapter_home(directory, base)
    return directory if home is None else home if home.is_dir() else home.parent


def _adapter_home(adapter: Path, base: Optional[Path] = None) -> Optional[Path]:
    """The base whose config and tokenizer files are a LoRA adapter's: ``base``, the one it is read on, where one
    is given (a merge's lora_base or base, a LoraExpert's: the weights and embedding rows read are that base's);
    else the one its config names, which it was trained on (``_named_base_home``). One rule for both: the config
    of one base beside the tokenizer of another compared an adapter as a model that is neither. (That the base
    it is read on is of the architecture of the one it was trained on, ``_check_architectures`` checks.)"""
    return base if base is not None else _named_base_home(adapter)


def _named_base_home(adapter: Path) -> Optional[Path]:
    """The directory of the base a LoRA adapter's config names, which it was trained on: a local checkpoint,
    or an HF hub id's config and tokenizer files (the weights are read when the adapter is), at the revision
    the adapter records. None where it names none or that cannot be read (what reads the adapter's base says
    why)."""
    named = named_base(adapter)
    if named is None:
        return None
    try:
        return json_files(named, revision=named_revision(adapter))
    except CheckpointError:
        return None


def _check_tokenizer_files(mine: Path, theirs: Path, what: str, ref_name: str, goal: str) -> None:
    """A model tokenized by the files of directory ``mine`` (``_reads_own_tokenizer``; a LoRA adapter's, or its
    base's: ``_tokenizer_home``) beside a reference tokenized by those of ``theirs``, which differ: the same
    hf_tokenizer_name in both configs, a fine-tune's own vocabulary in its directory was merged in silence, the
    merged model then tokenizing its texts by the files copied to it. Refused naming the files both
    directories hold whose contents differ and those one holds alone (an added_tokens.json: tokens added in
    training), unless both load as one tokenizer (saved otherwise: another transformers writes another
    tokenizer_config.json, a slow tokenizer's vocab.json beside a tokenizer.json). A directory holding no
    tokenizer file says nothing of its tokens (open_clip cannot load it by local-dir:), and files of no
    tokenizer (a README) none."""
    held = [[name for name in HF_TOKENIZER_FILES if (d / name).is_file()] for d in (mine, theirs)]
    if not all(held):
        return
    differ = [name for name in held[0] if name in held[1] and _signature(mine / name) != _signature(theirs / name)]
    alone = [(name, f"{what}'s alone") for name in held[0] if name not in held[1]] + [
        (name, f"the {ref_name}'s alone") for name in held[1] if name not in held[0]]
    if not (differ or alone) or _tokenizes_alike(mine, theirs):
        return
    said = [f"other contents of {', '.join(differ)}"] * bool(differ) + [f"{name}: {who}" for name, who in alone]
    raise ValueError(f"{what} holds other tokenizer files than the {ref_name} ({'; '.join(said)}): open_clip "
                     f"tokenizes a model loaded from its directory (local-dir:) by that directory's own files, which "
                     f"its hf_tokenizer_name does not say, its embedding rows then standing for other tokens: "
                     f"{goal.format('tokenizer')}")


# a text of cases, digits, punctuation, accents, CJK and runs of white space, which a slow tokenizer's rules
# (its code, not a pipeline to compare) read: lower-cased, split or normalized otherwise, it reads other tokens
TOKENIZER_PROBE = "Hello, WORLD!  it's 3.14 naïve Café — 東京\n\tend."


def _tokenizes_alike(mine: Path, theirs: Path) -> bool:
    """Whether the tokenizers of two directories (``load_tokenizer``) read texts as the same tokens: the same
    pipeline and vocabulary (its padding and truncation aside, which open_clip sets as it reads) and special
    tokens. A slow tokenizer (no tokenizers pipeline: transformers 5's CTRL's, XLM's) by its class, vocabulary,
    special tokens and the ids it reads ``TOKENIZER_PROBE`` and its own tokens as (merges, lower-casing, which
    its files give); a slow one beside a fast one (BertJapaneseTokenizer's beside BertTokenizer's), whose classes
    and pipelines cannot be alike, by the rest of that. False where either does not load."""
    tokenizers = [load_tokenizer(mine)]
    tokenizers += [load_tokenizer(theirs)] if tokenizers[0] is not None else []
    if len(tokenizers) < 2 or tokenizers[1] is None:
        return False
    pipelines = [getattr(t, "backend_tokenizer", None) for t in tokenizers]
    if None not in pipelines:
        mine, theirs = ((json.loads(p.to_str()) | {"padding": None, "truncation": None}, t.special_tokens_map)
                        for p, t in zip(pipelines, tokenizers))
        return mine == theirs
    if pipelines == [None, None] and type(tokenizers[0]).__name__ != type(tokenizers[1]).__name__:
        return False  # (two slow ones: their rules are their classes' code)

    def reading(tokenizer):
        vocabulary = tokenizer.get_vocab()
        probe = " ".join([TOKENIZER_PROBE, *sorted(vocabulary, key=vocabulary.get)])  # (a fast one's: unordered)
        return vocabulary, tokenizer.special_tokens_map, tokenizer.encode(probe)

    return reading(tokenizers[0]) == reading(tokenizers[1])


def _text_tokenizer(config: dict, fields: Sequence[str], nested: bool) -> dict:
    """``{field: value}`` of ``fields`` that ``config``'s open_clip text tower gives (``_open_clip_tokenizer``;
    at its top where it is that tower): other configs' fields of the same names (RWKV's context_length) are not
    its tokenizer's."""
    return {f"{scope}.{field}".lstrip("."): c[field] for scope, c in _scopes(config, nested).items()
            if c.get("model_type") == "open_clip_text_cfg" for field in fields if field in c}


def _check_reading(config: dict, reference: dict, what: str, ref_name: str, goal: str, experts: bool,
                   nested: bool = True, warn: bool = True) -> None:
    for how, fields_of in (("reads its weights as",
                            lambda c: _config_fields(_decoder_outputs_scaled(c), READ_AS, nested)),
                           ("tokenizes its texts as", lambda c: _text_tokenizer(c, TOKENIZED_BY, nested))):
        mine, theirs = fields_of(config), fields_of(reference)
        differ = _differing(mine, theirs, alike=READ_ALIKE)  # (both spell out)
        if differ:
            why = [w for m, t in differ if m.rpartition(".")[2] in READ_APART
                   and (w := READ_APART[m.rpartition(".")[2]](mine[m], theirs[t]))]
            raise ValueError(f"{what} {how} {({m: mine[m] for m, _ in differ})}, the {ref_name} as "
                             f"{({t: theirs[t] for _, t in differ})} (config.json): {goal.format('configuration')}"
                             + "".join(f"; {w}" for w in why))
    if not warn:
        return
    # (RoPE as transformers 5 reads either version's fields: 4.x's rope_scaling is 5.x's rope_parameters)
    for how, mine, theirs, differ_by in (
            ("computes its positions with", _ropes(config, nested), _ropes(reference, nested), _ropes_differ),
            ("runs its weights with", _config_fields(_windowed(config), RUN_WITH, nested),
             _config_fields(_windowed(reference), RUN_WITH, nested), operator.ne),
            ("tokenizes its texts with", _text_tokenizer(config, ("context_length",), nested),
             _text_tokenizer(reference, ("context_length",), nested), operator.ne)):
        differ = _differing(mine, theirs, differ_by)
        if differ:
            warnings.warn(f"{what} {how} {({m: mine[m] for m, _ in differ})}, the {ref_name} with "
                          f"{({t: theirs[t] for _, t in differ})} (config.json): "
                          + ("its weights are run as the model's config says" if experts else
                             "the merged weights are run as the config the output carries says"))


# model types whose tied head scales the decoder's outputs by d_model ** -0.5 unless the config says not: transformers
# 4 read that from tie_word_embeddings (FLAN-T5's false: no scaling), which transformers 5 forces true, keeping
# the old value as scale_decoder_outputs
T5_SCALED = ("t5", "umt5", "longt5", "pop2piano")


def _decoder_outputs_scaled(config: dict) -> dict:
    """``config`` with, in each scope of a ``T5_SCALED`` model that does not write scale_decoder_outputs (a
    transformers 4 config), the value transformers 5 derives from its tie_word_embeddings (true unless false):
    a 4.x FLAN-T5's config and a 5.x one scaling its outputs read the same weights otherwise."""
    def scaled(c: dict) -> dict:
        if c.get("model_type") in T5_SCALED and c.get("scale_decoder_outputs") is None:
            return {**c, "scale_decoder_outputs": c.get("tie_word_embeddings") is not False}
        return c

    return {k: scaled(v) if isinstance(v, dict) else v for k, v in scaled(config).items()}


# config.json's fields by which the same weights compute a little otherwise, or otherwise on long
# inputs alone: another norm epsilon (Llama 2's hub config went from 1e-6 to 1e-5, its fine-tunes
# carry either; open_clip's in norm_kwargs), another sliding window or layers attending through it (a
# long-context fine-tune's): warned of, as another RoPE is
RUN_WITH = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon", "sliding_window",
            "sliding_window_size", "attention_window_size", "local_attention_window", "layer_types",
            "norm_kwargs")


def _windowed(config: dict) -> dict:
    """``config`` with, in each scope that turns its sliding window off (Qwen2's use_sliding_window:
    false, beside the sliding_window it would use), that window None, as transformers 5 reads it."""
    def window(c: dict) -> dict:
        return {**c, "sliding_window": None} if c.get("use_sliding_window") is False and "sliding_window" in c else c

    return {k: window(v) if isinstance(v, dict) else v for k, v in window(config).items()}


def _tower_config(config: dict, model_type: str) -> dict:
    """``config``'s tower of ``model_type``; an open_clip one with its model_cfg's quick_gelu, with which
    open_clip builds each tower's activation."""
    tower = next(v for v in config.values() if isinstance(v, dict) and v.get("model_type") == model_type)
    if "quick_gelu" in config and _reads_quick_gelu(tower):
        return {"quick_gelu": config["quick_gelu"], **tower}
    return tower


def _check_layer_counts(mine: dict, theirs: dict, what: str, ref_name: str, goal: str) -> None:
    differ = _differing(mine, theirs)
    if differ:  # (the fields both configs spell out: writers differ in which they write)
        raise ValueError(f"{what} counts its layers as {({m: mine[m] for m, _ in differ})}, the "
                         f"{ref_name} as {({t: theirs[t] for _, t in differ})} "
                         f"(config.json): {goal.format('configuration')}")


# config.json's fields (at its top or in a tower's config) that count a model's layers
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "layers", "num_decoder_layers",
                "encoder_layers", "decoder_layers", "decoder_num_hidden_layers")


def _layer_counts(config: dict, nested: bool = True) -> dict:
    scopes = {"": config, **({k: v for k, v in config.items() if isinstance(v, dict)} if nested else {})}
    return {f"{scope}.{field}".lstrip("."): c[field] for scope, c in scopes.items() for field in LAYER_COUNTS
            if isinstance(c.get(field), int)}


def chat_template_of(paths: Sequence[Path], chat_template: str) -> Optional[str]:
    """``chat_template`` itself (Jinja text, as ``check_chat_template`` passes it), or for "auto"
    the template most of the checkpoints ``paths`` carry (stripped, a dict's "default" entry), as
    mergekit picks it, and None where none carries one (the base's tokenizer is written as it is,
    as mergekit leaves it); ValueError where several tie (mergekit then takes one of them in no
    fixed order)."""
    if chat_template != "auto":
        return chat_template
    import collections

    import transformers

    templates = []
    for path in dict.fromkeys(paths):  # (each checkpoint once, as mergekit's set of models)
        try:
            template = transformers.AutoTokenizer.from_pretrained(path).chat_template
        except Exception:  # (as mergekit: a model without a tokenizer has no say)
            continue
        template = template.get("default") if isinstance(template, dict) else template
        if template:
            templates.append(template.strip())
    counts = collections.Counter(templates).most_common()
    if not counts:
        return None
    if len(counts) > 1 and counts[1][1] == counts[0][1]:
        raise ValueError(f"chat_template: auto, and {sum(1 for _, n in counts if n == counts[0][1])} chat templates "
                         f"are each the models' most common ({counts[0][1]} of {len(templates)}): give one")
    return counts[0][0]


def _set_chat_template(source: Path, target: Path, template: str) -> None:
    """The tokenizer of ``source`` written to ``target`` with the chat template ``template``."""
    try:  # (as saved: see checkpoint_tokenizer)
        tokenizer = checkpoint_tokenizer(source)
    except Exception as e:
        raise ValueError(f"chat_template: {source} has no tokenizer to carry it ({type(e).__name__}: {e})") from e
    # (transformers 5's stand-in where no files are: not written as the model's)
    if holds_no_vocabulary(tokenizer, source):
        raise ValueError(f"chat_template: {source} has no tokenizer to carry it (no tokenizer files)")
    tokenizer.chat_template = template
    _save_tokenizer(tokenizer, target)


def _untie(reference, sources: list, followers: Mapping, reference_path: Path, models) -> tuple:
    """``(reference, sources, the names untied)``, untied where a model holds its own copy of one
    of the reference's tied tensors (``followers``): an untied expert's trained head, a LoRA adapter's
    ``modules_to_save: [lm_head]``, beside a base whose head is its embeddings. Each of those is
    then merged on its own, as in a merge of untied models: the reference's and every tied
    model's copy is the tensor it is tied to, and the output is written untied. Else the
    copies the reference does not store are left out, as before (every model's is its tied
    tensor: the merge of that is the merged copy)."""
    # (the reference too: without a base, the first model may be an adapter with its own head)
    own = [k for k, s in enumerate(sources) if any(_own_copy(s, n, leader) for n, leader in followers.items())]
    missing = [n for n in followers if n not in reference]
    if not own:
        if not missing:
            return reference, sources, []
        return reference, [_View(s.state, s.device, [n for n in s if n not in missing], s.label)
                           for s in sources], []
    held = [n for n, leader in followers.items() if _own_copy(sources[own[0]], n, leader)]
    why = (f"model {own[0]} ({models[own[0]]}) holds its own {held[:3]}, which the reference ties to "
           f"{[followers[n] for n in held[:3]]}")
    lora = reference.state.reader.lora  # (an adapter's config is its base's)
    _check_untie(lora.base.path if lora is not None else reference_path, followers, why)
    state = reference.state
    keys = {**{n: state.checkpoint_key(n) for n in state},
            **{n: state.checkpoint_key(followers[n]) for n in missing}}
    names = [*reference, *missing]
    extended = _View(LazyStateDict(state.reader, keys), reference.device, names, reference.label)
    return extended, [extended if s is reference else s for s in sources], list(followers)


def _read_in_one_layout(names: list, layout: LazyStateDict, states: list, paths: list) -> None:
    """Every model's tensors ``names`` read in the layout the checkpoint ``layout`` holds them in
    (the one whose config.json the output carries), where a model holds one with its dims 1 and 2
    swapped and the models' conversion mapping transposes it on loading (``loads_transposed``):
    Qwen3-VL-MoE's hub checkpoints hold the fused experts as transformers 4 saved them,
    ``experts.gate_up_proj [E, H, 2I]``, experts saved by transformers 5 as its model holds them,
    ``[E, 2I, H]``; transformers loads both. The output keeps ``layout``'s, which the transformers
    version of its config loads. ``paths``: checkpoints to build the model (on meta) from, the
    first that builds; only where some tensor is held swapped."""
    swapped = {}
    for name in names:
        want = tuple(layout.shape_of(name))
        if len(want) == 3 and want[1] != want[2]:
            held = [s for s in {id(s): s for s in states}.values()
                    if s is not layout and tuple(s.shape_of(name)) == (want[0], want[2], want[1])]
            if held:
                swapped[name] = held
    if not swapped:
        return
    skeleton = next((m for m in (model_skeleton(p) for p in paths if p is not None) if m is not None), None)
    if skeleton is None:
        return  # (the merge names the shapes that differ)
    transposed_on_loading = loads_transposed(skeleton)
    for name, held in swapped.items():
        if transposed_on_loading(name):
            for state in held:
                state.read_transposed(name)


def _what_is_read(path: Path) -> Path:
    """What a merge input at ``path`` reads, links resolved: a checkpoint directory's weights file
    (or shard index, as ``CheckpointReader`` picks it), so that the directory and that file named
    are one input; a file, or a LoRA adapter's directory (the expert it makes), as it is. A shard
    index by its directory: the shards it names are read beside it, and the HF hub cache links
    alike indexes of two revisions (their shards differ) to one blob."""
    if path.is_dir() and not is_lora_adapter(path):
        path = weights_in(path) or path  # (none: the reader says so)
    if path.name.endswith(".index.json"):
        return Path(os.path.realpath(path.parent)) / path.name
    return Path(os.path.realpath(path))


def _check_not_an_input(out: Source, inputs: Sequence[tuple]) -> None:
    """ValueError where ``out`` is one of the merge's ``inputs`` (``(what, as given, path)``) or
    holds one: an earlier epmq merge there is replaced by this one (read, then replaced), so
    given back as the base or a model it was lost. Links resolved, as the write resolves them."""
    target = Path(os.path.realpath(out))
    for what, given, path in inputs:
        if path is None:
            continue
        real = _what_is_read(path)
        if real == target or target in real.parents:
            raise ValueError(f"the output {out} {'is' if real == target else 'holds'} an input of this merge "
                             f"({what}: {given}): writing there "
                             f"would replace it; choose another output directory")


def _check_listed_once(models: Sequence[Source], model_paths: Sequence[Path], base: Optional[Source],
                       base_path: Optional[Path]) -> None:
    """ValueError where a checkpoint is listed twice among ``models`` (as written, or by another
    path to it) or is the base: merged, a second copy counted its task vector twice (a weight the
    config never gave) and the base counted a zero one (Model Stock's t moved)."""
    # (compared by what is read: base/ and base/model.safetensors are one checkpoint)
    base_key = None if base_path is None else _what_is_read(base_path)
    seen = {}
    for k, (model, path) in enumerate(zip(models, model_paths)):
        key = _what_is_read(path)
        if key == base_key:
            raise ValueError(f"model {k} ({model}) is the base ({base}): models are the experts merged into it "
                             f"(mergekit lists the base among its models; epmq merge's own configs do not)")
        if key in seen:
            j = seen[key]
            raise ValueError(f"model {k} ({model}) is model {j} ({models[j]}) again: list each expert once (to "
                             f"weigh one more than another, give params: {{weights: ...}} where the method takes them)")
        seen[key] = k


def _holding_out(merge):
    """``merge`` (``merge_checkpoints``' work) with OUT checked and held before any model is read."""
    @functools.wraps(merge)
    def held(method, models, out, **options):
        check_path(out, "out")
        # (an output epmq may not replace, the user's folder or a quantized checkpoint, is refused here, as
        # quantize_checkpoint refuses one at its start: the write refused it after every model's read and merge)
        check_output(out, marker=RECIPE_FILE)
        # (OUT held from before any model is read, as epmq merge and quantize_checkpoint hold it: a second merge
        # into it, held by the write alone, was refused after its whole merge, RegMean's calibration included)
        with hold_output(out):
            return merge(method, models, out, **options)
    return held


@_holding_out
def merge_checkpoints(method: str, models: Sequence[Source], out: Source, *,
                      base: Optional[Source] = None, params: Optional[dict] = None,
                      dtype: Optional[str] = None, max_shard_size="5GB", device=None,
                      calibration: Optional[Sequence] = None, samples: int = 128,
                      seq_len: int = 512, batch_size: int = 8, seed: int = 0,
                      lora_base: Optional[Source] = None, chat_template: Optional[str] = None,
                      tokenizer_source: Optional[str] = None, pad_to_multiple_of: Optional[int] = None,
                      tokens: Optional[Mapping[str, Mapping]] = None, files_from: Optional[Source] = None,
                      progress: bool = True) -> Path:
    """Merge the checkpoints ``models`` (with the pretrained ``base``) by ``method`` of
    :mod:`epmq.merge` with ``params`` and write the result to ``out``; returns ``out``.

    ``dtype``: "float32", "float16" or "bfloat16" for the merged floating-point tensors (default:
    each tensor keeps the base's dtype; the arithmetic is float32 either way, float64 for float64
    tensors, as ``epmq.merge``'s). ``device``: where
    the arithmetic runs (e.g. "cuda" for TSV-Merge's SVDs on large matrices). ``max_shard_size``:
    as ``save_quantized``'s (default "5GB", the size of transformers' shards).

    RegMean (``method="regmean"``) needs data: ``calibration`` gives each model's own task files,
    in the models' order (texts, input/target pairs or images, as ``epmq quantize`` reads them,
    with ``samples``, ``seq_len``, ``batch_size`` and ``seed``); each model is loaded whole in
    turn to collect ``X^T X`` at its linears, written to disk until the merge (float64: 8 d_in^2
    bytes per linear and model, 9 MB for a ViT-B layer's MLP input), in one calibration pass
    where a model's fit in ``GRAM_BYTES`` (32 GiB), else a few layers' a pass.

    Models that are LoRA adapters (``epmq.lora``) are the experts they make of ``base``; merged
    without one (average, slerp, karcher, ...), of ``lora_base``, by default the base their configs name.

    ``chat_template``: the output tokenizer's chat template (Jinja text), or "auto": the template
    most of the models (the base included) carry, where one does (``chat_template_of``); the
    tokenizer written is the base's (else the first model's), with that template.

    ``tokenizer_source``: "base" or "union" (``epmq.vocabulary``): for models whose vocabularies
    differ (experts with added tokens), every model's embeddings (and untied output head) are
    laid out by the base's tokenizer, or by the union of all the models' tokens, before the
    merge; that tokenizer is written with the output, and config.json's ``vocab_size`` set to
    its size (rounded up to ``pad_to_multiple_of``). Without it, models whose embedding rows
    differ are refused, and tokenizers that give one row different tokens are warned about.
    ``tokens``: rows named token by token, mergekit's ``tokenizer: {tokens: ...}``
    (``epmq.vocabulary``; a model named there is one of ``base`` and ``models`` as given).

    ``files_from``: the model (``base`` or one of ``models``, as given) whose config, tokenizer
    and other non-weight files the output carries; default the base, else the first model
    (mergekit's linear merge averages its ``base_model`` as one of the models and writes its
    files).
    """
    if not isinstance(models, (str, Path, Iterable)):  # (None: "'NoneType' object is not iterable")
        raise TypeError(f"models must be a list of paths (checkpoint directories or HF hub ids), got "
                        f"{type(models).__name__}")
    models = [models] if isinstance(models, (str, Path)) else list(models)
    for what, given in [*((f"models[{k}]", m) for k, m in enumerate(models)), ("base", base), ("lora_base", lora_base)]:
        if given is not None or what.startswith("models"):  # (an unset one: pathlib's bare TypeError)
            check_path(given, what)
    check_merge(method, models, base=base, params=params, dtype=dtype, calibration=calibration,
                chat_template=chat_template, tokenizer_source=tokenizer_source,
                pad_to_multiple_of=pad_to_multiple_of, tokens=tokens, files_from=files_from)
    pad_to_multiple_of = check_tokenizer_source(tokenizer_source, pad_to_multiple_of)  # (numpy's: the recipe's JSON)
    params = dict(params or {})
    device = device_argument(device)
    fn = getattr(merge_lib, method)
    if lora_base is not None and (base is not None or not any(adapter_directory(m) is not None for m in models)):
        raise ValueError("lora_base is the base of LoRA adapters merged without a base model "
                         "(average, slerp, karcher, regmean, nuslerp or multislerp without one); "
                         + ("base is given: it is the adapters' base" if base is not None
                            else "no model is an adapter"))
    lora_base = None if lora_base is None else local_checkpoint(lora_base)
    base_path = None if base is None else local_checkpoint(base)
    model_paths = [local_checkpoint(m) for m in models]
    # (adapters merged without a base nor lora_base are read on the bases their configs name:
    # an output there replaced the base they make their experts of; a hub id's is in the cache)
    named = [] if base_path is not None or lora_base is not None else [
        (f"the base of model {k}", b, Path(b)) for k, p in enumerate(model_paths)
        if is_lora_adapter(p) and (b := named_base(p)) is not None and Path(b).exists()]
    _check_not_an_input(out, [("the base", base, base_path), ("lora_base", lora_base, lora_base)]
                        + [(f"model {k}", m, p) for k, (m, p) in enumerate(zip(models, model_paths))] + named)
    _check_listed_once(models, model_paths, base, base_path)
    template = None if chat_template is None else chat_template_of(  # (before the merge's work)
        [p for p in [base_path] if p is not None] + model_paths, chat_template)
    whole = _check_architectures(base_path, model_paths, models, lora_base=base_path or lora_base)
    base_state = None if base_path is None else _open(base_path, f"base ({base})", device)
    sources = [] if base_state is not None else [_open(model_paths[0], f"model 0 ({models[0]})", device,
                                                       lora_base=lora_base)]
    reference = base_state if base_state is not None else sources[0]  # (its names are the merge's)
    reference_path = base_path if base_state is not None else model_paths[0]
    # the reference's tied copies (a tied head, which its checkpoint may leave out) are looked
    # for in the other models too: one that holds its own (a trained head) unties the merge
    followers = _tied_followers(reference)
    names = list(reference) + [n for n in followers if n not in reference]
    # (the other models may hold its tensors in another naming its architecture loads: LLaVA's two)
    skeleton = model_skeleton(reference_path)  # (None without a config: transformers is then not imported)
    rename = None if skeleton is None else key_renaming(skeleton)
    for k in range(len(sources), len(models)):
        path, source = model_paths[k], models[k]
        sources.append(_open(path, f"model {k} ({source})", device, names, lora_base=base_path or lora_base,
                             rename=rename))
        if not len(sources[-1]):
            raise ValueError(f"model {k} ({source}) has none of the {'base' if base else 'first model'}'s "
                             f"tensors: not the same architecture")
    reference, sources, untied = _untie(reference, sources, followers, reference_path, models)
    if base_state is not None:
        base_state = reference
    else:
        sources[0] = reference
    base_only, ties, tied = [], {}, set()
    if base_state is not None:
        # a base with more than the experts (CLIPModel's text tower beside fine-tuned
        # CLIPVisionModel experts): the rest is copied, so that the output is the base's model;
        # a tensor tied to a merged one takes its merged value
        base_only = [n for n in base_state if not all(n in s for s in sources)]
        unmerged = set(base_only)
        merged = [n for n in base_state if n not in unmerged]
        ties = _tied_in_base(base_path, base_state, merged, apart=set(untied))
        tied = {n for names in ties.values() for n in names}
        base_only = [n for n in base_only if n not in tied]
        merged = [n for n in merged if n not in tied]
        # a model of the base's own architecture without a weight matrix that others have (a
        # partial save) would lose every model's update of it (not a buffer older writers saved:
        # position_ids)
        reader, key = base_state.state.reader, base_state.state.checkpoint_key
        for k, (source, is_whole) in enumerate(zip(sources, whole)):
            lacks = [n for n in base_only if n not in source and any(n in s for s in sources)
                     and len(reader.shape(key(n))) >= 2 and reader.dtype(key(n)).is_floating_point]
            if is_whole and lacks:
                raise ValueError(f"model {k} ({models[k]}) lacks {len(lacks)} tensors that the base and other "
                                 f"models have (e.g. {lacks[:3]}), though it is of the base's architecture: "
                                 f"a partial checkpoint?")
        if base_only:
            warnings.warn(f"{len(base_only)} tensors of the base are in no or not every model (e.g. "
                          f"{base_only[:3]}): copied from the base unchanged")
        if base_only or tied:
            base_state = _View(base_state.state, device, merged)
            sources = [_View(s.state, device, merged, s.label) for s in sources]
    reference = base_state if base_state is not None else sources[0]
    written_state = reference.state  # (whose dtypes the merged and copied tensors keep)
    keys = {**{str(m): k for k, m in enumerate(models)}, **({str(base): "base"} if base is not None else {})}
    vocabulary, tokenizers = _lay_out_vocabulary(tokenizer_source, pad_to_multiple_of, base_state, sources,
                                                 base_path, model_paths, lora_base, base_only, tokens, keys.get)
    own_key = "base" if base_state is not None else 0  # (the base, else the first model)
    reference_key = keys[str(files_from)] if files_from is not None else own_key  # (whose files are copied)
    # (the vocabulary's tokenizer is the base's, else the first model's, whatever files_from names)
    written_key = reference_key if vocabulary is None else own_key
    _check_output_tokenizer(template, vocabulary.tokenizer if vocabulary is not None else tokenizers.get(reference_key),
                            tokenizers, written_key)
    layout = base_state if reference_key == "base" else sources[reference_key]
    layout_path = base_path if reference_key == "base" else model_paths[reference_key]
    _read_in_one_layout(list(reference), layout.state, [s.state for s in [base_state, *sources] if s is not None],
                        [layout_path, base_path, *model_paths, lora_base])
    companions = base_path if reference_key == "base" else model_paths[reference_key]
    lora = sources[0].state.reader.lora
    if base_path is None and files_from is None and lora is not None and lora.base.path is not None:
        companions = lora.base.path  # adapters merged without a base: their base's files
    _check_companions(companions)  # (before the merge's work)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(reference) + len(base_only) + len(tied), desc=f"merge {method}", unit="tensor",
               disable=not progress)
    out = Path(os.path.abspath(out))  # ("." has no name to write beside)
    try:
        with atomic_directory(out, marker=RECIPE_FILE) as tmp:
            writer = ShardWriter(tmp, _bytes(max_shard_size), dtype=DTYPES.get(dtype), progress=bar)
            writer = _TiedWriter(writer, ties) if ties else writer
            # (the writer's bar counts the tensors, not the merge's: its progress shows the passes before
            # them, TIES' global thresholds)
            if method == "slerp":
                fn(sources[0], sources[1], out=writer, progress=progress, **params)
            elif method in ("average", "karcher"):
                fn(sources, out=writer, progress=progress, **params)
            elif method == "regmean":
                # (its parameters checked on no tensors first: merged, they were read only after
                # every model's statistics, minutes to hours of loading and calibrating)
                fn([{} for _ in models], {}, progress=False, **params)
                # (each model's files were read in turn: a later model's typo found after them)
                check_calibration_paths({f"model {k}": files for k, files in enumerate(calibration)})
                spill_dir = tmp / ".regmean-grams"  # (in the output's temporary: gone with it if stopped)
                spill_dir.mkdir()
                with loading_bars(progress):
                    grams, transposed = _expert_grams(sources, model_paths, calibration, device,
                                                      dict(samples=samples, seq_len=seq_len,
                                                           batch_size=batch_size, seed=seed), spill_dir, out,
                                                      progress=progress)
                fn(sources, grams, transposed=transposed, out=writer, progress=progress, **params)
                shutil.rmtree(spill_dir)
            else:
                fn(base_state, sources, out=writer, progress=progress, **params)
            for name in base_only:
                t = base_state.state[name]
                # (cast by the writer: the merged tensors are checked as they are made, these were written inf)
                if dtype is not None and all_finite(t) and not all_finite(t.to(DTYPES[dtype])):
                    raise ValueError(f"tensor {name!r} of the base (copied: not every model has it) is not finite in "
                                     f"{DTYPES[dtype]} (the requested dtype): its values pass the dtype's range; "
                                     f"merge into float32 or bfloat16")
                writer[name] = t
            writer.finish()
            if _reads_open_clip(companions):
                _as_open_clip_weights(tmp)
            # (without dtype, the tensors keep the base's, else the first model's: a config copied from another model
            # (files_from) said that one's, and from_pretrained loads by what it says; their own is left as it is)
            _copy_companions(companions, tmp, dtype if dtype is not None or reference_key == own_key
                             else _written_dtype(written_state, list(written_state)))
            if untied and (tmp / "config.json").is_file():  # (as PEFT's merge_and_unload unties a trained head)
                (tmp / "config.json").write_text(
                    json.dumps(_untied(read_json_file(tmp / "config.json")), indent=2) + "\n", encoding="utf-8")
            if vocabulary is not None:
                _write_vocabulary(vocabulary, tmp, template)
            elif template is not None:
                _set_chat_template(companions, tmp, template)
            recipe = dict(method=method, params=params, dtype=dtype,
                          base=None if base is None else str(base), models=[str(m) for m in models])
            if tokenizer_source is not None:
                recipe.update(tokenizer_source=tokenizer_source, pad_to_multiple_of=pad_to_multiple_of)
            if chat_template is not None:
                recipe.update(chat_template=chat_template)
            if tokens:
                recipe.update(tokens=tokens)
            if files_from is not None:
                recipe.update(files_from=str(files_from))
            if calibration is not None:
                recipe.update(calibration=calibration, samples=samples, seq_len=seq_len, seed=seed)
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=_json_value) + "\n", encoding="utf-8")
            card = out / "README.md"
            if not card.is_file() or CARD_MARK in card.read_text(errors="replace"):
                (tmp / "README.md").write_text(_model_card(recipe), encoding="utf-8")  # else the user's is carried over
    finally:
        bar.close()
    return out
