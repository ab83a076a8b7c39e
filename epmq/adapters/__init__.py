"""Adapters: how the model walker finds the repeated blocks of a model family and drives them.

The walker quantizes a model one block at a time (GPTQ's sequential scheme). All it needs to
know about an architecture is:

* ``stacks(model)``: the runs of repeated blocks, as ``(qualified name, nn.ModuleList)`` in the
  order the forward pass reaches them (T5: encoder then decoder; CLIP: the towers). Found by
  structure: every ``ModuleList`` (or ``Sequential``, as timm's) whose children are all of one
  of ``block_types`` (class names, qualified class names, or the classes themselves), wherever
  it sits in the model.
* ``linears(block)``: the layers to quantize in a block. The rule: every ``nn.Linear`` inside a
  block. Embeddings, heads, norms, poolers, patch/conv stems and projections outside the blocks
  stay in full precision, and so do the ``routers(block)`` among the linears (MoE routers and
  gates: ``routers``). ``quantize_model(layers=...)`` narrows this per call.
* ``prepare(model, swap)``: rewrite modules whose projections are not ``nn.Linear`` (open_clip's
  ``nn.MultiheadAttention`` keeps q, k, v in one ``in_proj_weight``; GPT-2's ``Conv1D`` stores
  its weight as ``[in, out]``) into equivalent modules that use ``nn.Linear``; returns
  ``{new tensor name: original tensor name}`` so expert checkpoints (in the original naming) can
  still be read, the original name wrapped in ``Transposed`` where the checkpoint holds the
  transpose of the new tensor, or in ``Part`` where it may hold the tensor as a slice of a fused
  one (transformers 5's MoE experts) or the transpose of a slice of one (Llama 4's).
* ``stage(block, rel)``: linears of one stage are solved together (MoE experts: every expert's
  gate and up projections, then every down projection), a stage member the probe pass did not
  call included (an expert no token was routed to); None (the default): grouped by input.
  ``routes_tokens``: a block sends each token through some of its linears only (MoE), so only
  ``targets="merged_path"`` is defined.
* how a block is called: ``hidden_of(output)`` (the hidden states among a block's outputs),
  ``passthrough(hidden)`` (what a skipped block returns: the walker replaces blocks by
  stand-ins to capture inputs, and checks that each gets what the one before returned;
  ``passthrough_of(block, hidden)`` where it depends on the block), ``next_kwargs(kwargs, output)`` (keyword arguments of the next
  block, e.g. T5's position bias, computed by the first block and handed down).
* ``token_mask(model, prefix, item)``: which positions of a stack's hidden states are tokens of
  a calibration item, for models that pad without a mask (open_clip's text tower: the zeros
  after the end token); None (the default): all. Masked HF batches are cut before the walk.

To support a new family, subclass ``Adapter`` (or instantiate it, for plain blocks that take
and return hidden states) and register it::

    epmq.register_adapter(epmq.Adapter("my-net", block_types=("MyBlock",)))

Registered adapters are tried before the built-in ones. A model in which none of them finds
blocks is walked by ``AUTO`` (``auto.py``), which finds them by structure and records how the
model calls them.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import warnings

from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import nn


# What holds a stack of blocks: a ModuleList, or a Sequential (timm's ViT calls ``self.blocks(x)``).
_LISTS = (nn.ModuleList, nn.Sequential)


def named_blocks(prefix: str, blocks) -> list:
    """``(qualified name, block)`` of each block of the stack ``prefix``: ``{prefix}.{i}`` in a
    ModuleList; in an nn.Sequential built from an OrderedDict its own child names (torchvision's ViT's
    ``encoder.layers.encoder_layer_0``), which the model's state dict, its experts' and the checkpoints
    the walk writes hold."""
    return [(f"{prefix}.{key}", block) for key, block in blocks._modules.items()]


class Transposed(str):
    """A checkpoint tensor name whose tensor is the transpose of the model's (see ``prepare``)."""


class Part(str):
    """A checkpoint tensor name whose tensor a checkpoint may instead hold as a slice of a fused
    tensor: ``fused[index][slice(*rows)]`` (``rows`` None: all of it; ``index`` None: ``fused``
    itself, a 2-D tensor of fused projections as open_clip's ``in_proj_weight``), ``fused`` of shape
    ``fused_shape`` (see ``prepare``). ``transposed``: ``fused[index]`` holds the tensor's
    transpose (Llama 4's experts, ``[in, out]``), so the rows are taken from ``fused[index].T``:
    the transpose of a column slice; ``cols`` then takes columns of that transpose, a row slice
    of ``fused[index]`` (DBRX's ``w2``, ``[E * I, H]``: expert e's down projection is the
    transpose of its ``I`` rows). A checkpoint holding the tensor under ``name`` itself holds it
    as the model does (not transposed). ``saved``: where neither is held, the ``Part`` of the
    tensor that ``save_pretrained`` writes holding it (Step 3.7's experts: one ``[E, I, H]`` tensor
    per projection, ``moe.gate_proj.weight``), or None. ``order``: the slice holds the tensor's
    rows in another order, or among others, its row ``order[i]`` being the tensor's row ``i``
    (Step 3.7's vision q and k, saved for interleaved rotary pairs, which its loading permutes to
    halves; Inkling's gate and up, interleaved in one tensor), or None."""

    def __new__(cls, name, fused, index, rows, fused_shape, transposed=False, cols=None, saved=None, order=None):
        self = super().__new__(cls, name)
        self.fused, self.index, self.rows, self.fused_shape = fused, index, rows, tuple(fused_shape)
        self.transposed, self.cols, self.saved = transposed, cols, saved
        self.order = None if order is None else tuple(order)
        return self

    def __getnewargs__(self):  # (copied and pickled whole: a model keeps its walk's names)
        return (str(self), self.fused, self.index, self.rows, self.fused_shape, self.transposed, self.cols,
                self.saved, self.order)

    @property
    def where(self) -> tuple:
        """The index of this part in the fused tensor (a reader may read only it)."""
        rows, cols = (slice(None) if r is None else slice(*r) for r in (self.rows, self.cols))
        where = (cols, rows) if self.transposed else (rows, cols) if self.cols is not None else (rows,)
        return where if self.index is None else (self.index, *where)

    def take(self, fused, read: bool = False):
        """This part of ``fused`` (a view, a copy where ``order`` is given); ``read``: ``fused`` is
        ``fused[self.where]`` already."""
        part = fused if read else fused[self.where]
        part = part.t() if self.transposed else part
        return part if self.order is None else part[torch.tensor(self.order, device=part.device)]


