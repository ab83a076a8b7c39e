"""Mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, Llama 4, ...).

transformers 5 keeps a block's experts in two 3-D parameters, ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, and runs them in a routing loop. ``LinearExperts`` is the same module
with one small MLP of ``nn.Linear`` per expert, named as the checkpoints on the hub (and
``save_pretrained``) store them (``experts.{e}.gate_proj``, Mixtral ``experts.{e}.w1``), so each
expert's projections are quantized, saved and served like any linear. Each takes only the
tokens routed to it: its statistics are those of its own tokens, and an expert no calibration
token reached is rounded to nearest (the walker warns).

Llama 4 (``Llama4TextExperts``) stores the transpose, ``gate_up_proj [E, H, 2I]`` and
``down_proj [E, I, H]`` (its checkpoints too), and routes densely: its MoE block hands the
experts every token once per expert, pre-scaled by the router score, which is zero where the
token is not routed. ``Llama4LinearExperts`` holds transposed views and gives each expert only
its nonzero rows, its tokens; the per-expert names are those of Llama 4's quantized checkpoints
on the hub (``feed_forward.experts.{e}.gate_proj``, ``up_proj``, ``down_proj``).

The walker solves the experts of a block in two stages (``MoEAdapter.stage``): every expert's
gate and up projections, which read the block's routed hidden states, then every down
projection; not one group per expert, which would cost a calibration pass per expert.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from typing import Optional

import torch
from torch import nn

from . import Adapter, Part

# Per experts class: the names of an expert's (gate, up, down) projections in checkpoints (those
# transformers' conversion mapping reads into the fused parameters, and writes back on saving:
# ``.experts.*.w1.weight`` for Mixtral's and the families that share its layout), where the
# model's own mapping does not say (``saved_names``: no transformers model, experts saved fused).
_W1_W3_W2 = ("w1", "w3", "w2")
PROJECTION_NAMES = {**{name: _W1_W3_W2 for name in ("MixtralExperts", "PhimoeExperts", "MiniMaxExperts",
                                                    "MiniMaxM2Experts", "KimiLinearExperts", "Lfm2MoeExperts",
                                                    "DeepseekV4Experts", "MistralLarge4TextExperts")},
                    "DbrxExperts": ("w1", "v1", "w2")}
DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


# the attribute holding, on a fused experts module, the names ``saved_names`` found for it
SAVED_NAMES = "_epmq_saved_names"


def _names(fused: nn.Module) -> tuple:
    """The names of an expert's projections in checkpoints: gate, up, down (Mixtral's w1, w3,
    w2), or up and down for experts without a gate (Nemotron-H's ``up_proj [E, I, H]``): those
    ``saved_names`` found for the module, else its class's."""
    if fused.__dict__.get(SAVED_NAMES) is not None:
        return fused.__dict__[SAVED_NAMES]
    if not isinstance(getattr(fused, "gate_up_proj", None), torch.Tensor):
        return DEFAULT_NAMES[1:]
    return PROJECTION_NAMES.get(type(fused).__name__, DEFAULT_NAMES)


def _saved_as(model: nn.Module, name: str, shape, rename) -> Optional[list]:
    """``[(name, shape)]`` of the tensors ``save_pretrained`` writes for ``model``'s tensor ``name``
    of ``shape`` (transformers' own ``revert_weight_conversion`` on a meta tensor), named as
    ``from_pretrained`` renames them (``rename``: ``key_renaming(model)``, or None); None for no
    transformers model, or a converter that cannot run on meta tensors."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        saved = revert_weight_conversion(model, {name: torch.empty(shape, device="meta")})
    except Exception:  # (a converter that cannot run on meta tensors)
        return None
    return [(key if rename is None else rename(key), tuple(t.shape)) for key, t in saved.items()]


def saved_names(model: nn.Module, name: str, fused: nn.Module, rename) -> Optional[tuple]:
    """The names ``save_pretrained`` gives an expert's projections of the fused experts ``name``
    in ``model`` (gate, up, down, or up and down), found by transformers' own
    ``revert_weight_conversion`` on meta tensors of the fused parameters, its keys read back as
    ``from_pretrained`` renames them. The experts class alone does not say: MiniMax-M3's VL model
    saves its experts as ``.experts.{e}.w1.weight``, its text model, of the same class, fused.
    None where no tensor per expert is written (fused, stacked by projection), or none of the
    expected shape; not a transformers model."""
    gated = isinstance(getattr(fused, "gate_up_proj", None), torch.Tensor)
    expert = re.compile(re.escape(name) + r"\.0\.(\w+)\.weight")
    names = []
    # (one fused parameter at a time: gate and up are the two halves of gate_up_proj, in order)
    for param, count in ((("gate_up_proj", 2),) if gated else (("up_proj", 1),)) + (("down_proj", 1),):
        saved = _saved_as(model, f"{name}.{param}", getattr(fused, param).shape, rename)
        if saved is None:
            return None
        found = [(m.group(1), shape) for key, shape in saved if (m := expert.fullmatch(key)) is not None]
        if len(found) != count:
            return None
        names += found
    parts = _rebuilt_as(fused).parts(fused, 0)
    if any(saved_shape != (part.take(torch.empty(part.fused_shape, device="meta")).shape)
           for (_, saved_shape), part in zip(names, parts)):
        return None  # (held transposed, or otherwise than the linears: read fused)
    return tuple(n for n, _ in names)


def saved_stacks(model: nn.Module, parts: tuple, rename) -> Optional[list]:
    """For each of an expert's ``parts`` (gate, up, down: expert 0's, named in ``model``), the name,
    shape, rows and row order (``Part``'s) of the tensor ``save_pretrained`` writes holding it
    where that is one tensor per projection for all experts (``[E, I, H]``: Step 3.7's
    ``moe.gate_proj.weight`` and ``moe.up_proj.weight``, which its conversion mapping concatenates
    into ``gate_up_proj``), or the fused tensor under another name, each expert's rows in another
    order (Inkling's ``experts.w13_weight``, gate's and up's rows interleaved), else None (fused
    as the module holds it); None where the mapping writes none of these."""
    out = []
    for param in dict.fromkeys(part.fused for part in parts):
        mine = [part for part in parts if part.fused == param]
        saved = _saved_as(model, param, mine[0].fused_shape, rename)
        if saved is None:
            return None
        if [key for key, _ in saved] == [param]:
            out += [None] * len(mine)
            continue
        if len(saved) == 1 and saved[0][1] == mine[0].fused_shape and not mine[0].transposed:
            held = _stacked_rows(model, param, mine[0].fused_shape)
            if held is None:
                return None
            if torch.equal(held, torch.arange(len(held))):  # (renamed alone: read under the model's name)
                out += [None] * len(mine)
                continue
            position = torch.argsort(held)  # (the saved row holding each of the module's rows)
            for part in mine:
                rows = position[slice(*part.rows) if part.rows is not None else slice(None)]
                start, stop = int(rows.min()), int(rows.max()) + 1
                in_order = stop - start == len(rows) and torch.equal(rows, torch.arange(start, stop))
                out.append((*saved[0], (start, stop), None if in_order else (rows - start).tolist()))
            continue
        # (one tensor per part, in order, each expert's [out, in] stacked: gate and up are the halves)
        shapes = [(mine[0].fused_shape[0], *part.take(torch.empty(part.fused_shape, device="meta")).shape)
                  for part in mine]
        if mine[0].transposed or [shape for _, shape in saved] != shapes:
            return None
        out += [(key, shape, None, None) for key, shape in saved]
    return out if any(out) else None


def _stacked_rows(model: nn.Module, name: str, shape) -> Optional[torch.Tensor]:
    """For ``model``'s fused experts tensor ``name`` of ``shape`` (``[E, R, ...]``) saved as one
    tensor of that shape, the module's row each saved row of an expert holds (transformers' own
    ``revert_weight_conversion`` on an index of each expert's rows, one column: not an index as
    large as the experts); None where the saved tensor is not every expert's rows alike reordered."""
    from transformers.core_model_loading import revert_weight_conversion

    experts, rows = shape[0], shape[1]
    index = torch.arange(experts * rows).view(experts, rows, 1)
    try:
        saved = list(revert_weight_conversion(model, {name: index}).values())
    except Exception:  # (a converter that cannot take integer tensors, or one column)
        return None
    if len(saved) != 1 or tuple(saved[0].shape) != (experts, rows, 1):
        return None
    held = saved[0][:, :, 0]
    if (not torch.equal(held, held[:1] + rows * torch.arange(experts)[:, None])
            or not torch.equal(held[0].sort().values, torch.arange(rows))):
        return None
    return held[0]


