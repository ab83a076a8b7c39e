"""The fallback adapter: the blocks of a family no other adapter knows, found by structure, and
their calling convention taken from the model's own calls rather than assumed.

Block-by-block quantizers either list each family they support (GPTQModel's model definitions)
or find the blocks by name and trust that each block takes the output of the one before. ``AUTO``
finds them by structure and checks what it relies on:

* the stacks: the outermost ``ModuleList``s (or ``Sequential``s) of modules whose class names
  end in ``Layer``, ``Block`` or ``CrossAttention`` (transformers' ``*DecoderLayer``, ``*EncoderLayer``,
  ``*Block``; timm's and open_clip's blocks; torch's ``TransformerEncoderLayer``; BLT's lists of
  ``BltCrossAttention`` beside its layers), each holding a
  linear layer; in a model with none, the outermost lists of two or more modules of one class,
  each holding a linear layer (XLM's lists of attentions and of feed-forward layers), and in one
  with none of those either, the lists of one such module (a model of one layer);
* while the walker records a stack's inputs, the stand-ins call the real blocks
  (``runs_blocks``), so every block is recorded with what the model gives it at that depth,
  keyword arguments the model takes from an earlier block's outputs included (T5's position
  bias, computed by the first block); the walker's own checks (each block gets what the one before
  it returned, or its input is taken from the model; every block is called once, in order) hold
  as for any adapter;
* each block must return hidden states of its input's shape, alone or first in a tuple or list
  (else the walk is refused, naming the blocks);
* a stand-in that skips a block later returns what the block returned then, its hidden states in
  place of the first element (``passthrough_of``).

Projections held otherwise than in an ``nn.Linear`` are rebuilt as the built-in adapters rebuild
them: fused mixture-of-experts parameters in transformers' usual layout as one linear per expert
(``MOE_DECODERS``), GPT-2's ``Conv1D`` as ``nn.Linear`` (``GPT2``), ``nn.MultiheadAttention`` as
q, k and v linears (``LinearCrossAttention``, as in CoCa's decoder), open_clip's own ``Attention`` on
an ``nn.Linear`` ``in_proj`` (``LinearInProjAttention``, as ``OPEN_CLIP``), EVA's q/v-bias attention in
its ``qkv(x) + bias`` form (``TIMM``); WavLM's attention, which hands its projections' weights to
``F.multi_head_attention_forward``, is made to call them (``attention.call_projections``, by
``prepare_towers`` in every tower's blocks). Other
fused experts stay in full precision, named by the
walker's warning.

``find_towers`` falls back on ``AUTO`` only for a model in which no registered adapter finds any
blocks: a known language model beside an unknown vision tower keeps the tower in full precision,
as warned, unless ``adapter=[..., epmq.adapters.AUTO]`` asks for both (``AUTO`` then takes the
stacks the others leave); ``adapter=epmq.adapters.AUTO`` alone walks every stack it finds.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from . import _LISTS, _is_attention_pool, _nested
from .attention import applies_in_proj_weight
from .builtin import separate_qv_bias, swap_conv1d, swap_cross_attention, swap_in_proj_attention
from .moe import MoEAdapter, is_fused_experts, is_split_experts, rebuild_experts

# the class-name endings of the blocks AUTO walks (heads, projectors, experts, stages: not blocks);
# a list of cross-attentions beside a list of layers is a stack too (BLT's local encoder and decoder
# call theirs between their layers: left out, they stayed in full precision)
BLOCK_SUFFIXES = ("Layer", "Block", "CrossAttention")


def _holds_linear(module: nn.Module) -> bool:
    # (a packed layer too: a quantized model's blocks are found again to save or load it)
    return any(isinstance(m, (nn.Linear, nn.MultiheadAttention)) or type(m).__name__ == "Conv1D"
               or hasattr(m, "qweight") for m in module.modules())


def _routes(block: nn.Module) -> bool:
    """Whether a block holds routed experts: fused 3-D expert parameters or a list named ``experts``."""
    return any(is_fused_experts(m) or is_split_experts(m) or name.rpartition(".")[2] == "experts"
               for name, m in block.named_modules())


def _outermost(model: nn.Module, is_stack) -> list:
    """``[(name, list)]`` of the lists of ``model`` that ``is_stack(name, list)``, none inside another."""
    found = []
    for name, module in model.named_modules():
        if (isinstance(module, _LISTS) and is_stack(name, module)
                and not any(name.startswith(f"{outer}.") for outer, _ in found)):
            found.append((name, module))
    return found


def _repeats_one_module(name: str, module, fewest: int = 2) -> bool:
    """Whether a list holds ``fewest`` or more modules of one class, each holding a linear (not
    linears themselves, nor routed experts)."""
    kinds = {type(m) for m in module}
    return (len(module) >= fewest and len(kinds) == 1
            and not isinstance(module[0], (_LISTS, nn.Linear, nn.MultiheadAttention))
            and type(module[0]).__name__ != "Conv1D" and name.rpartition(".")[2] != "experts"
            and all(_holds_linear(m) for m in module))


def _one_layer_lists(model: nn.Module) -> list:
    """The outermost lists of one module holding linears: where no list repeats one, a model of
    one layer (a tiny or distilled Wav2Vec2 large encoder: its one Wav2Vec2EncoderLayerStableLayerNorm
    was refused as known to no adapter, where two are walked)."""
    # (not an attention pool alone in its list, open_clip's timm_pool 'abs_attn' head: it changes the shape of its
    # input, a block of no walk)
    return _outermost(model, lambda name, module: _repeats_one_module(name, module, fewest=1)
                      and not _is_attention_pool(module[0]))


class AutoAdapter(MoEAdapter):
    """Blocks found by structure, called as the model calls them (see the module docstring)."""

    runs_blocks = True
    routes_tokens = False

    def __init__(self, name: str = "auto"):
        super().__init__(name)
        # what each block returned when its stand-in called it: (tuple or list, its length)
        self._returned = weakref.WeakKeyDictionary()

    def is_block(self, module: nn.Module) -> bool:
        return (type(module).__name__.endswith(BLOCK_SUFFIXES) and not isinstance(module, (_LISTS, nn.Linear))
                and _holds_linear(module))

    def stacks(self, model: nn.Module) -> list:
        found = _outermost(model, lambda name, module: len(module) and all(self.is_block(b) for b in module))
        # where no block is named so, lists repeating one module that holds linears (XLM's attentions
        # and feed-forward layers, a large speech encoder's *EncoderLayerStableLayerNorm no adapter lists): only
        # then, as other lists of repeated modules beside named blocks
        # (detection heads) are no blocks to walk one by one
        return found or _outermost(model, _repeats_one_module) or _one_layer_lists(model)

    def stacks_beside(self, model: nn.Module, taken) -> list:
        """The stacks AUTO walks beside other adapters' at ``taken`` (``adapter=[..., AUTO]``): its
        own that none of them holds; where they hold them all, the lists repeating one module that
        holds linears that they leave (a large speech encoder no adapter lists beside a GPT-2 decoder, which
        ``warn_other_towers`` tells to walk so)."""
        found = [(name, blocks) for name, blocks in self.stacks(model) if not any(_nested(name, t) for t in taken)]
        return found or [(name, blocks) for name, blocks in _outermost(model, _repeats_one_module)
                         if not any(_nested(name, t) for t in taken)] or [
            (name, blocks) for name, blocks in _one_layer_lists(model) if not any(_nested(name, t) for t in taken)]

    def walking(self, stacks) -> "AutoAdapter":
        """AUTO whose stacks are ``stacks``, those ``find_towers`` gave it (beside other adapters:
        ``stacks_beside``, not its own), for ``prepare_towers``: it prepares the blocks it walks."""
        walking = copy.copy(self)
        walking.stacks = lambda model: list(stacks)
        return walking

    def routes(self, stacks) -> bool:
        return any(_routes(block) for _, blocks in stacks for block in blocks)

    def prepare(self, model, swap):
        separate_qv_bias(self, model)
        renames = swap_conv1d(self, model, swap)
        renames.update(rebuild_experts(self, model, swap, known_call_only=True))
        renames.update(self.swap_attention(list(self.block_modules(model)), swap))
        for encoder in model.modules():
            if isinstance(encoder, nn.TransformerEncoder) and not all(
                    isinstance(getattr(layer, "self_attn", None), nn.MultiheadAttention) for layer in encoder.layers):
                # its nested-tensor fast path (eval, with a padding mask) reads the fused
                # in_proj_weight the rebuilt attention no longer has; off, padded positions are
                # computed (not zeros) and the others are the same
                encoder.use_nested_tensor = False
        return renames

    def swap_attention(self, modules, swap) -> dict:
        """The attentions among ``modules`` (``[(name, module)]``) that apply their projections'
        weights themselves rebuilt on linears: ``nn.MultiheadAttention`` (``LinearCrossAttention``)
        and open_clip's ``Attention`` (``LinearInProjAttention``); their checkpoint names."""
        renames = {}
        for name, module in modules:
            # (as cross-attention: whether a block calls it on one tensor is not known before)
            if isinstance(module, nn.MultiheadAttention):
                renames.update(swap_cross_attention(name, module, swap))
            elif applies_in_proj_weight(module):  # (open_clip's custom blocks' attention)
                renames.update(swap_in_proj_attention(name, module, swap))
        return renames

    def returned(self, block: nn.Module, hidden: torch.Tensor, output) -> str:
        """Learn what ``block`` returns; a description of what is wrong with it as a block
        (``""``: nothing)."""
        h = self.hidden_of(output)
        if not isinstance(h, torch.Tensor) or h.shape != getattr(hidden, "shape", None):
            what = f"a {type(output).__name__}" if not isinstance(h, torch.Tensor) else f"shape {tuple(h.shape)}"
            return (f"its blocks ({type(block).__name__}) return {what} for hidden states of shape "
                    f"{tuple(getattr(hidden, 'shape', ()))}")
        if isinstance(output, (tuple, list)):
            self._returned[block] = type(output), len(output)
        return ""

    def passthrough_of(self, block, hidden):
        kind, n = self._returned.get(block, (None, 0))
        if not kind:
            return hidden
        fields = [hidden, *[None] * (n - 1)]
        # (a named tuple, Reformer's ReformerOutput, takes its fields one by one, not as a list)
        return kind._make(fields) if hasattr(kind, "_make") else kind(fields)


AUTO = AutoAdapter()