class Adapter:
    """A model family. The defaults fit blocks called as ``block(hidden, **kwargs)`` that return
    the hidden states (or a tuple starting with them) and take the same kwargs at every depth.
    ``routes_tokens``: a block sends each token through some of its linears only (MoE)."""

    routes_tokens = False
    # the walker's stand-ins call the real blocks while it records their inputs (``auto.AUTO``)
    runs_blocks = False

    def __init__(self, name: str, block_types: tuple = ()):
        self.name = name
        if isinstance(block_types, (str, type)):
            block_types = (block_types,)
        self.block_types = tuple(block_types)
        for t in self.block_types:
            if not isinstance(t, (str, type)):
                raise TypeError(f"block_types holds class names or classes, got {t!r}")

    def is_block(self, module: nn.Module) -> bool:
        """Whether ``module`` is of one of ``block_types``: a class, a class name, or a qualified
        one (``"timm.models.eva.EvaBlock"``: for names as common as timm's ``Block``)."""
        kind = type(module)
        return any((f"{kind.__module__}.{kind.__qualname__}" if "." in t else kind.__name__) == t
                   if isinstance(t, str) else isinstance(module, t) for t in self.block_types)

    def matches(self, model: nn.Module) -> bool:
        return bool(self.stacks(model))

    def stacks(self, model: nn.Module) -> list:
        return [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, _LISTS)
            and len(module)
            and all(self.is_block(block) for block in module)
        ]

    def routes(self, stacks) -> bool:
        """Whether the blocks of ``stacks`` (this adapter's, in a model) route tokens."""
        return self.routes_tokens

    def prepare(self, model: nn.Module, swap: Callable[[str, nn.Module], None]) -> dict:
        return {}

    def linears(self, block: nn.Module) -> dict:
        """The block's linear layers: ``nn.Linear`` and its subclasses (Falcon's ``FalconLinear``)
        but MoE routers (PhiMoE's, Llama 4's), which return their top-k experts."""
        return {name: m for name, m in block.named_modules() if _is_linear(m)}

    def routers(self, block: nn.Module) -> list:
        """The block's linears that route tokens (``routers``): the walk leaves them in full
        precision and the checkpoint says so."""
        return routers(block, self.linears(block))

    def stage(self, block: nn.Module, rel: str):
        return None

    def module_alias(self, model: nn.Module, name: str):
        """The prepared model's name for a module a checkpoint names otherwise, or None."""
        return None

    def block_modules(self, model: nn.Module):
        """``(qualified name, module)`` for every module inside the blocks (for ``prepare``)."""
        for stack_name, blocks in self.stacks(model):
            for name, block in named_blocks(stack_name, blocks):
                for rel, module in list(block.named_modules()):
                    yield f"{name}.{rel}", module

    def token_mask(self, model: nn.Module, prefix: str, item):
        """Which positions of the hidden states of the stack ``prefix`` are tokens of the
        calibration ``item`` (bool ``[B, L]``), or None: all of them. Padded HF batches are cut
        before the walk (``calibration.unpad``); this is for models that pad without a mask,
        and for padded image patches (SigLIP 2's)."""
        mask = _hf_text_tower_mask(model, prefix, item)
        return mask if mask is not None else _padded_patches_mask(model, prefix, item)

    def hidden_of(self, output):
        return output[0] if isinstance(output, (tuple, list)) else output

    def passthrough(self, hidden):
        return hidden

    def passthrough_of(self, block: nn.Module, hidden):
        """What a stand-in for ``block`` returns (``passthrough``, unless blocks of one adapter
        return their hidden states differently)."""
        return self.passthrough(hidden)

    def next_kwargs(self, kwargs: dict, output) -> dict:
        return kwargs

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, block_types={self.block_types})"



