"""Model merging: Task Arithmetic, TIES-Merging, DARE and simple averaging.

Every merge takes the pretrained ``base`` and the fine-tuned ``experts`` as state dicts (any
``Mapping`` of name -> tensor, including lazy ones that read a tensor from disk when indexed) or
``nn.Module``s, and returns a new state dict. Work goes tensor by tensor: at any time one tensor
of the base and of every expert is in memory, plus the result.

With task vectors ``tau_k = W_k - W_0``:

    task_arithmetic   W = W_0 + scale * sum_k tau_k
    ties              W = W_0 + scale * merge_k(trim(tau_k) agreeing with the elected sign)
    dare              W = W_0 + scale * sum_k drop(tau_k) / density
    average           W = mean_k W_k

Tensors that are not floating point (position ids, counters) are copied from the base (from
the first expert for ``average``) unchanged.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .checks import check_finite

StateDict = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------- inputs


def _as_state(model, what: str) -> StateDict:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"{what} must be a state dict (name -> tensor) or an nn.Module, got {type(model).__name__}")


def _inputs(base, experts) -> tuple[Optional[StateDict], list[StateDict]]:
    if isinstance(experts, (nn.Module, Mapping)) or not isinstance(experts, Iterable):
        raise TypeError("experts must be a list of state dicts or modules")
    experts = [_as_state(e, f"expert {k}") for k, e in enumerate(experts)]
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
            raise ValueError(
                f"expert {k} does not match the {'base' if base is not None else 'first expert'}: "
                f"missing tensors {missing[:5]}, unexpected tensors {extra[:5]}"
            )
    return base, experts


def _checked(name: str, who: str, t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if t.shape != reference.shape:
        raise ValueError(f"tensor {name!r}: {who} has shape {tuple(t.shape)}, expected {tuple(reference.shape)}")
    check_finite(t, f"tensor {name!r} of {who}")
    return t


def _tensors(name: str, base: Optional[StateDict], experts: Sequence[StateDict]):
    """The base's and every expert's tensor ``name``, checked, as float32 (``None`` when the
    tensor is not floating point), and the tensor whose dtype the result takes."""
    reference = base[name] if base is not None else experts[0][name]
    W_0 = None if base is None else _checked(name, "base", base[name], reference)
    W_k = [_checked(name, f"expert {k}", e[name], reference) for k, e in enumerate(experts)]
    if not reference.is_floating_point():
        return reference, None, None
    return reference, None if W_0 is None else W_0.float(), [W.float() for W in W_k]


def _merge_each(base, experts, merge_tensor) -> dict:
    """Apply ``merge_tensor(name, W_0, [W_k]) -> W`` to every float tensor, one at a time."""
    base, experts = _inputs(base, experts)
    reference = base if base is not None else experts[0]
    out = {}
    for name in reference.keys():
        ref, W_0, W_k = _tensors(name, base, experts)
        if W_0 is None and W_k is None:
            out[name] = ref.clone()
            continue
        out[name] = merge_tensor(name, W_0, W_k).to(ref.dtype)
    return out


def _check_unit(value, what):
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")


# --------------------------------------------------------------------------- merges


def average(experts) -> dict:
    """Simple weight averaging (model soup) of the experts."""
    return _merge_each(None, experts, lambda name, W_0, W_k: torch.stack(W_k).mean(0))


def task_arithmetic(base, experts, scale: float = 0.3) -> dict:
    """Task Arithmetic (Ilharco et al., 2023): ``W_0 + scale * sum_k (W_k - W_0)``."""
    if base is None:
        raise ValueError("task_arithmetic needs the base model")
    return _merge_each(
        base, experts, lambda name, W_0, W_k: W_0 + scale * sum(W - W_0 for W in W_k)
    )


def dare(base, experts, scale: float = 0.3, density: float = 0.5, seed: int = 0) -> dict:
    """DARE (Yu et al., 2024): drop each task-vector entry with probability ``1 - density``,
    rescale the kept ones by ``1 / density``, then Task Arithmetic with ``scale``.

    The drop mask of tensor ``name`` of expert k depends only on ``(seed, name, k)``, so a merge
    is reproducible whatever order or subset of tensors is merged.
    """
    if base is None:
        raise ValueError("dare needs the base model")
    _check_unit(density, "density")
    if density == 0:
        raise ValueError("density must be > 0 for DARE (everything would be dropped)")

    def merge_tensor(name, W_0, W_k):
        total = torch.zeros_like(W_0)
        for k, W in enumerate(W_k):
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{k}".encode()))
            keep = torch.rand(W_0.shape, generator=g) < density
            total += torch.where(keep.to(W.device), W - W_0, 0.0) / density
        return W_0 + scale * total

    return _merge_each(base, experts, merge_tensor)


def ties(
    base,
    experts,
    scale: Optional[float] = None,
    density: float = 0.2,
    scope: str = "global",
    merge: str = "mean",
) -> dict:
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

    trim     keep each task vector's entries whose magnitude is at least its k-th largest,
             ``k = round(density * n)``; ``scope="global"`` ranks over all float tensors of the
             model (as FusionBench), ``scope="tensor"`` within each tensor (as mergekit).
             Entries tied with the k-th largest are all kept.
    elect    the sign of the sum of the trimmed entries; where they sum to exactly 0 there is
             no elected sign and the entry stays at the base.
    merge    ``"mean"``: the disjoint mean, the average of the nonzero trimmed entries that
             agree with the elected sign (the TIES paper); ``"sum"``: their sum.

    ``scale=None`` means 1.0 for ``"mean"`` (the TIES paper's default: the disjoint mean is
    already the size of one task vector, whatever the number of tasks) and 0.3 for ``"sum"``
    (FusionBench's CLIP setting, where the sum grows with the number of tasks).
    """
    if base is None:
        raise ValueError("ties needs the base model")
    _check_unit(density, "density")
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    if merge not in ("mean", "sum"):
        raise ValueError(f"merge must be 'mean' or 'sum', got {merge!r}")
    if scale is None:
        scale = 1.0 if merge == "mean" else 0.3
    base_sd, expert_sds = _inputs(base, experts)
    thresholds = (
        _global_thresholds(base_sd, expert_sds, density) if scope == "global" else None
    )

    def merge_tensor(name, W_0, W_k):
        trimmed = []
        for k, W in enumerate(W_k):
            tau = W - W_0
            if thresholds is not None:
                thr = thresholds[k]
            else:
                thr = _kth_largest(lambda: [tau.abs()], tau.numel(), density)
            keep = tau.abs() >= thr if thr is not None else torch.zeros_like(tau, dtype=torch.bool)
            trimmed.append(torch.where(keep, tau, 0.0))
        T = torch.stack(trimmed)
        sign = torch.sign(T.sum(0))
        agree = (torch.sign(T) == sign) & (T != 0)
        total = torch.where(agree, T, 0.0).sum(0)
        if merge == "mean":
            total = total / agree.sum(0).clamp(min=1)
        return W_0 + scale * total

    return _merge_each(base_sd, expert_sds, merge_tensor)


