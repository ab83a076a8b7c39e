"""Layer solvers: round-to-nearest, GPTQ, and E-PMQ (GPTQ on the expert-guided target).

The formulation is ``docs/EPMQ_MATH.md``. In short, E-PMQ minimises

    L(Q) = sum_k a_k ||(Q - W_k) X_k||^2 + lam' ||(Q - W_m) X_m||^2 + mu' ||Q - W_m||^2
         = tr((Q - W*) H (Q - W*)^T) + const,

    H  = sum_k a_k H_k + lam' H_m + mu' I,     W* = W_m + R,     R = G H^{-1},
    G  = sum_k a_k (W_k - W_m) H_k,

so it is GPTQ run on the target ``W*`` with the Hessian ``H``. Both GPTQ and E-PMQ share one
path (``_round_target``): dead columns, damping with retries, act-order, the grid, the column
solver (torch reference or fused Triton kernel), and the loss.

Damping ``delta = percdamp * mean(diag H)`` (the mean over live columns, ``diag H > 0``) is
added to ``H`` for the factorisation. For E-PMQ the same damped ``H~ = H + delta I`` gives
``R = G H~^{-1}``. Since ``C = W_m H + G``, ``W_m + G H~^{-1} = (C + delta W_m) H~^{-1}``: the
exact minimiser of ``L(Q) + delta ||Q - W_m||^2``. Damping is an extra weight-space anchor of
strength ``delta``, of ``mu``'s form; it keeps ``R`` finite when the task Hessians are rank
deficient. The identities of EPMQ_MATH.md hold exactly for ``percdamp = 0`` (and a non-singular
``H``: then ``W*`` is ``C H^{-1}``); with damping they hold for the damped objective.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from epmq_kernels._runtime import fp32_mm, ieee_fp32_matmul, ieee_mm, split_once
from epmq_kernels.expert_residual import DEFAULT_RESIDUAL_PRECISION, fold_hessians
from epmq_kernels.gptq_solve import SolveOverflow, gptq_solve, solved_loss
from epmq_kernels.grid import dequantize, find_group_params, quantize_codes

from ._util import without_autocast
from .checks import all_finite, check_hessian, check_number, check_weight, resolve_backend
from .spec import QuantSpec
from .stats import EPMQStats

MAX_DAMP_RETRIES = 8


@dataclass
class QuantResult:
    """A quantized layer ``W[out, in]``.

    ``weight = (codes - zeros[:, g_idx]) * scales[:, g_idx]`` (float32); ``target`` is what was
    rounded (``W``, or ``W*`` for E-PMQ); ``loss = tr((weight - target) H (weight - target)^T)``
    with the undamped ``H`` (``||weight - target||^2`` for RTN without ``H``); GPTQ and E-PMQ
    take it from the solver's scaled errors (``solved_loss``) less the damping's share: within
    1e-6 of the product at 2 to 4 bits, 1e-5 at 8 for ``H`` of full rank (the fp32 rounding of
    GPTQ's updates, against a smaller error; 8 bits with ill-conditioned ``H`` or outlier
    weights in small groups reached 7.5e-5, and group size 1, whose loss is at the level of that
    rounding, is only good to its order of magnitude); where it is below ``mean(diag H) |F|^2 / 8``
    (``F = weight - target`` in ``H``'s weak directions: ``H`` of low rank, from fewer tokens
    than inputs) it is the product, in float64 where that is fast, which keeps low-rank ``H``
    within 1e-5 at 2 to 4 bits and 1e-4 at 8 at any ``percdamp`` (``tests/epmq/test_gptq.py``).
    It is the loss of ``weight``,
    whose scales are float32; the packed layer (``QuantLinear``) stores them in float16, the
    gptq format's dtype, as every GPTQ writer does after the solve (at most 2^-11 of each
    scale in float16's normal range, above 6.1e-5; smaller ones lose precision, with a warning:
    on a small Llama the packed layers' losses were 0.2-0.3% above ``loss`` at 8 bits, 0.01% at
    2 to 4).
    For E-PMQ, ``expert_loss + anchor_loss + weight_anchor_loss`` is ``L(Q)`` above.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    target: torch.Tensor
    loss: float
    spec: QuantSpec
    expert_loss: Optional[float] = None
    anchor_loss: Optional[float] = None
    weight_anchor_loss: Optional[float] = None
    perm: Optional[torch.Tensor] = None
    damp: float = 0.0
    damp_retries: int = 0
    dead_columns: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def report(self) -> dict:
        """The scalar facts of this layer, for the per-layer JSON report."""
        out = {
            "loss": self.loss,
            "expert_loss": self.expert_loss,
            "anchor_loss": self.anchor_loss,
            "weight_anchor_loss": self.weight_anchor_loss,
            "damp": self.damp,
            "damp_retries": self.damp_retries,
            "dead_columns": self.dead_columns,
            "seconds": self.seconds,
        }
        out.update(self.info)
        return out


# --------------------------------------------------------------------------- input checks


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an epmq.QuantSpec, got {type(spec).__name__}")