def _hf_text_tower_mask(model: nn.Module, prefix: str, item):
    """The tokens of a stack inside an open_clip HF text tower (``HFTextEncoder``: the XLM-R,
    RoBERTa and mT5 CLIPs), or None. Its texts come padded to the context length with the
    tokenizer's pad id and no ``attention_mask`` (the tower makes it from the pad id), so nothing
    cuts the padding before the walk; no token attends to those positions and the mean and CLS
    poolers leave them out: they change nothing the tower returns and are no calibration tokens
    (open_clip's max pooler reads them, and ``output_tokens`` returns them: no mask there)."""
    parts = prefix.split(".")
    # (k = 0: the model itself, a tower quantized alone, as the open_clip adapter's own towers)
    owners = (model.get_submodule(".".join(parts[:k])) for k in range(len(parts) - 1, -1, -1))
    owner = next((m for m in owners if type(m).__name__ == "HFTextEncoder"), None)
    if (owner is None or getattr(owner, "output_tokens", False)
            or type(getattr(owner, "pooler", None)).__name__ not in ("MeanPooler", "ClsPooler")):
        return None
    from .builtin import _open_clip_text  # (builtin imports this module)

    text = _open_clip_text(item)
    pad = getattr(getattr(owner, "config", None), "pad_token_id", None)
    if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.is_floating_point() or pad is None:
        return None
    return text != pad


def _padded_patches_mask(model: nn.Module, prefix: str, item):
    """The real patches of a vision stack's images, or None. SigLIP 2's (NaFlex) processor
    gives each image as many patches as its aspect ratio fits and pads them to the batch's
    count, marking the real ones in ``pixel_attention_mask`` ``[B, patches]``: no patch attends
    to the padded ones and the pooling head leaves them out, so they change nothing the tower
    returns and are no calibration tokens (they were counted in every statistic). Only in a
    vision module (a class named so, the stack's owner or the model): a two-tower model's text
    stack may have as many positions."""
    mask = item.get("pixel_attention_mask") if isinstance(item, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:  # (Idefics3's is per pixel: [B, N, H, W])
        return None
    parts = prefix.split(".")
    owners = (model.get_submodule(".".join(parts[:k])) for k in range(len(parts) - 1, -1, -1))
    if not any("Vision" in type(m).__name__ for m in owners):
        return None
    return mask != 0


_REGISTRY: list = []


def register_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Make ``adapter`` known to ``quantize_model`` / ``load_quantized`` (tried before the
    built-in adapters unless ``first=False``)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected an epmq.Adapter, got {type(adapter).__name__}")
    _REGISTRY.insert(0, adapter) if first else _REGISTRY.append(adapter)
    return adapter


def find_adapter(model: nn.Module, adapter: Optional[Adapter] = None) -> Adapter:
    if adapter is not None:
        if not adapter.matches(model):
            raise ValueError(f"{adapter!r} finds no blocks in {type(model).__name__}")
        return adapter
    for candidate in _REGISTRY:
        if candidate.matches(model):
            return candidate
    if AUTO.matches(model):
        return AUTO
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) <= 1:  # (a convolutional network, its head at most)
        raise ValueError(
            f"no epmq adapter knows {type(model).__name__}: it holds "
            f"{'no linear layer' if not linears else f'one linear layer ({linears[0]})'}, and epmq quantizes "
            f"the linear layers of repeated blocks (transformers'); a convolutional network has none to quantize")
    handed = _torch_attention_outside(model, [])
    # (and timm's, open_clip's timm_pool 'abs_attn' and 'rot_attn', which call their linears)
    pools = handed + _attention_pools_outside(model, [name for name, _ in handed])
    if set(linears) <= {f"{name}.{linear}" if name else linear for name, names in pools for linear in names}:
        # (an open_clip ResNet image tower, RN50's ModifiedResNet: convolutions and an attention pool,
        # which no adapter could take, so the list of block types and how to register one misled)
        held = ", ".join(f"{name or '<root>'} ({', '.join(names)})" for name, names in pools)
        raise ValueError(
            f"no epmq adapter knows {type(model).__name__}: its linear layers are those of {held}, an attention "
            f"pool {'that hands their weights to F.multi_head_attention_forward ' if handed else ''}outside any list "
            f"of blocks, and "
            f"epmq quantizes the linear layers of repeated blocks: this convolutional network has none to quantize")
    known = sorted({getattr(t, "__name__", t) for a in _REGISTRY for t in a.block_types})
    lists = sorted(
        {
            f"{name or '<root>'} ({', '.join(sorted({type(b).__name__ for b in m}))})"
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m)
        }
    )
    raise ValueError(
        f"no epmq adapter knows {type(model).__name__}: it has no ModuleList of a known block type "
        f"({', '.join(known)}), nor of modules named *Layer or *Block holding linears, nor one repeating a "
        f"module that holds linears, nor one of a single module holding linears (epmq.adapters.AUTO); its "
        f"ModuleLists are: {', '.join(lists) or 'none'}. "
        f"Register one: epmq.register_adapter(epmq.Adapter('name', block_types=('YourBlock',))) "
        f"(see epmq/adapters/__init__.py)"
    )