class _Expert(nn.Module):
    """One expert's projections: gate, up and down, or up and down (experts without a gate)."""

    def __init__(self, linears, names):
        super().__init__()
        self.names = tuple(names)
        for name, linear in zip(names, linears):
            self.add_module(name, linear)

    def projections(self):
        return tuple(getattr(self, name) for name in self.names)


class _FusedGate(nn.Module):
    """A fused experts module's own gate (its ``_apply_gate``: a clamped SwiGLU, a product in
    fp32), applied to an expert's gate and up outputs concatenated as its fused projection gives
    them. It holds the module's settings (limits, ``act_fn``), not its weights."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.apply_gate = type(fused)._apply_gate
        for key, value in vars(fused).items():
            if not key.startswith("_") and key != "training" and not isinstance(value, torch.Tensor):
                setattr(self, key, value)
        for key, module in fused.named_children():
            self.add_module(key, module)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.apply_gate(self, torch.cat([gate, up], dim=-1))


def _custom_gate(fused: nn.Module) -> bool:
    gate = getattr(type(fused), "_apply_gate", None)
    return gate is not None and gate.__name__ != "_default_apply_gate"


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``weight`` itself, a view of the fused parameter: the
    walker keeps the fused module (to restore it if quantization fails), so a copy would hold
    every expert twice."""
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return linear


