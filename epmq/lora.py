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
config names (``base_model_name_or_path``: a local path or an HF hub id) unless a base is given.

What a plain update cannot express is refused, never approximated: DoRA, LoRA on convolutions or
on bare parameters (``target_parameters``), trainable token deltas, LoRA biases, adapter types
other than LoRA, and updates of a module the base lacks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # PEFT's wrapper around the base model's own names

_UPDATE = re.compile(r"(?P<module>.+)\.lora_(?:embedding_)?(?P<side>A|B)(?:\.weight)?")
_REFUSED = {  # key pattern -> what it is
    r".+\.lora_magnitude_vector(\..+)?": "DoRA (use_dora) magnitudes",
    r".+\.lora_[AB]\.bias": "LoRA biases (lora_bias)",
    r".+trainable_tokens_delta.*": "trainable token deltas (trainable_token_indices)",
}


def is_lora_adapter(path) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def _config(directory: Path) -> dict:
    where = directory / ADAPTER_CONFIG
    try:
        config = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable adapter config ({e})") from e
    kind = config.get("peft_type", "LORA")
    problems = [
        f"peft_type {kind!r} (only LORA is read)" if kind != "LORA" else None,
        "use_dora" if config.get("use_dora") else None,
        "lora_bias" if config.get("lora_bias") else None,
        "target_parameters" if config.get("target_parameters") else None,
        "trainable_token_indices" if config.get("trainable_token_indices") else None,
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{where}: the adapter uses {', '.join(problems)}, which epmq cannot express "
                         f"as a plain weight update; merge it into its base with PEFT's "
                         f"merge_and_unload() and pass the merged checkpoint")
    return config


class LoraExpert(Mapping):
    """The whole expert of a LoRA ``adapter`` (a directory or HF hub id) on ``base`` (a
    checkpoint path, hub id, state dict or module; default: the base the adapter config names)."""

    def __init__(self, adapter, base=None):
        from .checkpoint_io import Binding, CheckpointReader, local_checkpoint

        self.directory = local_checkpoint(adapter, directory=True)
        config = _config(self.directory)
        weights = next((self.directory / f for f in ADAPTER_WEIGHTS if (self.directory / f).is_file()), None)
        if weights is None:
            raise ValueError(f"LoRA adapter {self.directory}: no {' or '.join(ADAPTER_WEIGHTS)}")
        what = f"LoRA adapter {self.directory}"
        self.adapter = CheckpointReader(weights, what)
        if base is None:
            base = config.get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{what}: its {ADAPTER_CONFIG} names no base model "
                                 f"(base_model_name_or_path); give the base: LoraExpert(adapter, base=...)")
        if isinstance(base, (str, Path)):
            base = local_checkpoint(base)
        self.base = CheckpointReader(base, f"the base model of {what}")
        self.description = f"{what} on {self.base.description}"
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        alpha, alpha_pattern = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))

        pairs, full = {}, {}  # module -> {"A": key, "B": key, "embedding": bool}; name -> key
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
            else:
                full[name.replace(".base_layer.", ".")] = key
        for module, pair in pairs.items():
            if "A" not in pair or "B" not in pair:
                has, lacks = ("A", "B") if "A" in pair else ("B", "A")
                raise ValueError(f"{what}: module {module!r} has lora_{has} but not lora_{lacks}")
            if len(self.adapter.shape(pair["A"])) != 2 or len(self.adapter.shape(pair["B"])) != 2:
                raise ValueError(f"{what}: module {module!r} has a LoRA on a convolution, which epmq "
                                 f"does not read; merge it with PEFT's merge_and_unload()")
        # adapter names -> base checkpoint keys, under one prefix rewrite (a base saved with other
        # leading names than the model PEFT wrapped, e.g. transformers 4's ``vision_model.``)
        binding = Binding(self.base.keys(), names=[f"{m}.weight" for m in pairs] + list(full))
        self._updates = {}  # base key -> (module, A key, B key, scale, embedding)
        missing = []
        for module, pair in pairs.items():
            key = binding.key_for(f"{module}.weight")
            if key is None:
                missing.append(module)
                continue
            r = self.adapter.shape(pair["A"])[0]
            a = next((alpha_pattern[p] for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", module)), alpha)
            self._updates[key] = (module, pair["A"], pair["B"], a / (math.sqrt(r) if rslora else r),
                                  pair["embedding"])
        if missing:
            raise ValueError(f"{what}: the base ({self.base.description}) has no weight for the "
                             f"adapted module(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                             f"not the adapter's base model")
        self._full = {binding.key_for(name) or name: key for name, key in full.items()}
        self._keys = list(dict.fromkeys([*self.base.keys(), *self._full]))

    # ----------------------------------------------------------------- the state dict

    def __len__(self):
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def __contains__(self, key):
        return key in self._full or key in self.base

    def shape_of(self, key: str) -> tuple:
        if key in self._full:
            return self.adapter.shape(self._full[key])
        return self.base.shape(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        # a ``base_layer`` tensor saved with the adapter (a resized embedding) is the W_0 updated
        W_0 = self.adapter.get(self._full[key]) if key in self._full else self.base.get(key)
        if key not in self._updates:
            return W_0
        module, key_A, key_B, s, embedding = self._updates[key]
        A, B = self.adapter.get(key_A).float(), self.adapter.get(key_B).float()
        delta = s * (B @ A)
        if embedding or self.fan_in_fan_out:
            delta = delta.T
        if delta.shape != W_0.shape:
            raise ValueError(f"{self.description}: the update of {module!r} has shape "
                             f"{tuple(delta.shape)}, its base weight {tuple(W_0.shape)}")
        return (W_0.float() + delta).to(W_0.dtype)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __repr__(self):
        return f"LoraExpert({self.description}, {len(self._updates)} updated tensors)"


def open_expert(source, base=None):
    """``source`` as it is, or as a ``LoraExpert`` on ``base`` where it is an adapter directory."""
    if isinstance(source, (str, Path)) and is_lora_adapter(source):
        return LoraExpert(source, base)
    return source