def _nested(a: str, b: str) -> bool:
    """Whether module names ``a`` and ``b`` are one module or one holds the other."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def find_towers(model: nn.Module, adapter=None) -> list:
    """The adapters that walk ``model`` and the stacks each takes:
    ``[(adapter, [(stack name, nn.ModuleList)])]``.

    ``adapter`` None: every tower of the model (a VLM's vision tower and language model, an
    encoder-decoder of two families): each registered adapter in turn takes those of its stacks
    that no earlier one holds, or lies in or around. An ``Adapter``, or a list of them: those,
    which must find blocks and must not share a stack.
    """
    if adapter is None:
        towers, taken = [], []
        for candidate in _REGISTRY:
            mine = [(name, blocks) for name, blocks in candidate.stacks(model)
                    if not any(_nested(name, t) for t in taken)]
            if mine:
                towers.append((candidate, mine))
                taken += [name for name, _ in mine]
        if not towers:  # (AUTO, or the error: what the model holds, and how to register an adapter)
            fallback = find_adapter(model)
            towers = [(fallback, fallback.stacks(model))]
        return _named_stacks(model, towers)
    chosen = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]
    if not chosen:
        raise ValueError("adapter= is an empty list: give an epmq.Adapter, a list of them, or None")
    towers, owner = [], {}
    # (AUTO last, given the stacks no other adapter in the list takes: a VLM's unknown tower)
    for a in sorted(chosen, key=lambda a: a is AUTO):
        if not isinstance(a, Adapter):
            raise TypeError(f"adapter must be an epmq.Adapter (or a list of them), got {type(a).__name__}")
        if any(t is a for t, _ in towers):  # (a repeat walks nothing more: a slip in the list)
            raise ValueError(f"adapter= lists {a.name!r} twice: give each tower's adapter once")
        stacks = find_adapter(model, a).stacks(model)
        if a is AUTO:
            stacks = AUTO.stacks_beside(model, owner)
            if not stacks:
                raise ValueError(f"epmq.adapters.AUTO finds no blocks in {type(model).__name__} that the other "
                                 f"adapters given do not walk")
        for name, _ in stacks:
            other = next((o for t, o in owner.items() if _nested(name, t)), None)
            if other is not None:
                raise ValueError(f"adapters {other.name!r} and {a.name!r} both walk the blocks at {name!r}: "
                                 f"give each tower's adapter once")
            owner[name] = a
        towers.append((a, stacks))
    return _named_stacks(model, towers)


def auto_beside(model: nn.Module, towers: list, holds: Callable[[str, nn.Module], bool]) -> list:
    """``[(AUTO, stacks)]`` of the stacks AUTO takes beside ``towers`` (those ``find_towers(model)``
    gives) for which ``holds(name, blocks)``, or ``[]``: where a walk took them (adapter=[..., AUTO],
    or AUTO alone beside a tower a registered adapter finds) they hold quantized layers that no tower
    of the default holds (Aria's language model beside its vision tower)."""
    taken = [name for _, stacks in towers for name, _ in stacks]
    found = [(name, blocks) for name, blocks in AUTO.stacks_beside(model, taken) if holds(name, blocks)]
    return [(AUTO, found)] if found else []


def _named_stacks(model: nn.Module, towers: list) -> list:
    """``towers``, unless a stack is the model itself (an ``nn.Sequential`` of blocks): its
    layers would have no names of their own to report, resume or save them under."""
    if any(name == "" for _, stacks in towers for name, _ in stacks):
        raise ValueError(f"the model ({type(model).__name__}) is itself the list of blocks, which leaves them "
                         f"no names: walk a module that holds and calls it (its forward "
                         f"'return self.blocks(x)', with self.blocks = the model)")
    return towers


# The attribute holding, on a prepared model, the names ``prepare`` returned. A module it rewrote
# is not rewritten again, so a second walk (or one over a loaded checkpoint) would otherwise read
# the experts, and save the model, as if nothing had been renamed or transposed.
CHECKPOINT_NAMES = "_epmq_checkpoint_names"


def prepare_towers(model: nn.Module, towers: list, swap: Callable[[str, nn.Module], None]) -> dict:
    """Each tower's ``prepare``: ``{tensor name: checkpoint name}`` of every module rewritten, in
    this call or an earlier one (``checkpoint_names``). ``remember(model, names)`` keeps them."""
    from .attention import call_projections, hands_weights_to_torch
    from .moe import saved_linears

    names = checkpoint_names(model)
    for adapter, stacks in towers:
        # AUTO beside other adapters walks lists they leave (stacks_beside), not its own stacks
        # (GPT-2's, beside it): its prepare rewrites the blocks it walks, whose EVA attention read
        # its packed qkv's weight (NaN) and whose Conv1D and in_proj_weight stayed in full precision
        walking = getattr(adapter, "walking", None)
        adapter = adapter if walking is None else walking(stacks)
        names.update(adapter.prepare(model, swap))
        names.update({n: part for n, part in saved_linears(adapter, model, swap).items() if n not in names})
        # WavLM's attention, in whichever tower's blocks, calls its projections: done by AUTO's
        # prepare in its own stacks alone, a large encoder's beside GPT-2 (adapter=[GPT2, AUTO])
        # left them in full precision, and RTN's packed ones were read as weights, NaN
        for attention in [m for _, blocks in stacks for block in blocks for m in block.modules()
                          if hands_weights_to_torch(m)]:
            call_projections(attention)
    return names


def checkpoint_names(model: nn.Module) -> dict:
    """What ``prepare`` renamed in ``model`` so far (a copy)."""
    return dict(model.__dict__.get(CHECKPOINT_NAMES, {}))


def remember(model: nn.Module, names: dict) -> None:
    model.__dict__[CHECKPOINT_NAMES] = dict(names)


# Blocks no walk can take, and why: warned of with the reason, not told to be walked by AUTO, which
# refuses them (the walker: "are handed a cache ... that the model filled before them")
UNWALKABLE = {
    "PI05DecoderLayer": "PI05's action expert attends to the KV cache its VLM fills with the prefix, and the walk "
                        "calls each block without a cache: it cannot replay that cache to calibrate them",
}


def warn_other_towers(model: nn.Module, towers: list, chosen: bool = False,
                      selected: Optional[Callable[[str], bool]] = None) -> None:
    """Say which stacks of repeated blocks holding linears no adapter walks (a tower of a model
    newer than the adapters' lists): they stay in full precision. ``chosen``: ``towers`` are those ``adapter=``
    named, and the stacks a registered adapter knows were left by choice (LLaVA's CLIP tower beside
    ``adapter=HF_DECODERS``): not named; those none knows, and attention pools, are (not a projector's
    list, nor heads each called on an input of its own: no stacks). ``selected``: the linears ``layers=``
    selects (by qualified name); a list holding none of them was left out by choice too (Gemma 3n's audio
    tower under ``tower: language``): not named."""
    taken = [name for _, stacks in towers for name, _ in stacks]
    if chosen:
        taken += [name for candidate in _REGISTRY for name, _ in candidate.stacks(model)]

    def deselected(name) -> bool:
        return selected is not None and not any(selected(f"{name}.{inner}") for inner, m
                                                in model.get_submodule(name).named_modules() if _is_projection(m))

    def repeated(module) -> list:
        # the block types a list repeats, each holding a linear (LeViT's stages: residual layers
        # with a subsampling attention between them are repeated blocks all the same)
        # (patch mergers and projectors, each called once on what a tower hands the language model,
        # are no blocks: Qwen3-VL's DeepStack mergers were warned of, and AUTO, told to walk them, refused them)
        kinds = [type(m) for m in module if not isinstance(m, nn.Linear)
                 and not type(m).__name__.endswith(("Merger", "Projector"))
                 and any(isinstance(x, nn.Linear) for x in m.modules())]
        if len(module) == 1 and not isinstance(module[0], _LISTS):
            # (a list of one such block: a tower of one layer, as a tiny or distilled Wav2Vec2
            # large encoder's beside GPT-2, which stayed in full precision unsaid)
            return [k.__name__ for k in kinds]
        return sorted({k.__name__ for k in kinds if kinds.count(k) > 1})

    def stack(name) -> bool:
        # (a projector's own list of MLPs, MiniCPM-V's merger.mlp of DownsampleMLPs, is kept in full
        # precision as every projector, its layers of attention (Fun-ASR-Nano's) are a stack; parallel
        # heads, SAM's output_hypernetworks_mlps, hand no block's outputs to the next: AUTO, or an
        # adapter naming them, refuses them, so neither is told to be walked)
        owner, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner)
        mlps = not any("Attention" in type(m).__name__ or isinstance(m, nn.MultiheadAttention)
                       for m in owner.get_submodule(attr).modules())
        return not ((mlps and type(owner).__name__.endswith(("Merger", "Projector"))) or _apart(owner, attr))

    named = []
    for name, module in model.named_modules():
        if (isinstance(module, _LISTS) and len(module) and not any(_nested(name, t) for t in taken)
                and repeated(module) and stack(name) and not deselected(name)):
            if len(module) == 1 and (name.rpartition(".")[2] == "experts"
                                     or any(name.startswith(f"{n}.") for n in named)):
                continue  # (one expert, or a block's own list inside a tower named already)
            if len(module) == 1 and _is_attention_pool(module[0]):
                # (open_clip's timm_pool 'abs_attn' head, a Sequential of the pool alone: named below as a pool,
                # which AUTO refuses, changing the shape of its input, and no adapter could walk)
                continue
            named.append(name)
    unwalkable = [name for name in named if all(k in UNWALKABLE for k in repeated(model.get_submodule(name)))]
    named = [name for name in named if name not in unwalkable]
    # (a list inside one named already, VibeVoice's ConvNext layers in each of its downsampling
    # stages, is part of that one's count and of its remedy, not a stack of its own beside it)
    inner = {name: sorted({k for n in named if n.startswith(f"{name}.") for k in repeated(model.get_submodule(n))})
             for name in named}
    named = sorted(name for name in named if not any(name.startswith(f"{o}.") for o in named))
    others = [f"{name} ({', '.join(repeated(model.get_submodule(name)))})" for name in named]
    # (a stack's every module must be a block: a list with others between its blocks, LeViT's
    # stages' subsampling attention, is walked only by an adapter naming all its kinds)
    mixed = [(name, tuple(sorted({type(m).__name__ for m in module})))
             for name, module in model.named_modules()
             if isinstance(module, _LISTS) and len(module) > 1 and not any(_nested(name, t) for t in taken)
             and repeated(module) and len({type(m) for m in module}) > len(repeated(module)) and stack(name)
             and not deselected(name)]
    walked = ", ".join(f"{a.name}: {[name for name, _ in stacks]}" for a, stacks in towers)
    torch_pools = _torch_attention_outside(model, taken)
    pools = [f"{name} ({', '.join(linears)})" for name, linears in torch_pools]
    if pools:
        warnings.warn(f"{type(model).__name__}: the linears of {', '.join(pools)} stay in full precision: the "
                      f"module hands their weights to F.multi_head_attention_forward, outside the lists of "
                      f"blocks the walk quantizes (walked: {walked})")
    # (the lists named below are warned of whole, their attention with them)
    unsaid = taken + named + unwalkable + [name for name, _ in mixed] + [name for name, _ in torch_pools]
    pools = [f"{name} ({', '.join(linears)})" for name, linears in _attention_pools_outside(model, unsaid)]
    if pools:
        warnings.warn(f"{type(model).__name__}: the linears of {', '.join(pools)} stay in full precision: an "
                      f"attention pool after the blocks, outside the lists of blocks the walk quantizes "
                      f"(walked: {walked})")
    for name in unwalkable:
        kinds = repeated(model.get_submodule(name))
        warnings.warn(f"{type(model).__name__}: the blocks at {name} ({', '.join(kinds)}) stay in full precision: "
                      f"{'; '.join(UNWALKABLE[k] for k in kinds)} (walked: {walked})")
    if others:
        mixed_names = {name for name, _ in mixed}
        sizes = "; ".join(f"{name}: {_size(model, name)}" for name in named)
        walk = [name for name in named if name not in mixed_names]
        remedy = _walk_remedy(model, towers, walk, {name: repeated(model.get_submodule(name)) for name in walk},
                              inner) if walk else []
        remedy += [f"{name} holds other modules between its blocks, which AUTO takes for no stack: walk it with "
                   f"an adapter naming every kind it holds, adapter=[..., epmq.Adapter(name, block_types={kinds!r})]"
                   for name, kinds in mixed]
        warnings.warn(f"{type(model).__name__}: no adapter knows the blocks at {', '.join(others)}, which stay "
                      f"in full precision ({sizes}; walked: {walked}); " + "; ".join(remedy))


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _size(model: nn.Module, name: str) -> str:
    """How much of ``model`` the list ``name`` is: its blocks, its linears and their share of the
    model's linear weights (what a user weighs before walking a tower left in full precision)."""
    linears = [m for m in model.get_submodule(name).modules() if _is_projection(m)]
    total = sum(m.weight.numel() for m in model.modules() if _is_projection(m))
    share = sum(m.weight.numel() for m in linears) / max(total, 1)
    share = f"{share:.0%}" if share >= 0.005 or not share else "under 1%"
    return f"{len(model.get_submodule(name))} blocks, {len(linears)} linears, {share} of the linear weights"


