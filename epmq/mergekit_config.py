"""mergekit's YAML configs as ``epmq merge`` configs: a ``mergekit-yaml`` file runs as it is.

A config with ``merge_method:`` is read as mergekit reads it (mergekit 0.1.5: its parameter
names and defaults) and becomes the epmq merge that computes the same tensors, for the methods
where every setting means the same in both (``benchmarks/side_by_side_mergekit.py`` compares
the two on the same checkpoints, tensor by tensor):

    mergekit            epmq
    task_arithmetic     task_arithmetic(scale=lambda, weights=weight)   (density not read)
    ties                ties(scope="tensor", density, scale=lambda, weights=weight,
                             merge="mean" if normalize (its default) else "sum")
    dare_ties           dare(density, scale=lambda, weights=weight, consensus="sign",
                             merge="mean" if normalize else "sum", rescale="l1" (its default)
                             or None, seed=0)   (its own random masks: the same merge, not
                             mergekit's tensors, which depend on torch's global generator)
    dare_linear         the same without the vote
    della               della(density, epsilon, scale=lambda, weights=weight, consensus="sign",
                              merge="mean" if normalize (its default) else "sum", rescale="l1"
                              (its default) or None, seed=0)   (its own random masks, as DARE's)
    della_linear        the same without the vote (normalize: false by default)
    breadcrumbs         breadcrumbs(density, gamma, scale=lambda, weights=weight, merge="sum")
    breadcrumbs_ties    the same with consensus="sign", merge="mean" if normalize else "sum"
    linear              average(weights=weight) of every model, the base included
                        (normalize: true, its default)
    model_stock         model_stock(per_row=filter_wise)
    sce                 sce(select_topk)
    nuslerp             nuslerp(base_model or none, the two models, weights=weight,
                                row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    multislerp          multislerp(base_model or none, the models, weights=weight,
                                   normalize_weights, eps)
    karcher             karcher(every model, the base too, max_iter, tol)
    nearswap            nearswap(base_model, the other model, t)
    ram                 ram(epsilon)
    ramplus_tl          ram_plus(r, alpha, epsilon)
    arcee_fusion        arcee_fusion(base_model, the other model)   (exact quartiles, where
                        mergekit samples a million entries of larger tensors)
    slerp               slerp(base_model, the other model, t)   (each tensor whole; where one
                        is all zeros, interpolated linearly, where mergekit scales the other
                        by sin(t pi / 2): its direction is undefined)

TIES, Breadcrumbs and Model Stock run with ``convention="mergekit"`` (``epmq.merge``): mergekit's
entry counts (truncated), tie-breaking (torch's sort order), sign vote (+ where the votes sum to
exactly 0) and Model Stock (``t`` unclamped, norms floored at 1e-6; with ``filter_wise``, a
tensor of more than two dimensions' rows along its last one). A per-model parameter
(``weight``, ``density``, ``gamma``, ``epsilon``) given in ``parameters:`` (a slice's or the top level's)
holds for every model that does not give its own, as mergekit looks them up.

SLERP's ``t`` may be what mergekit's best-known configs give it: a gradient over the layers
(``[0, 0.5, 0.3, 0.7, 1]``, interpolated linearly at layer ``i`` of ``N`` as ``i / (N - 1)``)
and per-tensor filters (``[{filter: self_attn, value: ...}, {filter: mlp, value: ...}, {value:
0.5}]``: the first whose filter is in the tensor's name), as mergekit evaluates them: a tensor's
layer is the number after its block list (``layers.3``, ``h.3``, ``block.3``, ...), and tensors
outside the layers (embeddings, final norm, head) take the value at 0. ``N`` is the count the
base model's ``config.json`` states, and ``slices:`` is read where it is the whole model: one
slice whose every source spans layers 0 to ``N``.

``normalize: true`` on a method without a sign vote divides by the sum of the weights, which is
``weights`` divided by their sum. ``lambda`` defaults to 1 and ``density`` to 1, as mergekit's
(epmq's own defaults differ: the translation states every value). ``int8_mask`` changes only
mergekit's memory and is ignored (for every method); so is a per-model ``weight`` where
mergekit ignores it (Model Stock, SCE, Karcher: warned). ``dtype`` (or ``out_dtype``) is the
output's dtype: epmq computes in fp32 and rounds once, where mergekit computes in ``dtype``
(and, with an ``out_dtype``, casts to it), so a bf16 or fp16 result can differ from mergekit's:
by one rounding for the interpolations, by several where many terms are summed (TIES on norm
weights near 1: up to 0.078 in bf16, measured), and an fp32 ``out_dtype`` of fp16 arithmetic
holds more than fp16's digits.

``tokenizer_source: base`` (or the base's path) and ``union`` (or ``tokenizer: {source: ...,
pad_to_multiple_of: ..., tokens: ...}``, per-token rows included) are epmq's own
(``epmq.vocabulary``: experts with added tokens, embeddings padded past the vocabulary, which
mergekit cuts to the vocabulary's size): the same row for every token as mergekit's (mergekit
numbers the union's added tokens in an order that changes from run to run, epmq in the models'
order). Where every model has the base's vocabulary, no padding and no per-token rows, they
change nothing and are dropped. Refused, saying why: another model's tokenizer, tokens past the
base's embedding (mergekit strips them from BPE tokenizers only), linear and karcher with
``base_model`` over different vocabularies (the translation averages the base as a model, so
no base is left to take the tokenizer and shared rows from), and without ``base_model``,
``base`` over different vocabularies or a model without a tokenizer.

Anything else is refused with the setting named, never approximated: other methods
(passthrough, ...), slices of parts of models (frankenmerges), gradients and
filters of any parameter but SLERP's ``t``, ``rescale: true`` on a method without random
masks, and ``model+lora`` sources. ``chat_template`` (Jinja text, or "auto": the
template most of the models carry, refused where several tie) is set on the output's
tokenizer, as mergekit sets it; mergekit's templates named after a format ("chatml", ...) are
its own files and are refused.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

from ._util import layer_part
from .checkpoint_io import json_files
from .checks import check_number
from .vocabulary import load_tokenizer

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "name",
            "int8_mask", "tokenizer_source", "tokenizer", "chat_template"}
METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear", "della",
           "della_linear", "sce", "linear", "model_stock", "slerp", "nuslerp", "multislerp", "karcher",
           "nearswap", "ram", "ramplus_tl", "arcee_fusion")
# per method: the parameters mergekit reads, with its defaults (None: none)
SHARED = {
    "task_arithmetic": {"normalize": False, "lambda": 1.0, "rescale": False},
    "ties": {"normalize": True, "lambda": 1.0, "rescale": False},
    "breadcrumbs": {"normalize": False, "lambda": 1.0, "rescale": False},
    "breadcrumbs_ties": {"normalize": False, "lambda": 1.0, "rescale": False},
    "dare_ties": {"normalize": False, "lambda": 1.0, "rescale": True},
    "dare_linear": {"normalize": False, "lambda": 1.0, "rescale": True},
    "della": {"normalize": True, "lambda": 1.0, "rescale": True},
    "della_linear": {"normalize": False, "lambda": 1.0, "rescale": True},
    "linear": {"normalize": True},
    "model_stock": {"filter_wise": False},
    "sce": {"select_topk": 1.0},
    "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "nearswap": {"t": None},
    "slerp": {"t": None},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    "arcee_fusion": {},
}
PER_MODEL = {
    "task_arithmetic": {"weight": None, "density": 1.0},
    "ties": {"weight": None, "density": 1.0},
    "breadcrumbs": {"weight": None, "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": None, "density": 1.0, "gamma": 0.01},
    "dare_ties": {"weight": None, "density": 1.0},
    "dare_linear": {"weight": None, "density": 1.0},
    "della": {"weight": None, "density": 1.0, "epsilon": 0.15},
    "della_linear": {"weight": None, "density": 1.0, "epsilon": 0.15},
    "linear": {"weight": None},
    "model_stock": {"weight": 1.0},  # (weight: read nowhere, as mergekit ignores it: warned)
    "sce": {"weight": 1.0},
    "slerp": {},
    "nuslerp": {"weight": None},
    "multislerp": {"weight": None},
    "karcher": {"weight": 1.0},
    "nearswap": {},
    "ram": {"weight": 1.0},
    "ramplus_tl": {"weight": 1.0},
    "arcee_fusion": {},
}


IGNORES_WEIGHT = ("model_stock", "sce", "karcher", "ram", "ramplus_tl")


def is_mergekit(config: Mapping) -> bool:
    """Whether a merge config is mergekit's (it names ``merge_method``)."""
    return "merge_method" in config


