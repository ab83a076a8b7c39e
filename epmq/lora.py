"""Experts given as LoRA adapters (the layout PEFT's ``save_pretrained`` writes).

A LoRA expert is its base model with a low-rank update of some matrices:

    W_k = W_0 + s B A        A [r, d_in], B [d_out, r], s = lora_alpha / r  (rsLoRA: / sqrt(r))

(an embedding ``[vocab, d]``: ``W_0 + s (B A)^T`` with ``A [r, vocab]``, ``B [d, r]``; a layer
stored as ``[d_in, d_out]``, GPT-2's ``Conv1D`` with ``fan_in_fan_out``: the transpose). ``r``
is read from each ``A``, so ``rank_pattern`` needs nothing; ``alpha_pattern`` is matched to the
module's name as PEFT matches it (a pattern matches a name that ends in it after a dot).

``LoraExpert`` is a read-only state dict of the whole expert, in the base checkpoint's naming:
the base's tensors, the updated ones formed on demand (in fp32, returned in the base tensor's
dtype), and the full tensors the adapter saved (``modules_to_save``, e.g. a classifier head;
``base_layer`` weights of a resized embedding; trained biases) in place of the base's. An
adapter therefore goes wherever an expert checkpoint goes: merges (``epmq merge``,
``epmq.merge.*``) and E-PMQ's targets (``quantize_model(experts=)``, ``epmq quantize``), read
tensor by tensor, so the walker forms the updates of one block at a time. A checkpoint path that
is an adapter directory (it holds ``adapter_config.json``) is opened as one, on the base its
config names (``base_model_name_or_path``: a local path or an HF hub id, at the hub ``revision`` the
config records) unless a base is given.

What a plain update cannot express is refused, never approximated: DoRA, LoRA on convolutions or
on bare parameters (``target_parameters``), trainable token deltas, LoRA biases, adapter types
other than LoRA, and updates of a module the base lacks.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ._util import layer_part, storage_key, without_autocast

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # PEFT's wrapper around the base model's own names

_GIVE_BASE = "lora_base: in epmq quantize, base: in epmq merge, LoraExpert(adapter, base=...) in Python"
_UPDATE = re.compile(r"(?P<module>.+)\.lora_(?:embedding_)?(?P<side>A|B)(?:\.weight)?")
_REFUSED = {  # key pattern -> what it is
    r".+\.lora_magnitude_vector(\..+)?": "DoRA (use_dora) magnitudes",
    r".+\.lora_[AB]\.bias": "LoRA biases (lora_bias)",
    r".+trainable_tokens_delta.*": "trainable token deltas (trainable_token_indices)",
}

# the tensors bitsandbytes saves beside a quantized weight: Linear4bit's QuantState under
# ``weight.`` (its weight two codes a byte), Linear8bitLt's row scales and layout (its weight int8
# codes of the weight's shape, which an update would be added to in silence)
_BITSANDBYTES_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map"
                                 r"|quant_state\.bitsandbytes__(nf4|fp4))$|\.(SCB|weight_format)$")
# the names of PEFT's LoRA layers' own tensors, in a model it has wrapped (``.default``) or as saved
_PEFT_LAYER = re.compile(r"(^|\.)(base_layer|lora_(embedding_)?[AB]|modules_to_save|original_module)(\.|$)")


def is_lora_adapter(path) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def named_base(adapter) -> Optional[str]:
    """The base model a LoRA adapter directory's config names (``base_model_name_or_path``: a
    path or hub id), or None where its config names none or cannot be read."""
    return _config_string(adapter, "base_model_name_or_path")


def named_revision(adapter) -> Optional[str]:
    """The hub revision of its named base a LoRA adapter's config records (PEFT's
    ``get_peft_model(..., revision=)``; ``AutoPeftModel`` loads the base at it), or None (main)."""
    return _config_string(adapter, "revision")


def _config_string(adapter, key: str) -> Optional[str]:
    try:
        value = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


# adapter config entries read here, or that do not change the merged weight (training settings,
# bookkeeping, which modules were adapted: the adapter's tensors say that); any other entry that is
# set (DoRA, layer replication, aLoRA, bias terms, initialisations that change the base weights
# such as PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ...) is refused, new PEFT options included
_READ = {"peft_type", "r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "fan_in_fan_out",
         "modules_to_save", "base_model_name_or_path", "bias", "init_lora_weights"}
_HARMLESS = {"auto_mapping", "inference_mode", "lora_dropout", "target_modules", "exclude_modules",
             "layers_to_transform", "layers_pattern", "task_type", "revision", "peft_version",
             "megatron_config", "megatron_core", "eva_config", "ensure_weight_tying", "qalora_group_size"}
# initialisations that leave the base weights as they are (the others move part of W_0 into A, B)
_PLAIN_INIT = (True, False, "gaussian", "eva", "orthogonal")


def _config(directory: Path) -> dict:
    where = directory / ADAPTER_CONFIG
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable adapter config ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{where}: not an adapter config (a JSON object)")
    kind = config.get("peft_type", "LORA")
    problems = [f"{k}={v!r}" for k, v in config.items() if k not in _READ | _HARMLESS and v]
    if kind != "LORA":
        problems.insert(0, f"peft_type={kind!r} (only LORA is read)")
    if config.get("init_lora_weights", True) not in _PLAIN_INIT:
        problems.append(f"init_lora_weights={config['init_lora_weights']!r} (it changes the base weights)")
    if problems:
        raise ValueError(f"{where}: the adapter uses {', '.join(problems)}, which epmq does not read as "
                         f"a plain weight update; merge it into its base with PEFT's "
                         f"merge_and_unload() and pass the merged checkpoint")
    # the scales s = alpha / r of every update: Python's JSON reads NaN and Infinity, which made
    # every updated weight NaN or inf (and a string or null ended in a bare TypeError)
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise ValueError(f"{where}: alpha_pattern must be an object (module name pattern -> alpha), "
                         f"got {alpha_pattern!r}")
    for what, value in [("lora_alpha", config.get("lora_alpha", 8)),
                        *((f"alpha_pattern[{p!r}]", v) for p, v in alpha_pattern.items())]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {what} must be a finite number, got {value!r}")
    return config


def model_skeleton(base) -> Optional[nn.Module]:
    """The base model's modules without weights (built on the meta device from its config.json),
    for the types of its layers (GPT-2's ``Conv1D`` holds its weight transposed) and its tied
    weights; None where it cannot be built (no config, not a transformers model)."""
    if isinstance(base, nn.Module):
        return base
    if not isinstance(base, (str, Path)):
        return None
    directory = Path(base) if Path(base).is_dir() else Path(base).parent
    if not (directory / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(directory)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            return cls._from_config(config)
    except Exception:  # (best effort: without it, shapes and the adapter config decide)
        return None


def _saved_converted(skeleton, modules) -> dict:
    """``{module: [the checkpoint tensors holding its weight]}`` for those of ``modules`` whose
    weight ``save_pretrained`` writes converted (Sarvam-MoE's q_proj, k_proj and v_proj as rows of
    one query_key_value), as a base checkpoint of ``skeleton``'s holds them: not under the
    module's name. Empty without a skeleton, or a model that converts none."""
    if skeleton is None or not modules:
        return {}
    import warnings

    from .checkpoint_io import saved_layout

    with warnings.catch_warnings():  # (its warning is a merge's)
        warnings.simplefilter("ignore")
        layout = saved_layout(skeleton)
    if layout is None:
        return {}
    from transformers.core_model_loading import revert_weight_conversion

    found = {}
    for module in modules:
        group = layout.group(f"{module}.weight")
        if group is None:
            continue
        try:
            saved = revert_weight_conversion(skeleton, {n: torch.empty(layout.shapes[n], device="meta")
                                                        for n in group})
        except Exception:  # (a converter that cannot run on meta tensors)
            continue
        found[module] = list(saved)
    return found


def _maybe_converted(base, module, out_in, bound) -> list:
    """The tensors of ``base`` (a reader with no model to say its layout: a checkpoint's state
    dict) that may hold ``module``'s weight ``out_in`` converted (q, k and v as rows of one
    tensor): matrices of its layer (its name up to the layer's number, ``layer_part``'s: a tower's
    index before it named every layer of the tower's) that no adapted module took, sharing a
    dimension with the weight, of another shape; none where the base holds tensors under the
    module's parent (it names that module as the model does: the weight is missing, not
    converted). A module outside any block list is in the list its last number is of (a
    Sequential's layer, model.vision.1.encoder.3.q_proj: the tower's index before it names the
    whole tower), or is a tower's own (model.vision.1.embeddings.q_proj): held by no layer of a list
    nested below that number, whose tensors are left out, as are PEFT's own."""
    parts = module.split(".")
    layer = layer_part(parts)
    outside = layer is None
    if outside:  # (its innermost list's number, of its parents' names; else its parent)
        layer = max((i for i, part in enumerate(parts[:-1]) if part.isdigit()), default=len(parts) - 2)
    prefix, parent = ".".join(parts[:layer + 1]) + ".", ".".join(parts[:-1]) + "."
    keys = [k for k in base.keys() if k.startswith(prefix) and not any(
        peft in k for peft in (".lora_", ".base_layer.", ".modules_to_save.", ".original_module."))]
    if any(k.startswith(parent) for k in keys):
        return []

    def nested(key):  # (a number below the module's last: a list's layer, holding none of its weights)
        return any(part.isdigit() for part in key[len(prefix):].split(".")[:-1])

    found = []
    for key in keys:
        if key not in bound and not (outside and nested(key)):
            shape = tuple(base.shape(key))
            if len(shape) == 2 and shape not in (out_in, out_in[::-1]) and set(shape) & set(out_in):
                found.append(key)
    return found


def checkpoint_ties(reader) -> dict:
    """The tensors the checkpoint ``reader`` reads ties by its own config.json: name -> the
    other names of the same tensor (``tie_order`` with ``own_checkpoint``: under
    ``tie_word_embeddings: false`` nothing is tied). A LoRA adapter's are its base's; {} for
    tensors in memory (a module's state dict lists every name of a tied tensor) and where no
    model is built from a config (nothing says what is tied)."""
    from .checkpoint_io import tie_order

    lora = getattr(reader, "lora", None)
    home = lora.base.path if lora is not None else reader.path
    skeleton = None if home is None else model_skeleton(home)
    if skeleton is None:
        return {}
    return {n: [m for m in names if m != n] for n, names in tie_order(skeleton, own_checkpoint=True).items()
            if len(names) > 1}


class LoraExpert(Mapping):
    """The whole expert of a LoRA ``adapter`` (a directory or HF hub id) on ``base`` (a
    checkpoint path, hub id, state dict or module; default: the base the adapter config names)."""

    def __init__(self, adapter, base=None, prefix: Optional[str] = None):
        from .checkpoint_io import Binding, CheckpointReader, key_renaming, local_checkpoint, tie_order

        self.directory = local_checkpoint(adapter, directory=True)
        config = _config(self.directory)
        weights = next((self.directory / f for f in ADAPTER_WEIGHTS if (self.directory / f).is_file()), None)
        if weights is None:
            raise ValueError(f"LoRA adapter {self.directory}: no {' or '.join(ADAPTER_WEIGHTS)}")
        what = f"LoRA adapter {self.directory}"
        self.adapter = CheckpointReader(weights, what)
        named = base is None
        revision = None
        if named:
            base = config.get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{what}: its {ADAPTER_CONFIG} names no base model "
                                 f"(base_model_name_or_path); give the base: {_GIVE_BASE}")
            # the hub revision of that base the adapter was trained on (PEFT's get_peft_model(...,
            # revision=) records it, and AutoPeftModel loads the base at it): main may since hold
            # other weights, and W_0 + (alpha/r) B A on them is another expert
            revision = named_revision(self.directory)
        if isinstance(base, (str, Path)):
            try:
                base = local_checkpoint(base, revision=revision)
            except FileNotFoundError as e:
                where = f"named in its {ADAPTER_CONFIG}" if named else "given"
                raise FileNotFoundError(f"{what}: its base model {str(base)!r} ({where}) is not found ({e}); "
                                        f"give the base: {_GIVE_BASE}") from e
        self.base = CheckpointReader(base, f"the base model of {what}")
        # (the model the adapter was trained in, its LoRA layers in place: W_0 under base_layer,
        # the update maybe merged into it by merge_adapter(); no name of it is the base's own)
        wrapped = next((k for k in self.base.keys() if _PEFT_LAYER.search(k)), None)
        if wrapped is not None:
            raise ValueError(f"{what}: the base ({self.base.description}) is a model PEFT has wrapped (its tensor "
                             f"{wrapped!r} is a LoRA layer's), not the base model: give the base as it was before "
                             f"get_peft_model (its checkpoint directory, or the model loaded from it)")
        # (QLoRA on a GPTQ or AWQ model, an epmq checkpoint: its layers hold codes, no W_0 to update)
        packed = next((k for k in self.base.keys() if k.endswith(".qweight")), None)
        if packed is not None:
            raise ValueError(f"{what}: the base ({self.base.description}) is a quantized model (its tensor "
                             f"{packed!r} holds packed codes, no weight the update can be added to): give the "
                             f"full-precision base")
        bnb = next((k for k in self.base.keys() if _BITSANDBYTES_STATE.search(k)), None)
        if bnb is not None:
            raise ValueError(f"{what}: the base ({self.base.description}) is a model quantized by bitsandbytes "
                             f"(its tensor {bnb!r} is the quantization state of a 4-bit or int8 weight, which "
                             f"holds codes, no weight the update can be added to): give the full-precision base")
        # (what tells adapters of one base apart from others': its files, or the object given,
        # kept so that its id is not another's)
        self._base_given = base
        self.base_key = ("path", str(self.base.path)) if self.base.path is not None else ("object", id(base))
        self.description = f"{what} on {self.base.description}"
        alpha, alpha_pattern = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))

        # module -> {"A": key, "B": key, "embedding": bool}; the others: name -> key
        pairs, full, base_layers, wrapped = {}, {}, {}, {}
        for key in self.adapter.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            refused = next((why for pattern, why in _REFUSED.items() if re.fullmatch(pattern, name)), None)
            if refused:
                raise ValueError(f"{what}: tensor {key!r} holds {refused}, which epmq cannot express as "
                                 f"a plain weight update")
            update = _UPDATE.fullmatch(name)
            if update:
                pair = pairs.setdefault(update["module"], {"embedding": ".lora_embedding_" in name})
                pair[update["side"]] = key
            elif ".lora_" in name:
                raise ValueError(f"{what}: tensor {key!r} is no LoRA tensor epmq knows")
            elif ".base_layer." in name:  # W_0 of an adapted module, saved (a resized embedding)
                base_layers[name.replace(".base_layer.", ".")] = key
            elif ".original_module." in name:  # (PEFT's wrapper of a saved module: the base's own)
                continue
            elif ".modules_to_save." in name:  # (the saved module's copy, under its wrapper's name)
                wrapped.setdefault(name.replace(".modules_to_save.", "."), key)
            else:
                full[name] = key
        for name, key in wrapped.items():
            full.setdefault(name, key)
        for module, pair in pairs.items():
            if "A" not in pair or "B" not in pair:
                has, lacks = ("A", "B") if "A" in pair else ("B", "A")
                raise ValueError(f"{what}: module {module!r} has lora_{has} but not lora_{lacks}")
            A, B = self.adapter.shape(pair["A"]), self.adapter.shape(pair["B"])
            # (a convolution's LoRA tensors have 3 to 5 dims: fewer is a damaged adapter file)
            flat = next((side for side, shape in (("A", A), ("B", B)) if len(shape) < 2), None)
            if flat is not None:
                raise ValueError(f"{what}: module {module!r}: its {pair[flat]} has shape "
                                 f"{tuple(A if flat == 'A' else B)}, no matrix (a damaged adapter file)")
            if len(A) != 2 or len(B) != 2:
                raise ValueError(f"{what}: module {module!r} has a LoRA on a convolution, which epmq "
                                 f"does not read; merge it with PEFT's merge_and_unload()")
            if B[1] != A[0]:  # (B A needs B's columns as A's rows; else a bare error at a read)
                raise ValueError(f"{what}: module {module!r} has lora_A of rank {A[0]} and lora_B of rank "
                                 f"{B[1]}: not one LoRA update (a damaged adapter file)")
            if A[0] == 0:  # (the update is scaled by alpha / r; PEFT refuses r = 0)
                raise ValueError(f"{what}: module {module!r} has lora_A and lora_B of rank 0 ({pair['A']} "
                                 f"{tuple(A)}, {pair['B']} {tuple(B)}): no LoRA update (a damaged adapter file)")
            pair["rank"], pair["out_in"] = A[0], (B[0], A[1])  # B A is [out, in]
            pair["shapes"] = {pair["out_in"], pair["out_in"][::-1]}  # W_0's, as B A or its transpose

        # adapter names -> base checkpoint keys, under one prefix rewrite (a base saved with other
        # leading names than the model PEFT wrapped: transformers 4's ``vision_model.``, a tower
        # of a two-tower base), counting only keys whose shape fits the update; an update of a
        # tied weight (an lm_head tied to the embeddings) goes to the tensor the base stores
        skeleton = model_skeleton(base)
        order = tie_order(skeleton, own_checkpoint=True) if skeleton is not None else None
        # (PEFT names the modules as the loaded model does; a base saved by transformers keeps
        # the checkpoint's layout, which its renaming rules map, each tower its own way)
        rename = key_renaming(skeleton) if skeleton is not None else None

        def W_0_shape(name, key) -> tuple:  # (the adapter's saved W_0 where it has one)
            return tuple(self.adapter.shape(base_layers[name]) if name in base_layers else self.base.shape(key))

        def fits(name, key):
            pair = pairs.get(name.removesuffix(".weight"))
            return pair is None or W_0_shape(name, key) in pair["shapes"]

        names = [f"{m}.weight" for m in pairs]
        binding = Binding(self.base.keys(), order, names=names, fits=fits, rename=rename,
                          prefixes=() if prefix is None else (prefix,))
        ambiguous = [] if prefix is not None else binding.ambiguous()
        if prefix is not None:
            binding.rewrite = ("", prefix)
        elif ambiguous:
            places = sorted(add or strip or "(as named)" for strip, add in ambiguous)
            raise ValueError(f"{what}: its modules fit the base ({self.base.description}) in several "
                             f"places ({', '.join(places)}): give the base it was trained on (the tower "
                             f"alone), or LoraExpert(adapter, base, prefix=...) the one to update")
        self._updates = {}  # base key -> [(module, A key, B key, scale, transposed, embedding)]
        missing, found = [], {}
        for module, pair in pairs.items():
            key = binding.key_for(f"{module}.weight")
            if key is None or not fits(f"{module}.weight", key):
                missing.append(module)
            else:
                found[module] = key
        shapes = {module: W_0_shape(f"{module}.weight", key) for module, key in found.items()}
        shared = self._storage_names()
        transposed = self._orientations(found, shapes, pairs, skeleton, config)
        # (in the order of the model's modules, PEFT's merge order: one tensor updated twice, a
        # tied head's and its embeddings', is rounded to its dtype after each, as PEFT does; where
        # no model is built, a base state dict's order, the model's too: the adapter file's names
        # sort GPT-2's lm_head before its wte)
        place = {} if skeleton is None else {m: i for i, (m, _) in enumerate(skeleton.named_modules())}
        stored = {k: i for i, k in enumerate(self.base.keys())}
        # full tensors are the module's own (a trained copy of a tied head unties it, as in PEFT);
        # an adapted module's saved W_0 is where its update goes
        whole = Binding(self.base.keys(), names=list(full) + list(base_layers), rename=rename)
        saved = {whole.key_for(name) or name for name in full}
        untied = set()  # adapted modules tied to a module saved whole
        for module, key in sorted(found.items(), key=lambda item: (place.get(item[0], len(place)),
                                                                   stored.get(item[1], len(stored)))):
            pair = pairs[module]
            r = pair["rank"]
            a = next((alpha_pattern[p] for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", module)), alpha)
            # (every name the base has for the tensor: a tied head and its embeddings are one
            # parameter, which PEFT updates once; but one of them saved whole is wrapped apart,
            # and the update is the others' alone: modules_to_save: [embed_tokens] beside a LoRA
            # on the tied lm_head updates the head, on the base's W_0; T5's shared saved whole
            # leaves its encoder's and decoder's embed_tokens tied to the head)
            names = self._names_of(key, order, shared)
            own = f"{module}.weight"
            group = [*names, *(order or {}).get(key, ()), *(order or {}).get(own, ())]
            if saved.intersection(group):
                names = [k for k in dict.fromkeys(whole.key_for(n) or n for n in group) if k not in saved]
                untied.add(own)
            for name in names:
                self._updates.setdefault(name, []).append(
                    (module, pair["A"], pair["B"], a / (math.sqrt(r) if rslora else r), transposed[module],
                     pair["embedding"]))
        mha = [m for m in missing
               if ".base_layer." in m or any(k.endswith(f"{m}.in_proj_weight") for k in self.base.keys())]
        if mha:
            raise ValueError(f"{what}: module {mha[0]!r} has a LoRA on torch's nn.MultiheadAttention (its "
                             f"in_proj_weight, or the out_proj inside it), which epmq does not read; merge it "
                             f"with PEFT's merge_and_unload()")
        converted = _saved_converted(skeleton, missing)
        if converted:  # (the base is the adapter's: its checkpoint holds those weights otherwise)
            module, held = next(iter(converted.items()))
            more = f" and {len(converted) - 1} more" if len(converted) > 1 else ""
            raise ValueError(f"{what}: the base ({self.base.description}) holds the weight of the adapted module "
                             f"{module!r}{more} inside {', '.join(held)}, which transformers converts as it loads "
                             f"the model; epmq reads a base checkpoint tensor by tensor: merge the adapter with PEFT's "
                             f"merge_and_unload(), or in Python give base= the base loaded (from_pretrained(...)), "
                             f"or its state dict")
        if missing and skeleton is None:
            # (a checkpoint's own tensors given, no model saying how transformers converts them)
            bound = set(found.values())
            absent = [m for m in missing if binding.key_for(f"{m}.weight") is None]
            held = next(([m, h] for m in absent
                         if (h := _maybe_converted(self.base, m, pairs[m]["out_in"], bound))), None)
            if held is not None:
                module, held = held
                more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
                raise ValueError(f"{what}: the base ({self.base.description}) has no tensor {module}.weight{more}, "
                                 f"which the adapter updates, and its layer holds {held[:3]}: a checkpoint's tensors "
                                 f"may hold the module's weight inside another tensor, which transformers converts as "
                                 f"it loads the model (or it is not the adapter's base): give base= the base loaded "
                                 f"(from_pretrained(...)), or its state_dict()")
        if missing:
            more = " ..." if len(missing) > 3 else ""
            tied = "" if skeleton is not None else (
                " (or a module tied to another, as an lm_head to the embeddings, which only the base's "
                "config.json says: give the base as its checkpoint directory or as the model)")
            raise ValueError(f"{what}: the base ({self.base.description}) has no weight, or none of the "
                             f"update's shape, for the adapted module(s) {missing[:3]}{more}: "
                             f"not the adapter's base model{tied}")
        # a module saved whole under the model's names for tensors its base checkpoint stores in
        # another layout (transformers 5 fuses Mixtral's experts into mlp.experts.gate_up_proj
        # from block_sparse_moe.experts.N.w1 and w3): no name of the checkpoint reads it, and
        # every reader took the base's tensors for the trained ones
        # (a name the base stores none of, tied to one it stores, is that one: a tied head's)
        lost = [name for name in full if order is not None and name in order
                and not any(whole.key_for(n) is not None for n in order[name])]
        if lost:
            raise ValueError(f"{what}: it saves {lost[:3]} whole (modules_to_save), which the base "
                             f"({self.base.description}) stores in another layout (transformers' conversion "
                             f"of its checkpoint), so no tensor of the expert holds it; merge it with PEFT's "
                             f"merge_and_unload() and pass the merged checkpoint, or give the base as the model")
        self._full = {whole.key_for(name) or name: key for name, key in full.items()}
        self._full.update({(None if name in untied else binding.key_for(name)) or whole.key_for(name) or name: key
                           for name, key in base_layers.items()})
        # a module saved whole replaces that module alone: PEFT wraps it (modules_to_save:
        # [embed_tokens] over a tied head) and the modules tied to it keep the base's W_0, which a
        # base checkpoint stores once, under another name: alias -> the base's key for it
        # (not an adapted module's saved W_0, base_layer: its update goes to every name of it)
        # (names of the model, found in the base under its renaming: Gemma 3's hub layout)
        self._aliases = {}
        for name, stored in ((name, whole.key_for(name)) for name in full):
            for other in (order or {}).get(name, ()) if stored is not None else ():
                if other not in full and whole.key_for(other) is None:
                    self._aliases[other] = stored
        self._keys = list(dict.fromkeys([*self.base.keys(), *self._full, *self._aliases]))
        if not named:
            self._warn_if_update_in_base()

    @without_autocast
    def _warn_if_update_in_base(self) -> None:
        """Warn where the base given holds the adapter's update already (PEFT's merge_and_unload()
        saved and given as the base: W_0 + 2 s B A, the update twice, in silence), told by the base
        the adapter's config names where it is on this machine: the given base's weight of an
        adapted module less the named base's is the update (to rounding: a bf16 merge's is noisy)."""
        from .checkpoint_io import CheckpointError, CheckpointReader, hub_reference, hub_snapshot

        named = named_base(self.directory)
        path = None if named is None else Path(named)
        if path is not None and not path.exists():
            reference = hub_reference(named)
            try:  # (the hub's cache alone: nothing is fetched for a check)
                path = None if reference is None else hub_snapshot(
                    reference[0], revision=reference[1] or named_revision(self.directory), offline=True)
            except CheckpointError:
                path = None
        if path is None or (self.base.path is not None and Path(self.base.path).resolve() == path.resolve()):
            return
        try:
            reference = CheckpointReader(path, f"the base named by {self.directory}")
        except (CheckpointError, OSError, ValueError):
            return
        try:
            key = next((k for k in self._updates if k not in self._full and k in reference
                        and reference.shape(k) == self.base.shape(k)), None)
            if key is None:
                return
            update = 0
            for _, key_A, key_B, s, transposed, _ in self._updates[key]:
                delta = s * (self.adapter.get(key_B).float() @ self.adapter.get(key_A).float())
                update = update + (delta.T if transposed else delta)
            held = self.base.get(key).float() - reference.get(key).float()
        finally:
            reference.close()
        norm, held_norm = float(torch.linalg.vector_norm(update)), float(torch.linalg.vector_norm(held))
        if norm == 0 or held_norm == 0:
            return
        along = float((held * update).sum())  # (the update's share of the difference, and its alignment)
        if 0.5 < along / norm ** 2 < 1.5 and along / (norm * held_norm) > 0.2:
            warnings.warn(f"{self.description}: the base given already holds this adapter's update (its {key!r} "
                          f"less that of {named}, the base the adapter's config names, is {along / norm ** 2:.2f} "
                          f"times s B A): a model the adapter was merged into (PEFT's merge_and_unload()) given "
                          f"as the base, the update is applied twice; give the base the adapter was trained on "
                          f"({named}), or the merged model alone as the expert")

    def _names_of(self, key: str, order, shared) -> list:
        """``key`` and the base's other names for the same tensor: tied aliases (``tie_order``
        of the base's modules), or names of one tensor in memory (``shared``: a tied model's
        state dict, ``_storage_names``)."""
        names = [key] + [name for name in (order or {}).get(key, ()) if name in self.base]
        if shared:
            names += shared[storage_key(self.base.get(key))]
        return list(dict.fromkeys(names))

    def _storage_names(self) -> dict:
        """For a base in memory, the names of each tensor (by its storage and layout); {} for
        one read from files, whose tied tensors are stored once."""
        shared = {}
        if self.base.path is None:
            for name in self.base.keys():
                shared.setdefault(storage_key(self.base.get(name)), []).append(name)
        return shared

    def _orientations(self, found, shapes, pairs, skeleton, config) -> dict:
        """Per adapted module, whether W_0 holds ``(B A)^T``: an embedding's update, or a layer
        that stores its weight as ``[in, out]`` (GPT-2's ``Conv1D``). The base's module types say
        which where it can be built (``model_skeleton``); else the shapes, and for a square weight what
        the adapter's other layers show, or its config's ``fan_in_fan_out`` (which PEFT sets per
        layer type but saves once: refused where the layers show both)."""
        out, square, shown = {}, [], set()
        for module, key in found.items():
            pair, shape = pairs[module], shapes[module]
            layer = None
            if skeleton is not None:
                try:
                    layer = skeleton.get_submodule(key.removesuffix(".weight"))
                except AttributeError:
                    pass
            if pair["embedding"]:
                out[module] = True
            elif layer is not None:
                out[module] = type(layer).__name__ == "Conv1D"
            elif shape[0] != shape[1]:
                out[module] = shape == pair["out_in"][::-1]
                shown.add(out[module])
            else:
                square.append(module)
        if square and len(shown) > 1:
            raise ValueError(f"LoRA adapter {self.directory}: it adapts layers stored both as [out, in] and "
                             f"as [in, out] (nn.Linear and Conv1D), and for its square ones "
                             f"({square[0]}, ...) neither the shapes nor its fan_in_fan_out say which; "
                             f"give the base as a checkpoint directory with its config.json")
        square_transposed = next(iter(shown)) if shown else bool(config.get("fan_in_fan_out"))
        out.update(dict.fromkeys(square, square_transposed))
        return out

    # ----------------------------------------------------------------- the state dict

    def __len__(self):
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def __contains__(self, key):
        return key in self._full or key in self._aliases or key in self.base

    def shape_of(self, key: str) -> tuple:
        if key in self._full:
            return self.adapter.shape(self._full[key])
        return self.base.shape(self._aliases.get(key, key))

    def _own(self, key: str, index=None) -> torch.Tensor:
        """The tensor before any update: the adapter's where it saved one (``modules_to_save``, a
        resized embedding's ``base_layer``), in the base tensor's dtype as PEFT loads it into the
        base model (an adapter trained in fp32 on a bf16 base), else the base's."""
        if key not in self._full:
            key = self._aliases.get(key, key)  # (a tied alias of a module saved whole: the base's)
            # (a float8 base with its scales beside: W_0 + B A in float8, or a float8 W_0 taken for
            # the weight by E-PMQ's low-rank form, silently; refused as any expert's such tensor)
            why = self.base.quantized_with_scales(key)
            if why is not None:
                raise ValueError(f"{self.description}: the base's tensor {key!r} {why}; give the "
                                 f"full-precision base")
            return self.base.get(key, index)
        t = self.adapter.get(self._full[key], index)
        key = self._aliases.get(key, key)  # (an untied head's saved W_0: the dtype of the base's)
        if key in self.base and t.is_floating_point():
            t = t.to(self.base.dtype(key))
        return t

    @without_autocast  # (B A in float32: a caller's autocast made it bf16, the expert PEFT's no more)
    def __getitem__(self, key: str) -> torch.Tensor:
        W_0 = self._own(key)
        if key not in self._updates:
            return W_0
        W = W_0.float()
        for module, key_A, key_B, s, transposed, embedding in self._updates[key]:
            delta = s * (self.adapter.get(key_B).float() @ self.adapter.get(key_A).float())
            if transposed:
                delta = delta.T
            if embedding:  # (PEFT rounds an embedding's update to its dtype before adding it)
                delta = delta.to(W_0.dtype).float()
            W = (W + delta).to(W_0.dtype).float()  # (PEFT merges module by module, each rounded)
        return W.to(W_0.dtype)

    def low_rank(self, key: str, device=None, bases: Optional[dict] = None):
        """``self[key]`` as an ``epmq.stats.LowRankExpert`` ``W_0 + U V`` (on ``device``: ``U``
        the updates' ``s B`` side by side in fp32, ``V`` their ``A`` stacked), the form E-PMQ
        takes its targets' residual in at the cost of one expert for all of them; ``W_0 + U V``
        unrounded, as PEFT applies an adapter it has not merged (``self[key]`` rounds it to
        ``W_0``'s dtype); of rank 0 where the adapter does not update ``key`` (every expert of
        one base is then the base there). None where ``key`` is no 2-D floating-point tensor, or
        has an update of an embedding or of a layer stored as ``[in, out]``. ``bases``: a dict
        in which adapters of one base share the base's tensor, read once (the same tensor for
        every expert of a layer: E-PMQ then knows them of one ``W_0`` without comparing)."""
        from .stats import LowRankExpert

        updates = self._updates.get(key, [])
        if any(transposed or embedding for *_, transposed, embedding in updates):
            return None
        shared = (self.base_key, key, str(device)) if bases is not None and key not in self._full else None
        W_0 = bases.get(shared) if shared is not None else None
        if W_0 is None:
            W_0 = self._own(key).to(device)
            if shared is not None:  # (not a tensor the adapter saved whole: that one is its own)
                bases[shared] = W_0
        if W_0.dim() != 2 or not W_0.is_floating_point():
            return None
        parts = [(s * self.adapter.get(key_B).to(device=device, dtype=torch.float32),
                  self.adapter.get(key_A).to(device=device, dtype=torch.float32))
                 for _, key_A, key_B, s, _, _ in updates]
        U = torch.cat([B for B, _ in parts], dim=1) if parts else W_0.new_zeros((W_0.shape[0], 0), dtype=torch.float32)
        V = torch.cat([A for _, A in parts], dim=0) if parts else W_0.new_zeros((0, W_0.shape[1]), dtype=torch.float32)
        return LowRankExpert(W_0, U, V)

    def part(self, key: str, index) -> torch.Tensor:
        """``self[key][index]``, reading only that part where no update applies (one expert of a
        base's fused MoE tensor: the updates are of whole 2-D weights)."""
        return self[key][index] if key in self._updates else self._own(key, index)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __repr__(self):
        return f"LoraExpert({self.description}, {len(self._updates)} updated tensors)"


def adapter_directory(source) -> Optional[Path]:
    """The adapter directory ``source`` is (a directory, or an HF hub id's snapshot), or None
    where it is no adapter (or not found: what reads it says so)."""
    from .checkpoint_io import local_checkpoint_or_none

    here = local_checkpoint_or_none(source, directory=True)
    return here if here is not None and is_lora_adapter(here) else None


def open_expert(source, base=None):
    """``source`` as it is, or as a ``LoraExpert`` on ``base`` where it is an adapter (a
    directory or hub id: an adapter named by hub id is given ``base`` too, not its config's)."""
    directory = adapter_directory(source)
    return source if directory is None else LoraExpert(directory, base)