def _expression(adapter: Adapter) -> str:
    """How a user names ``adapter`` in ``adapter=``: its name in ``epmq.adapters``, or the adapter
    they registered."""
    held = next((f"epmq.adapters.{name}" for name in __all__ if globals().get(name) is adapter), None)
    return held or f"<your adapter {adapter.name!r}>"


def _walk_remedy(model: nn.Module, towers: list, named: list, kinds: dict, inner: dict) -> list:
    """How to walk the stacks ``named`` (their block types ``kinds``, the types of the lists inside
    their blocks ``inner``) beside ``towers``: the ``adapter=`` list that walks them, for those that
    ``AUTO`` takes beside the others (as ``find_towers`` gives it), and the adapter to register."""
    adapters = [a for a, _ in towers]
    given = f"adapter=[{', '.join(_expression(a) for a in adapters + [AUTO])}]"
    try:
        auto = [] if AUTO in adapters else [n for a, stacks in find_towers(model, adapters + [AUTO]) if a is AUTO
                                             for n, _ in stacks]
    except ValueError:  # (AUTO finds nothing beside them)
        auto = []
    # (AUTO may take the lists inside a stack named, where the stack's own blocks are named otherwise)
    by_auto = [name for name in named if any(_nested(name, n) for n in auto)]
    rest = [name for name in named if name not in by_auto]
    remedy = []
    if by_auto:
        also = [name for name in auto if not any(_nested(name, n) for n in named)]
        remedy.append(
            f"to quantize {'them' if not rest else 'those at ' + ', '.join(by_auto)} too, walk them with "
            f"epmq.adapters.AUTO beside the adapters that walked the rest, with calibration that reaches them: {given}"
            + (f" (it walks {', '.join(also)} too)" if also else ""))
    # (a stack whose blocks hold lists of blocks of their own, VibeVoice's downsampling stages: registered,
    # both its blocks and theirs would be stacks one inside the other, so the adapter names theirs)
    register = rest or named
    nesting = [name for name in register if inner.get(name)]
    types = tuple(sorted({k for name in register for k in (inner.get(name) or kinds[name])}))
    lead = ("or register an adapter for them" if not rest else
            f"those at {', '.join(rest)} AUTO does not take beside them: register an adapter for them" if by_auto
            else "to quantize them too, register an adapter for them")
    whole = [name for name in nesting if name in auto]
    remedy.append(f"{lead}: epmq.register_adapter(epmq.Adapter('name', block_types={types!r}))"
                  + (f" (at {', '.join(nesting)}, the blocks of the lists inside the blocks"
                     + (f"; AUTO takes those at {', '.join(whole)} whole, and refuses them where they change the "
                        f"shape of their input" if whole else "") + ")" if nesting else ""))
    return remedy