class JoinedLinear(nn.Module):
    """A linear that checkpoints hold as blocks of rows under names of their own (MiniMax-M3 VL's
    ``mlp.gate_up_proj``, saved as ``gate_proj`` and ``up_proj``), called as the fused linear was:
    the blocks' outputs concatenated. The blocks are linears of its owner, under those names, so
    each is read, quantized and saved as the checkpoints name it."""

    def __init__(self, owner: nn.Module, blocks):
        super().__init__()
        # (the owner's children, looked up at each call: the walk replaces them with packed ones)
        self.__dict__["owner"], self.blocks = owner, tuple(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self.owner, block)(x) for block in self.blocks], dim=-1)


def _saved_rows(model: nn.Module, name: str, linear: nn.Linear, rename) -> Optional[list]:
    """``[(child name, rows)]`` where ``save_pretrained`` writes the linear ``name`` of ``model``
    as blocks of rows beside it (``{owner}.{child}.weight``, and bias), in order; else None."""
    from transformers.core_model_loading import revert_weight_conversion

    owner = name.rpartition(".")[0]
    found = []
    for kind, tensor in (("weight", linear.weight), ("bias", linear.bias)):
        if tensor is None:
            continue
        try:
            saved = revert_weight_conversion(model, {f"{name}.{kind}": torch.empty(tensor.shape, device="meta")})
        except Exception:  # (a converter that cannot run on meta tensors)
            return None
        block = re.compile(re.escape(owner) + r"\.(\w+)\." + kind)
        rows = [(m.group(1), t.shape[0]) for key, t in saved.items()
                if (m := block.fullmatch(rename(key))) is not None and tuple(t.shape[1:]) == tuple(tensor.shape[1:])]
        if len(rows) < 2 or len(rows) != len(saved) or sum(r for _, r in rows) != tensor.shape[0]:
            return None
        if found and rows != found:
            return None
        found = rows
    return found


def split_saved_linears(adapter: Adapter, model: nn.Module, swap, layout) -> dict:
    """Linears inside ``adapter``'s blocks that ``save_pretrained`` writes as blocks of rows
    (transformers' conversion mapping fuses them on loading: MiniMax-M3 VL's ``gate_up_proj`` of
    its dense MLPs and shared experts, saved as ``gate_proj`` and ``up_proj``) held as one
    ``nn.Linear`` per block, each under its saved name, viewing the fused weight (their owner
    replaced by a copy holding them, its fused linear a ``JoinedLinear``): an expert directory
    holds no tensor of the fused name, and engines read the quantized blocks under the saved ones.
    A checkpoint that holds the fused tensor is read by rows (``Part``). ``layout``:
    ``saved_layout(model)``."""
    from ..checkpoint_io import key_renaming

    rename = key_renaming(model) or (lambda key: key)
    split = {}  # owner -> {fused linear's name in it: its blocks}
    for name, module in list(adapter.block_modules(model)):
        owner, _, attr = name.rpartition(".")
        if type(module) is not nn.Linear or not owner or layout.group(f"{name}.weight") is None:
            continue
        rows = _saved_rows(model, name, module, rename)
        if rows is not None and not any(hasattr(model.get_submodule(owner), child) for child, _ in rows):
            split.setdefault(owner, {})[attr] = rows
    renames = {}
    for owner, linears in split.items():
        old = model.get_submodule(owner)
        new = copy.copy(old)  # (its own registries: the original is restored whole if the walk fails)
        new._parameters, new._buffers = dict(old._parameters), dict(old._buffers)
        new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
        new._modules = {}
        for attr, module in old._modules.items():
            if attr not in linears:
                new._modules[attr] = module
                continue
            first = 0
            for child, rows in linears[attr]:
                block = _linear(module.weight[first:first + rows])
                if module.bias is not None:
                    block.bias = nn.Parameter(module.bias[first:first + rows], requires_grad=module.bias.requires_grad)
                new._modules[child] = block
                for kind in ("weight",) + (("bias",) if module.bias is not None else ()):
                    renames[f"{owner}.{child}.{kind}"] = Part(f"{owner}.{child}.{kind}", f"{owner}.{attr}.{kind}",
                                                             None, (first, first + rows),
                                                             getattr(module, kind).shape)
                first += rows
            new._modules[attr] = JoinedLinear(new, [child for child, _ in linears[attr]]).train(module.training)
        swap(owner, new)
    return renames


def _transposed(source, shape, held) -> bool:
    """Whether the saved tensor of ``shape`` whose entries ``source`` gives is the transpose of
    the module's tensor of shape ``held`` (Ergo's router and shared expert, saved ``[in, out]``)."""
    _, where, at = source
    if tuple(shape) != tuple(held)[::-1] or not isinstance(at, torch.Tensor) or where != slice(None):
        return False
    return torch.equal(at, torch.arange(at.numel()).view(held).t().reshape(-1))