# --------------------------------------------------------------------------- top-k threshold


def _kth_largest(magnitudes: Callable[[], Iterable[torch.Tensor]], n: int, density: float):
    """The k-th largest of ``n`` non-negative values spread over several tensors,
    ``k = round(density * n)``, without concatenating them; ``None`` when k = 0.

    Radix select on the float32 bit patterns, which order non-negative floats like their
    values: one pass counts the high 16 bits, a second the low 16 bits inside the high bucket
    that holds the k-th value. ``magnitudes()`` yields the tensors anew for each pass.
    """
    k = min(int(round(density * n)), n)
    if k == 0:
        return None

    def bits(m):
        return m.float().contiguous().view(torch.int32).reshape(-1)

    counts = torch.zeros(65536, dtype=torch.int64)
    for m in magnitudes():
        counts += torch.bincount((bits(m) >> 16).cpu(), minlength=65536)
    hi, rank = _bucket_of_kth(counts, k)
    counts = torch.zeros(65536, dtype=torch.int64)
    for m in magnitudes():
        b = bits(m)
        counts += torch.bincount((b[(b >> 16) == hi] & 0xFFFF).cpu(), minlength=65536)
    lo, _ = _bucket_of_kth(counts, rank)
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def _bucket_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest value (1-based) and its rank within that bucket."""
    above = torch.cumsum(counts.flip(0), 0).flip(0)  # above[b] = count in buckets >= b
    bucket = int((above >= k).nonzero().max())
    in_higher = int(above[bucket + 1]) if bucket + 1 < len(above) else 0
    return bucket, k - in_higher


def _global_thresholds(base: StateDict, experts: Sequence[StateDict], density: float) -> list:
    """Each expert's magnitude threshold over all float tensors of the model, streamed twice."""
    names = [n for n in base.keys() if base[n].is_floating_point()]
    n = sum(base[name].numel() for name in names)

    def task_vector(k):
        for name in names:
            W_k = _checked(name, f"expert {k}", experts[k][name], base[name])
            yield (W_k.float() - base[name].float()).abs()

    return [_kth_largest(lambda k=k: task_vector(k), n, density) for k in range(len(experts))]