def _scalar(value, where: str):
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where} is a gradient or a per-tensor filter ({value!r}): epmq merges with one value "
                         f"per model; give a number")
    return _number(value, where)


def _parameters(given, known: Mapping, where: str, scheduled: tuple = ()) -> dict:
    """``given`` (a mergekit ``parameters`` mapping, or None) checked against ``known`` (name ->
    default), with the defaults filled in; the names in ``scheduled`` may be gradients or
    filters (kept as given)."""
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ValueError(f"{where} must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{where}: {', '.join(unknown)} not read by this method here "
                         f"(it reads {', '.join(known) or 'none'})")
    out = dict(known)
    for name, value in given.items():
        out[name] = value if name in scheduled else _scalar(value, f"{where}.{name}")
    return out


def _number(value, where: str) -> float:
    """A finite number; a string that reads as one too (YAML reads 1e-1 as a string, and mergekit
    takes it as the number)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return check_number(value, where)


class _Layered(tuple):
    """Settings of one parameter looked up in turn (a slice's, then the top level's): the first
    whose conditions match a tensor gives its value, as mergekit falls through to the next."""


def _conditions(setting, where: str) -> list:
    """A setting as mergekit's list of ``(filter or None, value)``, checked."""
    if isinstance(setting, _Layered):
        return [c for layer in setting for c in _conditions(layer, where)]
    if isinstance(setting, Mapping):
        setting = [setting]
    if not (isinstance(setting, list) and setting and all(isinstance(c, Mapping) for c in setting)):
        return [(None, setting)]
    out = []
    for k, cond in enumerate(setting):
        unknown = sorted(set(cond) - {"filter", "value"})
        if unknown or "value" not in cond or not isinstance(cond.get("filter", ""), (str, type(None))):
            raise ValueError(f"{where}[{k}] must be {{filter: a name part, value: ...}}, got {dict(cond)!r}")
        out.append((cond.get("filter"), cond["value"]))
    return out