def saved_linears(adapter: Adapter, model: nn.Module, swap) -> dict:
    """``split_saved_linears`` and ``fused_saved_linears`` of a transformers ``model`` whose
    ``save_pretrained`` fuses or splits tensors: the checkpoint names of the linears it rewrote
    or reads by rows."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return {}
    if not isinstance(model, PreTrainedModel):
        return {}
    from ..checkpoint_io import saved_layout

    with warnings.catch_warnings():  # (its warning is a merge's: a layout not found leaves the linears as they are)
        warnings.simplefilter("ignore")
        layout = saved_layout(model)
    if layout is None:
        return {}
    renames = split_saved_linears(adapter, model, swap, layout)
    return {**fused_saved_linears(adapter, model, layout), **renames}


def fused_saved_linears(adapter: Adapter, model: nn.Module, layout) -> dict:
    """``{tensor name: Part}`` of the linears inside ``adapter``'s blocks whose weights (and biases)
    ``save_pretrained`` writes as rows of one tensor with others (transformers' conversion mapping
    splits it on loading: LaraMini's ``linear_attn.in_proj``, rows ``[qkv | z | b | a]``; GTE's
    ``attention.qkv_proj``, weight and bias), or transposed under
    another name (Ergo's ``feed_forward.shared_up_proj``), so that an expert directory, which
    holds no tensor of their names, is read by rows of that one, or transposed (found by
    ``SavedLayout.pieces``, one group of tensors at a time; ``layout``: ``saved_layout(model)``)."""
    from ..checkpoint_io import key_renaming

    rename = key_renaming(model) or (lambda key: key)
    # (their biases too: GTE's q, k, v biases are rows of the one attention.qkv_proj.bias, which a
    # walk of the expert's path reads)
    held = {f"{name}.{kind}": tuple(tensor.shape) for name, module in adapter.block_modules(model)
            if type(module) is nn.Linear
            for kind, tensor in (("weight", module.weight), ("bias", module.bias)) if tensor is not None}
    renames, done = {}, set()
    for tensor in held:
        group = layout.group(tensor)
        if group is None or tensor in done or not all(n in held for n in group):
            continue  # (only groups of whole linears' tensors: an index as large as a layer's, not its experts')
        done.update(group)
        pieces = layout.pieces(group)
        if pieces is None or len(pieces) != 1:
            continue
        (key, shape, sources), = pieces
        if len(shape) != len(held[tensor]):
            continue
        if len(shape) == 2 and len(sources) == 1 and _transposed(sources[0], shape, held[sources[0][0]]):
            renames[tensor] = Part(tensor, rename(key), None, None, shape, transposed=True)
            continue
        for name, where, at in sources:
            rows, cols = held[name][0], math.prod(held[name][1:])
            if cols != math.prod(shape[1:]):
                continue
            span = _rows_held(where, at, rows, cols, math.prod(shape))
            if span is not None:
                renames[name] = Part(name, rename(key), None, span[0], shape, order=span[1])
    return renames


def _rows_held(where, at, rows: int, cols: int, total: int) -> Optional[tuple]:
    """``(rows, order)`` for ``Part`` where a saved tensor's flat entries ``where`` (of ``total``,
    rows of ``cols``) are a module tensor's flat entries ``at`` (``SavedLayout.pieces``) row by
    row: the saved rows it spans, and for each of its rows the one of them holding it, None where
    they hold it in order. Its rows in another order (Step 3.7's vision q and k, saved for
    interleaved rotary pairs) or among others' (Inkling's gate and up, interleaved in
    ``mlp.w13_dn``: each reads both's rows) are read so. None where its entries are not whole rows."""
    def positions(index, n):
        return torch.arange(*index.indices(n)) if isinstance(index, slice) else index

    saved, entries = positions(where, total), positions(at, rows * cols)
    if saved.numel() != rows * cols:
        return None
    held = torch.empty(rows * cols, dtype=torch.long)
    held[entries] = saved.long()  # (the saved entry holding each of the tensor's entries)
    held = held.view(rows, cols)
    first = held[:, 0]
    if bool((first % cols).any()) or not torch.equal(held, first[:, None] + torch.arange(cols)):
        return None
    first = first // cols
    start, stop = int(first.min()), int(first.max()) + 1
    in_order = stop - start == rows and torch.equal(first, torch.arange(start, stop))
    return (start, stop), None if in_order else (first - start).tolist()


