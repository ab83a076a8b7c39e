"""Model merging: Task Arithmetic, TIES-Merging, DARE, Model Breadcrumbs, DELLA, TSV-Merge,
Iso-C, Model Stock, SLERP and (weighted) averaging.

Every merge takes the pretrained ``base`` and the fine-tuned ``experts`` as state dicts (any
``Mapping`` of name -> tensor, including lazy ones that read a tensor from disk when indexed) or
``nn.Module``s, and returns a new state dict. Work goes tensor by tensor: at any time one tensor
of the base and of every expert is in memory, plus the result. The task-vector merges, ``multislerp``,
``karcher`` and ``average`` read the experts' tensors one at a time instead; a tensor whose K
task vectors would pass ``HOLD_BYTES`` is merged holding a few tensors whatever K (an 8B model's
embedding is 2.1 GB in fp32), the sign election making each task vector twice (its expert read
twice; ``model_stock(convention="mergekit")``'s pairs K (K + 1) / 2 times in all).

With task vectors ``tau_k = W_k - W_0`` (task_arithmetic, ties, dare, breadcrumbs and della also
take ``weights``, one per expert, multiplying each ``tau_k`` before it is combined, as
mergekit's per-model ``weight``; the spectral tsv and iso_c do not):

    task_arithmetic   W = W_0 + scale * sum_k tau_k
    ties              W = W_0 + scale * merge_k(trim(tau_k) agreeing with the elected sign)
    dare              W = W_0 + scale * sum_k drop(tau_k) / density   (consensus="sign": DARE-TIES)
    breadcrumbs       W = W_0 + scale * sum_k tau_k without its largest (gamma) and smallest
                      (1 - density - gamma) entries                    (consensus="sign")
    della             W = W_0 + scale * merge_k(magprune(tau_k) agreeing with the elected sign)
    tsv               W = W_0 + scale * U_o diag(S) V_o^T, the top singular triplets of every
                      tau_k with their singular vectors orthogonalised across tasks (matrices)
    iso_c             W = W_0 + scale * mean(S) U V^T, from the SVD U S V^T of sum_k tau_k
    model_stock       W = t mean_k W_k + (1 - t) W_0, t from the angle between task vectors
    sce               W = W_0 + merge_k(w_k tau_k over the most varying entries, agreeing with
                      the elected sign), w_k from each task vector's mean square
    ram               W = W_0 + sum_k m_k tau_k / c: an entry one expert changed (m_k: |tau_k|
                      > epsilon) takes its change whole, one c > 1 experts changed their mean
                      (Reinforced Agent Merging; ram_plus: the lone changes scaled up per expert)
    arcee_fusion      W = W_0 + tau_1 where its importance |tau_1| KL(row) is an outlier (two
                      models; mergekit's)
    slerp             spherical interpolation of two models (no base)
    nuslerp           spherical interpolation of two experts or of their task vectors
                      (mergekit's NuSLERP; the base optional)
    multislerp        a weighted mean of several experts (or task vectors) on the sphere
                      (mergekit's Multi-SLERP; the base optional)
    karcher           the models' Riemannian (Karcher) mean on the sphere, scaled by their mean
                      norm (mergekit's; no base)
    nearswap          the base's entries moved to one expert's where they are close (mergekit's)
    average           W = sum_k w_k W_k / sum_k w_k   (w_k = 1: a model soup)
    regmean           W = (sum_k W_k G_k) (sum_k G_k)^-1 for linear layers, G_k the Gram
                      matrix of their inputs on task k (data needed: ``stats.gram_matrices``)

Tensors that are not floating point (position ids, counters) are copied from the base (from
the first model where a merge takes none: ``average``, ``slerp``, ``karcher``, ``regmean``, and
``nuslerp`` / ``multislerp`` given ``base=None``) unchanged. Each merged tensor is stored in
``out`` as soon as it is made (a new dict by default, returned; anything with ``__setitem__``:
``epmq.merge_checkpoints`` passes a writer that puts them into shards on disk, so a merge of
large checkpoints holds one shard of the result at a time). ``progress`` (every merge takes it):
a bar of the tensors merged (minutes on a 7B model for TSV's and Iso-C's SVDs). Random merges
(``dare``, ``della``) draw the mask of tensor ``name`` of expert k from ``(seed, name, k)`` alone, so a merge is
reproducible whatever order or subset of tensors is merged (a transformers module's tensors by
the names it saves them under: the same masks as its checkpoint's merge). A transformers module's
tensors that ``save_pretrained`` splits or fuses (transformers 5 holds a MoE layer's experts fused,
``mlp.experts.gate_up_proj [E, 2I, H]``, and saves one matrix per expert and projection) are
merged as the tensors it saves, under their saved names, and put back in the module's layout:
the per-tensor steps (ranks, SVDs, cosines, masks) see the checkpoint's matrices, and the same
models merged as modules or from their checkpoints give the same weights (``regmean``, whose
grams are the module's linear layers', merges the module's tensors). State dicts given as plain
dicts holding such fused experts (by transformers 5's names) are merged as given, each a tensor,
with a warning from the merges whose statistics are per tensor: the dicts do not say whether
``save_pretrained`` cuts them (Mixtral's) or not (Qwen3-VL-MoE's).
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from epmq_kernels.grid import is_integer

from ._util import storage_key, without_autocast
from .checks import all_finite, check_finite, check_hessian, check_number, check_seed

StateDict = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------- inputs


def _as_state(model, what: str) -> StateDict:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"{what} must be a state dict (name -> tensor) or an nn.Module, got {type(model).__name__}")


def _who(state, k: int) -> str:
    """How errors name expert ``k``: by the ``label`` its state carries where it has one
    (``epmq merge``'s checkpoints: "model 1 (path)"), else "expert k"."""
    return getattr(state, "label", None) or f"expert {k}"


def _listed_experts(experts) -> list:
    """``experts`` as a list (a generator is read once), or the error for one model given alone."""
    if isinstance(experts, (nn.Module, Mapping)) or not isinstance(experts, Iterable):
        raise TypeError("experts must be a list of state dicts or modules")
    return list(experts)


def _inputs(base, experts) -> tuple[Optional[StateDict], list[StateDict]]:
    experts = [_as_state(e, _who(e, k)) for k, e in enumerate(_listed_experts(experts))]
    if not experts:
        raise ValueError("the expert list is empty: nothing to merge")
    base = None if base is None else _as_state(base, "base")
    reference = base if base is not None else experts[0]
    names = list(reference.keys())
    for k, expert in enumerate(experts):
        keys = set(expert.keys())
        missing = [n for n in names if n not in keys]
        extra = sorted(keys - set(names))
        if missing or extra:
            # (a tied model's checkpoint leaves its head out, an untied one's has it: the state
            # dicts read from files do not say the head is the embeddings)
            tie = (f"; if the {'base' if base is not None else 'first expert'} ties them to another tensor "
                   f"(a head tied to the embeddings, which save_pretrained leaves out), give it as its module "
                   f"(its state_dict() lists the tied names too) or add them under their names"
                   if extra and not missing else "")
            raise ValueError(
                f"{_who(expert, k)} does not match the {'base' if base is not None else 'first expert'}: "
                f"missing tensors {missing[:5]}, unexpected tensors {extra[:5]}{tie}"
            )
    return base, experts


def _a_tensor(name: str, who: str, t) -> None:
    if not isinstance(t, torch.Tensor):  # (a module's get_extra_state)
        raise ValueError(f"entry {name!r} of {who} is a {type(t).__name__}, not a tensor: merge state "
                         f"dicts of tensors")
    if t.is_meta:
        raise ValueError(f"tensor {name!r} of {who} is on the meta device (no values): load its weights")


def _checked(name: str, who: str, t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    _a_tensor(name, who, t)
    if t.shape != reference.shape:
        r = tuple(reference.shape)
        swapped = (t.dim() == 3 and tuple(t.shape) == (r[0], r[2], r[1])
                   and "; its dims 1 and 2 swapped: fused experts saved transposed, as transformers 4 saved them "
                       "(Qwen3-VL-MoE's hub checkpoints)? load it with from_pretrained and re-save it with "
                       "transformers 5, or merge the checkpoints with epmq.merge_checkpoints, which reads both")
        raise ValueError(f"tensor {name!r}: {who} has shape {tuple(t.shape)}, expected {r}{swapped or ''}")
    if t.is_floating_point() != reference.is_floating_point():
        raise ValueError(f"tensor {name!r}: {who} is {t.dtype}, the reference {reference.dtype} (an "
                         f"integer-quantized checkpoint? merge full-precision weights)")
    check_finite(t, f"tensor {name!r} of {who}")
    return t


# The task vectors of one tensor held at once up to this many bytes (in the work dtype); a larger tensor's
# are made one at a time, when needed (the sign vote makes each twice: slower, memory flat in K).
HOLD_BYTES = 1 << 30


class _OnDemand(Sequence):
    """Element k made by ``make(k)`` each time it is indexed: a merge that takes the experts'
    tensors (or task vectors) one at a time holds one, not K."""

    def __init__(self, make, n):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if not 0 <= k < self.n:
            raise IndexError(k)
        return self.make(k)


def _tensors(name: str, base: Optional[StateDict], experts: Sequence[StateDict], lazy: bool = False):
    """The base's and every expert's tensor ``name``, checked, as float32 (float64 where the
    reference is: its updates below float32's precision are kept; ``None`` when the tensor is
    not floating point), and the tensor whose dtype the result takes. ``lazy``: the experts'
    read when indexed (and checked the first time)."""
    reference = base[name] if base is not None else experts[0][name]
    _a_tensor(name, "base" if base is not None else "expert 0", reference)
    W_0 = None if base is None else _checked(name, "base", reference, reference)
    if not reference.is_floating_point():
        for k, e in enumerate(experts):
            _checked(name, _who(e, k), e[name], reference)
        return reference, None, None
    work = _work_dtype(reference)
    checked = set()

    def read(k):
        W = reference if k == 0 and base is None else experts[k][name]  # (expert 0's: already read)
        if k not in checked:
            _checked(name, _who(experts[k], k), W, reference)
            checked.add(k)
        return W.to(work)

    W_k = _OnDemand(read, len(experts))
    if not lazy:
        W_k = list(W_k)
    return reference, None if W_0 is None else W_0.to(work), W_k


def _common_aliases(states: Sequence[StateDict]) -> dict:
    """``{name: the first name holding the same tensor in every state}``: a tied head and its
    embeddings, listed twice by a module's state dict, are one tensor, merged once; names one
    tensor in some inputs only (an untied fine-tune's changed head) are merged apart. States held
    in memory (dicts) by storage; lazy ones (``checkpoint_io.LazyStateDict``, read when indexed:
    no tensors held to compare) by the checkpoint key each name is read from. Others have no ties found
    (``merge_checkpoints`` finds them by the base's config)."""

    def keys(state):  # (by items(): no read a state counts or makes)
        if isinstance(state, dict):
            return {name: storage_key(t) for name, t in dict.items(state)
                    if isinstance(t, torch.Tensor) and t.numel() and not t.is_meta}
        checkpoint_key = getattr(state, "checkpoint_key", None)
        return None if checkpoint_key is None else {name: checkpoint_key(name) for name in state}

    each = [keys(state) for state in states]
    if any(k is None for k in each):
        return {}
    first, aliases = {}, {}
    for name in states[0]:
        if all(name in k for k in each):
            leader = first.setdefault(tuple(k[name] for k in each), name)
            if leader != name:
                aliases[name] = leader
    return aliases


def _work_dtype(reference: torch.Tensor) -> torch.dtype:
    """What the merges compute in: float32, or float64 for float64 tensors."""
    return torch.float64 if reference.dtype == torch.float64 else torch.float32


@torch.no_grad()  # (parameters as inputs: no graph kept alive by the result)
@without_autocast  # (the merges compute in _work_dtype: a caller's autocast ran TSV's and Iso-C's products in bf16)
def _merge_each(base, experts, merge_tensor, out=None, lazy=False, tied=True, as_saved=True, method="",
                progress=False):
    """Apply ``merge_tensor(name, W_0, [W_k]) -> W`` to every float tensor, one at a time, and
    store each result in ``out`` as it is made (a new dict by default); returns ``out``.
    ``lazy``: ``W_k`` reads expert k's tensor when indexed (each access reads it again). An
    ``out`` with a ``dtype`` (``ShardWriter``'s) takes the results in it, else in the base's.
    ``tied``: names of one tensor in every input (``_common_aliases``) are merged once, sharing
    the result. ``as_saved``: tensors of a transformers module that ``save_pretrained`` splits
    or fuses (transformers 5's fused MoE experts) are merged as the tensors it saves, each its
    own ``merge_tensor(saved name, ...)`` (the merge of its checkpoint), and put back in the
    module's layout. ``progress``: a bar of the tensors merged, named after ``method`` (none where
    ``out`` counts them on a bar of its own, as ``merge_checkpoints``' writer does)."""
    from tqdm.auto import tqdm

    experts = _listed_experts(experts)
    layout = _saved_layout(base, experts) if as_saved else None
    base, experts = _inputs(base, experts)
    stored = getattr(out, "dtype", None)
    reference = base if base is not None else experts[0]
    out = {} if out is None else out
    aliases = _common_aliases([reference, *experts]) if tied else {}
    shared = {}  # (the results aliases take: ``out`` may be write-only, a ShardWriter)

    def store(name, ref, merged):
        # straight from the float32 arithmetic to the stored dtype (a rounding to the base's
        # first would wipe out task vectors below its precision, and its overflow would stand)
        dtype = stored or ref.dtype
        merged = merged.to(dtype).detach()
        if not all_finite(merged):
            whose = "the requested dtype" if stored else "the base's dtype"
            raise ValueError(f"merged tensor {name!r} is not finite in {dtype} ({whose}): its values "
                             f"pass the dtype's range; merge into float32 or bfloat16 "
                             f"(merge_checkpoints(dtype=...))")
        out[name] = merged
        if name in aliases.values():
            shared[name] = merged

    done = set()  # (the names merged with an earlier one's saved tensors)
    # (TSV's and Iso-C's SVD per tensor took minutes on a 7B model, said by nothing)
    for name in tqdm(reference.keys(), total=len(reference), desc=f"merge {method}", unit="tensor",
                     disable=not progress or getattr(out, "progress", None) is not None):
        if name in done:
            continue
        if name in aliases:  # (one tensor, merged once: DARE's masks drawn per name differed)
            out[name] = shared[aliases[name]]
            continue
        group = layout.group(name) if layout is not None else None
        if group is not None and not any(n in aliases or n in aliases.values() for n in group):
            pieces = _merge_saved(layout, group, base, experts, merge_tensor, lazy, stored)
            if pieces is not None:
                for n, merged in pieces.items():
                    store(n, reference[n], merged)
                done.update(pieces)
                continue
        ref, W_0, W_k = _tensors(name, base, experts, lazy)
        if W_0 is None and W_k is None:
            out[name] = shared[name] = ref.clone()  # (shared: an integer buffer of several names)
            continue
        store(name, ref, merge_tensor(name, W_0, W_k))
    if tied:
        _warn_of_untied(reference, aliases, out)
    return out


# transformers 5's names of a MoE layer's experts held fused, one 3-D tensor [E, ., .] a projection
_FUSED_EXPERTS = re.compile(r"(^|\.)experts\.(gate_up_proj|gate_proj|up_proj|down_proj)$")


def _warn_of_fused_experts(base, experts: list, statistic: Optional[str], stacklevel: int = 3,
                           at_once: bool = True) -> None:
    """Warn where state dicts held in memory (no module: no layout says how ``save_pretrained``
    cuts them) hold a MoE layer's experts fused, by transformers 5's names: a merge with
    per-tensor statistics takes them over all the layer's experts at once, where the modules (and
    a checkpoint of one matrix per expert, Mixtral's, Qwen3-MoE's) are merged expert by expert.
    The dicts do not say which (Qwen3-VL-MoE's checkpoints hold them fused, merged so by epmq
    merge): merged as given. Lazy checkpoint states are merged as their checkpoints hold them.
    ``statistic``: what the merge takes over a whole tensor (None: nothing, no warning); ``at_once``
    False: over each expert's matrix whole, as ``statistic`` says (not over all the experts)."""
    states = [base, *experts] if base is not None else experts
    if statistic is None or not states or not all(isinstance(state, dict) for state in states):
        return
    fused = [name for name, t in dict.items(states[0])
             if _FUSED_EXPERTS.search(name) and isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point()]
    if fused:
        warnings.warn(f"tensors {fused[:3]} ({len(fused)} in all) are a MoE layer's experts fused in one 3-D tensor "
                      f"(transformers 5's names): each is merged as one tensor, {statistic}"
                      f"{' over all its experts at once' if at_once else ''}, where a model whose save_pretrained "
                      f"writes one matrix per expert (Mixtral, Qwen3-MoE) is merged expert by expert as its modules "
                      f"or checkpoints (epmq merge); give the models as modules to merge them as their checkpoints are",
                      stacklevel=stacklevel)


def _saved_layout(base, experts):
    """The ``checkpoint_io.SavedLayout`` of the first transformers module given, or None."""
    module = next((m for m in (base, *experts) if isinstance(m, nn.Module)), None)
    if module is None:
        return None
    from .checkpoint_io import saved_layout

    return saved_layout(module)


def _merge_saved(layout, names, base, experts, merge_tensor, lazy, stored=None) -> Optional[dict]:
    """The module tensors ``names`` (one group of ``layout``) merged as the tensors
    ``save_pretrained`` makes of them, ``{name: merged}`` in ``stored`` (else each one's own
    dtype): each saved tensor's entries gathered from the inputs, merged by ``merge_tensor``
    under its saved name and cast as they are put back where they came from (a group held in
    the work dtype whole was twice a bf16 MoE layer's experts, 6.4 GB for a Qwen3-235B layer's
    gate_up_proj; a cast is elementwise: the same values). The per-tensor statistics (TIES' and
    Breadcrumbs' ranks, TSV's and Iso-C's SVDs, Model Stock's cosines, DELLA's rows, DARE's
    masks) are then those of the checkpoint's matrices, not of all experts fused. None (merged
    whole, as the module holds them) where the tensors are not floating point of one dtype."""
    reference = base if base is not None else experts[0]
    refs = {n: reference[n] for n in names}
    for n, t in refs.items():
        _a_tensor(n, "base" if base is not None else "expert 0", t)
    if not all(t.is_floating_point() for t in refs.values()) or len({t.dtype for t in refs.values()}) > 1:
        return None
    pieces = layout.pieces(names)
    if pieces is None:
        warnings.warn(f"tensors {names[:3]} of the module are saved by save_pretrained in a layout epmq cannot map "
                      f"them to: merged as the module holds them, their per-tensor statistics (ranks, SVDs, "
                      f"cosines, masks) differ from the merge of its checkpoint (epmq merge)", stacklevel=4)
        return None
    for n, t in refs.items():  # (checked once each, as _tensors does)
        if base is not None:
            _checked(n, "base", base[n], t)
        for k, e in enumerate(experts):
            _checked(n, _who(e, k), e[n], t)
    work = _work_dtype(next(iter(refs.values())))

    def on(index, t):  # (the layout's indices are on the CPU)
        return index if isinstance(index, slice) else index.to(t.device)

    def gather(state, shape, sources):
        if len(sources) == 1 and isinstance(sources[0][1], slice) and sources[0][1] == slice(None):
            n, _, at = sources[0]
            W = state[n]
            return W.reshape(-1)[on(at, W)].to(work).view(shape)
        piece = None
        for n, where, at in sources:
            W = state[n]
            if piece is None:
                piece = torch.empty(math.prod(shape), dtype=work, device=W.device)
            piece[on(where, piece)] = W.reshape(-1)[on(at, W)].to(work)
        return piece.view(shape)

    merged = {n: torch.empty(t.numel(), dtype=stored or t.dtype, device=t.device) for n, t in refs.items()}
    for saved_name, shape, sources in pieces:
        W_0 = None if base is None else gather(base, shape, sources)
        W_k = _OnDemand(lambda k: gather(experts[k], shape, sources), len(experts))
        if not lazy:
            W_k = list(W_k)
        result = merge_tensor(saved_name, W_0, W_k).reshape(-1)
        for n, where, at in sources:
            merged[n][on(at, merged[n])] = result[on(where, result)].to(merged[n].device, merged[n].dtype)
        del W_0, W_k, result
    return {n: merged[n].view(refs[n].shape) for n in names}


def _warn_of_untied(reference, aliases: Mapping, out) -> None:
    """Warn where names of one tensor in the reference alone (a tied base module's head and
    embeddings, beside experts with their own trained heads) were merged apart into different
    values, as a merge of untied models gives them: loaded into the tied base, one would be
    lost (``load_state_dict`` copies both into the one parameter, the last one kept). Not for a
    lazy checkpoint's state: whoever reads one (the benches, ``merge_checkpoints``) unties the
    model it loads into where an expert's head is its own."""
    if not isinstance(out, Mapping) or not isinstance(reference, dict):
        return
    apart = [(name, first) for name, first in _common_aliases([reference]).items()
             if name not in aliases and name in out and first in out and not torch.equal(out[name], out[first])]
    if apart:
        name, first = apart[0]
        warnings.warn(f"the base holds {name!r} and {first!r} as one tensor (tied), the experts as their own (a "
                      f"trained head): the merged state gives them different values, as a merge of untied models "
                      f"does. Load it into a model whose {name!r} is its own parameter (tie_word_embeddings=False): "
                      f"load_state_dict into the tied base keeps one value for both", stacklevel=4)


def _array_values(value):
    """A numpy array or torch tensor of per-expert values (a sweep's row) as the list of its values
    (a 0-d one as its number), taken and checked as a list is; anything else as it is."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy" and hasattr(value, "ndim"):
        return value.tolist()  # (iterated, a tensor gave 0-d tensors, which no check takes for numbers)
    return value


def _listed(weights):
    """``weights`` as a list once (a generator would be used up by the first tensor)."""
    weights = _array_values(weights)
    return list(weights) if isinstance(weights, Iterable) and not isinstance(weights, (str, bytes)) else weights


def _check_weights(weights, n: int, *, divide: bool) -> Optional[list]:
    """Per-expert weights: ``n`` finite numbers, with a nonzero sum where the merge divides by it."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise ValueError(f"weights must be a list of {n} numbers, got {weights!r}")
    weights = [check_number(w, "each weight") for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights must give one number per expert ({n}), got {weights}")
    if divide and sum(weights) == 0:
        raise ValueError(f"weights {weights} sum to 0: their weighted mean is undefined")
    return weights


def _check_unit(value, what):
    check_number(value, what)
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")


def _each(value, what: str, n: int) -> Callable[[int], float]:
    """A parameter in [0, 1] given once or once per expert (a list of ``n``, or an array): expert k's."""
    value = _array_values(value)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} values for {n} experts: give one, or one per expert")
        for v in value:
            _check_unit(v, what)
        return lambda k: float(value[k])
    _check_unit(value, what)
    return lambda k: float(value)


class _Trim:
    """What a trimming merge (TIES per tensor, Breadcrumbs, DELLA, SCE) kept of the task vectors at
    ``what`` = ``value`` (``kept``: :func:`_each`'s, expert k's). A ``what`` of 0 for every expert is
    refused at once: every task vector dropped (one expert's 0 leaves that one out).

    ``note(name, k, tau, trimmed)`` (returns ``trimmed``): expert k's trim of tensor ``name``, what it
    chose from and what it kept. ``check()``, after the merge: a tensor of which no expert kept a nonzero
    entry (a small tensor at a small ``what``: its count rounds to 0, or DELLA draws none) merges as the
    base's, as a large model's few tiny tensors may: warned once, how many. Where every tensor did, the
    merge is the base, said nowhere else: refused."""

    def __init__(self, value, kept: Callable[[int], float], n: int, what: str, method: str):
        if n and all(kept(k) == 0 for k in range(n)):  # (no expert at all: the merge's own 'empty' refusal)
            raise ValueError(f"{what} is 0 for every expert: {method} would drop every task vector and return "
                             f"the base; give a {what} > 0")
        self.value, self.kept, self.what, self.method = value, kept, what, method
        self.some = {}  # {tensor: whether some expert kept an entry of it}, in the merge's order

    def note(self, name: str, k: int, tau: torch.Tensor, trimmed: torch.Tensor) -> torch.Tensor:
        # (a 0 drops its expert; a zero task vector has nothing to keep)
        if self.kept(k) > 0 and bool(tau.any()):
            self.some[name] = self.some.get(name, False) or bool(trimmed.any())
        return trimmed

    def check(self) -> None:
        nothing = [name for name, some in self.some.items() if not some]
        if not nothing:
            return
        said = f"{self.what}={self.value!r} keeps no entry of"
        if len(nothing) == len(self.some):
            raise ValueError(f"{said} any of the {len(nothing)} tensors the experts changed, for any expert (too "
                             f"small a {self.what} of their entries): {self.method}'s merge is the base; give a "
                             f"larger {self.what}")
        more = " ..." if len(nothing) > 3 else ""
        warnings.warn(f"{said} {len(nothing)} of the {len(self.some)} tensors the experts changed, for any expert "
                      f"(too small a {self.what} of their entries): {nothing[:3]}{more} merge as the base's",
                      stacklevel=3)


def _check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _needs_base(base, method):
    if base is None:
        raise ValueError(f"{method} needs the base model")


def _generator(seed: int, name: str, k: int) -> torch.Generator:
    """The generator of expert k's mask of tensor ``name``: seeded by 64 bits of a hash of ``(seed,
    name, k)``. (A 32-bit crc32 gave two of DeepSeek-V3's ~1e5 (tensor, expert) pairs one seed, by the
    birthday bound: one mask twice, ``layers.18.mlp.experts.62.up_proj`` and
    ``layers.33.mlp.experts.165.down_proj`` at seed 2.)"""
    digest = hashlib.blake2b(f"{seed}/{name}/{k}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _mask_names(base, experts) -> dict:
    """``{state-dict name: the name its random masks are drawn under}`` (DARE's, DELLA's; the
    name SLERP's schedule ``t`` is read at): for
    transformers modules whose ``save_pretrained`` renames tensors (transformers 5 loads ViT's
    ``encoder.layer.N.attention.attention.query`` as ``layers.N.attention.q_proj``), the name
    they are saved under, the one ``epmq merge`` reads from their checkpoints; so the same
    models merged as modules or as checkpoints draw the same masks. Else each name is its own."""
    module = next((m for m in (base, *experts) if isinstance(m, nn.Module)), None)
    if module is None:
        return {}
    from .checkpoint_io import renamed, saved_key_renaming

    rename = saved_key_renaming(module)
    return {} if rename is None else renamed(list(module.state_dict()), rename)


def _combine(taus: Sequence[torch.Tensor], consensus: Optional[str], merge: str,
             weights: Optional[Sequence[float]] = None, zero_vote: int = 0) -> torch.Tensor:
    """One task vector from several (already sparsified) ones, each times its weight (1 by
    default; the weights enter the sign vote too, as mergekit's do).

    ``consensus=None``: their sum (``merge="sum"``) or weighted mean (``"mean"``). ``"sign"``
    (TIES): the elected sign is that of their sum, and only the nonzero entries that agree with
    it are summed or averaged (the disjoint mean, weighted by the agreeing entries' weights);
    where the sum is exactly 0 there is no elected sign and the result is 0 (``zero_vote=1``:
    mergekit's convention, the sign elected there is +, and a weighted mean whose agreeing
    weights sum to 0 is their sum, as mergekit divides by 1 there).

    ``taus`` is indexed once per task vector, twice for ``"sign"`` (it may make them on demand).
    """
    K = len(taus)
    weights = _check_weights(weights, K, divide=consensus is None and merge == "mean")

    def weighted(k):
        return taus[k] if weights is None else weights[k] * taus[k]

    # one task vector at a time: K-sized temporaries (stacks, masks) of a large tensor would
    # cost several times the experts' own memory
    total = weighted(0).clone()
    for k in range(1, K):
        total += weighted(k)
    if consensus is None:
        if merge == "sum":
            return total
        return total / (len(taus) if weights is None else sum(weights))
    sign = torch.sign(total) if not zero_vote else torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    total.zero_()
    count = torch.zeros_like(total)
    for k in range(K):
        tau = weighted(k)
        agree = (torch.sign(tau) == sign) & (tau != 0)
        total += torch.where(agree, tau, 0.0)
        count += agree if weights is None else agree * weights[k]
    if merge == "sum":
        return total
    if weights is None:
        return total / count.clamp(min=1)
    if zero_vote:  # (mergekit divides by 1 where the agreeing weights sum to 0: their sum stays)
        return total / torch.where(count != 0, count, 1.0)
    return torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)


def _sparse_merge(base, experts, scale, sparsify, consensus, merge, method, out, weights=None, zero_vote=0,
                  statistic=None, progress=True, trim=None):
    """``W_0 + scale * combine_k(sparsify(name, k, tau_k))``: the task-vector merges that
    differ only in how each task vector is thinned and how the results are combined."""
    weights = _listed(weights)
    _needs_base(base, method)
    check_number(scale, "scale")
    _check_choice(consensus, (None, "sign"), "consensus")
    _check_choice(merge, ("sum", "mean"), "merge")

    def merge_tensor(name, W_0, W_k):
        def trimmed(k):
            tau = W_k[k] - W_0
            return sparsify(name, k, tau) if trim is None else trim.note(name, k, tau, sparsify(name, k, tau))

        taus = _OnDemand(trimmed, len(W_k))
        if W_0.element_size() * W_0.numel() * len(W_k) <= HOLD_BYTES:  # (float64's: 8 bytes an entry)
            taus = list(taus)  # (each made once)
        return W_0 + scale * _combine(taus, consensus, merge, weights, zero_vote)

    experts = _listed_experts(experts)
    # (checked before any tensor is merged: _combine's check came at the first float tensor, after the
    # ones before it were written out, and never where there is none)
    weights = _check_weights(weights, len(experts), divide=consensus is None and merge == "mean")
    _warn_of_fused_experts(base, experts, statistic, stacklevel=4)
    out = _merge_each(base, experts, merge_tensor, out, lazy=True, method=method, progress=progress)
    if trim is not None:
        trim.check()
    return out



# ``convention="mergekit"``: the trims, sign vote and Model Stock of mergekit 0.1.5, for its configs
# (epmq.mergekit_config) to give its tensors: entry counts truncated, not rounded; ties at a trim
# boundary broken by torch's sort order; a sign vote of exactly 0 elects +
CONVENTIONS = ("epmq", "mergekit")


def _by_magnitude(tau: torch.Tensor, descending: bool) -> torch.Tensor:
    """The entries' indices by magnitude, sorted as mergekit sorts them (float32 on the CPU)."""
    w = tau.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    return torch.sort(w, descending=descending).indices  # (what torch.argsort returns)


def _kept(tau: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(tau.numel(), dtype=tau.dtype, device=tau.device)
    mask[indices] = 1
    return tau * mask.reshape_as(tau)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, entries]``: a matrix's output rows; a vector is one row."""
    return t.reshape(1, -1) if t.dim() < 2 else t.flatten(1)  # (flatten: a tensor of 0 rows too)


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Their mean, summed one at a time (a stack of K large tensors would cost K copies)."""
    total = tensors[0].clone()
    for k in range(1, len(tensors)):
        total += tensors[k]
    return total.div_(len(tensors))


# --------------------------------------------------------------------------- merges


def average(experts, weights: Optional[Sequence[float]] = None, *, out=None, progress: bool = True):
    """Weight averaging: ``sum_k w_k W_k / sum_k w_k``; equal weights (a model soup) by default."""
    experts = _listed_experts(experts)
    weights = _check_weights(_listed(weights), len(experts), divide=True)  # (before any tensor is written)

    def merge_tensor(name, W_0, W_k):  # (the experts read one at a time)
        w = [1.0] * len(W_k) if weights is None else weights
        # over the weights' sum in the merge's dtype, as mergekit's linear divides (a float64 sum, 0.9
        # for 0.3 x 3, rounds to another float32 than mergekit's 0.90000004: every entry ~1 ulp off)
        w_sum = torch.tensor(w, dtype=W_k[0].dtype).sum()
        if w_sum == 0 or not torch.isfinite(w_sum):  # (in float32 past what float64 checked: 1 and -0.99999999)
            raise ValueError(f"weights {weights} sum to {float(w_sum)} in {w_sum.dtype} (the merge's dtype): "
                             f"their weighted mean is undefined")
        total = W_k[0].mul(w[0])
        for k in range(1, len(W_k)):
            total.add_(W_k[k], alpha=w[k])  # (mergekit's addcmul_: fused, or not, alike on each CPU)
        return total.div_(w_sum)

    return _merge_each(None, experts, merge_tensor, out, lazy=True, method="average", progress=progress)


def task_arithmetic(base, experts, scale: float = 0.3, weights: Optional[Sequence[float]] = None,
                    *, out=None, progress: bool = True):
    """Task Arithmetic (Ilharco et al., 2023): ``W_0 + scale * sum_k w_k (W_k - W_0)``
    (``weights`` w_k: 1 each by default)."""
    return _sparse_merge(base, experts, scale, lambda name, k, tau: tau, None, "sum",
                         "task_arithmetic", out, weights, progress=progress)


DARE_RESCALES = ("density", "l1", None)


def _l1_rescaled(tau: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked`` scaled to ``tau``'s L1 norm (mergekit's rescaling; as its, nothing is matched
    where either norm is below 1e-7)."""
    before, after = tau.abs().sum(), masked.abs().sum()
    return masked * (before / after) if before >= 1e-7 and after >= 1e-7 else masked


def dare(base, experts, scale: float = 0.3, density: float = 0.5, seed: int = 0,
         consensus: Optional[str] = None, merge: str = "sum",
         weights: Optional[Sequence[float]] = None, *, rescale: Optional[str] = "density",
         convention: str = "epmq", out=None, progress: bool = True):
    """DARE (Yu et al., 2024): drop each task-vector entry with probability ``1 - density``,
    rescale the kept ones by ``1 / density`` (the paper's rescaling: the task vector is kept in
    expectation), then Task Arithmetic with ``scale``. ``consensus="sign"`` elects a sign per
    entry as TIES does (DARE-TIES); ``merge="mean"`` then takes the disjoint mean. ``density``:
    one, or one per expert. ``rescale="l1"``: the kept entries scaled so that each tensor keeps
    its L1 norm (mergekit's rescaling); None: not rescaled. ``convention="mergekit"``: its vote
    (+ where the votes cancel). The masks are drawn from ``(seed, tensor name, expert)``.
    """
    experts = _listed_experts(experts)
    kept = _each(density, "density", len(experts))
    seed = check_seed(seed)
    _check_choice(rescale, DARE_RESCALES, "rescale")
    _check_choice(convention, CONVENTIONS, "convention")
    if any(kept(k) == 0 for k in range(len(experts))):
        raise ValueError("density must be > 0 for DARE (everything would be dropped)")
    drawn_as = _mask_names(base, experts)

    def sparsify(name, k, tau):
        if kept(k) >= 1:
            return tau
        # (drawn on the CPU, the generator's, whatever torch's default device: set_default_device("cuda") failed)
        keep = torch.rand(tau.shape, generator=_generator(seed, drawn_as.get(name, name), k), device="cpu") < kept(k)
        masked = torch.where(keep.to(tau.device), tau, 0.0)
        if rescale == "density":
            return masked / kept(k)
        return _l1_rescaled(tau, masked) if rescale == "l1" else masked

    # (a density so small that no draw keeps an entry of any tensor left the base, said nowhere)
    trim = _Trim(density, kept, len(experts), "density", "DARE")
    return _sparse_merge(base, experts, scale, sparsify, consensus, merge, "dare", out, weights,
                         zero_vote=int(convention == "mergekit"),
                         statistic="its L1 norm rescaled" if rescale == "l1" else None, progress=progress,
                         trim=trim)


def ties(
    base,
    experts,
    scale: Optional[float] = None,
    density: float = 0.2,
    scope: str = "global",
    merge: str = "mean",
    weights: Optional[Sequence[float]] = None,
    *,
    convention: str = "epmq",
    out=None,
    progress: bool = True,
):
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

    trim     keep each task vector's entries whose magnitude is at least its k-th largest,
             ``k = round(density * n)`` (``density``: one, or one per expert); ``scope="global"``
             ranks over all float tensors of the model that some expert keeping anything changed
             (as FusionBench over the fine-tuned ones: a tower every expert left as the base's
             counts in no n, nor one only changed by experts whose k rounds to 0, who keep nothing
             as at density 0), refused where every expert's k is 0; ``scope="tensor"`` within each
             tensor (as mergekit). Entries tied with the k-th largest are all kept.
    elect    the sign of the sum of the trimmed entries; where they sum to exactly 0 there is
             no elected sign and the entry stays at the base.
    merge    ``"mean"``: the disjoint mean, the average of the nonzero trimmed entries that
             agree with the elected sign (the TIES paper); ``"sum"``: their sum.

    ``scale=None`` means 1.0 for ``"mean"`` (the TIES paper's default: the disjoint mean is
    already the size of one task vector, whatever the number of tasks) and 0.3 for ``"sum"``
    (FusionBench's CLIP setting, where the sum grows with the number of tasks).
    ``convention="mergekit"`` (``scope="tensor"`` only): mergekit 0.1.5's trim, ``max(1,
    floor(density n))`` entries, ties broken by torch's sort order, and its vote, + where the
    sum is exactly 0.
    """
    _needs_base(base, "ties")
    _check_choice(scope, ("global", "tensor"), "scope")
    _check_choice(convention, CONVENTIONS, "convention")
    if convention == "mergekit" and scope != "tensor":
        raise ValueError("convention='mergekit' trims each tensor: scope='tensor'")
    _check_choice(merge, ("mean", "sum"), "merge")
    if scale is None:
        scale = 1.0 if merge == "mean" else 0.3
    experts = _listed_experts(experts)  # (read twice: the thresholds, the merge)
    base_sd, expert_sds = _inputs(base, experts)
    kept = _each(density, "density", len(expert_sds))
    trim = _Trim(density, kept, len(expert_sds), "density", "TIES")
    weights = _check_weights(_listed(weights), len(expert_sds), divide=False)  # (before the thresholds' pass)
    thresholds = (
        _global_thresholds(base_sd, expert_sds, kept, progress) if scope == "global" else None
    )

    def sparsify(name, k, tau):
        if convention == "mergekit":
            if kept(k) >= 1:
                return tau
            if kept(k) <= 0 or tau.numel() == 0:
                return torch.zeros_like(tau)
            return _kept(tau, _by_magnitude(tau, descending=True)[:max(1, int(kept(k) * tau.numel()))])
        if thresholds is not None:
            thr = thresholds[k]
        else:
            thr = _kth_largest(lambda: [tau.abs()], tau.numel(), kept(k))
        # (ranked in float32, as the threshold was: float64 magnitudes by their float32 values)
        return torch.where(tau.abs().float() >= thr, tau, 0.0) if thr is not None else torch.zeros_like(tau)

    # (the inputs as given: a transformers module's fused tensors merged as the ones it saves)
    return _sparse_merge(base, experts, scale, sparsify, "sign", merge, "ties", out, weights,
                         zero_vote=int(convention == "mergekit"),
                         statistic="its entries ranked" if scope == "tensor" else None, progress=progress,
                         trim=trim if scope == "tensor" else None)  # (global: refused with its thresholds)


def breadcrumbs(base, experts, scale: float = 0.3, density: float = 0.9, gamma: float = 0.01,
                consensus: Optional[str] = None, merge: str = "sum",
                weights: Optional[Sequence[float]] = None, *, convention: str = "epmq", out=None,
                progress: bool = True):
    """Model Breadcrumbs (Davari and Belilovsky, 2024): in each tensor of each task vector, drop
    the ``gamma`` fraction of largest-magnitude entries (outliers) and the smallest ones, keeping
    ``density`` of the entries (ranks ``round(gamma n) + 1 .. + round(density n)`` by magnitude;
    fewer outliers are dropped where ``gamma + density > 1``), then Task Arithmetic with
    ``scale`` (``density`` and ``gamma``: one, or one per expert). Entries tied in magnitude with a
    kept boundary entry are kept. ``consensus="sign"``
    elects a sign per entry as TIES does (mergekit's ``breadcrumbs_ties``). ``convention=
    "mergekit"``: mergekit 0.1.5's counts, ``floor(gamma n)`` outliers and ``floor(density n)``
    kept (none dropped at density 1), ties broken by torch's sort order, and its vote (+ at 0).
    """
    experts = _listed_experts(experts)
    kept, outliers = _each(density, "density", len(experts)), _each(gamma, "gamma", len(experts))
    trim = _Trim(density, kept, len(experts), "density", "Breadcrumbs")
    _check_choice(convention, CONVENTIONS, "convention")

    def sparsify(name, k, tau):
        if convention == "mergekit":
            if kept(k) >= 1:
                return tau
            n = tau.numel()
            n_keep, n_top = int(kept(k) * n), int(outliers(k) * n)
            n_bottom = max(0, n - n_keep - n_top)
            return _kept(tau, _by_magnitude(tau, descending=False)[n_bottom:n_bottom + n_keep])
        m = tau.abs().float()  # (ranked in float32: the thresholds are float32 values)
        n = m.numel()
        n_keep = int(round(kept(k) * n))
        if n_keep == 0:
            return torch.zeros_like(tau)
        n_top = min(int(round(outliers(k) * n)), n - n_keep)
        upper = _kth_largest_rank(lambda: [m], n_top + 1)
        lower = _kth_largest_rank(lambda: [m], n_top + n_keep)
        return torch.where((m >= lower) & (m <= upper), tau, 0.0)

    return _sparse_merge(base, experts, scale, sparsify, consensus, merge, "breadcrumbs", out, weights,
                         zero_vote=int(convention == "mergekit"), statistic="its entries ranked", progress=progress,
                         trim=trim)


DELLA_RESCALES = ("probability", "l1", None)


def della(base, experts, scale: float = 1.0, density: float = 0.7, epsilon: float = 0.15,
          seed: int = 0, consensus: Optional[str] = "sign", merge: str = "mean",
          weights: Optional[Sequence[float]] = None, *, rescale: Optional[str] = "probability",
          convention: str = "epmq", out=None, progress: bool = True):
    """DELLA-Merging (Deep et al., 2024): MagPrune, elect sign, disjoint merge.

    MagPrune keeps each entry of a task vector with a probability that grows with its magnitude
    rank within its row (a matrix's output row; a vector is one row): from ``density -
    epsilon`` for the smallest to ``density + epsilon`` for the largest, linear in the rank.
    ``rescale="probability"`` divides a kept entry by its own keep probability (the paper's
    rescaling: each entry is kept in expectation); ``"l1"`` scales the kept entries so that each
    tensor keeps its L1 norm (mergekit's); None leaves them. Equal magnitudes take ranks in
    index order. A density of 1 keeps every entry, whatever ``epsilon``. ``density`` and
    ``epsilon``: one, or one per expert. ``consensus=None, merge="sum"`` is mergekit's
    ``della_linear``. ``convention="mergekit"``: its vote (+ where the votes cancel), its ranks
    along dimension 1 of a tensor of more than two (a convolution's input channels at each
    kernel position), its strict ``density + epsilon < 1``, and density 0 dropping the task
    vector. (A row of one entry keeps it with probability ``density``, where mergekit 0.1.5
    fails dividing 0 by 0.)
    """
    experts = _listed_experts(experts)
    kept = _each(density, "density", len(experts))
    spread = _each(epsilon, "epsilon", len(experts))
    trim = _Trim(density, kept, len(experts), "density", "DELLA")
    seed = check_seed(seed)
    _check_choice(rescale, DELLA_RESCALES, "rescale")
    _check_choice(convention, CONVENTIONS, "convention")
    mergekit = convention == "mergekit"
    for k in range(len(experts)):
        d, e = kept(k), spread(k)
        if d >= 1 or (mergekit and d == 0):  # (mergekit: nothing kept at density 0)
            continue
        if not (0 < d - e and (d + e < 1 if mergekit else d + e <= 1)):
            raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon "
                             f"{'< 1 (as mergekit)' if mergekit else '<= 1'} (or density 1), got density={d}, "
                             f"epsilon={e}" + (f" for expert {k}" if len(experts) > 1 else ""))
    drawn_as = _mask_names(base, experts)

    def sparsify(name, k, tau):
        if kept(k) >= 1:
            return tau
        if kept(k) == 0:
            return torch.zeros_like(tau)
        # the ranks run along each output row (all of a tensor's entries past dimension 0);
        # mergekit's along dimension 1 of any tensor (of a [out, in, kh, kw] convolution: each
        # kernel position's input channels)
        channels_last = mergekit and tau.dim() > 2
        moved = tau.movedim(1, -1) if channels_last else tau
        shape = moved.shape
        rows = moved.reshape(-1, shape[-1]) if channels_last else _rows(tau)
        n = rows.shape[1]
        rank = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
        p = kept(k) + spread(k) * (2 * rank / (n - 1) - 1 if n > 1 else torch.zeros_like(rank))
        draw = torch.rand(rows.shape, generator=_generator(seed, drawn_as.get(name, name), k),
                          device="cpu").to(tau.device)
        keep = draw < p
        kept_rows = torch.where(keep, rows / p if rescale == "probability" else rows, 0.0)
        masked = kept_rows.reshape(shape).movedim(-1, 1) if channels_last else kept_rows.reshape(shape)
        return _l1_rescaled(tau, masked) if rescale == "l1" else masked

    return _sparse_merge(base, experts, scale, sparsify, consensus, merge, "della", out, weights,
                         zero_vote=int(convention == "mergekit"),
                         statistic="its rows ranked", progress=progress, trim=trim)


def sce(base, experts, select_topk: float = 1.0, *, out=None, progress: bool = True):
    """SCE (Wan et al., 2024, FuseChat's merge): per tensor, Select the entries where the task
    vectors vary most (the top ``select_topk`` of the entries whose variance across the experts
    is nonzero; the others are zeroed), Calculate each task vector's weight as its mean square
    over the tensor (normalized to sum to 1; equal where they sum below 1e-6), Erase the entries
    whose sign is not that of their sum (+ where the sum is 0), then ``W = W_0 + sum_k w_k m_k
    tau_k / max(sum_k w_k m_k, 1e-6)`` with ``m_k`` the agreeing entries. mergekit 0.1.5's
    ``sce``, step for step (equal variances at the selection's boundary in ``torch.topk``'s
    order, as its; no scale or per-model weight)."""
    _needs_base(base, "sce")
    _check_unit(select_topk, "select_topk")
    experts = _listed_experts(experts)
    trim = _Trim(select_topk, lambda k: float(select_topk), len(experts), "select_topk", "SCE")
    if select_topk < 1 and len(experts) < 2:  # (one task vector varies nowhere: nothing selected, the base)
        raise ValueError(f"SCE's select_topk < 1 selects the entries where the experts' task vectors vary: it "
                         f"needs two experts or more, got {len(experts)} (select_topk=1 merges one as it is)")
    _warn_of_fused_experts(base, experts, "its entries selected and weighted")

    def merge_tensor(name, W_0, W_k):
        # passes over the task vectors, one held at a time (a stack of K, with its masks and products,
        # grew with K): their sum and variance (Welford's: an entry every expert changed alike has 0,
        # as torch.var gives it), each one's mean square of the selection, then the weighted sums
        K = len(W_k)
        taus = _OnDemand(lambda k: W_k[k] - W_0, K)
        if W_0.element_size() * W_0.numel() * K <= HOLD_BYTES:
            taus = list(taus)  # (each made once)
        select = select_topk < 1
        total = torch.zeros_like(W_0)
        mean, spread = (torch.zeros_like(W_0), torch.zeros_like(W_0)) if select else (None, None)
        energy = []
        for k in range(K):
            tau = taus[k]
            total += tau
            if select:
                delta = tau - mean
                mean += delta / (k + 1)
                spread += delta * (tau - mean)
            else:
                energy.append(tau.square().mean())
            del tau
        selected = None
        if select:
            variance = spread.div_(K)
            del mean
            n = int(torch.count_nonzero(variance) * select_topk)
            selected = torch.zeros_like(variance)
            if n:
                selected.view(-1)[torch.topk(variance.abs().view(-1), k=n, largest=True).indices] = 1
            trim.note(name, 0, variance, selected)  # (one selection for all the experts, of the varying entries)
            del variance, spread
            total *= selected  # (the sum of the selected entries)
            energy = [(taus[k] * selected).square().mean() for k in range(K)]
        sign = torch.where(total >= 0, 1.0, -1.0)
        del total
        energy = torch.stack(energy)
        whole = float(energy.sum())
        weights = energy / whole if abs(whole) >= 1e-6 else torch.full_like(energy, 1 / K)
        merged, weight = torch.zeros_like(W_0), torch.zeros_like(W_0)
        for k in range(K):
            tau = taus[k] if selected is None else taus[k] * selected
            w = weights[k] * (tau.sign() == sign)
            merged += tau * w
            weight += w
            del tau, w
        return W_0 + merged / weight.clamp(min=1e-6)

    out = _merge_each(base, experts, merge_tensor, out, lazy=True, method="sce", progress=progress)
    trim.check()
    return out


def _polar(A: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor ``P Q^T`` of ``A = P S Q^T``: the matrix with orthonormal columns
    nearest to ``A`` (orthogonal Procrustes)."""
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _numerical_rank(S: torch.Tensor, shape) -> int:
    """How many of the descending singular values ``S`` of a matrix of ``shape`` are above rounding
    (``torch.linalg.matrix_rank``'s tolerance): past them the singular vectors are any orthonormal
    completion the SVD picks (all of a zero matrix's), different by device and library."""
    return int((S > S[0] * max(shape) * torch.finfo(S.dtype).eps).sum()) if S.numel() else 0


def tsv(base, experts, scale: float = 1.0, rank_fraction: Optional[float] = None, *, out=None, progress: bool = True):
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors").

    For every matrix (2-D tensor): keep the top ``r = max(1, floor(rank_fraction * min(d_out,
    d_in)))`` singular triplets of each task vector (``rank_fraction`` defaults to 1 / number of
    experts, so that together they fill the rank), stack them, ``U = [U_1 .. U_K]``, ``S``,
    ``V = [V_1 .. V_K]``, replace ``U`` and ``V`` by their nearest matrices with orthonormal
    columns (removing the interference between tasks' singular subspaces; where ``K r`` passes
    ``min(d_out, d_in)``, as with ``rank_fraction`` above ``1 / K``, they cannot all be
    orthonormal and the polar factor is the nearest partial isometry) and add
    ``scale * U_o diag(S) V_o^T`` to the base. Other tensors (biases, norms, convolutions) take
    the mean task vector, scaled. Triplets past a task vector's numerical rank (``torch.linalg.matrix_rank``'s
    tolerance), whose singular vectors the SVD picks at will, are left out: an expert equal to the
    base adds none.
    """
    _needs_base(base, "tsv")
    check_number(scale, "scale")
    if rank_fraction is not None and not 0 < check_number(rank_fraction, "rank_fraction") <= 1:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
    experts = _listed_experts(experts)
    _warn_of_fused_experts(base, experts, "not a matrix: no SVD, the mean task vector taken")

    def merge_tensor(name, W_0, W_k):
        if W_0.dim() != 2:  # (the mean task vector, made one at a time)
            return W_0 + scale * _mean(_OnDemand(lambda k: W_k[k] - W_0, len(W_k)))
        fraction = rank_fraction if rank_fraction is not None else 1.0 / len(W_k)
        r = max(1, int(fraction * min(W_0.shape)))
        Us, Ss, Vhs = [], [], []
        for k in range(len(W_k)):  # (copies of the kept triplets: a slice would keep all of U, Vh)
            U, S, Vh = torch.linalg.svd(W_k[k] - W_0, full_matrices=False)
            # past the numerical rank (all of a zero task vector's) the singular vectors are whatever completion
            # the SVD picks: orthogonalised with the others', they would turn those, for no singular value
            rank = min(r, _numerical_rank(S, W_0.shape))
            Us.append(U[:, :rank].clone()), Ss.append(S[:rank].clone()), Vhs.append(Vh[:rank].clone())
            del U, S, Vh
        if not sum(len(S) for S in Ss):  # (every expert equal to the base here)
            return W_0.clone()
        U_o = _polar(torch.cat(Us, dim=1))
        Vh_o = _polar(torch.cat(Vhs, dim=0).T).T
        return W_0 + scale * (U_o * torch.cat(Ss)) @ Vh_o

    return _merge_each(base, experts, merge_tensor, out, lazy=True, method="tsv", progress=progress)


def iso_c(base, experts, scale: float = 1.0, *, out=None, progress: bool = True):
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging").

    For every matrix: the SVD ``U S V^T`` of the summed task vectors, with every singular value
    replaced by their mean, ``W_0 + scale * mean(S) U V^T`` (a flat spectrum, so that no task's
    directions are dwarfed by the dominant ones). The directions past the sum's numerical rank
    (a sum of low-rank task vectors: LoRA experts'), whose singular vectors the SVD picks at will,
    are left out. Other tensors take the mean task vector, scaled.
    """
    _needs_base(base, "iso_c")
    check_number(scale, "scale")
    experts = _listed_experts(experts)
    _warn_of_fused_experts(base, experts, "not a matrix: no SVD, the mean task vector taken")

    def merge_tensor(name, W_0, W_k):
        tau_sum = W_k[0] - W_0  # (one task vector at a time: a stack would hold K)
        for k in range(1, len(W_k)):
            tau_sum += W_k[k] - W_0
        if W_0.dim() != 2:
            return W_0 + scale / len(W_k) * tau_sum
        U, S, Vh = torch.linalg.svd(tau_sum, full_matrices=False)
        # (the mean over every singular value, as the paper's; the directions past the sum's rank, a low-rank
        # (LoRA) sum's, are arbitrary and given none: the mean value on them was a full-rank update of noise)
        rank = _numerical_rank(S, tau_sum.shape)
        return W_0 + scale * S.mean() * (U[:, :rank] @ Vh[:rank])

    return _merge_each(base, experts, merge_tensor, out, lazy=True, method="iso_c", progress=progress)


def model_stock(base, experts, per_row: bool = False, *, convention: str = "epmq", out=None, progress: bool = True):
    """Model Stock (Jang et al., ECCV 2024): ``W = t mean_k W_k + (1 - t) W_0`` with
    ``t = K cos / (1 + (K - 1) cos)``, ``cos`` the mean cosine between the K task vectors'
    pairs (over the whole tensor, or each output row with ``per_row=True``). Needs at least two
    experts. ``t`` is clamped to [-1, 1]: the formula (the paper's geometry, for ``cos`` in
    [0, 1]) diverges as the task vectors point apart (``cos -> -1 / (K - 1)``: t = -4e4 at cos =
    -0.99995 with two experts, the result 200 task vectors away), and passes -1 below ``cos =
    -1 / (2K - 1)``; peers (mergekit, FusionBench) apply it unclamped, and agree above that.
    Where it is 0/0 (unit task vectors summing to 0: two scalars of opposite signs) the base is
    kept. ``convention="mergekit"``: mergekit 0.1.5's, ``t`` unclamped, the norms' product
    floored at 1e-6 in the cosines, the base kept where ``|1 + (K - 1) cos| < 1e-6`` (every
    pair's cosine made as mergekit makes it: past ``HOLD_BYTES`` each pair's task vectors are made
    anew, two at a time; epmq's convention takes one pass).
    """
    _needs_base(base, "model_stock")
    _check_choice(convention, CONVENTIONS, "convention")
    experts = _listed_experts(experts)
    if len(experts) < 2:  # (before any tensor is written out: one expert has no angle to another)
        raise ValueError(f"model_stock needs at least two experts, got {len(experts)}")
    _warn_of_fused_experts(base, experts, "its cosines taken")

    def merge_tensor(name, W_0, W_k):
        K = len(W_k)
        # (mergekit's rows of a tensor of more dimensions, a convolution or fused MoE experts: along
        # its last dimension; epmq's: each output channel whole)
        last = per_row and convention == "mergekit" and W_0.dim() > 2

        def vectors(tau):  # (what the cosines are taken over, one a row)
            if last:
                return tau.reshape(-1, tau.shape[-1])
            return _rows(tau) if per_row else tau.reshape(1, -1)

        if convention == "mergekit":  # (its floored norms' product does not split into the pairs' directions)
            held = W_0.element_size() * W_0.numel() * K <= HOLD_BYTES
            taus, norms, total = [], [], None
            for k in range(K):  # (each expert read once: its task vector, and into the mean as _mean sums it)
                W = W_k[k]
                tau = vectors(W - W_0)
                norms.append(tau.norm(dim=1))
                if held:
                    taus.append(tau)
                total = W.clone() if total is None else total.add_(W)
                del W, tau
            if not held:  # (each pair's task vectors made anew, two held at a time: K (K + 1) / 2 reads)
                taus = _OnDemand(lambda k: vectors(W_k[k] - W_0), K)
            cosines = []
            for i in range(K):
                tau = taus[i]
                cosines += [((tau * taus[j]).sum(1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                            for j in range(i + 1, K)]
                del tau
            del taus
            cos = torch.stack(cosines).mean(0)
            singular = (1 + (K - 1) * cos).abs() < 1e-6
            t = torch.where(singular, 0.0, K * cos / torch.where(singular, 1.0, 1 + (K - 1) * cos))
        else:
            # with u_k = tau_k / |tau_k| (0 for a zero task vector: cosine 0; no floor on the norms,
            # which would make the cosine depend on the task vectors' size), the pairs' cosines sum to
            # (|sum_k u_k|^2 - m) / 2, m the nonzero u_k: one pass, sum_k u_k and sum_k W_k held
            # whatever K (the K task vectors held for every pair grew with K)
            directions, total, m = None, None, 0
            for k in range(K):  # (each expert read once)
                W = W_k[k]
                tau = vectors(W - W_0)
                norm = tau.norm(dim=1, keepdim=True)
                m = m + (norm[:, 0] > 0)
                u = tau.div_(torch.where(norm > 0, norm, 1.0))
                directions = u if directions is None else directions.add_(u)
                total = W.clone() if total is None else total.add_(W)
                del W, tau, u
            spread = directions.square().sum(1)
            del directions
            cos = (spread - m) / (K * (K - 1))
            denominator = (K - m + spread) / K  # (1 + (K - 1) cos, >= 0 as written: 0 where the u_k sum to 0)
            t = torch.where(denominator > 0, K * cos / denominator.clamp(min=1e-30), 0.0).clamp(-1, 1)
        if last:
            t = t.reshape(*W_0.shape[:-1], 1)
        else:
            t = t.reshape(-1, *([1] * (W_0.dim() - 1))) if per_row and W_0.dim() > 1 else t.reshape(())
        return t * total.div_(K) + (1 - t) * W_0  # (as mergekit writes it: the same rounding)

    return _merge_each(base, experts, merge_tensor, out, lazy=True, method="model_stock", progress=progress)


def slerp(a, b, t: float | Callable[[str], float] = 0.5, per_row: bool = False,
          dot_threshold: float = 0.9995, *, out=None, progress: bool = True):
    """Spherical linear interpolation from model ``a`` (t = 0) to model ``b`` (t = 1).

    Each tensor (as mergekit 0.1.5 does; or each output row, ``per_row=True``: a vector's entries
    are then rows of one, interpolated linearly) moves along the great circle between the two
    directions: ``sin((1 - t) theta) / sin theta a + sin(t theta) / sin theta b``, ``theta`` the
    angle between them; where they are nearly parallel or opposite (``|cos theta| >
    dot_threshold``), or one is 0, it interpolates linearly. ``t`` may be a function of the
    tensor's name (a schedule over layers; a transformers module's tensors are named as it saves
    them, as ``epmq merge`` names them: its fused ones are merged as the ones it saves).
    """
    check_number(dot_threshold, "dot_threshold", 0)  # (below 0 every tensor passed it: linear, silently)
    per_expert = "per_row taking each expert's whole matrix as a row (an angle each), not its rows"
    _warn_of_fused_experts(None, [a, b], per_expert if per_row else "the angle between the models taken",
                           at_once=not per_row)
    # (a schedule reads every tensor under its saved name, as the fused ones are merged: read at
    # the module's names beside them, a filter on either naming missed the other's tensors)
    named = _mask_names(None, [a, b]) if callable(t) else {}

    def merge_tensor(name, W_0, W_k):
        name = named.get(name, name)
        frac = check_number(t(name) if callable(t) else t, f"t (at {name})")
        if not 0 <= frac <= 1:  # (past a or b the arc runs on, into a model that is neither)
            raise ValueError(f"t (at {name}) must be in [0, 1] (a at 0, b at 1: slerp interpolates), got {frac}")
        A, B = ((W.reshape(-1, 1) if W.dim() < 2 else W.flatten(1)) if per_row else W.reshape(1, -1)
                for W in W_k)
        norm_a, norm_b = (X.norm(dim=1, keepdim=True) for X in (A, B))
        tiny = torch.finfo(A.dtype).tiny  # (only against 0/0: a floor would bend tiny rows' cosines)
        cos = ((A / norm_a.clamp(min=tiny)) * (B / norm_b.clamp(min=tiny))).sum(1, keepdim=True).clamp(-1, 1)
        # (sin theta = 0, or a zero row with no direction: no circle)
        linear = (cos.abs() > dot_threshold) | (cos.abs() >= 1) | (norm_a == 0) | (norm_b == 0)
        theta = torch.acos(torch.where(linear, 0.0, cos))
        sin_theta = torch.where(linear, 1.0, torch.sin(theta))
        ca = torch.where(linear, 1 - frac, torch.sin((1 - frac) * theta) / sin_theta)
        cb = torch.where(linear, frac, torch.sin(frac * theta) / sin_theta)
        return (ca * A + cb * B).reshape(W_k[0].shape)

    # (a schedule over names may give two names of one tensor two values: each merged apart)
    return _merge_each(None, [a, b], merge_tensor, out, tied=not callable(t), method="slerp", progress=progress)


def nuslerp(base, experts, weights: Sequence[float] = (1.0, 1.0), row_wise: bool = False,
            flatten: bool = True, *, out=None, progress: bool = True):
    """mergekit's NuSLERP: spherical interpolation of two experts (``base=None``) or of their task
    vectors (added to ``base``) at ``t = w_1 / (w_0 + w_1)`` (weights >= 0 of a sum of 1e-6 or
    more, where mergekit takes 0.5 below it and goes past the experts for a negative one), without
    normalizing: ``(sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin theta``,
    ``theta`` the angle between ``v_0`` and ``v_1``, linear where they are parallel or opposite
    to 1e-16 in ``1 - cos^2``. The vectors are each tensor whole (``flatten``, the default),
    else its rows along the last dimension, or along the first (``row_wise``: a matrix's
    columns). mergekit 0.1.5's ``nuslerp`` step for step."""
    experts = _listed_experts(experts)
    # (None: equal, as every merge taking weights reads it; sum(None) failed as a bare TypeError)
    weights = _check_weights(_listed(weights), 2, divide=False) or [1.0, 1.0]
    if len(experts) != 2:
        raise ValueError(f"nuslerp interpolates two experts, got {len(experts)}")
    total = sum(weights)
    if abs(total) < 1e-6:  # (mergekit takes t = 0.5 there: weights 1 and -1 gave the midpoint)
        raise ValueError(f"nuslerp's weights {weights} sum to {total:g}: t = w_1 / (w_0 + w_1) has no value; "
                         f"give weights of a positive sum (they are relative: 1 and 3 is t = 0.75)")
    if min(weights) < 0:
        raise ValueError(f"nuslerp's weights must be >= 0 (t = w_1 / (w_0 + w_1) in [0, 1]: past an expert the "
                         f"arc runs on, into a model that is neither), got {weights}")
    t = weights[1] / total
    # (rows along the last dimension are each expert's matrix's rows: no warning)
    if flatten or row_wise:
        _warn_of_fused_experts(base, experts, "the angle between the vectors taken")

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    def interpolate(v0, v1):
        shape = v0.shape
        if flatten:
            v0, v1 = v0.reshape(-1), v1.reshape(-1)
        elif row_wise:
            v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
        parallel = (1 - cos.square()) <= 1e-16
        theta = torch.acos(torch.where(parallel, 0, cos))
        arc = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
        result = torch.where(parallel, (1 - t) * v0 + t * v1, arc)
        return (result.transpose(0, -1) if row_wise and not flatten else result).reshape(shape)

    def merge_tensor(name, W_0, W_k):
        if W_0 is None:
            return interpolate(W_k[0], W_k[1])
        return W_0 + interpolate(W_k[0] - W_0, W_k[1] - W_0)

    return _merge_each(base, experts, merge_tensor, out, method="nuslerp", progress=progress)


def multislerp(base, experts, weights: Optional[Sequence[float]] = None, normalize_weights: bool = True,
               eps: float = 1e-8, *, out=None, progress: bool = True):
    """mergekit's Multi-SLERP: a weighted mean of several experts (or of their task vectors,
    added to ``base``) on the sphere. Per tensor: each vector scaled to unit length, their
    weighted mean ``m`` normalized, each unit vector's part orthogonal to ``m`` averaged with the
    weights (``g``), mapped back by ``m cos|g| + g sin|g| / |g|`` and scaled by the weighted mean
    of the vectors' lengths. ``weights``: one per expert (default 1), divided by their sum
    (``normalize_weights``). Where the weighted mean of the unit vectors vanishes, two experts
    are averaged linearly and more are refused, but where every vector is 0 (a tensor no expert
    changed: frozen embeddings, norms) the base is kept (mergekit 0.1.5 raises). One expert is
    returned as it is. Otherwise mergekit's ``multislerp`` step for step (``eps`` as its)."""
    experts = _listed_experts(experts)
    weights = _check_weights(_listed(weights), len(experts), divide=normalize_weights)
    check_number(eps, "eps", 0)
    _warn_of_fused_experts(base, experts, "their norms and directions taken")

    def mean_on_sphere(name, vectors, reference):
        # one vector held at a time (a stack of K, its unit vectors and tangents, grew with K): the
        # weighted sum of the unit vectors, M, and the norms are all the steps take
        # (on the vectors' device, not torch's default: a [K, 1] on another device is refused, not broadcast)
        w = torch.tensor([1.0] * len(vectors) if weights is None else weights, dtype=reference.dtype,
                         device=reference.device)
        if normalize_weights:
            w = w / w.sum()
        norms, mean = [], None
        for k in range(len(vectors)):
            flat = vectors[k].reshape(-1)
            norm = torch.norm(flat)
            norms.append(norm)
            # (a zero vector has no direction: its unit 0, as at eps > 0, not 0 / 0 at eps=0)
            unit = flat / torch.where(norm + eps > 0, norm + eps, 1.0) * w[k]
            mean = unit if mean is None else mean.add_(unit)
            del flat, unit
        norms = torch.stack(norms)
        mean_norm = torch.norm(mean)
        if (mean_norm < eps or mean_norm == 0) and bool(((norms < eps) | (norms == 0)).all()):
            # (no expert moved this tensor: the base, or the zero vectors themselves; mergekit raises)
            return torch.zeros_like(reference)
        if mean_norm < eps or mean_norm == 0:
            if len(vectors) != 2:
                raise ValueError(f"multislerp: the weighted mean of the experts' directions is 0 at {name!r} "
                                 f"(opposite vectors with weights that balance): give other weights")
            return vectors[0] * w[0] + vectors[1] * w[1]
        # the unit vectors' parts orthogonal to m = M / |M|, averaged with the weights: sum_k w_k (u_k -
        # (u_k . m) m) = M - (M . m) m, 0 but for rounding (mergekit's tangent step moves by that rounding)
        g = mean - torch.dot(mean, mean / mean_norm) * (mean / mean_norm)
        mean = mean / mean_norm
        g_norm = torch.norm(g) + eps
        result = mean * torch.cos(g_norm) + g * torch.where(g_norm > 0, torch.sin(g_norm) / g_norm, 1.0)
        return (result * (norms * w).sum()).view(reference.shape)

    def merge_tensor(name, W_0, W_k):
        if len(W_k) == 1:  # (a copy: W_k[0] may be the expert's own float32 tensor)
            return W_k[0].clone()
        reference = W_k[0] if W_0 is None else W_0
        vectors = W_k if W_0 is None else _OnDemand(lambda k: W_k[k] - W_0, len(W_k))
        if reference.element_size() * reference.numel() * len(W_k) <= HOLD_BYTES:
            vectors = list(vectors)  # (each made once)
        result = mean_on_sphere(name, vectors, reference)
        return result if W_0 is None else result + W_0

    return _merge_each(base, experts, merge_tensor, out, lazy=True, method="multislerp", progress=progress)


def karcher(models, max_iter: int = 10, tol: float = 1e-5, *, out=None, progress: bool = True):
    """mergekit's Karcher mean: the models' directions averaged on the sphere (per tensor, equal
    weights) by up to ``max_iter`` steps of the Riemannian mean (each along the weighted tangent
    ``sum_k alpha_k theta_k / sin theta_k (u_k - cos theta_k m)``, stopping where it is below
    ``tol``), scaled by the mean of the models' norms; zero tensors (norm <= ``tol``) take no
    part in the direction. mergekit 0.1.5's ``karcher`` step for step."""
    if not is_integer(max_iter) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")  # (numpy's integers are)
    max_iter, tol = int(max_iter), check_number(tol, "tol", 0)
    models = _listed_experts(models)
    _warn_of_fused_experts(None, models, "their norms and directions taken")

    def merge_tensor(name, W_0, W_k):
        if len(W_k) == 1:  # (a copy: it may be the model's own float32 tensor)
            return W_k[0].clone()
        # past HOLD_BYTES the models' tensors (and their unit vectors) are made anew at each step, one at
        # a time: the same steps, each model read once a step (a list of K grew with K)
        held = W_k[0].element_size() * W_k[0].numel() * len(W_k) <= HOLD_BYTES
        tensors = list(W_k) if held else W_k
        alphas = [1.0 / len(tensors)] * len(tensors)
        norms = [torch.linalg.vector_norm(tensors[k]) for k in range(len(tensors))]
        valid = [k for k, n in enumerate(norms) if float(n) > tol]
        if not valid:  # (every tensor 0, or within tol of it)
            return torch.zeros_like(tensors[0])
        total = sum(alphas[k] for k in valid)
        weights = [alphas[k] / total for k in valid]
        units = _OnDemand(lambda i: tensors[valid[i]] / norms[valid[i]], len(valid))
        if held:
            units = list(units)
        mean = torch.zeros_like(tensors[valid[0]])
        for i, alpha in enumerate(weights):
            mean += alpha * units[i]
        mean_norm = torch.linalg.vector_norm(mean)
        mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            for i, alpha in enumerate(weights):
                unit = units[i]
                cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
                theta = torch.arccos(cos)
                if float(theta) < tol or float(theta) == 0.0:  # (on the mean: no tangent, 0 / 0 at tol=0)
                    continue
                tangent += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
                del unit
            step = torch.linalg.vector_norm(tangent)
            if float(step) < tol or float(step) == 0.0:  # (converged: no step, 0 / 0 at tol=0)
                break
            mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
            length = torch.linalg.vector_norm(mean)
            if float(length) > tol:
                mean = mean / length
        return sum(alpha * n for alpha, n in zip(alphas, norms)) * mean

    # (one model given for the list was iterated: an nn.Sequential's layers merged as models)
    return _merge_each(None, models, merge_tensor, out, lazy=True, method="karcher", progress=progress)


def nearswap(base, experts, t: float = 0.001, *, out=None, progress: bool = True):
    """mergekit's NearSwap: the base's entries move to the one expert's where the two are close,
    ``W = w W_1 + (1 - w) W_0`` with ``w = min(1, t / max(|W_1 - W_0|, 1e-6))`` entry by entry:
    entries that differ by less than ``t`` take the expert's value, the others move by ``t``
    toward it. mergekit 0.1.5's ``nearswap`` step for step, but that an entry equal in both stays
    it bit for bit (mergekit's is an ulp off where t is below 1e-6)."""
    experts = _listed_experts(experts)
    _needs_base(base, "nearswap")
    if len(experts) != 1:
        raise ValueError(f"nearswap moves the base toward one expert, got {len(experts)}")
    if check_number(t, "nearswap's t") <= 0:  # (at 0 every entry stays the base's, as mergekit returns it)
        raise ValueError(f"nearswap's t must be > 0 (entries within t of the expert take its value), got {t}")
    t = float(t)

    def merge_tensor(name, W_0, W_k):
        W_1 = W_k[0]
        w = (t / torch.abs(W_0 - W_1).clamp(min=1e-6)).clamp(min=0, max=1)
        # (an entry the expert left alone stays the base's: w W_1 + (1 - w) W_0 rounds it off by an ulp
        # where w < 1 there, t below 1e-6; elsewhere mergekit's arithmetic, its tensors bit for bit)
        return torch.where(W_1 == W_0, W_0, w * W_1 + (1 - w) * W_0)

    return _merge_each(base, experts, merge_tensor, out, method="nearswap", progress=progress)


def ram(base, experts, epsilon: float = 1e-5, *, out=None, progress: bool = True):
    """RAM (Reinforced Agent Merging, arXiv 2601.13572): an entry that exactly one expert
    changed (``|tau_k| > epsilon``) takes that expert's change whole, one that ``c > 1`` experts
    changed takes their mean change, ``W = W_0 + sum_k m_k tau_k / max(c, 1)``: unlike a mean of
    task vectors, a skill only one expert learned is not diluted by the experts that left its
    entries alone. mergekit 0.1.5's ``ram``, step for step."""
    return _ram(base, experts, 0.0, 0.0, epsilon, "ram", out, progress)


def ram_plus(base, experts, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5, *, out=None,
             progress: bool = True):
    """RAM+ as mergekit's ``ramplus_tl`` (tensor-local): RAM with each expert's lone changes
    scaled by ``1 + r min(alpha, rho_k)``, ``rho_k`` the number of its changed entries that
    others changed too over the number only it changed, counted per tensor: an expert whose
    changes mostly overlap others' has its own ones amplified, as the shared ones are averaged
    down. mergekit 0.1.5's ``ramplus_tl``, step for step (but that an expert with no lone change in
    a tensor has none to scale, where mergekit's 0 / 0 at ``epsilon=0`` makes the tensor NaN)."""
    return _ram(base, experts, r, alpha, epsilon, "ram_plus", out, progress)


def _ram(base, experts, r, alpha, epsilon, method, out, progress):
    """RAM (``r = 0``: the lone changes whole) and RAM+."""
    _needs_base(base, method)
    r, alpha, epsilon = (check_number(r, "r", 0), check_number(alpha, "alpha", 0),
                         check_number(epsilon, "epsilon", 0))
    experts = _listed_experts(experts)
    if r:  # (RAM's entries alone: each expert's matrix's)
        _warn_of_fused_experts(base, experts, "each expert's overlap counted", stacklevel=4)

    def merge_tensor(name, W_0, W_k):
        # two passes over the task vectors, one held at a time (a stack of K, with its masks and
        # products, grew with K): the count of experts changing each entry, then each expert's
        # share (its rho_k needs only the count and its own changes)
        taus = _OnDemand(lambda k: W_k[k] - W_0, len(W_k))
        if W_0.element_size() * W_0.numel() * len(W_k) <= HOLD_BYTES:
            taus = list(taus)  # (each made once)
        c = torch.zeros(W_0.shape, dtype=torch.int32, device=W_0.device)  # (how many experts changed each entry)
        for k in range(len(taus)):
            c += taus[k].abs() > epsilon
        lone, shared = c == 1, c > 1
        divisor = c.clamp(min=1)
        total = torch.zeros_like(W_0)
        for k in range(len(taus)):
            tau = taus[k]
            changed = tau.abs() > epsilon
            kept = tau * changed
            own = kept * lone
            alone = (changed & lone).sum() if r else 0
            if alone:  # (no lone change, none to scale: its 0 / 0 at epsilon=0 made the tensor NaN)
                rho = (changed & shared).sum() / alone.clamp(min=epsilon)
                own = own * (1 + r * rho.clamp(min=0, max=alpha))
            total += own + kept * shared / divisor
            del tau, changed, kept, own
        return W_0 + total

    return _merge_each(base, experts, merge_tensor, out, lazy=True, method=method, progress=progress)


def arcee_fusion(base, experts, *, out=None, progress: bool = True):
    """mergekit's Arcee Fusion of the base and one expert: the expert's change is kept where its
    importance is an outlier and dropped elsewhere, ``W = W_0 + tau 1[I >= median(I) + 1.5
    IQR(I)]``, with ``I = |tau| KL(softmax(W_1) || softmax(W_0))`` (the divergence of each row,
    along the last dimension; of the whole tensor for a vector; softmaxes offset by 1e-8). The
    quartiles are the sorted importances at ``floor(q (n - 1))``, as mergekit's; mergekit 0.1.5
    estimates them from a million entries drawn at random in tensors larger than that, epmq
    uses every entry (the same function, deterministic)."""
    experts = _listed_experts(experts)
    _needs_base(base, "arcee_fusion")
    if len(experts) != 1:
        raise ValueError(f"arcee_fusion fuses one expert into the base, got {len(experts)}")
    _warn_of_fused_experts(base, experts, "its importances' quartiles taken")

    def merge_tensor(name, W_0, W_k):
        W_1 = W_k[0]
        if W_0.numel() == 0:  # (no entries: no quartiles to take)
            return W_0.clone()
        p = torch.softmax(W_1, dim=-1) + 1e-8
        q = torch.softmax(W_0, dim=-1) + 1e-8
        importance = (W_1 - W_0).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        ordered = torch.sort(importance.reshape(-1)).values
        quartiles = torch.tensor([0.25, 0.5, 0.75], device=ordered.device)
        q1, median, q3 = ordered[(quartiles * (ordered.numel() - 1)).long()]
        keep = (importance >= median + 1.5 * (q3 - q1)).to(W_0.dtype)
        return W_0 + (W_1 - W_0) * keep

    return _merge_each(base, experts, merge_tensor, out, method="arcee_fusion", progress=progress)


# --------------------------------------------------------------------------- top-k threshold


def _kth_largest(magnitudes: Callable[[], Iterable[torch.Tensor]], n: int, density: float):
    """The k-th largest of ``n`` non-negative values spread over several tensors,
    ``k = round(density * n)``, without concatenating them; ``None`` when k = 0."""
    k = min(int(round(density * n)), n)
    return None if k == 0 else _kth_largest_rank(magnitudes, k)


def _kth_largest_rank(magnitudes: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The k-th largest (k >= 1) of the non-negative values ``magnitudes()`` yields.

    Radix select on the float32 bit patterns, which order non-negative floats like their
    values: one pass counts the high 16 bits, a second the low 16 bits inside the high bucket
    that holds the k-th value. ``magnitudes()`` yields the tensors anew for each pass.
    """
    return _kth_largest_ranks(lambda: ((0, m) for m in magnitudes()), [k])[0]


def _kth_largest_ranks(magnitudes: Callable[[], Iterable[tuple]],
                       ks: Union[Sequence[Optional[int]], Callable[[], Sequence[Optional[int]]]]) -> list:
    """``_kth_largest_rank`` of several sets of values in the same two passes: ``magnitudes()``
    yields ``(j, tensor)``, values of set j, whose ``ks[j]``-th largest is found (None: none,
    its values not asked for, or not yielded). ``ks`` may be a function giving them, called
    after the first pass (what the ranks count known once the values were read)."""

    def bits(m):
        return m.float().contiguous().view(torch.int32).reshape(-1)

    # (counted on the CPU, whatever torch's default device)
    counts = {}
    for j, m in magnitudes():
        if j not in counts:
            counts[j] = torch.zeros(65536, dtype=torch.int64, device="cpu")
        counts[j] += torch.bincount((bits(m) >> 16).cpu(), minlength=65536)
    ks = ks() if callable(ks) else ks
    high = [None if k is None else _bucket_of_kth(counts[j], k) for j, k in enumerate(ks)]
    counts = [None if k is None else torch.zeros(65536, dtype=torch.int64, device="cpu") for k in ks]
    for j, m in magnitudes():
        if counts[j] is None:  # (a set whose rank came out None: its values not asked for)
            continue
        b = bits(m)
        counts[j] += torch.bincount((b[(b >> 16) == high[j][0]] & 0xFFFF).cpu(), minlength=65536)
    found = []
    for c, h in zip(counts, high):
        if h is None:
            found.append(None)
            continue
        hi, rank = h
        lo, _ = _bucket_of_kth(c, rank)
        found.append(float(torch.tensor([(hi << 16) | lo], dtype=torch.int32, device="cpu").view(torch.float32)))
    return found


def _bucket_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest value (1-based) and its rank within that bucket."""
    above = torch.cumsum(counts.flip(0), 0).flip(0)  # above[b] = count in buckets >= b
    bucket = int((above >= k).nonzero().max())
    in_higher = int(above[bucket + 1]) if bucket + 1 < len(above) else 0
    return bucket, k - in_higher


def _refuse_keeping_nothing(density: Callable[[int], float], K: int, m: int, changed: bool) -> None:
    """A ValueError where global TIES's rank ``round(density(k) m)`` is 0 for every expert: the merge
    would be the base. It names the density, the ``m`` entries ranked (``changed`` False: all the
    float entries, which those some expert changed are at most) and the smallest density that keeps
    one (Python's round takes 0.5 to 0: just above 0.5 / m)."""
    densities = sorted({density(k) for k in range(K)})
    given = f"density={densities[0]}" if len(densities) == 1 else f"densities {densities} (of the {K} experts)"
    smallest = 0.5 / m
    while min(int(round(smallest * m)), m) == 0:
        smallest = math.nextafter(smallest, math.inf)
    counted = ("entries some expert changed" if changed
               else "float entries (those some expert changed are at most these)")
    raise ValueError(f"{given} keeps round(density * {m}) = 0 of the model's {m} {counted}, for every expert: "
                     f"TIES (scope='global') would return the base; the smallest density that keeps one is "
                     f"{'' if changed else 'at least '}{smallest!r}")


@torch.no_grad()
def _global_thresholds(base: StateDict, experts: Sequence[StateDict], density: Callable[[int], float],
                       progress: bool = False) -> list:
    """Each expert's magnitude threshold over all float tensors of the model that some expert
    changed (``density(k)`` of their entries kept), streamed twice, every expert's in the same
    passes: each pass reads the base once (it was read twice per expert, 2K + 1 times with the
    merge's). ``progress``: a bar of the tensors read, both passes.

    A tensor every expert left as the base's (a vision-only fine-tune's text tower) is no part
    of the task vectors (the TIES paper ranks over the fine-tuned parameters; mergekit trims
    each tensor, an unchanged one never moving another's trim): counted in n, it had each
    expert keep more than ``density`` of what they changed, a merge that moved with a tower no
    expert trained. Its zeros are ranked in the first pass (it is known unchanged once read) and
    it is not read again in the second: k is at most the changed tensors' entries, so the k-th
    largest is one of theirs, which zeros ranked below it (or beside it, where it is a zero) do
    not move.

    An expert whose rank rounds to 0 keeps nothing, as at density 0: it is not read, and a tensor
    only it changed counts in no n (it merges as the base's)."""
    from tqdm.auto import tqdm

    aliases = _common_aliases([base, *experts])  # (a tied tensor counts once)
    def dtype_and_size(name):  # (a lazy checkpoint's from its header, not a read of it all)
        if hasattr(base, "dtype_of"):
            return base.dtype_of(name), math.prod(base.shape_of(name))
        t = base[name]
        _a_tensor(name, "base", t)  # (a meta base failed below as torch's "not on the expected device")
        return t.dtype, t.numel()

    sizes = {name: dtype_and_size(name) for name in base.keys() if name not in aliases}
    names = [name for name, (dtype, _) in sizes.items() if dtype.is_floating_point]
    n = sum(sizes[name][1] for name in names)

    def ranks_of(m):  # (as _kth_largest)
        return [min(int(round(density(k) * m)), m) or None for k in range(len(experts))]

    def some_kept(ranks, m, changed):
        if m and all(k is None for k in ranks):  # (m = 0: the experts are the base, which merges as itself)
            _refuse_keeping_nothing(density, len(experts), m, changed)
        return ranks

    unchanged = set()
    # (the first pass's over all n: m <= n, so an expert ranked None there is None after it, never read;
    # none of them read where all are, so refused before any read, the changed m unknown)
    ranked = some_kept(ranks_of(n), n, changed=False)

    def task_vectors():
        for name in names:
            if name in unchanged:  # (the second pass: its zeros, no k-th largest's, need not be read again)
                bar.update()
                continue
            W_0 = base[name]  # (a lazy state reads anew at each index)
            work = _work_dtype(W_0)
            changed = False
            for k, expert in enumerate(experts):
                if ranked[k] is not None:  # (one expert's task vector at a time)
                    W_k = _checked(name, _who(expert, k), expert[name], W_0)
                    tau = (W_k.to(work) - W_0.to(work)).abs()
                    changed = changed or bool(tau.any())
                    yield k, tau
            if not changed:
                unchanged.add(name)
            bar.update()

    def ranks():
        m = n - sum(sizes[name][1] for name in unchanged)
        ranked[:] = some_kept(ranks_of(m), m, changed=True)
        return ranked

    # (every model read twice, before the merge's first tensor: minutes on a large model, the
    # merge's bar still at 0 until then)
    with tqdm(total=2 * len(names), desc="ties: global thresholds", unit="tensor", leave=False,
              disable=not progress) as bar:
        return _kth_largest_ranks(task_vectors, ranks)


def conv1d_weights(model: nn.Module) -> set:
    """The names of ``model``'s weights stored ``[in, out]`` (GPT-2's ``Conv1D``; fused MoE experts
    holding each expert transposed): RegMean's ``transposed=`` for experts given as state dicts."""
    from .adapters.moe import _rebuilt_as, is_fused_experts

    conv1d = {f"{name}.weight" if name else "weight" for name, module in model.named_modules()
              if type(module).__name__ == "Conv1D"}
    # (fused experts holding each expert's weight transposed: gpt-oss's and Llama 4's [E, in, out];
    # DBRX's w2 [E * I, H], each expert's I rows its down projection's [in, out])
    return conv1d | {f"{name}.{param}" for name, module in model.named_modules()
                     if is_fused_experts(module) and _rebuilt_as(module).transposed
                     for param in ("gate_up_proj", "up_proj", "down_proj") if hasattr(module, param)} | {
        f"{name}.mlp.w2" for name, module in model.named_modules() if type(module).__name__ == "DbrxExperts"}


class _Checked(Sequence):
    """RegMean's Gram matrices of weight ``name`` (one per expert), each checked to be a tensor as
    it is read (tensors, or merge_checkpoints' read per expert: what has dim and shape)."""

    def __init__(self, name: str, grams: Sequence):
        self.name, self.grams = name, grams

    def __len__(self):
        return len(self.grams)

    def __getitem__(self, k):
        G = self.grams[k]
        if not (hasattr(G, "dim") and hasattr(G, "shape")):
            raise ValueError(f"grams[{self.name!r}][{k}] is a {type(G).__name__}, not a tensor"
                             f"{' (torch.from_numpy)' if hasattr(G, 'ndim') else ''}")
        return G


def _square(W: torch.Tensor) -> bool:
    return W.dim() == 2 and W.shape[0] == W.shape[1]


def regmean(experts, grams: Mapping[str, Sequence[torch.Tensor]], alpha: float = 0.9,
            *, transposed: Optional[Iterable[str]] = None, out=None, progress: bool = True):
    """RegMean (Jin et al., ICLR 2023): the weight of each linear layer that fits every expert's
    outputs on its own task's inputs best, ``min_W sum_k |X_k (W - W_k)^T|^2``, in closed form

        W = (sum_k W_k G_k) (sum_k G_k)^-1,   G_k = X_k^T X_k,

    with ``G_k``'s off-diagonal entries scaled by ``alpha`` (the paper's regularisation toward
    the plain average: ``alpha = 0`` gives a per-input-feature weighted average). ``grams``: for
    the name of each linear layer's weight (``[out, in]``), one ``[in, in]`` Gram matrix per
    expert, in the experts' order (``epmq.stats.gram_matrices`` of each expert on its task's
    data). Other tensors (biases, norms, embeddings, weights without grams) are averaged. A
    ridge of 1e-8 of the mean diagonal toward the average keeps input features no task
    activates (all-zero rows of every ``G_k``) at the average. Computed in float64.

    ``transposed``: the names of weights stored ``[in, out]`` (GPT-2's ``Conv1D``); by default
    those of the experts' ``Conv1D`` layers where the experts are modules, else none. A square
    one cannot be told from its shape: state dicts whose grams name square weights with GPT-2's
    Conv1D names (``c_attn``, ``q_attn``, ``c_fc``, ``c_proj``) need ``transposed=`` said
    (``conv1d_weights(model)``, or ``()`` for GPT-BigCode's ``nn.Linear`` of those names).
    """
    _check_unit(alpha, "alpha")
    if isinstance(experts, Iterable) and not isinstance(experts, (nn.Module, Mapping)):
        experts = list(experts)  # (read twice below)
    modules = any(isinstance(e, nn.Module) for e in experts)
    told = transposed is not None
    if transposed is None:
        transposed = {name for e in experts if isinstance(e, nn.Module) for name in conv1d_weights(e)}
    elif isinstance(transposed, str):
        raise TypeError("transposed must be a collection of weight names, not one string")
    transposed = set(transposed)
    _, experts = _inputs(None, experts)
    if not isinstance(grams, Mapping):
        raise ValueError("grams must map each linear weight's name to its experts' Gram matrices")
    if not told and not modules:
        # a square weight stored [in, out] fits its grams either way round: name which are
        ambiguous = sorted(n for n in grams if re.search(r"(^|\.)(c_attn|q_attn|c_fc|c_proj)\.weight$", n)
                           and n in experts[0] and _square(experts[0][n]))  # (a lazy state reads once)
        if ambiguous:
            raise ValueError(f"grams name square weights of GPT-2's Conv1D names ({ambiguous[:3]}), which "
                             f"state dicts may store [in, out]: say which are, transposed="
                             f"epmq.merge.conv1d_weights(model) for GPT-2, transposed=() where they are "
                             f"nn.Linear weights [out, in] (GPT-BigCode), or give the experts as modules")
    # (one module's fused experts are all held transposed or none: its gate_up_proj named alone, as
    # its shape refusal names it, left a square down_proj merged as its transpose's fit)
    fused = {}
    for n in grams:
        module, _, param = n.rpartition(".")
        if param in ("gate_up_proj", "up_proj", "down_proj"):
            fused.setdefault(module, []).append(n)
    if not told and not modules:
        # a down_proj square per expert fits its grams either way round (gpt-oss's [E, I, H], I == H,
        # held transposed; Qwen3-MoE's of the same name not): its gate_up_proj's shape says which,
        # [E, H, 2I] beside a transposed down_proj [E, I, H], [E, 2I, H] beside [E, H, I]
        for module, names in fused.items():
            if {f"{module}.gate_up_proj", f"{module}.down_proj"} <= set(names) <= set(experts[0]):
                (_, a, b), (_, c, d) = (experts[0][f"{module}.{p}"].shape for p in ("gate_up_proj", "down_proj"))
                if b == 2 * c and a == d:
                    transposed.update(names)
    for names in fused.values():
        said = [n for n in names if n in transposed]
        if said and len(said) < len(names):
            raise ValueError(f"transposed= names {said[0]} but not {next(n for n in names if n not in transposed)}, "
                             f"fused experts of one module (held transposed alike): name both, or neither")
    unknown = sorted(n for n in [*grams, *transposed] if n not in experts[0])
    if unknown:  # (else those layers would silently be averaged)
        raise ValueError(f"grams or transposed name tensors the experts do not have: {unknown[:5]}")
    # a weight tied to another name (a head that is also the embedding) would get two values.
    # Told by storage only in a dict of stored tensors: a lazy mapping's (checkpoints, LoRA
    # experts; ties there are epmq merge's) are made per read, and freed memory is reused.
    names_of = {}
    if isinstance(experts[0], dict):
        for n, t in experts[0].items():
            names_of.setdefault(storage_key(t), []).append(n)
    for n in grams if names_of else ():
        tied = [m for m in names_of[storage_key(experts[0][n])] if m != n]
        if tied:
            raise ValueError(f"grams[{n!r}]: the tensor is tied to {tied[0]!r} (one storage), which RegMean "
                             f"would leave at the average: leave it out of grams (it is averaged)")

    unheard = []  # (the models whose Gram matrix of a weight is zero, the weight's name)
    unreached = []  # (weights whose Gram matrices are all zero, fused experts' said apart)
    unrouted = []  # (those of one fused weight's experts)

    def merge_tensor(name, W_0, W_k):
        if name not in grams:
            return _mean(W_k)
        if not isinstance(grams[name], Iterable) or isinstance(grams[name], (str, bytes, Mapping)):
            raise ValueError(f"grams[{name!r}] is a {type(grams[name]).__name__}: give one Gram matrix per expert, "
                             f"in the experts' order")
        # (a sequence indexed as each is summed: merge_checkpoints' reads one model's matrix from disk a time,
        # where a list of them held every model's at once)
        G_k = grams[name] if isinstance(grams[name], Sequence) else list(grams[name])
        G_k = _Checked(name, G_k)
        one_each = len(G_k) == len(W_k)
        if one_each and W_k[0].dim() == 2 and G_k[0].dim() == 3 and W_k[0].shape[0] % G_k[0].shape[0] == 0:
            # (DBRX's experts: [E * I, H] with [E, in, in] Gram matrices, expert e's rows e*I:(e+1)*I)
            merged = merge_experts(name, [W.reshape(G_k[0].shape[0], -1, W.shape[-1]) for W in W_k], G_k)
            return merged.reshape(-1, merged.shape[-1])
        if one_each and W_k[0].dim() == 3:
            return merge_experts(name, W_k, G_k)
        if W_k[0].dim() not in (2, 3):
            raise ValueError(f"grams[{name!r}]: {name} has shape {tuple(W_k[0].shape)}, no linear layer's weight "
                             f"[out, in] (nor fused experts' [E, out, in]), which alone RegMean fits to inputs: "
                             f"leave it out of grams (it is averaged)")
        if not one_each:
            raise ValueError(f"grams[{name!r}]: expected {len(W_k)} Gram matrices (one per expert), got {len(G_k)}")
        return solve(name, W_k, G_k)

    def merge_experts(name, W_k, G_k):
        # a mixture of experts' fused experts ([E, out, in]; [E, in, out] transposed) and their
        # [E, in, in] Gram matrices: each expert merged by its own. G_k[k][e] is read once, as the
        # expert is solved (merge_checkpoints' read from disk: one expert's matrix a model at a time)
        W_k = [W for W in W_k]  # (read once each)
        G_k = list(G_k)  # (merge_checkpoints': views of a file, an expert's matrix read as it is solved)
        for k, G in enumerate(G_k):
            if G.dim() != 3 or G.shape[0] != W_k[0].shape[0]:
                raise ValueError(f"grams[{name!r}][{k}] has shape {tuple(G.shape)}: a fused weight of shape "
                                 f"{tuple(W_k[0].shape)} takes one Gram matrix per expert, "
                                 f"({W_k[0].shape[0]}, in, in)")
        unrouted.clear()
        # (each expert written in as solved: a list of them stacked was the float64 weight twice)
        merged = torch.empty(W_k[0].shape, dtype=torch.float64, device=W_k[0].device)
        for e in range(W_k[0].shape[0]):
            merged[e] = solve(f"{name}[{e}]", [W[e] for W in W_k], [G[e] for G in G_k])
        if unrouted:
            warnings.warn(f"regmean: experts {[int(n[len(name) + 1:-1]) for n in unrouted]} of {name} were routed "
                          f"no calibration token by any model (their Gram matrices are zero): merged by their "
                          f"plain average")
        return merged

    def solve(name, W_k, G_k):
        fused, _, e = name.partition("[")  # (a fused weight's expert: 'name[e]')
        flip = fused in transposed  # (W_k as [in, out] below)

        def entry(k):  # (as grams is indexed: a fused weight's expert e at grams[name][k][e])
            return f"grams[{fused!r}][{k}]" + (f"[{e}" if e else "")
        W_k = [W if flip else W.T for W in W_k]  # (read once each: W_k reads on demand)
        d_in = W_k[0].shape[0]
        G_sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=W_k[0].device)
        B = torch.zeros(d_in, W_k[0].shape[1], dtype=torch.float64, device=W_k[0].device)
        silent = []
        for k, W in enumerate(W_k):
            G = G_k[k]  # (indexed, not zipped: the pair zip made of the last one held it through the next read)
            if tuple(G.shape) != (d_in, d_in):
                hint = ("; a weight stored [in, out], as GPT-2's Conv1D? name it in transposed="
                        if not flip and tuple(G.shape) == (W.shape[1],) * 2 else "")
                raise ValueError(f"{entry(k)} has shape {tuple(G.shape)}, expected ({d_in}, {d_in}){hint}")
            check_hessian(G, d_in, entry(k))
            if not G.any():
                silent.append(k)
            G = G.to(W.device, torch.float64)
            G = alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G))
            G_sum += G
            B += G @ W.to(torch.float64)
            del G  # (gone before the next model's is read)
        if 0 < len(silent) < len(G_k):
            unheard.append((silent, name))
        elif silent:  # (a fused expert's said by merge_experts)
            (unrouted if "[" in name else unreached).append(name)
        ridge = 1e-8 * float(torch.diagonal(G_sum).mean()) or 1.0
        G_sum += ridge * torch.eye(d_in, dtype=torch.float64, device=G_sum.device)
        B += ridge * _mean(W_k).to(torch.float64)
        L, info = torch.linalg.cholesky_ex(G_sum)
        if int(info) == 0:
            W = torch.cholesky_solve(B, L)
            return W if flip else W.T
        # (rounding in grams of low rank may leave the sum a hair indefinite; clearly negative
        # directions mean they are no Gram matrices, and the solve would leave the experts' span)
        eigenvalues = torch.linalg.eigvalsh(G_sum)
        if float(eigenvalues[0]) < -1e-6 * float(eigenvalues[-1]):
            raise ValueError(f"grams[{fused!r}]{f' of expert {e[:-1]}' if e else ''}: their sum is not positive "
                             f"semidefinite (eigenvalue {float(eigenvalues[0]):.3g}): they are not Gram matrices X^T X")
        W = torch.linalg.solve(G_sum, B)
        return W if flip else W.T

    # (grams are the module's linear layers': each weight merged as the module holds it)
    out = _merge_each(None, experts, merge_tensor, out, lazy=True, as_saved=False, method="regmean", progress=progress)
    if unreached:  # (an expert saved one matrix per expert that no router picks, a layer no input reaches)
        warnings.warn(f"regmean: {len(unreached)} weights had no calibration input in any model (their Gram matrices "
                      f"zero: {', '.join(unreached[:3])}{', ...' if len(unreached) > 3 else ''}): merged by their "
                      f"plain average")
    if unheard:
        # (an expert one model's router never picks for its task: RegMean's fit has nothing of
        # that model there, and the merged expert is the others', which nothing else would say)
        def said(ks, name):
            fused, _, e = name.partition("[")
            return f"model{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))}'s " + (
                f"expert {e[:-1]} of {fused}" if e else name)

        warnings.warn(f"regmean: {len(unheard)} weights had no calibration input in one model or more (their Gram "
                      f"matrices zero: {'; '.join(said(ks, n) for ks, n in unheard[:3])}"
                      f"{'; ...' if len(unheard) > 3 else ''}): each is RegMean's merge of the other models' alone "
                      f"(a model that sent no token there has no say in it)")
    return out