def _value_at(value, x: float, where: str) -> float:
    """A number, or a gradient (a list of numbers) read at ``x`` in [0, 1] as mergekit reads it."""
    if not isinstance(value, list):
        return _number(value, where)
    if not value:
        raise ValueError(f"{where} is an empty gradient")
    values = [_number(v, f"{where}[{k}]") for k, v in enumerate(value)]
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


class Schedule:
    """mergekit's value of a setting (a number, a gradient, filters) for each tensor name: a
    tensor's layer is the number after its block list (``layer_part``; layer ``i`` of ``num_layers``
    sits at ``i / (N - 1)`` of a gradient); tensors outside the layers are read at 0. Its repr is the
    setting (what the merge recipe records)."""

    def __init__(self, setting, num_layers: int, where: str = "parameters.t"):
        self.setting, self.num_layers, self.where = setting, num_layers, where
        self.conditions = _conditions(setting, where)
        for k, (_, value) in enumerate(self.conditions):  # (every value checked before any merging)
            for x in (0.0, 1.0):
                _value_at(value, x, f"{where}[{k}]" if len(self.conditions) > 1 else where)

    def __call__(self, name: str) -> float:
        for part, value in self.conditions:
            if part is None or part == "*" or part in name:
                parts = name.split(".")[:-1]  # (a number last is no layer: a Sequential's own parameter)
                found = layer_part(parts)
                if found is None:
                    x = 0.0
                else:
                    layer = int(parts[found])
                    if layer >= self.num_layers:
                        raise ValueError(f"{self.where}: tensor {name} is in layer {layer}, past the "
                                         f"{self.num_layers} layers the base's config.json states")
                    x = layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
                return _value_at(value, x, self.where)
        raise ValueError(f"{self.where}: no filter matches tensor {name}, and there is no default (a "
                         f"condition without filter)")

    def __repr__(self):
        return f"mergekit {self.where} {self.setting!r} over {self.num_layers} layers"