class LinearExperts(nn.Module):
    """Fused experts as ``nn.Linear`` per expert (children ``"0"``, ``"1"``, ...); the fused
    module's routing loop, unchanged."""

    # how the fused parameters hold an expert's weight: [out, in] as nn.Linear does, or its
    # transpose (Llama 4)
    transposed = False

    def __init__(self, fused: nn.Module):
        super().__init__()
        names = _names(fused)
        self.num_experts = fused.down_proj.shape[0]
        for e in range(self.num_experts):
            linears = [_linear(part.take(getattr(fused, part.fused))) for part in self.parts(fused, e)]
            self.add_module(str(e), _Expert(linears, names))
        self.act_fn = getattr(fused, "act_fn", None)
        # (the fused module's own gate where it has one, else act(gate) * up)
        self.activation = _FusedGate(fused) if _custom_gate(fused) else None
        # (a norm of each expert's output, before the router's weight: MuseSpark's)
        self.post_expert_norm = fused.post_expert_norm if getattr(fused, "has_post_expert_norm", False) else None
        self.train(fused.training)

    def _gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.activation(gate, up) if self.activation is not None else self.act_fn(gate) * up

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s output for its tokens ``x``: ``down(act(gate(x)) * up(x))``, or
        ``down(act(up(x)))`` without a gate; its output normed where the fused module norms it."""
        *first, down = self[e].projections()
        y = down(self._gated(first[0](x), first[1](x)) if len(first) == 2 else self.act_fn(first[0](x)))
        return y if self.post_expert_norm is None else self._normed(e, y)

    def _normed(self, e: int, y: torch.Tensor) -> torch.Tensor:
        return self.post_expert_norm(y)

    @classmethod
    def parts(cls, fused: nn.Module, e: int, prefix: str = "") -> tuple:
        """Expert ``e``'s gate, up and down weights as ``Part``s of the fused parameters
        ``{prefix}gate_up_proj`` and ``{prefix}down_proj``, named as per-expert checkpoints name
        them (``{prefix}{e}.gate_proj.weight``, ...). The rebuilt linears' weights are these
        parts of the fused module's parameters, so what a checkpoint holds fused is read as the
        linears hold it."""
        names, down = _names(fused), fused.down_proj.shape
        if len(names) == 2:  # (no gate: up_proj [E, I, H] and down_proj, each expert whole)
            where = (("up_proj", fused.up_proj.shape, None), ("down_proj", down, None))
        else:
            gate_up = fused.gate_up_proj.shape
            inner = gate_up[2 if cls.transposed else 1] // 2
            where = (("gate_up_proj", gate_up, (0, inner)), ("gate_up_proj", gate_up, (inner, 2 * inner)),
                     ("down_proj", down, None))
        return tuple(Part(f"{prefix}{e}.{name}.weight", prefix + param, e, rows, shape, cls.transposed)
                     for name, (param, shape, rows) in zip(names, where))

    def __getitem__(self, e: int) -> _Expert:
        return getattr(self, str(e))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        n = self.num_experts
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            # A slot of weight zero adds nothing to the output, and its token is not the expert's:
            # LongCat-Flash hands the tokens of its zero-computation experts to real experts so,
            # several slots to one expert at times. Left out, each expert is called on the tokens
            # routed to it with a weight, each once, and its statistics count those alone.
            mask = mask * top_k_weights.ne(0).T
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == n:
                continue
            position, token = torch.where(mask[e])
            y = self.expert(e, hidden_states[token]) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class Llama4LinearExperts(LinearExperts):
    """Llama 4's experts (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``: each expert's
    weights transposed) as ``nn.Linear`` per expert, with the fused module's call: the block's
    routed input ``[E * T, H]``, each token once per expert, scaled by its router score (zero
    where the token is not routed). Each expert takes its nonzero rows only (its tokens); the
    zero rows' output is zero, as in the fused module (no biases, ``act(0) * 0 = 0``)."""

    transposed = True

    def forward(self, hidden_states):
        x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        with torch.no_grad():
            routed = x.ne(0).any(dim=-1)  # [E, T]
            hit = routed.any(dim=-1).nonzero()[:, 0].tolist()
        for e in hit:
            rows = routed[e].nonzero()[:, 0]
            out[e].index_copy_(0, rows, self.expert(e, x[e, rows]).to(out.dtype))
        return out.view(-1, out.shape[-1])


class GptOssLinearExperts(LinearExperts):
    """gpt-oss's experts as ``nn.Linear`` per expert, with biases. The fused module stores each
    expert transposed (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) with the gate and
    up projections interleaved column by column (gate the even columns, up the odd ones), and
    biases beside them (``gate_up_proj_bias [E, 2I]``, ``down_proj_bias [E, H]``); its gate is
    gpt-oss's clamped SwiGLU, ``(clamp(up) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, limit)``."""

    transposed = True

    def __init__(self, fused: nn.Module):
        nn.Module.__init__(self)
        self.num_experts = fused.gate_up_proj.shape[0]
        self.alpha, self.limit = fused.alpha, fused.limit
        for e in range(self.num_experts):
            parts = self.parts(fused, e)
            linears = [_linear(part.take(getattr(fused, part.fused))) for part in parts[:3]]
            for linear, bias in zip(linears, parts[3:]):
                linear.bias = nn.Parameter(bias.take(getattr(fused, bias.fused)),
                                           requires_grad=linear.weight.requires_grad)
            self.add_module(str(e), _Expert(linears, DEFAULT_NAMES))
        self.train(fused.training)

    @classmethod
    def parts(cls, fused: nn.Module, e: int, prefix: str = "") -> tuple:
        """Expert ``e``'s gate, up and down weights, then their biases, as ``Part``s."""
        width = fused.gate_up_proj.shape[2]
        where = (("gate_proj", "gate_up_proj", (0, width, 2)), ("up_proj", "gate_up_proj", (1, width, 2)),
                 ("down_proj", "down_proj", None))  # (gate and up: interleaved columns)
        return tuple(Part(f"{prefix}{e}.{name}.{kind}", f"{prefix}{param}{suffix}", e, rows,
                          getattr(fused, param + suffix).shape, kind == "weight")
                     for kind, suffix in (("weight", ""), ("bias", "_bias")) for name, param, rows in where)

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        n = self.num_experts
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(router_indices, num_classes=n).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            position, token = torch.where(mask[e])
            gate_proj, up_proj, down_proj = self[e].projections()
            x = hidden_states[token]
            gate = gate_proj(x).clamp(max=self.limit)
            up = up_proj(x).clamp(min=-self.limit, max=self.limit)
            y = down_proj((up + 1) * gate * torch.sigmoid(gate * self.alpha))
            out.index_add_(0, token, (y * routing_weights[token, position, None]).to(out.dtype))
        return out