def _apart(owner: nn.Module, attr: str) -> bool:
    """Whether ``owner``'s forward calls the modules of its list ``attr`` each on an input of its own
    (``self.heads[i](x[:, i])``, or ``m = self.heads[i]`` then ``m(x[:, i])``: SAM's hypernetwork
    MLPs, one per mask token) or all on one input (``[head(x) for head in self.heads]``), as heads,
    not one after another as blocks; False where its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(owner).forward)))
    except (OSError, TypeError, SyntaxError):
        return False

    def listed(node) -> bool:  # self.<attr>
        return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
                and node.value.id == "self")

    def names(node) -> set:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    # names bound to one module of the list by its index: m = self.<attr>[i] -> i
    indexed = {node.targets[0].id: node.value.slice for node in ast.walk(tree)
               if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
               and isinstance(node.value, ast.Subscript) and listed(node.value.value)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp)) and not any(
                isinstance(n, ast.NamedExpr) for n in ast.walk(node.elt)):  # (x := block(x): one after another)
            for loop in node.generators:
                called = {c.func.id for c in ast.walk(node.elt) if isinstance(c, ast.Call)
                          and isinstance(c.func, ast.Name)}
                if any(listed(n) for n in ast.walk(loop.iter)) and called & names(loop.target):
                    return True
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            index = (f.slice if isinstance(f, ast.Subscript) and listed(f.value)
                     else indexed.get(f.id) if isinstance(f, ast.Name) else None)
            # (its first input a part taken by the module's own index: a block's first is what the
            # block before it returned, the rest, a layer's cache or head mask, may be indexed so)
            first = node.args[0]
            if (index is not None and names(index) and isinstance(first, ast.Subscript)
                    and names(index) & names(first.slice)):
                return True
    return False


def _torch_attention_outside(model: nn.Module, taken: list) -> list:
    """``[(name, [linear names])]`` of the modules outside the stacks ``taken`` that hand their own
    linears' weights to ``F.multi_head_attention_forward`` instead of calling them (open_clip's and
    OpenAI CLIP's ``AttentionPool2d``, the ResNet image towers' pooling: q, k, v and c projections)."""
    found = []
    for name, module in model.named_modules():
        linears = [n for n, m in module.named_children() if isinstance(m, nn.Linear)]
        if (not linears or isinstance(module, nn.MultiheadAttention)
                or any(_nested(name, t) for t in taken)):
            continue
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):  # (no source to read: a compiled or dynamically made class)
            continue
        if "multi_head_attention_forward" in source:
            found.append((name, linears))
    return found


# The attention pools of open_clip's and timm's image towers, after their blocks (a learned query attending to every
# token; their output the image features): open_clip's AttentionalPooler (CoCa), timm's AttentionPoolLatent (the MAP
# heads of SigLIP and PE-Core), AttentionPool2d and RotAttentionPool2d. (HF's *AttentionPoolingHead, SigLIP's,
# SigLIP 2's, AIMv2's, only where the model returns its output: see _pooled_output_returned.)
_ATTENTION_POOL = re.compile(r"Attention\w*Pool|AttnPool")
_HF_POOLING_HEAD = re.compile(r"AttentionPoolingHead$")


def _is_attention_pool(module: nn.Module) -> bool:
    kind = type(module)
    return bool(_ATTENTION_POOL.search(kind.__name__)) and kind.__module__.partition(".")[0] in ("open_clip", "timm")


def _is_hf_pooling_head(module: nn.Module) -> bool:
    kind = type(module)
    return bool(_HF_POOLING_HEAD.search(kind.__name__)) and kind.__module__.partition(".")[0] == "transformers"


def _pooled_output_returned(model: nn.Module, name: str) -> bool:
    """Whether what ``model`` returns holds the output of the HF pooling head ``name``: ``model`` holds
    the head itself (a SiglipVisionModel's ``pooler_output``), or its forward reads the ``pooler_output``
    of its child that holds it (SiglipModel's image embeddings). A VLM's SigLIP tower, deeper, computes
    the head but its language model reads the hidden states, and SiglipForImageClassification averages
    them: there the head's output is never read, and naming it would be noise."""
    owner = name.rpartition(".")[0]
    if not owner:
        return True
    if "." in owner:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(model).forward)))
    except (OSError, TypeError, SyntaxError):
        return False

    def called(node) -> bool:  # self.<owner>(...)
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == owner
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")

    # names bound to the owner's outputs: outputs = self.<owner>(...) (annotated or not)
    bound = {node.targets[0].id if isinstance(node, ast.Assign) else node.target.id for node in ast.walk(tree)
             if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                 or isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) and called(node.value)}
    return any(isinstance(node, ast.Attribute) and node.attr == "pooler_output"
               and (called(node.value) or isinstance(node.value, ast.Name) and node.value.id in bound)
               for node in ast.walk(tree))