def num_layers(model: str) -> int:
    """The layer count the ``config.json`` of ``model`` (a directory or HF hub id) states."""
    from .merge_checkpoint import _layer_counts

    config_file = json_files(model) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model} has no config.json stating its layer count, which a gradient or slices need")
    counts = set(_layer_counts(json.loads(config_file.read_text(encoding="utf-8"))).values())
    if len(counts) != 1:
        raise ValueError(f"{model}'s config.json states {'no' if not counts else 'several'} layer counts "
                         f"{sorted(counts) if counts else ''}: a gradient over layers is ambiguous")
    return counts.pop()


def _vocabulary(model: str):
    """``(tokens -> ids, embedding rows, tokens past them)`` of ``model`` (a directory or HF hub
    id): its tokenizer's vocabulary without ids past its embedding (as mergekit strips them), or
    None where it has no tokenizer; its text model's ``vocab_size``; how many ids were past it."""
    import transformers

    path = json_files(model)
    if not path.exists():
        raise ValueError(f"{model} is neither a directory nor an HF hub id")
    config = transformers.AutoConfig.from_pretrained(path)
    try:
        text = config.get_text_config()
    except ValueError:
        # a text encoder's config and a decoder's (MusicGen: T5's tokens in, audio codes out), between which
        # transformers will not choose unasked: the tokenizer's ids index the encoder's embeddings, the
        # model's input embeddings (the decoder's vocab_size counts audio codes)
        text = getattr(config, "text_encoder", None)
        if text is None:
            raise
    rows = getattr(text, "vocab_size", None)
    tokenizer = load_tokenizer(path)  # (mergekit, too, takes a model without a tokenizer to have the base's)
    if tokenizer is None:
        return None, rows, 0
    vocab = tokenizer.get_vocab()
    kept = {token: i for token, i in vocab.items() if rows is None or i < rows}
    return kept, rows, len(vocab) - len(kept)


class TokenizerDifference(str):
    """Why a tokenizer source changes the merge (``base_tokenizer_changes_nothing``);
    ``translatable``: whether ``epmq.vocabulary`` lays the embeddings out as mergekit does."""

    def __new__(cls, why: str, translatable: bool = False):
        self = super().__new__(cls, why)
        self.translatable = translatable
        return self


def base_tokenizer_changes_nothing(base: str, models: list, vocabulary=_vocabulary, *,
                                   every_tokenizer: bool = False) -> Optional[str]:
    """None where mergekit's tokenizer source (the base's, or the union of identical ones) merges
    what a config without it merges: every model's vocabulary is the base's, token for id, and
    fills its embedding rows (the embeddings are permuted by the identity and keep their size);
    else why not (a ``TokenizerDifference``): other vocabularies, or embeddings padded past the
    vocabulary (mergekit realigns or resizes them, as ``epmq.vocabulary`` does), or what epmq
    does not translate: tokens past the base's embedding, which mergekit strips from BPE
    tokenizers only. ``every_tokenizer``: every model must carry a tokenizer (without
    ``base_model``, mergekit's tokenizer base is one of the models, picked in no fixed order)."""
    base_vocab, base_rows, past = vocabulary(base)
    if base_vocab is None:
        return TokenizerDifference(f"the base model {base} has no tokenizer")
    if past:
        return TokenizerDifference(
            f"the tokenizer of {base} has {past} tokens past its {base_rows} embedding rows (mergekit 0.1.5 "
            f"strips them from BPE tokenizers only, fails on others, and keeps them for a model path)")
    for model in [base] + [m for m in models if m != base]:
        vocab, rows, _ = vocabulary(model) if model != base else (base_vocab, base_rows, 0)
        if vocab is None and every_tokenizer:
            return TokenizerDifference(
                f"{model} has no tokenizer, and without base_model mergekit's tokenizer base is one of the "
                f"models, picked in no fixed order")
        if vocab is not None and vocab != base_vocab:
            differ = sorted(set(vocab.items()) ^ set(base_vocab.items()))[:3]
            return TokenizerDifference(f"the vocabulary of {model} is not the base's (e.g. {differ}): mergekit "
                                       f"realigns its embeddings token by token", True)
        if rows != len(base_vocab):
            return TokenizerDifference(f"{model} has {rows} embedding rows for the base tokenizer's "
                                       f"{len(base_vocab)} tokens: mergekit resizes its embeddings to the "
                                       f"vocabulary", True)
    return None