class TransposedLinearExperts(LinearExperts):
    """Fused experts of transformers' usual call that store each expert transposed
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, tagged ``is_transposed``: Aria's)."""

    transposed = True


class ErgoLinearExperts(TransposedLinearExperts):
    """Ergo's experts: no gate, stored transposed, each expert's output RMS-normed with a weight of
    its own (``post_expert_norm.weight [E, H]``, applied by the module's own forward, which no
    flag announces) before the router's weight."""

    def __init__(self, fused: nn.Module):
        super().__init__(fused)
        self.post_expert_norm = fused.post_expert_norm

    def _normed(self, e, y):
        return self.post_expert_norm(y, torch.full((y.shape[0],), e, dtype=torch.long, device=y.device))


class DbrxLinearExperts(LinearExperts):
    """DBRX's experts (``mlp.w1``, ``mlp.v1``, ``mlp.w2``, each ``[E * I, H]``: expert e's gate and
    up projections are rows ``e*I:(e+1)*I`` of ``w1`` and ``v1``, its down projection the
    transpose of those rows of ``w2``) as ``nn.Linear`` per expert viewing them, named as the
    per-expert DBRX checkpoints GPTQ tools write (``experts.mlp.{e}.w1``); the fused module's
    call, on hidden states ``[B, T, H]``."""

    def __init__(self, fused: nn.Module):
        nn.Module.__init__(self)
        self.num_experts = fused.num_experts
        self.mlp = nn.Module()
        for e in range(self.num_experts):
            linears = [_linear(part.take(fused.get_parameter(part.fused))) for part in self.parts(fused, e)]
            self.mlp.add_module(str(e), _Expert(linears, PROJECTION_NAMES["DbrxExperts"]))
        self.act_fn = fused.mlp.activation_fn
        self.activation = self.post_expert_norm = None
        self.train(fused.training)

    @classmethod
    def parts(cls, fused: nn.Module, e: int, prefix: str = "") -> tuple:
        rows, shape = (e * fused.ffn_hidden_size, (e + 1) * fused.ffn_hidden_size), fused.mlp.w1.shape
        return (Part(f"{prefix}mlp.{e}.w1.weight", f"{prefix}mlp.w1", None, rows, shape),
                Part(f"{prefix}mlp.{e}.v1.weight", f"{prefix}mlp.v1", None, rows, shape),
                Part(f"{prefix}mlp.{e}.w2.weight", f"{prefix}mlp.w2", None, None, shape, transposed=True, cols=rows))

    def __getitem__(self, e: int) -> _Expert:
        return getattr(self.mlp, str(e))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        batch = hidden_states.shape[0]
        out = super().forward(hidden_states.reshape(-1, hidden_states.shape[-1]), top_k_index, top_k_weights)
        return out.view(batch, -1, out.shape[-1])


class SplitLinears(nn.Module):
    """Experts held as one ``weight [E, out, in]`` and called on the tokens sorted by expert with
    each expert's count (JetMoE's ``ParallelExperts``: ``forward(inputs, expert_size)``), as
    ``nn.Linear`` per expert (children ``"0"``, ``"1"``, ...) viewing the fused weight: the same
    call. An expert without tokens is not called (nothing to record)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.num_experts = fused.weight.shape[0]
        for e in range(self.num_experts):
            self.add_module(str(e), _linear(fused.weight[e]))
        self.train(fused.training)

    @classmethod
    def parts(cls, fused: nn.Module, e: int, prefix: str = "") -> tuple:
        return (Part(f"{prefix}{e}.weight", f"{prefix}weight", e, None, fused.weight.shape),)

    def __getitem__(self, e: int) -> nn.Module:
        return getattr(self, str(e))

    def forward(self, inputs, expert_size):
        out = []
        for e, rows in enumerate(inputs.split(expert_size, dim=0)):
            linear = self[e]
            out.append(linear(rows) if rows.shape[0] else rows.new_zeros(0, linear.out_features))
        return torch.cat(out, dim=0)


def is_split_experts(module: nn.Module) -> bool:
    """Experts of ``SplitLinears``' layout and call (one 3-D ``weight``, nothing else)."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 3
            and [n for n, _ in module.named_parameters()] == ["weight"]
            and list(inspect.signature(module.forward).parameters)[:2] == ["inputs", "expert_size"])