def _attention_pools_outside(model: nn.Module, taken: list) -> list:
    """``[(name, [linear names])]`` of the open_clip and timm attention pools (and HF's pooling heads
    whose output ``model`` returns) outside the modules ``taken`` and the linears inside them, an
    ``nn.MultiheadAttention``'s projection weights among them: a block's worth of weights after the
    blocks, which the walk never reaches."""
    found = []
    for name, module in model.named_modules():
        if any(_nested(name, t) for t in taken) or not (
                _is_attention_pool(module) or _is_hf_pooling_head(module) and _pooled_output_returned(model, name)):
            continue
        linears = []
        for rel, m in module.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                linears += [f"{rel}.{p}" for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                            if getattr(m, p, None) is not None]
            elif isinstance(m, nn.Linear):
                linears.append(rel)
        if linears:
            found.append((name, linears))
    return found


from .builtin import (BART, CLIP_HF, CONFORMERS, DEBERTA_V2, GPT2, HF_DECODERS, HF_ENCODERS, LONGT5,  # noqa: E402
                      OPEN_CLIP, SWIN, T5, TIMM, WAVLM)
from .moe import DSA_MOE_DECODERS, MOE_DECODERS  # noqa: E402
from .auto import AUTO  # noqa: E402

for _adapter in (OPEN_CLIP, CLIP_HF, T5, LONGT5, BART, GPT2, HF_DECODERS, MOE_DECODERS, DSA_MOE_DECODERS, HF_ENCODERS,
                 CONFORMERS, WAVLM, DEBERTA_V2, SWIN, TIMM):
    register_adapter(_adapter, first=False)