def _block_edges(d: int) -> list:
    """Edges of the (at most 8, at least 256 wide) column blocks that the triangular and
    symmetric products below skip half of: with 8 blocks they do 56% of a dense product's work."""
    n_blocks = max(1, min(8, d // 256))
    return [round(b * d / n_blocks) for b in range(n_blocks + 1)]


# The solver's own loss is taken only where it is at least this fraction of mean(diag H) |F|^2
# (see gptq's use of it)
MEASURE_LOSS_BELOW = 1 / 8


def _objective(E: torch.Tensor, H: torch.Tensor, mm=ieee_mm, dtype=torch.float32, shift: int = 0) -> float:
    """``tr(E H E^T) = <H, E^T E>`` for a symmetric ``H``: the blocks of the symmetric ``E^T E``
    on and right of the diagonal, each off-diagonal one counted twice (56% of the work of
    ``E @ H``). Products in float32 by ``mm`` (the value is a report, not an input to the
    solver), or in float64 (``dtype``), sums in float64. ``shift``: ``H`` is taken as
    ``2^-shift H`` (exactly) and the value scaled back, for an ``H`` past float32's range
    (``_fp32_shift``)."""
    if shift:
        H = _times_power_of_two(H.double(), -shift)
    E, H = E.to(dtype), H.to(dtype)
    mm = torch.matmul if dtype == torch.float64 else mm
    edges = _block_edges(H.shape[0])
    parts, product = split_once(mm)
    E_parts = parts(E)
    total = torch.zeros((), dtype=torch.float64, device=E.device)  # (read once, at the end)
    for a, b in zip(edges[:-1], edges[1:]):
        # row a:b of E^T E, from its diagonal block on
        P = product([p[:, a:b].T for p in E_parts], [p[:, a:] for p in E_parts])
        w = b - a
        total += torch.sum(P[:, :w] * H[a:b, a:b], dtype=torch.float64)
        total += 2 * torch.sum(P[:, w:] * H[a:b, b:], dtype=torch.float64)
    return math.ldexp(float(total), shift)


def _fp32_shift(mean_diag: float) -> int:
    """The even power of two that brings a Hessian of this mean diagonal into EPMQ_HESSIAN_SCALE,
    where float32 holds it (0 where it is there already, or zero): ``_objective``'s ``shift``."""
    lo, hi = EPMQ_HESSIAN_SCALE
    return 2 * (math.frexp(mean_diag)[1] // 2) if mean_diag and not lo <= mean_diag <= hi else 0


def _unpermute(A: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(A)
    out[:, perm] = A
    return out


# --------------------------------------------------------------------------- RTN


@torch.no_grad()  # (inputs that track gradients: the solve is not differentiable)
@without_autocast
def rtn(W: torch.Tensor, spec: QuantSpec, *, H: Optional[torch.Tensor] = None) -> QuantResult:
    """Round to nearest on the grid of ``spec`` (groups in the stored column order)."""
    t0 = time.perf_counter()
    check_weight(W)
    d_out, d_in = W.shape
    _check_spec(spec)
    trace = check_hessian(H, d_in) if H is not None else 0.0
    target = W.detach().float()
    group_size = max(d_in, 1) if spec.group_size == -1 else spec.group_size  # (1: no inputs)
    scales, zeros = find_group_params(target, group_size, spec.bits, spec.sym)
    g_idx = torch.arange(d_in, device=W.device) // group_size
    scale, zero = scales[:, g_idx], zeros[:, g_idx]
    q = quantize_codes(target, scale, zero, spec.maxq)
    weight = dequantize(q, scale, zero)
    E = weight - target
    # (an H past float32's range, which GPTQ solves scaled, taken scaled: else 0 or NaN)
    loss = (_objective(E, H, shift=_fp32_shift(trace / max(d_in, 1))) if H is not None
            else float(E.double().pow(2).sum()))
    return QuantResult(
        weight=weight,
        codes=q.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        target=target,
        loss=loss,
        spec=spec,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- shared GPTQ path


def _lower_inverse(L: torch.Tensor, leaf: int = 256, in_place: bool = False) -> torch.Tensor:
    """``L^{-1}`` of a lower-triangular ``L`` by halving: with ``L = [[A, 0], [B, C]]``,
    ``L^{-1} = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``. Most of the work is then two matrix products
    per level instead of one triangular solve against the identity, which runs far below GEMM
    speed (0.70 -> 0.50 s on the CPU at 4096; on the H200 the solve took 4 of GPTQ's 16.6 ms).

    ``in_place``: into ``L``'s own memory (its upper triangle zero), no second ``d^2`` matrix:
    ``B`` is read only after ``A`` and ``C`` are inverted, and then overwritten."""
    out = L if in_place else torch.zeros_like(L)
    _fill_lower_inverse(out, L, 0, L.shape[0], leaf)
    return out


def _fill_lower_inverse(out: torch.Tensor, L: torch.Tensor, lo: int, hi: int, leaf: int) -> None:
    """``out[lo:hi, lo:hi] = L[lo:hi, lo:hi]^{-1}`` (``_lower_inverse``'s halving). A module
    function, not a closure: a recursive closure over ``L`` and ``out`` is a reference cycle
    (the function, its cell, the function), which kept the solve's float64 d^2 matrix alive
    after the solve until Python's cycle collector happened to run."""
    if hi - lo <= leaf:
        eye = torch.eye(hi - lo, dtype=L.dtype, device=L.device)
        out[lo:hi, lo:hi] = torch.linalg.solve_triangular(L[lo:hi, lo:hi], eye, upper=False)
        return
    mid = (lo + hi) // 2
    _fill_lower_inverse(out, L, lo, mid, leaf)
    _fill_lower_inverse(out, L, mid, hi, leaf)
    out[mid:hi, lo:mid] = -(out[mid:hi, mid:hi] @ (L[mid:hi, lo:mid] @ out[lo:mid, lo:mid]))


# GPUs whose float64 runs at half the fp32 rate (P100, V100, A100/A30, H100/H200, B200); the
# others run it at 1/32 to 1/64 (consumer cards, L4/A10-class, B300), where factoring a 14336-wide
# Hessian in float64 costs about a second.
FP64_FAST_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
# An fp32 factor is kept if ||Hinv^T Hinv H~ v - v|| <= this * ||v|| for two fixed random v. On
# Hessians of (correlated) features with log-normal scales the fp64 factor rounded to fp32 (what
# the solver runs on) reaches 1e-6 to 1.4e-4, the fp32 one 1.5 to 10 times that, and GPTQ's loss
# with it stays within 2e-4 of the fp64 factor's, either way (99.95% of codes equal).
FP32_FACTOR_TOLERANCE = 1e-3


def _fp64_is_fast(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device) in FP64_FAST_CAPABILITIES


@ieee_fp32_matmul()  # (its products: TF32's would make the factor, and its check, ~5e-4 off)
def _factor_fp32(H: torch.Tensor, damp: float):
    """``Hinv`` as ``_factor`` defines it, factored in fp32 after Jacobi scaling (unit diagonal,
    so its accuracy follows the scaled Hessian's condition number, not the spread of the
    features' scales), or None where it fails or misses FP32_FACTOR_TOLERANCE.

    With ``J H~ J = S^-1 L_s L_s^T S^-1`` (``S`` the scaling), ``L^{-1} = L_s^{-1} S``."""
    H_damped = H.flip(0, 1).float()
    H_damped.diagonal().add_(damp)
    s = torch.diagonal(H_damped).rsqrt()
    H_damped.mul_(s[:, None]).mul_(s[None, :])
    L, info = torch.linalg.cholesky_ex(H_damped, out=(H_damped, _info(H)))  # (in place)
    del H_damped
    if int(info) != 0:
        return None
    Hinv = _lower_inverse(L, in_place=True).mul_(s[None, :]).flip(0, 1)
    del L
    if not all_finite(Hinv):
        return None
    g = torch.Generator(device=H.device).manual_seed(0)
    V = torch.randn(H.shape[0], 2, generator=g, device=H.device, dtype=H.dtype)
    HV = (H @ V + damp * V).float()
    gap = torch.linalg.vector_norm((Hinv.T @ (Hinv @ HV)).double() - V)
    return Hinv if float(gap) <= FP32_FACTOR_TOLERANCE * float(torch.linalg.vector_norm(V)) else None


def _info(H):
    return torch.empty((), dtype=torch.int32, device=H.device)


HESSIAN_SCALE = (1e-50, 1e50)  # the mean diagonals _factor takes (Hinv's entries fit fp32's 1e+-38)
# E-PMQ's G = sum_k a_k D_k H_k is of H's scale and rounded to float32 as well: task weights of
# 2^-140 (H ~ 1e-44) flushed it to subnormals (13% of codes moved), 2^140 overflowed it. So is
# GPTQ's H where float64 is slow (the fp32 factor, a low-rank H's measured loss): one of 2^-150
# was read as subnormals there (its loss 1.3% low, 12.6 times too high of 8 tokens): both are
# solved scaled into this range
EPMQ_HESSIAN_SCALE = (2.0**-64, 2.0**64)


def _more_damping(damp: float, mean_diag: float) -> float:
    """A retry's damping: ten times more; from zero, 1e-6 of the mean diagonal."""
    return damp * 10 if damp > 0 else 1e-6 * mean_diag


def _warn_damped_again(failures, damp: float, mean_diag: float, retries: int) -> None:
    """Say that a layer was solved at more damping than percdamp asked, and why: ``failures``,
    ``(what failed, at which percdamp)`` in the order they happened (a factor that failed, a solve
    that overflowed). Said as percdamp, H's scale apart: E-PMQ's H has its task weights' scale,
    which epmq may rescale."""
    what = ", then ".join(f"{failure} at percdamp {at:.3g}" for failure, at in failures)
    warnings.warn(f"{what}: solved at percdamp {damp / mean_diag:.3g} (damping that times H's mean diagonal; "
                  f"retries: {retries})")


def _factor(H: torch.Tensor, percdamp: float, perm: Optional[torch.Tensor] = None, damp: Optional[float] = None,
            retries: int = 0):
    """Damp ``H`` (float64, dead columns fixed; taken in the processing order ``perm``, or as it
    is) until it factors; from ``damp`` where given (a retry's), else ``percdamp * mean(diag H)``.
    ``retries``: the solve's retries so far, counting this call's first try (a retry's):
    MAX_DAMP_RETRIES bounds the solve's total, not each factor's.

    Returns ``(Hinv, damp, retries)``, ``retries`` the solve's total, with ``Hinv`` (fp32, what
    the solver runs on) the upper Cholesky factor of ``H~^{-1}``,
    ``H~ = H + damp I``, ``damp = percdamp * mean(diag H)`` (the live columns' mean: dead
    diagonals are set to it) unless retries raised it. With ``J`` the order reversal and
    ``J H~ J = L L^T``, that factor is ``J L^{-1} J``: one Cholesky and one triangular inverse,
    never ``H~^{-1}`` itself. In float64, except on GPUs with slow float64, where an fp32
    factor that passes its check is taken (``_factor_fp32``; float64 otherwise, with the same
    damping). Memory beyond ``H``: one float64 ``d^2`` matrix (the reversed copy, factored and
    inverted in place) and the fp32 result (at 14336 inputs a float64 one is 1.6 GB).
    """
    mean_diag = float(torch.diagonal(H).mean())
    if H.shape[0] and mean_diag and not HESSIAN_SCALE[0] <= mean_diag <= HESSIAN_SCALE[1]:
        # the solver's fp32 Hinv is about H^(-1/2): it would overflow (and read as "not positive
        # definite", damped away) or underflow to zeros. GPTQ does not depend on H's scale.
        raise ValueError(f"the Hessian's mean diagonal {mean_diag:.3g} is outside [{HESSIAN_SCALE[0]:g}, "
                         f"{HESSIAN_SCALE[1]:g}], where its inverse factor fits float32: scale it "
                         f"(the codes do not depend on the Hessian's scale)")
    damp = percdamp * mean_diag if damp is None else damp
    if not _fp64_is_fast(H.device):
        Hinv = _factor_fp32(H if perm is None else H[perm[:, None], perm[None, :]], damp)
        if Hinv is not None:
            return Hinv, damp, retries
    reverse = None if perm is None else perm.flip(0)
    for retry in range(retries, MAX_DAMP_RETRIES + 1):
        # J H J (J the order reversal), in the processing order: one gather, one copy
        L = H.flip(0, 1) if reverse is None else H[reverse[:, None], reverse[None, :]]
        L.diagonal().add_(damp)  # (no identity matrix)
        L, info = torch.linalg.cholesky_ex(L, out=(L, _info(H)))
        if int(info) == 0:
            Linv = _lower_inverse(L, in_place=True).float()  # (before the flip: half the memory)
            L = None
            Hinv = Linv.flip(0, 1)
            del Linv
            if all_finite(Hinv):
                return Hinv, damp, retry
        L = Hinv = None
        damp = _more_damping(damp, mean_diag)
    raise ValueError(
        f"the Hessian is not positive definite even with damping {damp / 10:.3g} "
        f"({MAX_DAMP_RETRIES} retries): check the calibration statistics"
    )


class FactorCache:
    """The factorization of the last Hessian solved, for layers whose Hessians are equal.

    Linears that read the same input (q/k/v, gate/up; the model walker groups them) have one
    Hessian, so GPTQ and E-PMQ can share its damped Cholesky factor ``Hinv`` (and act-order's
    permutation) instead of forming it once per layer: pass one cache to their solves. A solve
    takes the cached factor only when its Hessian, as prepared for factoring (float64, dead
    columns fixed), is equal to the cached one entry for entry, with the same dead columns
    (a dead column's diagonal is the live mean, which a live column could equal; act-order
    puts only the dead ones last), on the same device, with the same act-order and damping (a
    ``d_in^2`` comparison against the factor's ``d_in^3``);
    otherwise it factors and replaces the entry. One entry: the cache holds a float64 copy of
    the Hessian and the fp32 factor the solver runs on until it is dropped.
    """

    def __init__(self):
        self._key = None
        self._value = None
        self.hits = 0

    def get(self, H64: torch.Tensor, dead: torch.Tensor, act_order: bool, percdamp: float):
        key = self._key
        if (key is not None and key[2:] == (act_order, percdamp) and key[0].device == H64.device
                and torch.equal(key[0], H64) and torch.equal(key[1], dead)):
            self.hits += 1
            return self._value
        return None

    def put(self, H64, dead, act_order, percdamp, value) -> None:
        self._key, self._value = (H64, dead, act_order, percdamp), value


def _times_upper(A: torch.Tensor, U: torch.Tensor, *, transposed: bool = False,
                 mm=ieee_mm) -> torch.Tensor:
    """``A @ U`` (``A @ U^T`` with ``transposed``) for an upper-triangular ``U``, in column
    blocks that skip its zero half: with 8 blocks, 56% of a dense product's work. E-PMQ's
    ``R = (G Hinv^T) Hinv`` is two of these products of the layer's full size (30% less time
    than dense on the CPU at 4096 x 4096)."""
    d = U.shape[0]
    edges = _block_edges(d)
    out = torch.empty(A.shape[0], d, dtype=torch.promote_types(A.dtype, U.dtype), device=A.device)
    parts, product = split_once(mm)  # (A's slices overlap; each U slice is read once)
    A_parts = parts(A)
    for a, b in zip(edges[:-1], edges[1:]):
        if transposed:  # (U^T)[i, j] = U[j, i] is zero for i < j
            out[:, a:b] = product([p[:, a:] for p in A_parts], parts(U[a:b, a:].T))
        else:  # U[i, j] is zero for i > j
            out[:, a:b] = product([p[:, :b] for p in A_parts], parts(U[:b, a:b]))
    return out


def _times_power_of_two(A: torch.Tensor, e: int) -> torch.Tensor:
    """``A * 2^e``, exact where the result is normal: in two factors, each of them finite."""
    return A * 2.0 ** (e // 2) * 2.0 ** (e - e // 2)


def _round_target(
    W_base: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    G,
    blocksize: int,
    percdamp: float,
    backend: Optional[str],
    mm=ieee_mm,
    factors: Optional[FactorCache] = None,
):
    """GPTQ of the target ``W* = W_base + G H~^{-1}`` (``G=None``: ``W* = W_base``) under ``H``.

    ``G``: a tensor, or a function that returns it, called once ``H`` is factored (E-PMQ's
    residual products may still be running then, on the side stream: the function waits for
    them). ``mm``: the fp32 product for ``R = G H~^{-1}`` (``epmq_from_stats`` picks it). ``factors``:
    a ``FactorCache`` shared with layers of the same Hessian. The caller adds the method's own
    loss terms to the result.
    """
    t0 = time.perf_counter()
    d_out, d_in = W_base.shape
    _check_spec(spec)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    percdamp = check_number(percdamp, "percdamp", 0)
    backend = resolve_backend(backend, W_base.device)
    device = W_base.device

    dead = torch.diagonal(H) == 0
    # (one read for whether any column is dead, any live, and how many: each of the four was its own,
    # and on a GPU each waits for the queue to drain)
    n_dead = int(dead.sum())
    any_dead, any_live = n_dead > 0, n_dead < d_in
    # float64, copied only where it is changed below (the caller's H is left as it is)
    H64 = H.to(torch.float64, copy=True) if any_dead or H.dtype != torch.float64 else H
    diag = torch.diagonal(H64)
    # A dead column saw only zero inputs: with any positive diagonal (its row and column of H
    # are zero) it carries no error and takes none, so the solver rounds its target as RTN
    # would, on its group's grid, whose fit includes it as RTN's does. (A grid fitted to the live
    # columns alone clamped it: wherever the unit fires after calibration, its weight was off by
    # up to all of it, 154 against RTN's 7.3 for weights 50 times the live ones' at 4 bits per
    # channel; GPTQ's reference zeroes it, worse still. The grid it widens costs the live
    # columns as it costs RTN's: 4-12% more loss at 4 bits where 1 in 8 is dead and alike.)
    # Its diagonal is the live columns' mean, not GPTQ's 1: the damping, percdamp * mean(diag),
    # is then the live columns' and scales with H. A 1 made the damping depend on H's scale:
    # E-PMQ's H has trace about K, so each dead column added 1/d_in to a mean near K/d_in (8 of
    # 64 dead, K = 1: 7.9 times the live columns' damping), and GPTQ's codes changed when H was
    # rescaled. With no live column the value is immaterial: 1, as before.
    live = ~dead
    mean_diag = float(diag[live].mean()) if any_live else 0.0
    shift = _fp32_shift(mean_diag)  # (into float32's range: the factor and the loss may be taken in it)
    if shift:
        # GPTQ's codes do not depend on H's scale, but the solver's fp32 factor does: such an H
        # (inputs of order 1e-27, behind a norm of tiny weight; E-PMQ's of task weights of 1e-60
        # or an anchor of 1e300) is solved scaled by a power of two, exactly, its loss and damping
        # scaled back below. E-PMQ's G is scaled with it: R = G H~^{-1} is the same. (An even
        # power, whose square root is one too: the fp32 factor and R are those of H itself.)
        H = H64 = _times_power_of_two(H64, -shift)
        diag = torch.diagonal(H64)
        mean_diag = math.ldexp(mean_diag, -shift)
    if any_dead:
        diag[dead] = mean_diag or 1.0
    cached = None if factors is None else factors.get(H64, dead, spec.act_order, percdamp)
    if cached is None:
        # Act-order on the diagonal as measured (dead columns at 0, last): their position then
        # does not depend on H's scale, and with dynamic groups they fill the last groups (a
        # group with no live column gets RTN's grid) instead of sharing the live columns'.
        perm = (torch.argsort(diag.masked_fill(dead, 0.0), descending=True, stable=True)
                if spec.act_order else None)
        Hinv32, damp, retries = _factor(H64, percdamp, perm)  # (fp32: what the solver runs on)
        if factors is not None:
            # (the key a copy when H64 is the caller's H, which the caller may change in place)
            factors.put(H64.clone() if H64 is H else H64, dead, spec.act_order, percdamp,
                        (perm, Hinv32, damp, retries))
    else:
        perm, Hinv32, damp, retries = cached
    factor_retries = retries
    if not any_live:
        damp = 0.0  # (of the placeholder diagonal: there is no H to damp)

    W_base = W_base.detach().float()
    W_p = W_base if perm is None else W_base[:, perm]
    G_p = None
    if G is not None:
        G = G() if callable(G) else G
        if shift:  # (in float64, before float32 would flush or overflow it)
            G = _times_power_of_two(G.double(), -shift)
        G_p = G.float() if perm is None else G.float()[:, perm]
    dead_p = dead if perm is None else dead[perm]

    group_size = spec.group_size
    static = group_size == -1 or spec.static_groups
    if static:
        # static grid: parameters from the original target, groups in stored column order
        gs = max(d_in, 1) if group_size == -1 else group_size  # (1: a layer of no inputs)
        g_idx = torch.arange(d_in, device=device) // gs
        col_group = g_idx if perm is None else g_idx[perm]
    else:
        # dynamic groups: found in processing order as the solver reaches them
        order = torch.arange(d_in, device=device) // group_size
        g_idx = order.clone()
        if perm is not None:
            g_idx[perm] = order

    def solve(Hinv32):
        """``(out, target_p)``: the target of this damping (E-PMQ's moves with it), solved."""
        R_p = None
        if G_p is not None:
            # R = G H~^{-1} = (G Hinv^T) Hinv, in processing order, in IEEE fp32 like the solver's
            # own updates: ~1e-6 of R from float64 products (at most 1.4e-5 on the demo's layers;
            # 0.01% of codes move, at rounding ties, on residual_precision_study.py's layers), at
            # half their cost on the CPU and far less on GPUs without fast float64 (L4, A10, RTX:
            # 1/32 to 1/64 of the fp32 rate)
            R_p = _times_upper(_times_upper(G_p, Hinv32, transposed=True, mm=mm), Hinv32, mm=mm)
            if not all_finite(R_p):
                if all_finite(G_p):  # (H~^-1's factor too large for float32: a nearly singular H, too little damping)
                    raise SolveOverflow("E-PMQ's residual correction R = G H~^-1 overflowed float32 from a finite G "
                                        "and Hinv: a nearly singular H, too little damping (raise percdamp)?")
                # (each expert finite, their products in float32 not: W_0 + U V)
                raise ValueError("E-PMQ's residual correction R = G H^-1 has non-finite values: the "
                                 "experts' weights (or W_0 + U V of a low-rank expert) overflow float32")
        target_p = W_p if R_p is None else W_p + R_p
        if static:
            target = target_p if perm is None else _unpermute(target_p, perm)
            scales, zeros = find_group_params(target, gs, spec.bits, spec.sym)
            grid = dict(group_size=-1, scales=scales, zeros=zeros, col_group=col_group)
        else:
            grid = dict(group_size=group_size)
        out = gptq_solve(W_p.contiguous(), Hinv32, R=None if R_p is None else R_p.contiguous(), bits=spec.bits,
                         sym=spec.sym, blocksize=blocksize, backend=backend, **grid)
        return out, target_p

    overflowed_at = None  # (the percdamp the solve first overflowed at)
    while True:
        try:
            out, target_p = solve(Hinv32)
            break
        except SolveOverflow as error:
            # Too little damping for float32 (percdamp 0 on a nearly singular H, with large weights): as a
            # factor that fails, solved again with more. (Not cached: the cache holds percdamp's factor.)
            if retries >= MAX_DAMP_RETRIES or not mean_diag:  # (no live column: no H to damp)
                raise ValueError(f"{error} (percdamp {damp / (mean_diag or 1):.3g} after {retries} retries)"
                                 ) from error
            if overflowed_at is None:
                overflowed_at = damp / mean_diag
            try:
                Hinv32, damp, retries = _factor(H64, percdamp, perm, damp=_more_damping(damp, mean_diag),
                                                retries=retries + 1)
            except ValueError as failed:  # (its retries spent: said with the overflow that started them)
                raise ValueError(f"{error} (at percdamp {damp / mean_diag:.3g}); damped more, {failed}") from failed
    if retries and mean_diag:  # (no live column: nothing was damped, the placeholder factored at once)
        failures = [("the Hessian did not factor", percdamp)] if factor_retries else []
        if overflowed_at is not None:
            failures.append(("the solve overflowed float32", overflowed_at))
        _warn_damped_again(failures, damp, mean_diag, retries)
    target = target_p if perm is None else _unpermute(target_p, perm)
    # The loss from the solver's errors (no product with H): tr(F H~ F^T) = sum(err^2) for the
    # damped H~ the solver ran on (F = Q - T); tr(F H F^T) = tr(F H~ F^T) - damp |F|^2 over the
    # live columns. A dead column's row and column of H are zero, but the solver weighed its
    # error by its placeholder diagonal, H~[j, j] = 1 / Hinv[j, j]^2: that share is taken out.
    F_p = out.Q - target_p
    dead_share = 0.0
    if any_dead:
        F_dead = F_p[:, dead_p].double()
        dead_share = float((F_dead.square().sum(0) / Hinv32.diagonal()[dead_p].double().square()).sum())
        del F_dead
        F_p.masked_fill_(dead_p, 0.0)
    F_sq = float(torch.linalg.vector_norm(F_p, dtype=torch.float64)) ** 2
    loss = solved_loss(out) - dead_share - damp * F_sq
    overflowed = not math.isfinite(loss)  # (the solver's squared errors in float32: |err| > 1.8e19)
    if not any_live:
        loss = 0.0  # (H is zero: what is left of the sum is the fp32 rounding of the dead share)
    elif overflowed or loss < max(F_sq * mean_diag, dead_share) * MEASURE_LOSS_BELOW:
        # (A dead share past 8 times the loss: the difference is off by more than 1e-6 of it at
        # 2 to 4 bits, the fp32 sums' rounding of the share; 3.8e-6 at 16 to 64 times, measured.)
        # F lies in H's weak directions (H of low rank, fewer tokens than inputs: an MoE expert
        # few tokens reached): the solver's fp32 rounding, set by the damped H's conditioning, is
        # no longer small against a loss GPTQ drives toward 0 (2.9e-4 of it at 8 bits, one
        # token), so the loss is measured instead (56% of a dense product; about 10% of a CPU
        # solve). Measured against mean(diag H) |F|^2, whatever the damping. Problems of 1 to 64
        # tokens in 128 to 512 inputs reach 0.107 of it, and at 1/25 one in 3,240 of them was off
        # by 1.3e-5 of its loss (a failed CI run); at 1/8 the worst of 3,240 was off by 2.1e-7.
        # Full-rank problems sit at 0.1-0.6 (heavy-tailed scales with act-order lower: measured).
        F = F_p if perm is None else _unpermute(F_p, perm)
        loss = _objective(F, H, dtype=torch.float64 if overflowed or _fp64_is_fast(device) else torch.float32)
        del F
    del F_p
    loss, damp = math.ldexp(loss, shift), math.ldexp(damp, shift)
    weight = out.Q if perm is None else _unpermute(out.Q, perm)
    codes = out.codes if perm is None else _unpermute(out.codes, perm)

    result = QuantResult(
        weight=weight,
        codes=codes,
        scales=out.scales,
        zeros=out.zeros,
        g_idx=g_idx.to(torch.int32),
        target=target,
        loss=loss,
        spec=spec,
        perm=perm,
        damp=damp,
        damp_retries=retries,
        dead_columns=n_dead,
        info={"backend": backend},
    )
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- GPTQ


@torch.no_grad()
@without_autocast
def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    backend: Optional[str] = None,
    factors: Optional[FactorCache] = None,
) -> QuantResult:
    """GPTQ (Frantar et al., 2022) of ``W[out, in]`` with the Hessian ``H = X X^T [in, in]``.

    ``factors``: a ``FactorCache`` shared by the solves of layers that read the same inputs."""
    check_weight(W)
    check_hessian(H, W.shape[1])
    return _round_target(W, H, spec, G=None, blocksize=blocksize, percdamp=percdamp,
                         backend=backend, factors=factors)


# --------------------------------------------------------------------------- E-PMQ


@torch.no_grad()
@without_autocast
def epmq(
    W_merged: torch.Tensor,
    expert_weights: Sequence[torch.Tensor],
    expert_hessians: Sequence[torch.Tensor],
    spec: QuantSpec,
    *,
    merged_hessian: Optional[torch.Tensor] = None,
    anchor: float = 1.0,
    weight_anchor: float = 0.0,
    task_weights: Optional[Sequence[float]] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    backend: Optional[str] = None,
    residual_precision: str = DEFAULT_RESIDUAL_PRECISION,
) -> QuantResult:
    """E-PMQ of the merged weight ``W_merged`` toward the experts ``W_k`` with Hessians ``H_k``.

    An expert may be given as ``epmq.LowRankExpert(W_0, U, V)``, ``W_k = W_0 + U V`` (a LoRA):
    where all are, of one ``W_0``, the residual costs one product of the weight's size for all
    of them instead of one each (see :class:`~epmq.stats.LowRankExpert`).

    ``anchor`` (lam) and ``weight_anchor`` (mu) are relative to the expert term (EPMQ_MATH.md);
    ``task_weights=None`` means ``a_k = 1 / tr(H_k)``; ``merged_hessian=None`` means ``sum_k H_k``.
    ``residual_precision``: see :class:`~epmq.stats.EPMQStats` ("bf16x3", the default;
    "tf32x3", "ieee" or "tf32").

    ``percdamp`` changes the target, not only the factorisation. With ``H`` and ``G`` as in
    EPMQ_MATH.md and ``delta = percdamp * mean(diag H)`` (over the live columns, ``diag H > 0``;
    ``result.damp``, raised where the factorisation or the solve needed retries), the rounded target
    (``result.target``) is

        W* = W_m + G (H + delta I)^{-1} = (C + delta W_m) (H + delta I)^{-1},

    the exact minimiser of ``L(Q) + delta ||Q - W_m||_F^2``: GPTQ's damping acts as an extra
    weight-space anchor toward ``W_m`` of strength ``delta``, the same form as ``mu`` (the
    target is that of ``mu + delta``; ``info["mu_effective"]`` and ``weight_anchor_loss`` count
    ``mu`` alone). So the identities of EPMQ_MATH.md hold exactly with ``percdamp=0`` (where
    ``H`` is non-singular); with damping they hold for the damped objective. The default 0.01
    pulls ``W*`` toward ``W_m``, most along ``H``'s weak directions, and keeps ``R`` finite when
    the task Hessians are rank deficient. ``result.loss`` and the reported terms are those of
    the undamped ``H`` and ``L(Q)``, measured around the damped target.
    """
    if not isinstance(W_merged, torch.Tensor):
        check_weight(W_merged, "W_merged")  # (raises; EPMQStats checks a tensor's values)
    # (a dict was read as its keys, refused as 'expert 0 ... got str'; one tensor as its rows. A
    # 3-D tensor is a stack, one per expert along dim 0, as list() reads it)
    for name, given in (("expert_weights", expert_weights), ("expert_hessians", expert_hessians),
                        ("task_weights", task_weights)):
        one_tensor = isinstance(given, torch.Tensor) and name != "task_weights" and given.dim() != 3
        if isinstance(given, (Mapping, str, bytes)) or one_tensor:
            raise ValueError(f"{name} must be a list (sequence), one per expert in the same order, got "
                             + type(given).__name__
                             + (f" of shape {tuple(given.shape)} (a stack of 3 dims, experts first, is taken)"
                                if one_tensor else "")
                             + (" (give list(d.values()))" if isinstance(given, Mapping) else ""))
    expert_weights, expert_hessians = list(expert_weights), list(expert_hessians)
    if not expert_weights:
        raise ValueError("expert_weights is empty: E-PMQ needs at least one expert")
    if len(expert_weights) != len(expert_hessians):
        raise ValueError(
            f"{len(expert_weights)} expert weights but {len(expert_hessians)} expert Hessians"
        )
    if task_weights is not None and len(task_weights) != len(expert_weights):
        raise ValueError(f"{len(task_weights)} task_weights for {len(expert_weights)} experts")
    backend = resolve_backend(backend, W_merged.device)
    dtype = _statistics_dtype(W_merged.device)
    shift, given = 0, task_weights
    if (dtype == torch.float32 and task_weights is not None
            and all(isinstance(a, numbers.Real) and not isinstance(a, bool) and 0 <= a < math.inf for a in given)
            and max(given) > 0):
        # float32 statistics flush a_k H_k to subnormals or zeros from task weights near 2^-140 and
        # overflow it from 2^120, where float64's solve them: the weights are scaled by an even
        # power of two, their largest near 1 (exactly: H and G scale together, R = G H^-1 and the
        # codes depend on the weights' ratios alone), and the result's scale given back below
        shift = 2 * (math.frexp(max(given))[1] // 2)
        task_weights = [math.ldexp(float(a), -shift) for a in given]
    stats = EPMQStats(
        W_merged,
        merged_hessian=merged_hessian,
        dtype=dtype,
        backend=backend,
        residual_precision=residual_precision,
        side_stream=True,  # (the caller's tensors are not written to until this returns)
    )
    try:
        stats.add_tasks(expert_weights, expert_hessians, task_weights,
                        [f"expert {k}" for k in range(len(expert_weights))])
        result = epmq_from_stats(
            stats,
            spec,
            anchor=anchor,
            weight_anchor=weight_anchor,
            blocksize=blocksize,
            percdamp=percdamp,
            backend=backend,
        )
    finally:
        stats.join()  # (on an error too: the products read the caller's tensors)
    if shift:
        for name in ("loss", "damp", "expert_loss", "anchor_loss", "weight_anchor_loss"):
            setattr(result, name, math.ldexp(getattr(result, name), shift))
        result.info.update(lam_effective=math.ldexp(result.info["lam_effective"], shift),
                           mu_effective=math.ldexp(result.info["mu_effective"], shift),
                           task_weights=[float(a) for a in given])
    return result


def _statistics_dtype(device: torch.device) -> torch.dtype:
    """The dtype of ``epmq``'s statistics: float64 on the CPU, float32 on a GPU."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _fp32_floor(backend: str, residual_precision: str) -> str:
    """The least accurate product E-PMQ's other large fp32 products (``R = G H~^{-1}``, the
    anchor term) may run as: the residual's own on the Triton backend, but never below three bf16
    products (for a one-TF32 residual too: R is read through H~^{-1}, which amplifies errors
    along H's weak directions); IEEE on the torch backend. ``fp32_mm`` picks the fastest product
    at least that accurate on the GPU."""
    if backend != "triton" or residual_precision == "ieee":
        return "ieee"
    return "tf32x3" if residual_precision == "tf32x3" else "bf16x3"


MAX_EFFECTIVE_ANCHOR = 1e300  # lam' and mu': H and the terms weighed by them must fit float64


def _effective_anchor(anchor: float, s: float, by: float, name: str, ratio: str) -> float:
    """``anchor * s / by``: an anchor given relative to the expert term, as the objective weighs it.

    One near float's largest (1e308, for lam -> inf) overflowed, in ``anchor * s``, in ``H`` or in
    the mean of its diagonal, and was refused as an unnamed 'weights[1]' or a Hessian to scale."""
    value = anchor * s / by
    if not value <= MAX_EFFECTIVE_ANCHOR:
        raise ValueError(f"{name} {anchor:g} (times {ratio} = {s / by:.3g}) weighs its term past "
                         f"{MAX_EFFECTIVE_ANCHOR:g}, where E-PMQ's Hessian and loss overflow float64: give a smaller "
                         f"one (an anchor of 1e9 already gives that limit's solve, to rounding)")
    return value


@torch.no_grad()
@without_autocast
def epmq_from_stats(
    stats: EPMQStats,
    spec: QuantSpec,
    *,
    anchor: float = 1.0,
    weight_anchor: float = 0.0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    backend: Optional[str] = None,
    factors: Optional[FactorCache] = None,
) -> QuantResult:
    """E-PMQ from accumulated statistics (the streaming path the model walker uses).

    ``factors``: a ``FactorCache`` shared by the solves of layers that read the same inputs (the
    statistics of such layers share their Hessians: ``EPMQStats(inputs_of=...)``)."""
    anchor, weight_anchor = check_number(anchor, "anchor", 0), check_number(weight_anchor, "weight_anchor", 0)
    H_e, H_m, G_e, G_m = stats.finalize(join=False)  # (G_e read after H is factored)
    W_m = stats.W_merged
    d_in = W_m.shape[1]
    # (both traces in one read: each read waits for the device's queue)
    s, trace_m = torch.stack([torch.diagonal(H_e).sum(), torch.diagonal(H_m).sum()]).tolist()
    for trace, what, or_else in ((s, "H_e = sum_k a_k H_k", "give smaller task weights (the codes depend on "
                                  "their ratios alone)"), (trace_m, "H_m = sum_k H_k", "scale the inputs")):
        if not math.isfinite(trace):  # (else refused as an anchor, even of 0, times inf)
            weights = ", ".join(f"{a:.3g}" for a in stats.task_weights)
            raise ValueError(f"the statistics' {what} overflowed {stats.dtype} (its trace is {trace}; task weights "
                             f"[{weights}]): accumulate them in torch.float64 (EPMQStats(dtype=)), or {or_else}")
    if s / d_in < torch.finfo(stats.dtype).tiny and any(a > 0 for a in stats.task_weights):
        # a_k H_k fell to the dtype's subnormals (or zeros) as it was folded: its entries kept a few bits or none,
        # and the codes moved from those of the same weights scaled up (quant.epmq scales them so itself)
        weights = ", ".join(f"{a:.3g}" for a in stats.task_weights)
        raise ValueError(f"the statistics' H_e = sum_k a_k H_k is below {stats.dtype}'s normal range (its mean "
                         f"diagonal is {s / d_in:.3g}; task weights [{weights}]): its entries were flushed to "
                         f"subnormals as they were folded; give larger task weights (the codes depend on their "
                         f"ratios alone), or accumulate in torch.float64 (EPMQStats(dtype=))")
    if s == 0:  # (task weights of 0: no expert term, and the anchors, relative to it, vanish too)
        raise ValueError("the expert term is zero (task_weights all 0): E-PMQ would be round-to-nearest "
                         "with a loss of 0; give positive task weights")
    if anchor > 0 and trace_m == 0:
        warnings.warn("the merged path's Hessian is zero (no calibration input reached this layer on "
                      "it): E-PMQ goes on without the anchor term")
    lam = _effective_anchor(anchor, s, trace_m, "anchor", "tr(H_e) / tr(H_m)") if anchor > 0 and trace_m > 0 else 0.0
    mu = _effective_anchor(weight_anchor, s, d_in, "weight_anchor", "tr(H_e) / d_in")
    backend = resolve_backend(backend, W_m.device)
    # (into one float64 matrix, never the statistics' own H_e: at 14336 inputs each d_in^2
    # float64 temporary is 1.6 GB; on the Triton backend in one pass over H_e and H_m)
    H = torch.empty(d_in, d_in, dtype=torch.float64, device=H_e.device)
    fold_hessians(H, None, [H_e, H_m] if lam else [H_e], [1.0, lam] if lam else [1.0],
                  backend=backend, overwrite=True)
    if mu:
        H.diagonal().add_(mu)
    mm = fp32_mm(W_m.device, _fp32_floor(backend, stats.residual_precision))

    @functools.cache  # (formed once, when the solve first needs it, and kept for the loss below)
    def target_G():
        G = stats.G_e.to(torch.float64, copy=G_m is not None and bool(lam))  # (joins the side stream)
        if G_m is not None and lam:
            G.add_(G_m, alpha=lam)
        return G

    result = _round_target(
        W_m, H, spec, G=target_G, blocksize=blocksize, percdamp=percdamp, backend=backend, mm=mm,
        factors=factors,
    )
    G = target_G()  # (the current stream has waited for the side stream's G_e by now)
    t0 = time.perf_counter()
    # The objective's value without another d_out x d_in x d_in product: with F = Q - W*,
    # R = W* - W_m (so E = Q - W_m = F + R) and R H~ = G (H~ = H + damp I),
    #   L(Q) = tr(E H E^T) - 2 <E, G> + c = tr(F H F^T) - <R, G> - damp (2 <F, R> + |R|^2) + c,
    # and tr(F H F^T) is the layer loss already computed. Only the split between the expert and
    # anchor terms needs a product, and only when the anchor term is there (lam > 0).
    W_m32 = W_m.float()
    F = (result.weight - result.target).double().reshape(-1)  # (fp32 differences: exact to
    R = (result.target - W_m32).double().reshape(-1)  # 6e-8 of themselves, whatever W's size)
    F_R, R_R = float(torch.dot(F, R)), float(torch.dot(R, R))
    c = stats.c_e + (lam * stats.c_m if lam and G_m is not None else 0.0)
    total = result.loss - float(torch.dot(R, G.reshape(-1))) - result.damp * (2 * F_R + R_R) + c
    del F, R
    if total < c * MEASURE_LOSS_BELOW and stats.dtype == torch.float64:
        # W* (nearly) meets the experts (one expert, or fewer tokens than inputs, without
        # anchors: L(W*) ~ 0, exactly 0 undamped), so L(Q) is a small difference of c and
        # <R, G>. That derivation takes the fp32 R as the exact G H~^{-1}: its error enters to
        # first order (1e-5 to 2e-3 of L(Q) at 8 bits, or a negative L(Q)). The objective
        # itself, in float64 from Q - W_m (exact in float64), has no R in it: one float64
        # product, taken only here. (Statistics in fp32, the GPU default, hold c and G to ~1e-7
        # of themselves: there the term stays off by ~1e-4 either way, and is left as it is.)
        E64 = result.weight.double() - W_m.double()
        total = _objective(E64, H, dtype=torch.float64) - 2 * float((E64 * G).sum()) + c
        del E64
    anchor_term = weight_anchor_term = 0.0
    if lam or mu:
        E = result.weight - W_m32
        if mu:
            weight_anchor_term = float(E.double().pow(2).sum())
        if lam:
            # (H_m is not weighed by a_k: inputs of order 1e-23 or 1e21 put it past float32's range,
            # flushed to zero or overflowed in the product, where the solve scales H)
            anchor_term = _objective(E, H_m, mm, shift=_fp32_shift(trace_m / d_in))
            if G_m is not None:
                anchor_term += -2 * float((E.double() * G_m.double()).sum()) + stats.c_m
    result.anchor_loss = lam * anchor_term
    result.weight_anchor_loss = mu * weight_anchor_term
    result.expert_loss = total - result.anchor_loss - result.weight_anchor_loss
    if (lam or mu) and result.expert_loss < (result.anchor_loss + result.weight_anchor_loss) / 8:
        # anchors that dominate the objective (lam -> inf) leave the expert term a small difference
        # of large ones, off by about 4e-6 of the total (the solver's fp32 loss; 4% at anchor
        # 1e6): taken by its own product then, so it is off by 4e-5 of itself at most (not
        # always: the product costs 56% of a solve's, and anchors up to ~3 never need it)
        result.expert_loss = (_objective(E, H_e, mm, shift=_fp32_shift(s / d_in))
                              - 2 * float((E.double() * G_e.double()).sum())
                              + stats.c_e)
    result.info.update(
        lam_effective=lam,
        mu_effective=mu,
        task_weights=list(stats.task_weights),
        n_tasks=len(stats.task_weights),
        low_rank_tasks=stats.low_rank_tasks,
    )
    result.seconds += time.perf_counter() - t0
    return result