# fused experts of another layout or call than transformers' usual ones
REBUILT_AS = {"Llama4TextExperts": Llama4LinearExperts, "GptOssExperts": GptOssLinearExperts,
              "DbrxExperts": DbrxLinearExperts, "ErgoExperts": ErgoLinearExperts}
# what transformers tags its fused experts with (``use_experts_implementation``), as they are in
# the layout ``LinearExperts`` takes (transposed or not, with a gate or without, normed or not)
USUAL_LAYOUT = {"is_concatenated": True, "has_bias": False}


def _rebuilt_as(experts: nn.Module):
    if type(experts).__name__ in REBUILT_AS:
        return REBUILT_AS[type(experts).__name__]
    return TransposedLinearExperts if getattr(experts, "is_transposed", False) else LinearExperts


def is_fused_experts(module: nn.Module) -> bool:
    """Experts held as 3-D parameters: ``gate_up_proj`` (or ``up_proj``, without a gate) and
    ``down_proj``."""
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def _known_call(experts: nn.Module) -> bool:
    """Whether ``LinearExperts`` (or the class ``REBUILT_AS`` names) takes the fused module's
    layout and call: transformers' usual ``(hidden_states, top_k_index, top_k_weights)``, gate
    and up concatenated, no biases (the gate, ``act(gate) * up`` or the module's own
    ``_apply_gate``, is kept)."""
    if type(experts).__name__ in REBUILT_AS:
        return True
    return (list(inspect.signature(experts.forward).parameters)[:3] == ["hidden_states", "top_k_index",
                                                                        "top_k_weights"]
            and all(getattr(experts, flag, usual) == usual for flag, usual in USUAL_LAYOUT.items()))


def rebuild_experts(adapter: Adapter, model: nn.Module, swap, known_call_only: bool = False) -> dict:
    """Fused experts inside ``adapter``'s blocks rebuilt as ``LinearExperts`` (or the class
    ``REBUILT_AS`` names; JetMoE's as ``SplitLinears``); ``known_call_only``: only those whose
    call it is known to take."""
    from ..checkpoint_io import conversions_found_once, key_renaming

    renames, rename = {}, key_renaming(model)  # (the model's rules, found once, not per fused tensor)
    with conversions_found_once(model):  # (transformers' mapping, found once: not per fused tensor)
        for name, module in list(adapter.block_modules(model)):
            split = is_split_experts(module)
            if not split and type(module).__name__ not in REBUILT_AS and (
                    not is_fused_experts(module) or (known_call_only and not _known_call(module))):
                continue
            if not split and _rebuilt_as(module).parts.__func__ is LinearExperts.parts.__func__:
                module.__dict__[SAVED_NAMES] = saved_names(model, name, module, rename)
            experts = (SplitLinears if split else _rebuilt_as(module))(module)
            if not split and not _computes_as(module, experts):
                continue
            swap(name, experts)
            # (experts a checkpoint holds neither per expert nor fused: stacked by projection)
            stacks = None
            if module.__dict__.get(SAVED_NAMES, ()) is None:
                stacks = saved_stacks(model, experts.parts(module, 0, f"{name}."), rename)
            for e in range(experts.num_experts):
                parts = experts.parts(module, e, f"{name}.")
                if stacks is not None:
                    parts = tuple(p if s is None else Part(str(p), p.fused, p.index, p.rows, p.fused_shape,
                                                           p.transposed, p.cols,
                                                           saved=Part(str(p), s[0], e, s[2], s[1], order=s[3]))
                                  for p, s in zip(parts, stacks))
                renames.update({str(part): part for part in parts})
    return renames


_COMPUTES_AS: dict = {}  # a fused experts class -> whether its rebuilt linears compute what it does


def _computes_as(fused: nn.Module, rebuilt: nn.Module) -> bool:
    """Whether ``rebuilt`` computes what ``fused`` does, tried once per class of the usual call
    on 6 random tokens routed to random experts: a step the layout flags do not announce (as
    Ergo's per-expert norms in a forward of their own, which ``ErgoLinearExperts`` now applies)
    would otherwise make a quantized model of other outputs, silently. Weights not in memory
    (meta) or not yet loaded are taken at their word."""
    kind = type(fused)
    if kind.__name__ in REBUILT_AS or fused.down_proj.is_meta:
        return True
    if kind not in _COMPUTES_AS:
        W = fused.down_proj
        if not bool(W.isfinite().all()):  # (weights not yet loaded: torch.empty's)
            return True
        gen = torch.Generator().manual_seed(0)
        E, k = rebuilt.num_experts, min(2, rebuilt.num_experts)
        hidden = rebuilt[0].projections()[0].in_features
        x = torch.randn(6, hidden, generator=gen).to(W.device, W.dtype)
        index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(6)]).to(W.device)
        weights = torch.rand(6, k, generator=gen).to(W.device, W.dtype)
        try:
            with torch.no_grad():
                want, got = fused(x, index, weights), rebuilt(x, index, weights)
            if isinstance(want, torch.Tensor) and not bool(want.isfinite().all()):
                return True  # (garbage weights: nothing to learn from them)
            atol = 1e-2 * float(want.abs().max()) + 1e-6
            _COMPUTES_AS[kind] = (isinstance(want, torch.Tensor) and want.shape == got.shape
                                  and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=atol))
        except Exception:  # (a call of other arguments: not the usual one)
            _COMPUTES_AS[kind] = False
        if not _COMPUTES_AS[kind]:
            warnings.warn(f"{kind.__name__}: one linear per expert does not compute what these fused experts "
                          f"compute (a step of their own around the projections?): they stay in full precision")
    return _COMPUTES_AS[kind]