__all__ = ["Adapter", "Transposed", "Part", "register_adapter", "find_adapter", "find_towers", "OPEN_CLIP",
           "CLIP_HF", "T5", "LONGT5", "BART", "SWIN", "TIMM", "GPT2", "HF_DECODERS", "MOE_DECODERS", "DSA_MOE_DECODERS",
           "HF_ENCODERS", "CONFORMERS", "WAVLM", "DEBERTA_V2", "AUTO", "routers"]


# the class names of the modules that choose experts (DBRX's ``DbrxRouter``, JetMoE's
# ``JetMoeTopKGating``, Gemma 4's ``Gemma4TextRouter``; not Moshi's ``MoshiGatingMLP``)
_ROUTER = re.compile(r"router|gating$", re.IGNORECASE)


def _experts_count(name: str, module: nn.Module):
    """How many experts ``module`` holds, if it is a block's experts (a list named ``experts``,
    or a module holding them by number, fused or rebuilt as linears), else None."""
    if name.rpartition(".")[2] != "experts":
        return None
    count = len(module) if isinstance(module, _LISTS) else getattr(module, "num_experts", None)
    return count if isinstance(count, int) else None


def routers(block: nn.Module, linears: dict) -> list:
    """Which of ``linears`` (``{name in the block: linear}``) route tokens to experts: those
    inside a router (a module whose class name says so) and, beside a block's experts, a linear
    of one output (Qwen2-MoE's ``shared_expert_gate``) or one of as many outputs as there are
    experts alone in its module (Hunyuan's ``gate.wg``). They stay in full precision: they are a
    sliver of the weights, a rounding error there sends tokens to other experts, and GPTQModel,
    llm-compressor's recipes and vLLM (which builds them unquantized) leave them so."""
    modules = dict(block.named_modules())
    experts = {}  # a module holding experts -> (the experts' child name, their count)
    for name, module in modules.items():
        count = _experts_count(name, module)
        if count:
            parent, _, child = name.rpartition(".")
            experts[parent] = (child, count)
    found = []
    for rel, linear in linears.items():
        parts = rel.split(".")
        path = [".".join(parts[:k]) for k in range(len(parts) + 1)]  # "", "mlp", "mlp.gate", "mlp.gate.wg"
        if any(_ROUTER.search(type(modules[name]).__name__) for name in path[1:] if name in modules):
            found.append(rel)
            continue
        for holder in path[:-1]:
            if holder not in experts:
                continue
            child, count = experts[holder]
            below = rel[len(holder) + 1:] if holder else rel
            top = below.split(".")[0]
            if top == child:
                continue
            alone = sum(isinstance(m, nn.Linear) for m in modules[f"{holder}.{top}" if holder else top].modules()) == 1
            if linear.out_features == 1 or (linear.out_features == count and alone):
                found.append(rel)
                break
    return found


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a subclass that computes what it does (Falcon's ``FalconLinear``):
    not a router (routers subclass ``nn.Linear`` to return their top-k experts, and a
    ``QuantLinear`` in their place would return a tensor), nor one whose own ``forward`` computes
    something else from its weight (DeepSeek-V4's block-diagonal ``DeepseekV4GroupedLinear``)."""
    if not isinstance(module, nn.Linear):
        return False
    if type(module).forward is nn.Linear.forward:
        return True
    return "router" not in type(module).__name__.lower() and _computes_linear(module)


_COMPUTES_LINEAR: dict = {}  # an nn.Linear subclass with its own forward -> whether it is x W^T + b


def _computes_linear(module: nn.Linear) -> bool:
    """Whether ``module``'s class computes ``x W^T + b`` (tried once per class on 3 random rows;
    a weight not in memory, on the meta device, is taken at its word)."""
    kind = type(module)
    if kind not in _COMPUTES_LINEAR:
        W, b = module.weight, module.bias
        if W.is_meta:
            return True
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(W.device, W.dtype)
        try:
            with torch.no_grad():  # (a product asking for a derivative warns when read as a number: -W error)
                y = module(x)
                want = torch.nn.functional.linear(x.float(), W.float(), None if b is None else b.float())
            atol = 1e-2 * float(want.abs().max())
            _COMPUTES_LINEAR[kind] = (isinstance(y, torch.Tensor) and y.shape == want.shape
                                      and torch.allclose(y.float(), want, rtol=1e-2, atol=atol))
        except Exception:  # (any failure on a plain [rows, in_features] input: not a linear layer's call)
            _COMPUTES_LINEAR[kind] = False
        if not _COMPUTES_LINEAR[kind]:
            warnings.warn(f"{kind.__name__} subclasses nn.Linear but its forward computes something else from its "
                          f"weight: layers of it stay in full precision")
    return _COMPUTES_LINEAR[kind]