def _same_model(a, b) -> bool:
    """Whether ``a`` and ``b`` name one model: the same text, or one local path spelled two ways
    (``./ckpt/base/`` for ``ckpt/base``: mergekit reads the same tokenizer from either)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists()):
        return False
    return os.path.samefile(a, b)


def _tokenizer_source(config: Mapping, base: Optional[str], models: list, tokenizers, base_given: bool,
                      base_averaged: bool = False) -> dict:
    """mergekit's ``tokenizer_source`` (or ``tokenizer: {source: ..., pad_to_multiple_of: ...}``,
    whose source defaults to "union") as epmq's (``epmq.vocabulary``: the same rows for every
    token; mergekit numbers the union's added tokens in an order that changes from run to run,
    epmq in the models' order): nothing where it changes nothing
    (``base_tokenizer_changes_nothing``), else ``tokenizer_source`` ("base", also for the base's
    own path, or "union"), ``pad_to_multiple_of`` and ``tokens``; refused with the reason where epmq does not
    lay the vocabulary out as mergekit does (``base_averaged``: the translation averages the base
    as one of the models, linear's and karcher's, so that epmq's merge has no base to take the
    tokenizer and the shared tokens' rows from, as mergekit does)."""
    if "tokenizer_source" in config and "tokenizer" in config:
        raise ValueError("give tokenizer_source or tokenizer, not both (as mergekit)")
    source, pad, tokens = config.get("tokenizer_source"), None, None
    if "tokenizer" in config:
        spec = config["tokenizer"]
        if not isinstance(spec, Mapping):
            raise ValueError(f"tokenizer must be a mapping, got {spec!r}")
        unknown = sorted(set(spec) - {"source", "tokens", "pad_to_multiple_of"})
        if unknown:
            raise ValueError(f"tokenizer: {', '.join(unknown)} not read by epmq merge")
        source, pad, tokens = spec.get("source", "union"), spec.get("pad_to_multiple_of"), spec.get("tokens") or None
    if source is None:
        return {}
    if source not in ("base", "union") and not _same_model(source, base):
        if not any(_same_model(source, m) for m in models):  # (a name mistyped, likelier than a model not merged)
            named = ", ".join(map(repr, dict.fromkeys([base, *models])))
            raise ValueError(f"tokenizer source {source!r} is not base, union or a model of the merge ({named}): "
                             f"a mistyped name? (another model's tokenizer, which mergekit realigns the embeddings "
                             f"to, is not translated by epmq merge)")
        raise ValueError(f"tokenizer source {source!r} gives the output another model's tokenizer and realigns "
                         f"the embeddings to it: not translated by epmq merge (give that model as base_model)")
    source = "union" if source == "union" else "base"
    translated = dict(tokenizer_source=source, pad_to_multiple_of=pad, tokens=tokens)
    why = tokenizers(base, models, every_tokenizer=not base_given)
    if why is None:
        return {} if pad is None and tokens is None else translated
    if not getattr(why, "translatable", False):
        raise ValueError(f"tokenizer source {source!r}: {why}: not translated by epmq merge")
    if base_averaged:
        raise ValueError(f"tokenizer source {source!r} with base_model on a merge that averages the base as one of "
                         f"the models (linear, karcher), and here {why}: mergekit lays the vocabulary out by the "
                         f"base's tokenizer and rows, which epmq's translation, with no base, would not: not "
                         f"translated")
    if source == "base" and not base_given:
        raise ValueError(f"tokenizer source 'base' without base_model: mergekit's tokenizer base is one of the "
                         f"models, picked in no fixed order, and here {why}")
    return translated


def _whole_slice(slices, base: Optional[str], layers: Callable[[str], int]) -> tuple:
    """``(models entries, slice parameters)`` of ``slices:`` that is one slice of whole models."""
    if not (isinstance(slices, list) and len(slices) == 1 and isinstance(slices[0], Mapping)):
        raise ValueError("slices: epmq merges whole models; several slices (a frankenmerge) are not translated")
    (piece,) = slices
    unknown = sorted(set(piece) - {"sources", "parameters"})
    if unknown:
        raise ValueError(f"slices[0]: {', '.join(unknown)} not supported by epmq merge")
    sources = piece.get("sources")
    if not (isinstance(sources, list) and sources and all(isinstance(s, Mapping) for s in sources)):
        raise ValueError(f"slices[0].sources must be a list of {{model, layer_range}}, got {sources!r}")
    entries = []
    for k, source in enumerate(sources):
        unknown = sorted(set(source) - {"model", "layer_range", "parameters"})
        if unknown:
            raise ValueError(f"slices[0].sources[{k}]: {', '.join(unknown)} not supported by epmq merge")
        model = source.get("model")
        if not isinstance(model, str):
            raise ValueError(f"slices[0].sources[{k}].model must be a path or hub id, got {model!r}")
        n = layers(model)
        if list(source.get("layer_range") or []) != [0, n]:
            raise ValueError(f"slices[0].sources[{k}]: layer_range {source.get('layer_range')} is not the whole "
                             f"model ([0, {n}]): epmq merges whole models")
        entries.append({k: v for k, v in source.items() if k != "layer_range"})
    return entries, piece.get("parameters")


def _source(entry, k: int) -> tuple:
    """``(path or hub id, per-model parameters)`` of entry ``k`` of ``models:``."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
        raise ValueError(f"models[{k}] must be a mapping with model: a path or hub id, got {entry!r}")
    unknown = sorted(set(entry) - {"model", "parameters"})
    if unknown:
        raise ValueError(f"models[{k}]: {', '.join(unknown)} is not read by epmq merge")
    model = entry["model"]
    if "+" in model and not Path(model).exists():
        raise ValueError(f"models[{k}]: {model!r} is a model+LoRA source: give the adapter directory as the model "
                         f"(epmq reads a PEFT adapter as its whole expert)")
    return model, entry.get("parameters")


def from_mergekit(config: Mapping, layers: Callable[[str], int] = num_layers,
                  tokenizers: Callable[[str, list], Optional[str]] = base_tokenizer_changes_nothing) -> dict:
    """An ``epmq merge`` config (``method``, ``base``, ``models``, ``params``, ``dtype``, and
    ``chat_template`` where it sets one) that computes what the mergekit config ``config`` does;
    ValueError for what it cannot. ``layers``: a model's layer count (read where ``slices`` or a
    gradient needs it); ``tokenizers``: why ``tokenizer_source: base`` would change the merge, or
    None."""
    from .merge_checkpoint import check_chat_template

    translated = _translate(config, layers, tokenizers)
    template = config.get("chat_template")
    if template is not None:
        check_chat_template(template)
        translated["chat_template"] = template
    return translated


def _translate(config: Mapping, layers, tokenizers) -> dict:
    vocabulary = {}  # (tokenizer_source, pad_to_multiple_of, where the tokenizer source changes the merge)
    translated = _translate_method(config, layers, tokenizers, vocabulary)
    return {**translated, **{k: v for k, v in vocabulary.items() if v is not None}}


def _translate_method(config: Mapping, layers, tokenizers, vocabulary: dict) -> dict:
    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise ValueError(f"mergekit config: {', '.join(unknown)} not supported by epmq merge (it reads "
                         f"{', '.join(sorted(TOP_KEYS))})")
    method = config["merge_method"]
    if method not in METHODS:
        raise ValueError(f"mergekit merge_method {method!r} is not translated; translated: {', '.join(METHODS)}")
    base = config.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"base_model must be a path or hub id, got {base!r}")
    given = config.get("parameters")
    if "slices" in config:
        if "models" in config:
            raise ValueError("give models or slices, not both")
        entries, in_slice = _whole_slice(config["slices"], base, layers)
        if in_slice is not None:  # (a slice's parameters before the top level's, as mergekit)
            if not isinstance(in_slice, Mapping):
                raise ValueError(f"slices[0].parameters must be a mapping, got {in_slice!r}")
            top = dict(given or {}) if isinstance(given, Mapping) else {}
            given = {**top, **in_slice}
            if "t" in in_slice and "t" in top and all(
                    part not in (None, "*") for part, _ in _conditions(in_slice["t"], "slices[0].parameters.t")):
                # (the slice's filters may match no tensor: there mergekit reads the top level's)
                given["t"] = _Layered((in_slice["t"], top["t"]))
    else:
        entries = config.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"models must be a list of {{model: ..., parameters: ...}}, got {entries!r}")
    sources = [_source(e, k) for k, e in enumerate(entries)]
    # (without base_model, the vocabulary compared against is the first model's: all must match)
    vocabulary.update(_tokenizer_source(config, base or sources[0][0], [m for m, _ in sources], tokenizers,
                                        base is not None, base is not None and method in ("linear", "karcher")))
    # (a per-model parameter given for all: mergekit looks it up on the model, then the slice, then the top)
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ValueError(f"parameters must be a mapping, got {given!r}")
    if "int8_mask" in given:  # (mergekit's mask memory, whatever the method: read nowhere)
        _scalar(given["int8_mask"], "parameters.int8_mask")
        given = {k: v for k, v in given.items() if k != "int8_mask"}
    for_all = {k: v for k, v in given.items() if k in PER_MODEL[method]}
    shared = _parameters({k: v for k, v in given.items() if k not in for_all},
                         {**SHARED[method], **dict.fromkeys(PER_MODEL[method])}, "parameters",
                         scheduled=("t",) if method == "slerp" else ())
    shared = {k: shared[k] for k in SHARED[method]}
    for_all = {k: _scalar(v, f"parameters.{k}") for k, v in for_all.items()}
    if "int8_mask" in config:  # (a top-level option in older configs)
        _scalar(config["int8_mask"], "int8_mask")
    if shared.get("rescale") and not method.startswith(("dare", "della")):
        raise ValueError("parameters.rescale: true rescales the kept entries by the L1 norm, which epmq does "
                         "only for DARE and DELLA")
    # (an out_dtype written empty, null, is mergekit's "none given": the output is then in dtype)
    dtype = config.get("out_dtype") or config.get("dtype")
    if isinstance(dtype, str) and dtype.startswith("torch."):  # (as mergekit reads it: torch.bfloat16 is bfloat16)
        dtype = dtype[len("torch."):]

    if method == "slerp":
        models = [m for m, _ in sources]
        if base is None or base not in models or len(models) != 2:
            raise ValueError(f"slerp interpolates from base_model to the other of two models; got base_model "
                             f"{base!r} and models {models}")
        for m, p in sources:
            _parameters(p, {}, f"models[{models.index(m)}].parameters")
        if shared["t"] is None:
            raise ValueError("slerp needs parameters.t")
        t = shared["t"]
        if not isinstance(t, (int, float)) or isinstance(t, bool):  # (a gradient or filters)
            t = Schedule(t, layers(base))
        other = models[1 - models.index(base)]
        return dict(method="slerp", base=None, models=[base, other], params=dict(t=t), dtype=dtype)

    # linear averages every model it lists, the base too (and adds the base if it is not listed)
    inputs = sources + ([(base, None)] if method in ("linear", "karcher") and base is not None
                        and base not in [m for m, _ in sources] else [])
    # (averaged as one of the models, the base still gives the output its files, as in mergekit)
    files_from = dict(files_from=base) if method in ("linear", "karcher") and base is not None else {}
    experts, per_model = [], []
    for k, (model, own) in enumerate(inputs):
        if model == base and method not in ("linear", "karcher"):  # (mergekit lists the base; not an expert)
            continue
        experts.append(model)
        where = f"models[{k}].parameters" if k < len(sources) else "base_model (added to linear's models)"
        per_model.append({**_parameters(own, PER_MODEL[method], where),
                          **{name: v for name, v in for_all.items() if name not in (own or {})}})
        if per_model[-1].get("weight", 0) is None:  # (as mergekit: no default)
            raise ValueError(f"{where}.weight is missing: {method} needs a weight for every model (or "
                             f"parameters.weight for all)")
    if not experts:
        raise ValueError("models lists no model but the base")
    weights = [float(p.get("weight", 1.0)) for p in per_model]
    if method in IGNORES_WEIGHT and any(w != 1.0 for w in weights):
        warnings.warn(f"{method}: weight is not read (mergekit's {method} ignores it too): the models count alike")
    if method == "nuslerp":
        if len(experts) != 2:
            raise ValueError(f"nuslerp interpolates two models besides the base, got {len(experts)}")
        return dict(method="nuslerp", base=base, models=experts, dtype=dtype,
                    params=dict(weights=weights, row_wise=bool(shared["nuslerp_row_wise"]),
                                flatten=bool(shared["nuslerp_flatten"])))
    if method in ("ram", "ramplus_tl", "arcee_fusion"):
        if base is None:
            raise ValueError(f"{method} needs base_model")
        if method == "arcee_fusion" and len(experts) != 1:
            raise ValueError(f"arcee_fusion fuses one other model into the base, got {len(experts)}")
        ours = {"ram": "ram", "ramplus_tl": "ram_plus", "arcee_fusion": "arcee_fusion"}[method]
        return dict(method=ours, base=base, models=experts, dtype=dtype,
                    params={k: float(v) for k, v in shared.items()})
    if method == "nearswap":
        if shared["t"] is None or base is None:
            raise ValueError("nearswap needs base_model and parameters.t")
        if len(experts) != 1:
            raise ValueError(f"nearswap moves the base toward one other model, got {len(experts)}")
        return dict(method="nearswap", base=base, models=experts, dtype=dtype, params=dict(t=float(shared["t"])))
    if method == "karcher":
        max_iter = shared["max_iter"]
        if float(max_iter) != int(max_iter):
            raise ValueError(f"parameters.max_iter must be a whole number, got {max_iter!r}")
        return dict(method="karcher", base=None, models=experts, dtype=dtype, **files_from,
                    params=dict(max_iter=int(max_iter), tol=float(shared["tol"])))
    if method == "multislerp":
        return dict(method="multislerp", base=base, models=experts, dtype=dtype,
                    params=dict(weights=weights, normalize_weights=bool(shared["normalize_weights"]),
                                eps=float(shared["eps"])))
    if method == "linear":
        # (a tolerance: weights written in decimals, 0.7 + 0.2 + 0.1, sum to 1 - 1e-16 in binary; dividing
        # by that sum moves the result far below float32's precision)
        if not shared["normalize"] and not math.isclose(sum(weights), 1.0, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError("linear with normalize: false is a weighted sum, not an average, unless the weights "
                             "sum to 1; epmq's average divides by the weights' sum")
        return dict(method="average", base=None, models=experts, dtype=dtype, params=dict(weights=weights),
                    **files_from)
    if base is None:
        raise ValueError(f"{method} needs base_model")
    if method == "model_stock":
        return dict(method="model_stock", base=base, models=experts, dtype=dtype,
                    params=dict(per_row=bool(shared["filter_wise"]), convention="mergekit"))
    if method == "sce":
        return dict(method="sce", base=base, models=experts, dtype=dtype,
                    params=dict(select_topk=float(shared["select_topk"])))

    vote = method in ("ties", "breadcrumbs_ties", "dare_ties", "della")
    if shared["normalize"] and not vote:  # (mergekit divides by the weights' sum)
        total = sum(weights)
        weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
    params = dict(scale=float(shared["lambda"]), weights=weights)
    if method == "task_arithmetic":
        if any(p["density"] != 1 for p in per_model):
            warnings.warn("task_arithmetic: density is not read (mergekit's task_arithmetic trims nothing)")
        return dict(method="task_arithmetic", base=base, models=experts, params=params, dtype=dtype)
    one = {}  # (one value, or one per model where they differ)
    for name in ("density", "gamma", "epsilon"):
        values = [float(p[name]) for p in per_model if name in p]
        if values:
            one[name] = values[0] if len(set(values)) == 1 else values
    merge = "mean" if vote and shared["normalize"] else "sum"
    params.update(density=one["density"], merge=merge, convention="mergekit")
    if method.startswith(("dare", "della")):
        ours = "dare" if method.startswith("dare") else "della"
        if any(float(p["density"]) < 1 for p in per_model):
            warnings.warn(f"{method}: {ours.upper()} drops random entries, and epmq draws its masks (seed 0) "
                          f"where mergekit draws from torch's global generator: the same merge, not the same "
                          f"tensors")
        params.update(consensus="sign" if vote else None, rescale="l1" if shared["rescale"] else None, seed=0)
        if ours == "della":
            params.update(epsilon=one["epsilon"])
        return dict(method=ours, base=base, models=experts, params=params, dtype=dtype)
    if method == "ties":
        params.update(scope="tensor")
        return dict(method="ties", base=base, models=experts, params=params, dtype=dtype)
    params.update(gamma=one["gamma"], consensus="sign" if vote else None)
    return dict(method="breadcrumbs", base=base, models=experts, params=params, dtype=dtype)