class MoEAdapter(Adapter):
    """Decoder layers whose MLP routes tokens to fused experts (rebuilt as ``LinearExperts``, Llama
    4's as ``Llama4LinearExperts``)."""

    routes_tokens = True

    def prepare(self, model, swap):
        return rebuild_experts(self, model, swap)

    def stage(self, block: nn.Module, rel: str):
        """Experts' projections: ``"<experts>.in"`` for gate and up, ``"<experts>.out"`` for down;
        JetMoE's (``SplitLinears``) by the module holding them, ``"<input_linear>"`` and
        ``"<output_linear>"``: its names say nothing of experts, so an expert no token reached in
        the probes would otherwise be a linear never called, left in full precision."""
        parent, _, projection = rel.rpartition(".")
        expert = block.get_submodule(parent) if parent else None
        if isinstance(expert, SplitLinears):
            return parent
        if not isinstance(expert, _Expert):
            return None
        experts = parent.rpartition(".")[0]
        return f"{experts}.{'out' if projection == expert.names[-1] else 'in'}"

    def module_alias(self, model, name):
        """An expert's projection under the other naming: GPTQModel writes Mixtral's w1, w3, w2
        as gate_proj, up_proj, down_proj."""
        parent, _, projection = name.rpartition(".")
        try:
            expert = model.get_submodule(parent)
        except AttributeError:
            return None
        if not isinstance(expert, _Expert):
            return None
        for default, own in zip(DEFAULT_NAMES[-len(expert.names):], expert.names):
            if projection in (default, own):
                return f"{parent}.{own}"
        return None


MOE_DECODERS = MoEAdapter("hf-moe-decoder", block_types=(
    "Qwen2MoeDecoderLayer", "Qwen3MoeDecoderLayer", "MixtralDecoderLayer", "OlmoeDecoderLayer",
    "PhimoeDecoderLayer", "GraniteMoeDecoderLayer", "DeepseekV2DecoderLayer", "DeepseekV3DecoderLayer",
    "JambaAttentionDecoderLayer", "JambaMambaDecoderLayer", "Llama4TextDecoderLayer",
    # checked like the ones above (WIDER): GLM-4.5 (Glm4Moe), dots.llm1, ERNIE 4.5 MoE, MiniMax,
    # Hunyuan MoE, FlexOlmo, Cohere2 MoE, EXAONE MoE, Granite MoE with a shared expert
    "Glm4MoeDecoderLayer", "Dots1DecoderLayer", "Ernie4_5_MoeDecoderLayer", "MiniMaxDecoderLayer",
    "HunYuanMoEV1DecoderLayer", "FlexOlmoDecoderLayer", "Cohere2MoeDecoderLayer", "ExaoneMoeDecoderLayer",
    "GraniteMoeSharedDecoderLayer", "GptOssDecoderLayer",
    # hybrids: Qwen3-Next (gated DeltaNet and attention layers), Granite 4 (Mamba 2 and attention)
    "Qwen3NextDecoderLayer", "GraniteMoeHybridDecoderLayer",
    # Aria's language model (experts stored transposed, a shared expert), beside its vision tower, which
    # a default walk took alone (AUTO, which walks the language model alone, is no default beside another)
    "AriaTextDecoderLayer",
))


class DsaMoEAdapter(MoEAdapter):
    """MoE decoder layers with DeepSeek sparse attention whose ``"shared"`` layers attend to the
    tokens the indexer of a layer before them chose: each returns ``(hidden, top-k indices)``, handed
    to the next as ``prev_topk_indices`` (a stand-in hands None, which such a layer refuses). Layers
    reusing an earlier layer's latent KV read it from the ``shared_kv_states`` of the call, which that
    layer's own run in the walk writes."""

    def passthrough(self, hidden):
        return hidden, None

    def next_kwargs(self, kwargs, output):
        return dict(kwargs, prev_topk_indices=output[1])


# Mistral Large 4's language model, beside its Pixtral tower (which a default walk took alone: AUTO,
# which walks the language model alone, is no default beside another adapter)
DSA_MOE_DECODERS = DsaMoEAdapter("hf-dsa-moe-decoder", block_types=("MistralLarge4TextDecoderLayer",))
