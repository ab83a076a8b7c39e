"""GPTQ's column solver: round a target column by column, feeding each column's error forward.

Given the target ``T = W + R`` (``R`` is E-PMQ's expert-residual correction, ``None`` for plain
GPTQ) and ``Hinv``, the upper Cholesky factor of ``H^{-1}`` (both in processing order), GPTQ
processes columns in blocks of ``B``. Inside a block, column ``j`` is rounded to ``q``, its error
``err = (w - q) / Hinv[j, j]`` updates the rest of the block ``W[:, j:] -= err * Hinv[j, j:]``,
and after the block one product ``W[:, end:] -= Err @ Hinv[block, end:]`` carries the block's
errors to every later column.

Grids:
  static   ``scales``/``zeros`` ``[out, G]`` given up front and ``col_group[j]`` the group of
           processing column ``j`` (per channel is one static group).
  dynamic  ``group_size > 0``: the parameters of group ``g`` (processing columns
           ``[g*gs, (g+1)*gs)``) are found from the error-corrected weights when the group starts.

With dynamic groups the blocks are aligned to the groups (``effective_blocksize``, a group
larger than the block cut into blocks of near-equal width: ``block_starts``) so that a group
always starts with every earlier column's error already applied to it; the
blocked loop then computes exactly what the unblocked column loop of the paper computes.

This file holds the torch reference (``gptq_solve_reference``) and the fused Triton solver
(``gptq_solve_triton``); ``gptq_solve(..., backend=)`` picks one.

The configuration space, stated once (both backends accept all of it):
  bits 2, 3, 4, 8; symmetric or asymmetric; static grid (per channel, static groups, act-order
  through ``col_group``) or dynamic groups of any size (smaller than, equal to or larger than
  the block; one that does not divide ``d_in`` leaves a shorter last group: ``ceil(d_in / gs)``
  groups); ``R`` given or not; any ``d_out``, ``d_in`` (no multiple of the block needed).
"""

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _runtime
from ._runtime import check_device, check_same_device, ieee_fp32_matmul, on_tensor_device, shares_memory
from .grid import TINY, dequantize, find_params, is_bits, is_flag, quantize_codes


class SolveOut(NamedTuple):
    Q: torch.Tensor  # float32 [out, in], dequantized, processing order
    codes: torch.Tensor  # int32 [out, in], processing order
    scales: torch.Tensor  # float32 [out, G]
    zeros: torch.Tensor  # float32 [out, G], integer-valued
    err_sq: Optional[torch.Tensor] = None  # float32 [out, blocks]: sum of err^2 (see below)


def solved_loss(out: SolveOut) -> float:
    """``tr((Q - T) H~ (Q - T)^T)`` of a solve, ``H~`` the (damped) Hessian whose inverse's
    Cholesky factor is ``Hinv``, without a ``d_out x d_in x d_in`` product.

    Column ``j`` leaves ``err_j = (w_j - q_j) / Hinv[j, j]`` and takes ``w_j - q_j``, its own
    share of ``err_j Hinv[j, :]``, so after the last column ``Q = T - Err Hinv`` and
    ``(Q - T) H~ (Q - T)^T = Err Hinv H~ Hinv^T Err^T = Err Err^T`` (``H~^{-1} = Hinv^T Hinv``):
    the loss is ``sum(err^2)`` (GPTQ's own ``Losses``), to the rounding of the fp32 updates:
    within 1e-6 of the explicit product at 2 to 4 bits, 1e-5 at 8 (a smaller error, the same
    rounding noise) for ``H~`` of full rank (``tests/epmq/test_gptq.py``, over random problems;
    ``epmq.quant`` states the low-rank case and the ill-conditioned ones that reach 7.5e-5).
    """
    return float(out.err_sq.double().sum())


def effective_blocksize(blocksize: int, group_size: int) -> int:
    """Block size used with dynamic groups: groups must not start inside a block and run past it.

    A group larger than the block is cut into ``ceil(group_size / blocksize)`` blocks of this
    near-equal width (the last of a group narrower): a largest divisor of the group size would
    be 1 for 131 or 257 with blocks of 128, a launch and a trailing product per column."""
    if group_size <= 0:
        return blocksize
    if group_size <= blocksize:
        return (blocksize // group_size) * group_size
    return -(-group_size // -(-group_size // blocksize))


def block_starts(d_in: int, blocksize: int, group_size: int) -> list:
    """First column of each block: every ``effective_blocksize`` columns, from each group's
    start where groups are larger than the block, so that each group starts a block."""
    B = effective_blocksize(blocksize, group_size)
    if group_size <= blocksize:
        return list(range(0, d_in, B))
    return [a + k for a in range(0, d_in, group_size) for k in range(0, min(group_size, d_in - a), B)]


def check_solve_args(W, Hinv, bits, sym, R, group_size, scales, zeros, col_group, blocksize):
    # (sym='no' from a YAML or CLI is truthy: it ran symmetric; bits=4.0 passed as 4, silently)
    if not is_flag(sym):  # (numpy's np.True_ is one)
        raise ValueError(f"sym must be a bool, got {sym!r}")
    if not is_bits(bits):  # (numpy's integers are)
        raise ValueError(f"bits must be an int (2, 3, 4 or 8), got {bits!r}")
    if not is_bits(blocksize) or blocksize <= 0:  # (an integer as bits are: numpy's too)
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not is_bits(group_size):
        raise ValueError(f"group_size must be an int (-1 or 0 for a static grid), got {group_size!r}")
    if group_size < -1:  # (-2, a width's sign slip, was solved as a static grid, silently)
        raise ValueError(f"group_size must be positive, or -1 or 0 for a static grid, got {group_size}")
    # (a NumPy array or a list ended in Python's bare "object has no attribute 'is_complex'")
    for name, t in (("W", W), ("Hinv", Hinv), ("R", R), ("scales", scales), ("zeros", zeros),
                    ("col_group", col_group)):
        if not (t is None and name not in ("W", "Hinv")) and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # (complex: solved as its real part, silently, by the reference's float() and the kernel's loads)
    for name, t in (("W", W), ("Hinv", Hinv), ("R", R), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.is_complex():
            raise ValueError(f"{name} must be real, got {t.dtype}")
        # (a mask: bool scales ran as a grid of step 1, bool W as weights 0 and 1, silently; bool zeros
        # ended in torch's bare '"round_vml_cpu" not implemented for 'Bool'')
        if t is not None and t.dtype == torch.bool:
            raise ValueError(f"{name} must be numbers, got a {t.dtype} tensor (a mask?)")
    # (the reference ended in torch's 'Tensor on device meta is not on the expected device cpu!',
    # naming no argument, and a static grid's checks below in 'Tensor.item() cannot be called on
    # meta tensors' on both backends)
    given = [(name, t) for name, t in (("W", W), ("Hinv", Hinv), ("R", R), ("scales", scales),
                                       ("zeros", zeros), ("col_group", col_group)) if t is not None]
    check_same_device(*(t for _, t in given), names=[name for name, _ in given])
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    if Hinv.shape != (d_in, d_in):
        raise ValueError(f"Hinv must be [{d_in}, {d_in}] for W {tuple(W.shape)}, got {tuple(Hinv.shape)}")
    if d_in and not Hinv.is_meta:
        # (a NaN below the diagonal was refused as a lower factor's "nonzeros below its diagonal",
        # one on or above it, or an inf, solved as NaN weights; aminmax: NaN propagates, no
        # d_in^2 boolean copy; float8 has no aminmax: read as fp32, as the solvers read it)
        values = Hinv.detach() if Hinv.element_size() > 1 else Hinv.detach().float()
        extremes = torch.stack(torch.aminmax(values))
        diag = values.diagonal().float()
        tiny = torch.finfo(torch.float32).tiny
        # The numbers the checks below judge Hinv by, read back at once (read check by check they
        # were five reads a solve, a nonzero's among them, and on a GPU each waits for the queue to
        # drain): its extremes, whether they fit fp32, how many diagonal entries are below fp32's
        # normal range, and whether it has nonzeros where the upper factor has zeros. The columns
        # an error names are read on its path alone.
        lo, hi, fits_fp32, n_small, lower = torch.stack([
            *extremes.double(), extremes.float().isfinite().all().double(), (diag.abs() < tiny).sum().double(),
            (Hinv[1:, 0].any() | Hinv.diagonal(-1).any()).double()]).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            what = "NaN" if math.isnan(lo) or math.isnan(hi) else "inf"
            raise ValueError(f"Hinv must be finite, it has {what} (a failed factorization of H^{{-1}}?)")
        # Both solvers read Hinv in fp32, where an fp64 factor's 1e39 is inf (weights solved to NaN) and
        # its 1e-50 a zero on the diagonal: the extremes and the diagonal are checked as read, in fp32
        # (rounding keeps the order: the fp32 matrix's extremes are these, rounded; no d_in^2 copy)
        if not fits_fp32:
            raise ValueError(f"Hinv holds {max(lo, hi, key=abs):g}, past float32's range, in which the solvers "
                             f"read it (inf there): a nearly singular H, too little damping?")
        # GPTQ divides column j's error by Hinv[j, j], never 0 in the factor of an invertible
        # H^{-1}: a zero made the errors inf and the scales NaN (reference) or inf (kernel).
        # Nor subnormal in fp32: Hinv[j, j]^2 >= 1 / H~[j, j], so one below 1.18e-38 factors an H~
        # past 7e75, and (w - q) / 1e-40 overflowed the errors to inf, the weights to NaN, silently
        small = (diag.abs() < tiny).nonzero().flatten().tolist() if n_small else []
        small = dict(zip(small, diag[small].tolist())) if small else {}
        zero = [j for j, value in small.items() if value == 0]
        if small and not zero:
            (j, value), more = next(iter(small.items())), f", and {len(small) - 1} more" if len(small) > 1 else ""
            raise ValueError(f"Hinv has {value:g} on its diagonal at column {j} (processing order){more}, below "
                             f"float32's normal range (1.18e-38) as the solvers read it: GPTQ divides each column's "
                             f"error by it, to inf. As Hinv[j, j]^2 >= 1 / H~[j, j], it factors an H~ whose diagonal "
                             f"is past 7e75: scale H into float32's range")
        if zero:
            more = f", and {len(zero) - 1} more" if len(zero) > 1 else ""
            raise ValueError(f"Hinv has a zero on its diagonal at column {zero[0]} (processing order){more} "
                             f"(in float32, as the solvers read it): "
                             f"the upper Cholesky factor of an invertible H^{{-1}} has none (a singular H^{{-1}}, "
                             f"or a column zeroed by hand?)")
        # The solver reads Hinv's upper triangle alone: the lower factor (torch.linalg.cholesky's
        # default) ran as a diagonal Hinv, no error fed forward, and H^{-1} itself as another matrix,
        # silently. Both have a nonzero first column below the diagonal or first subdiagonal, which
        # the upper factor has zero (views: O(d_in) reads, no d_in^2 copy).
        if lower:
            # (scipy.linalg.cho_factor leaves H^{-1}'s own entries there, which no check of O(d_in)
            # tells from H^{-1} itself: its upper triangle is the factor)
            raise ValueError("Hinv must be the upper Cholesky factor of H^{-1} (torch.linalg.cholesky(H_inv, "
                             "upper=True)); it has nonzeros below its diagonal: a lower factor, or H^{-1} itself, "
                             "or scipy.linalg.cho_factor's output, whose upper triangle alone is the factor "
                             "(give torch.triu of it)")
    if R is not None and R.shape != W.shape:
        raise ValueError(f"R must have W's shape {tuple(W.shape)}, got {tuple(R.shape)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    # (both said neither which of the three was given or missing nor the group_size that asked for it)
    grid = (("scales", scales), ("zeros", zeros), ("col_group", col_group))
    if group_size > 0:
        given = [name for name, t in grid if t is not None]
        if given:
            raise ValueError(f"dynamic groups (group_size = {group_size} > 0) take no static grid, got "
                             f"{', '.join(given)}: pass group_size=-1 (or 0) to solve on the grid given")
    else:
        missing = [name for name, t in grid if t is None]
        if missing:
            raise ValueError(f"a static grid (group_size = {group_size}) needs scales, zeros and col_group, "
                             f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} None")
        if scales.dim() != 2 or scales.shape[0] != d_out or zeros.shape != scales.shape:
            raise ValueError(
                f"scales/zeros must be [{d_out}, G], got {tuple(scales.shape)} and {tuple(zeros.shape)}"
            )
        if col_group.shape != (d_in,):
            raise ValueError(f"col_group must be [{d_in}], got {tuple(col_group.shape)}")
        # (a float one's 0.5 or 1.7 ran as groups 0 and 1, truncated by int() and the kernel's
        # int32 load; a bool one as groups 0 and 1: silently)
        if col_group.is_floating_point() or col_group.is_complex() or col_group.dtype == torch.bool:
            raise ValueError(f"col_group must be an integer tensor of group indices, got {col_group.dtype}")
        if d_in:  # (one wait; the error gives the range found, as the caller must find the wrong entries)
            lo, hi = torch.stack(torch.aminmax(col_group)).tolist()
            if lo < 0 or hi >= scales.shape[1]:
                raise ValueError(f"col_group out of range [0, {scales.shape[1]}) (scales' {scales.shape[1]} groups), "
                                 f"got values in [{lo}, {hi}]")
        maxq = 2**bits - 1
        # (checked as read, in fp32: an fp64 scale of 1e-50 is 0 there, every weight solved to 0 silently,
        # and one of 1e39 inf, refused as an overflow blamed on Hinv. A subnormal one solved them to ~0 as
        # well, and Triton's division on a GPU flushes it to 0: the grids found are never one, TINY)
        read = scales.float()
        bad = ~(torch.isfinite(read) & (read >= TINY))
        if bool(bad.any()):
            given, as_read = scales[bad][0].item(), read[bad][0].item()
            # (compared as printed: -0.1, not exactly fp32's, would read "-0.1 (-0.1 in float32)")
            said = f"{given:g}" if f"{as_read:g}" == f"{given:g}" else f"{given:g} ({as_read:g} in float32)"
            subnormal = ": below float32's normal range (1.18e-38)" if 0 < as_read < TINY else ""
            raise ValueError(f"a static grid's scales must be finite and positive in float32, as the solvers read "
                             f"them, got {said}{subnormal}")
        bad = ~((zeros >= 0) & (zeros <= maxq) & (zeros == torch.round(zeros)))
        if bool(bad.any()):
            raise ValueError(f"a static grid's zeros must be integers in [0, {maxq}] for {bits} bits, got "
                             f"{zeros[bad][0].item():g}")


class SolveOverflow(ValueError):
    """A solve whose finite W and Hinv overflowed float32 (``check_solved``): too little damping for
    float32, which more damping cures (``epmq.quant`` retries so)."""


def check_solved(out: SolveOut, W: torch.Tensor, R: Optional[torch.Tensor], starts: list) -> SolveOut:
    """``out`` of ``W`` (``+ R``, blocks from ``starts``), checked to be a solve that did not overflow
    float32; the cause named if it did.

    A finite Hinv can still overflow the solve: each column's error ``(w - q) / Hinv[j, j]`` is fed
    forward times ``Hinv[j, k]``, and 3.4e38 there (a nearly singular H) made an update inf and the
    weights after it NaN, silently. Q is checked, not the grid: ``Q = (q - zero) * scale`` is finite
    only where its group's grid is, and the kernel's grid of a NaN group can stay finite (its min and
    max drop NaN). On a static grid an inf target is clamped to a finite Q, so the errors are checked
    too: ``err_sq`` is NaN where one overflowed, and inf where only their squares pass fp32 (errors
    past 1.8e19, whose loss ``epmq.quant`` measures instead: taken). One sync, no copy of Q.
    """
    Q = out.Q
    if Q.numel() == 0 or Q.is_meta:
        return out
    q_lo, q_hi, e_lo, e_hi = torch.cat([torch.stack(torch.aminmax(t)) for t in (Q, out.err_sq)]).tolist()
    if math.isfinite(q_lo) and math.isfinite(q_hi) and not (math.isnan(e_lo) or math.isnan(e_hi)):
        return out
    # (the error's path: the target as the solvers read it, in fp32, where W + R may overflow too)
    operands = [("W", W.float())]
    if R is not None:
        operands += [("R", R.float()), ("W + R", W.float() + R.float())]
    for name, t in operands + [(None, Q)]:
        bad = ~t.isfinite()
        if bool(bad.any()):
            break
    else:  # (Q finite: an error overflowed on a static grid, in a block whose err_sq is NaN)
        block = int(out.err_sq.isnan().any(0).nonzero()[0])
        end = starts[block + 1] if block + 1 < len(starts) else Q.shape[1]
        raise SolveOverflow(f"the solve overflowed float32: its errors are inf in columns {starts[block]} to "
                            f"{end - 1} (processing order), from a finite W and Hinv. " + _OVERFLOW_CAUSE)
    column = int(bad.any(0).nonzero()[0])
    what = "NaN" if bool(t[:, column].isnan().any()) else "inf"
    if name is not None:
        raise ValueError(f"{name} has {what} at column {column} (processing order; in float32, as the solvers read "
                         f"it): the weights solved from it are not finite")
    raise SolveOverflow(f"the solve overflowed float32: its weights are first {what} at column {column} (processing "
                        f"order), from a finite W and Hinv. " + _OVERFLOW_CAUSE)


_OVERFLOW_CAUSE = ("Each column's error (w - q) / Hinv[j, j] is fed forward times Hinv[j, k], and Hinv holds "
                   "entries too large against its diagonal for float32: a nearly singular H, too little damping "
                   "(raise percdamp)?")


@torch.no_grad()  # (no derivative: an nn.Parameter is solved as its values, as by the kernel)
def gptq_solve_reference(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    bits: int,
    sym: bool,
    R: Optional[torch.Tensor] = None,
    group_size: int = -1,
    scales: Optional[torch.Tensor] = None,
    zeros: Optional[torch.Tensor] = None,
    col_group: Optional[torch.Tensor] = None,
    blocksize: int = 128,
) -> SolveOut:
    """The blocked GPTQ loop in float32 torch: the reference the Triton kernel must match."""
    check_solve_args(W, Hinv, bits, sym, R, group_size, scales, zeros, col_group, blocksize)
    # (numpy's, as Python's: what the kernel is specialised on)
    bits, sym, group_size, blocksize = int(bits), bool(sym), int(group_size), int(blocksize)
    maxq = 2**bits - 1
    given = W
    W = W.float().clone() if R is None else W.float() + R.float()
    Hinv = Hinv.float().contiguous()  # (as the kernel reads it: CPU products' sums follow the layout)
    d_out, d_in = W.shape
    dynamic = group_size > 0
    if dynamic:
        n_groups = triton.cdiv(d_in, group_size)
        scales = torch.empty(d_out, n_groups, dtype=torch.float32, device=W.device)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = scales.float(), zeros.float()
    starts = block_starts(d_in, blocksize, group_size)

    Q = torch.empty_like(W)
    codes = torch.empty(d_out, d_in, dtype=torch.int32, device=W.device)
    err_sq = torch.empty(d_out, len(starts), dtype=torch.float32, device=W.device)
    for b, i1 in enumerate(starts):
        i2 = starts[b + 1] if b + 1 < len(starts) else d_in
        # the block is held transposed, a column of W a contiguous row of W1t: the per-column
        # work then runs on contiguous memory (the arithmetic is the same, element for element)
        W1t = W[:, i1:i2].T.contiguous()
        Q1t = torch.empty_like(W1t)
        codes1t = torch.empty(W1t.shape, dtype=torch.int32, device=W.device)
        Err1t = torch.empty_like(W1t)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic:
                g = j // group_size
                if j % group_size == 0:
                    # aligned blocks: a group starting at i == 0 may run past the block, and
                    # then W[:, j:] (every earlier block applied) is current; otherwise it lies inside the block
                    group = W[:, j : j + group_size] if i == 0 else W1t[i : i + group_size].T
                    scales[:, g], zeros[:, g] = find_params(group, bits, sym)
            else:
                g = int(col_group[j])
            scale, zero = scales[:, g], zeros[:, g]
            w = W1t[i]
            q = quantize_codes(w, scale, zero, maxq)
            codes1t[i] = q.to(torch.int32)
            Q1t[i] = dequantize(q, scale, zero)
            err = (w - Q1t[i]) / Hinv[j, j]
            W1t[i:] -= Hinv[j, j:i2].unsqueeze(1) * err.unsqueeze(0)
            Err1t[i] = err
        Q[:, i1:i2] = Q1t.T
        codes[:, i1:i2] = codes1t.T
        # (Err1t - Err1t: 0 for a finite error, NaN for one that overflowed, as in the kernel: check_solved)
        err_sq[:, b] = (Err1t * Err1t + (Err1t - Err1t)).sum(0)
        with ieee_fp32_matmul():  # (whatever the caller set for TF32, as the kernel's launcher)
            W[:, i2:] -= Err1t.T.contiguous() @ Hinv[i1:i2, i2:]
    return check_solved(SolveOut(Q, codes, scales, zeros, err_sq), given, R, starts)




# =========================================================================== fused Triton solver
#
# One launch per block of B columns, then one matrix product per block:
#
#   programs   one per BLOCK_ROWS output rows: given Hinv, GPTQ's rows are independent.
#   registers  the program's tile W[rows, block] (BLOCK_ROWS x BLOCK_COLS fp32, BLOCK_COLS the
#              block width rounded up to a power of two), the grid of the current group (one
#              scale and zero per row), and the current column's Hinv row and Hinv[j, j] (and
#              its static grid), each loaded one column ahead so that the latency hides behind
#              the previous column's arithmetic. Hinv's block rows are read by every program
#              and stay in L2.
#   the loop   per column i of the block: take the column out of the tile (a masked row sum,
#              exact since every other term is 0), find the group's grid when a dynamic group
#              starts (its min/max from the tile, or from memory when the group runs past the
#              block), round, store the column's code, Q and err, and update the tile
#              W[:, i:] -= err * Hinv[j, i:].
#   trailing   W[:, end:] -= Err @ Hinv[block, end:] in torch, the reference's own expression
#              (fp32, TF32 off), so that the values carried to later blocks agree bit for bit
#              with the reference on the same device.
#   residual   T = W + R is formed on load: the first block's kernel reads W and R, and the
#              first trailing update writes (W + R) - Err @ Hinv into the workspace in the pass
#              that writes it anyway. No separate pass forms T.
#
# Exactness, so that codes match the reference rather than merely come close:
#   rounding   ``_rint`` (the 1.5 * 2**23 trick) is round-half-to-even like torch.round, with
#              the same code compiled and interpreted (libdevice's rint has no interpreter
#              implementation).
#   division   tl.math.div_rn everywhere: Triton's ``/`` on fp32 is an approximate division.
#              The one exception mirrors torch: on CUDA, ``tensor / python_scalar`` multiplies
#              by the fp32 reciprocal (ATen's div_true_kernel_cuda), on the CPU it divides;
#              ``scale = (max - min) / maxq`` does what torch does on the tensors' device.
#   fusion     the kernel is compiled with enable_fp_fusion=False: torch rounds the product
#              ``err * Hinv[j, i:]`` before subtracting it, and so must the kernel (an FMA would
#              round once). The interpreter (numpy) never fuses.


@triton.jit
def _rint(x):
    # For |x| < 2**22, x + 1.5 * 2**23 lies in [2**23, 2**24), where fp32's last mantissa bit
    # is worth 1: the addition itself rounds x to an integer, half to even, and subtracting
    # the constant again is exact. Larger |x| are returned as they are: every caller clamps
    # to [0, maxq] afterwards, where they land on the same end whichever way they round.
    r = (x + 12582912.0) - 12582912.0
    return tl.where(tl.abs(x) < 4194304.0, r, x)


@triton.jit
def _gptq_block_kernel(
    W,  # fp32 [d_out, d_in]: the target so far (W, or the workspace after the first block)
    R,  # fp32 [d_out, d_in]: the residual correction, read only when HAS_R
    Hinv,  # fp32 [d_in - i1, d_in]: Hinv's rows from the block's first on (upper triangular),
    # so that the offsets within it, below B d_in, fit 32 bits for any layer width
    Q,  # fp32 [d_out, d_in] out: dequantized weights
    codes,  # int32 [d_out, d_in] out
    Err,  # fp32 [d_out, nb] out: the block's scaled errors
    ErrSq,  # fp32 [d_out, n_blocks] out: per row, the block's sum of squared scaled errors
    scales,  # fp32 [d_out, n_groups]: in for a static grid, out for dynamic groups
    zeros,  # fp32 [d_out, n_groups]: likewise
    col_group,  # int32 [d_in]: group of each processing column (static grid)
    d_out,
    d_in,
    i1,  # first column of the block
    nb,  # columns in the block
    n_groups,
    group_size,
    block,  # the block's index (a column of ErrSq)
    n_blocks,
    HAS_R: tl.constexpr,
    DYNAMIC: tl.constexpr,
    GROUP_SPANS: tl.constexpr,  # dynamic groups larger than the block
    SYM: tl.constexpr,
    MAXQ: tl.constexpr,  # 2**bits - 1, as a float
    SCALE_BY_RCP: tl.constexpr,  # scale = (max - min) * MAXQ_RCP instead of / MAXQ (see above)
    MAXQ_RCP: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < d_out
    rows64 = rows.to(tl.int64)
    row_off = rows64 * d_in
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols < nb
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile_off = row_off[:, None] + (i1 + cols)[None, :]

    Wt = tl.load(W + tile_off, mask=tile_ok, other=0.0)
    if HAS_R:
        Wt = Wt + tl.load(R + tile_off, mask=tile_ok, other=0.0)

    scale = tl.full([BLOCK_ROWS], 1.0, tl.float32)
    zero = tl.zeros([BLOCK_ROWS], tl.float32)
    if GROUP_SPANS:
        # a group larger than the block: its grid is in memory, found by the launcher when
        # the group started (at this block or an earlier one)
        scale = tl.load(scales + rows64 * n_groups + i1 // group_size, mask=row_ok, other=1.0)
        zero = tl.load(zeros + rows64 * n_groups + i1 // group_size, mask=row_ok, other=0.0)
    # The column's Hinv row, Hinv[j, j] and (static grid) its grid are each loaded one column
    # ahead, so that their latency hides behind the previous column's arithmetic. The row is
    # read from column j on, like the reference's Hinv[j, j:i2]: nothing left of the diagonal.
    h = tl.load(Hinv + i1 + cols, mask=col_ok, other=0.0)
    d = tl.load(Hinv + i1)
    if not DYNAMIC:
        gcol = tl.load(col_group + i1 + cols, mask=col_ok, other=0)
        g = tl.sum(tl.where(cols == 0, gcol, 0), axis=0)
        scale = tl.load(scales + rows64 * n_groups + g, mask=row_ok, other=1.0)
        zero = tl.load(zeros + rows64 * n_groups + g, mask=row_ok, other=0.0)
    err_sq = tl.zeros([BLOCK_ROWS], tl.float32)
    for i in range(0, nb):
        j = i1 + i
        more = i + 1 < nb
        h_next = tl.load(Hinv + (i + 1) * d_in + i1 + cols, mask=col_ok & (cols > i) & more, other=0.0)
        d_next = tl.load(Hinv + (i + 1) * d_in + j + 1, mask=more, other=1.0)
        if not DYNAMIC:
            g_next = tl.sum(tl.where(cols == i + 1, gcol, 0), axis=0)
            scale_next = tl.load(scales + rows64 * n_groups + g_next, mask=row_ok & more, other=1.0)
            zero_next = tl.load(zeros + rows64 * n_groups + g_next, mask=row_ok & more, other=0.0)

        if DYNAMIC and not GROUP_SPANS:
            if j % group_size == 0:
                # the group lies inside the block: its error-corrected columns are in the tile.
                # (A group that runs past the block starts it; the launcher found its grid from
                # the columns in memory and it was loaded above.)
                in_group = ((cols >= i) & (cols < i + group_size))[None, :]
                lo = tl.minimum(tl.min(tl.where(in_group, Wt, 0.0), axis=1), 0.0)
                hi = tl.maximum(tl.max(tl.where(in_group, Wt, 0.0), axis=1), 0.0)
                if SYM:
                    hi = tl.maximum(tl.abs(lo), hi)
                    lo = -hi
                # as find_params: a range too small for a normal scale (below grid.TINY,
                # 2**-126 = 1.1754943508222875e-38) is the unit range
                if SCALE_BY_RCP:
                    raw = (hi - lo) * MAXQ_RCP
                else:
                    raw = tl.math.div_rn(hi - lo, tl.full([BLOCK_ROWS], MAXQ, tl.float32))
                empty = raw < 1.1754943508222875e-38
                lo = tl.where(empty, -1.0, lo)
                hi = tl.where(empty, 1.0, hi)
                if SCALE_BY_RCP:
                    scale = (hi - lo) * MAXQ_RCP
                else:
                    scale = tl.math.div_rn(hi - lo, tl.full([BLOCK_ROWS], MAXQ, tl.float32))
                if SYM:
                    zero = tl.full([BLOCK_ROWS], (MAXQ + 1) / 2, tl.float32)
                else:
                    zero = _rint(tl.math.div_rn(-lo, scale))
                g = j // group_size
                tl.store(scales + rows64 * n_groups + g, scale, mask=row_ok)
                tl.store(zeros + rows64 * n_groups + g, zero, mask=row_ok)

        w = tl.sum(tl.where((cols == i)[None, :], Wt, 0.0), axis=1)
        q = _rint(tl.math.div_rn(w, scale)) + zero
        # (NaN kept, as torch.clamp keeps it: a failed solve must not look like code 0)
        q = tl.minimum(tl.maximum(q, 0.0, propagate_nan=tl.PropagateNan.ALL), MAXQ,
                       propagate_nan=tl.PropagateNan.ALL)
        Qj = (q - zero) * scale
        err = tl.math.div_rn(w - Qj, tl.zeros([BLOCK_ROWS], tl.float32) + d)
        tl.store(codes + row_off + j, q.to(tl.int32), mask=row_ok)
        tl.store(Q + row_off + j, Qj, mask=row_ok)
        tl.store(Err + rows64 * nb + i, err, mask=row_ok)
        # err - err is 0 for a finite error and NaN for one that overflowed to inf: err_sq then tells
        # a solve that overflowed (NaN) from errors whose squares alone pass fp32 (inf; check_solved)
        err_sq = err_sq + (err * err + (err - err))
        Wt = Wt - err[:, None] * h[None, :]
        h = h_next
        d = d_next
        if not DYNAMIC:
            scale = scale_next
            zero = zero_next
    tl.store(ErrSq + rows64 * n_blocks + block, err_sq, mask=row_ok)


@triton.jit
def _target_minus_update_kernel(W, R, P, out, n_total, n_cols, col0, d_in, BLOCK: tl.constexpr):
    # out[:, col0:] = (W[:, col0:] + R[:, col0:]) - P, P contiguous [d_out, n_cols]: the first
    # trailing update, which also forms the target W + R (rounded as the reference rounds it).
    # n_total = d_out * n_cols comes from the host: Triton makes it int64 from 2^31 on, where a
    # product of the two i32 arguments here would wrap and mask every lane off.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_total
    r = offs // n_cols
    c = offs % n_cols
    src = r * d_in + col0 + c
    t = tl.load(W + src, mask=ok, other=0.0) + tl.load(R + src, mask=ok, other=0.0)
    tl.store(out + src, t - tl.load(P + offs, mask=ok, other=0.0), mask=ok)


def solver_launch_config(d_out: int, block_cols: int, device: torch.device, block_rows=None):
    """``(block_rows, num_warps)`` of the block kernel (``block_rows`` given: only the warps).

    The column loop is latency bound: each column waits on row reductions over the tile. With
    one warp per program they are warp shuffles; with more, Triton spreads the columns over the
    warps (its layout follows the contiguous dimension) and every reduction and every per-row
    store goes through shared memory behind a barrier. So: one warp, a few rows, and enough
    programs that each SM interleaves several of them. Interpreted, fewer and larger programs
    run faster. ``benchmarks/bench_solver.py`` sweeps the rows per program.
    """
    if _runtime.INTERPRETED or device.type != "cuda":
        return block_rows or min(64, triton.next_power_of_2(d_out)), 4
    if block_rows is None:
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        block_rows = 2
        for candidate in (8, 4):
            if triton.cdiv(d_out, candidate) >= 4 * n_sm:
                block_rows = candidate
                break
    return block_rows, 1


def _workspace(shape, dtype, device):
    # Interpreted (the CPU tests), workspaces start as NaN so that reading an element nobody
    # wrote shows in the results; compiled, they are left uninitialised.
    if _runtime.INTERPRETED:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _unlike_out(t, shape, dtype):
    """How an out= tensor that must be a contiguous ``dtype`` tensor of ``shape`` is not one, as its
    error says what was given (its shape and dtype, strides or type), or None where it is one."""
    if not isinstance(t, torch.Tensor):
        return "None" if t is None else type(t).__name__
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        return f"{tuple(t.shape)} {t.dtype}"
    if not t.is_contiguous():
        return f"a tensor of strides {t.stride()}, not contiguous"
    return None


def _check_out_is_its_own(Q, codes, scales, zeros, read):
    """Refuse outputs that share memory with what the kernel still reads (``read``, as it reads
    them) or with each other, naming both: programs write their rows of Q while others still
    read Hinv's rows, the static grid and W (out=SolveOut(Hinv, ...) of a square layer solved
    from a half-overwritten Hinv, without a word). Q at W's or R's own address solves right,
    each program reading its rows of a block (and the first trailing update the columns after
    it) before any are written, but check_solved reads W and R again to name the cause of a
    solve that failed: there an overflow was blamed on them ("R has NaN at column 2", their
    values gone) where SolveOverflow, on which epmq.quant retries with more damping, was due.
    So it is refused too, the error saying why."""
    written = [("out.Q", Q), ("out.codes", codes), ("out.scales", scales), ("out.zeros", zeros)]
    for k, (name, t) in enumerate(written):
        for other, u in read + written[:k]:
            if not shares_memory(t, u):
                continue
            itself = ""
            if other in ("W", "R") and (t.data_ptr(), t.stride(), t.shape) == (u.data_ptr(), u.stride(), u.shape):
                itself = (f" (it is {other} itself: the solve in place would be right, but a solve that fails reads "
                          f"{other} again to name its cause, after {name} overwrote it, and would blame an overflow "
                          f"on {other}'s values instead of raising SolveOverflow)")
            raise ValueError(f"{name} shares memory with {other}, which the solver reads or writes while it "
                             f"writes {name}{itself}: give an out of tensors of their own (e.g. torch.empty_like)")


@torch.no_grad()  # (its first trailing update is torch.sub(out=), which autograd refuses)
@on_tensor_device
def gptq_solve_triton(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    *,
    bits: int,
    sym: bool,
    R: Optional[torch.Tensor] = None,
    group_size: int = -1,
    scales: Optional[torch.Tensor] = None,
    zeros: Optional[torch.Tensor] = None,
    col_group: Optional[torch.Tensor] = None,
    blocksize: int = 128,
    block_rows: Optional[int] = None,
    num_warps: Optional[int] = None,
    out: Optional[SolveOut] = None,
) -> SolveOut:
    """The fused GPTQ solver; arguments and results as ``gptq_solve_reference``.

    ``block_rows``/``num_warps`` override the launch configuration (benchmarks sweep them).
    ``out``: preallocated ``SolveOut`` to write into (``Q`` and ``codes``; ``scales`` and
    ``zeros`` too with dynamic groups), e.g. poisoned buffers in tests; none may share memory with
    an operand (W included) or another output.
    """
    check_solve_args(W, Hinv, bits, sym, R, group_size, scales, zeros, col_group, blocksize)
    # (numpy's, as Python's: what the kernel is specialised on)
    bits, sym, group_size, blocksize = int(bits), bool(sym), int(group_size), int(blocksize)
    tensors, names = [W, Hinv], ["W", "Hinv"]
    for name, t in (("R", R), ("scales", scales), ("zeros", zeros), ("col_group", col_group)):
        if t is not None:
            tensors.append(t)
            names.append(name)
    device = check_device(*tensors, names=names)
    d_out, d_in = W.shape
    if d_out == 0 or d_in == 0:  # nothing to launch: the reference's empty results
        return gptq_solve_reference(W, Hinv, bits=bits, sym=sym, R=R, group_size=group_size,
                                    scales=scales, zeros=zeros, col_group=col_group,
                                    blocksize=blocksize)
    maxq = 2**bits - 1

    W = W.float().contiguous()
    Hinv = Hinv.float().contiguous()
    R = None if R is None else R.float().contiguous()
    dynamic = group_size > 0
    B = effective_blocksize(blocksize, group_size)
    # No block is wider than the layer: a blocksize past d_in (2**26, "one block", as the
    # reference takes it) was refused as too large for 32-bit offsets, or sized the tile and
    # the errors' workspace by itself (d_out x blocksize floats)
    width = min(B, d_in)
    if width * d_in >= 2**31:
        raise ValueError(f"blocksize {width} x d_in {d_in} is too large: a block's Hinv rows are 32-bit offsets")
    block_cols = triton.next_power_of_2(width)

    if out is not None:
        if not isinstance(out, SolveOut):  # (a plain tuple ended in "'tuple' object has no attribute 'Q'")
            raise ValueError(f"out must be a SolveOut (Q, codes, scales, zeros), got {type(out).__name__}")
        Q, codes = out.Q, out.codes
        # (they said "of W's shape" alone: neither that shape nor what was given, nor which of the three was off)
        for name, t, dtype in (("out.Q", Q, torch.float32), ("out.codes", codes, torch.int32)):
            got = _unlike_out(t, (d_out, d_in), dtype)
            if got is not None:
                raise ValueError(f"{name} must be a contiguous {dtype} tensor [{d_out}, {d_in}] (W's shape), "
                                 f"got {got}")
        # (the kernel writes them: on another GPU that is an illegal address, or another
        # device's memory overwritten)
        given = [("out.Q", Q), ("out.codes", codes)] + [
            (n, t) for n, t in (("out.scales", out.scales), ("out.zeros", out.zeros))
            if dynamic and t is not None]
        check_device(W, *(t for _, t in given), names=["W"] + [n for n, _ in given])
    else:
        Q = torch.empty_like(W)
        codes = torch.empty(d_out, d_in, dtype=torch.int32, device=device)
    if dynamic:
        n_groups = triton.cdiv(d_in, group_size)
        if out is not None and (out.scales is not None or out.zeros is not None):
            scales, zeros = out.scales, out.zeros
            for t in (scales, zeros):  # (one of them None ended in "'NoneType' object has no attribute 'shape'")
                given = _unlike_out(t, (d_out, n_groups), torch.float32)
                if given is not None:
                    raise ValueError(f"out.scales/out.zeros must be contiguous float32 [{d_out}, {n_groups}], "
                                     f"got {given}")
        else:
            scales = torch.empty(d_out, n_groups, dtype=torch.float32, device=device)
            zeros = torch.empty_like(scales)
        col_group_i32 = codes  # unused by the dynamic kernel; any valid pointer
    else:
        n_groups = scales.shape[1]
        scales = scales.float().contiguous()
        zeros = zeros.float().contiguous()
        col_group_i32 = col_group.to(torch.int32).contiguous()
    if out is not None:
        _check_out_is_its_own(Q, codes, scales if dynamic else None, zeros if dynamic else None,
                              read=[("W", W), ("R", R), ("Hinv", Hinv)] + ([] if dynamic else [
                                  ("scales", scales), ("zeros", zeros), ("col_group", col_group_i32)]))

    # (numpy's integers, a sweep's values read from an array, reached the kernel as such: the
    # interpreter's bare "cannot convert 4 of type <class 'numpy.int64'> to tensor"; num_warps=0
    # ran the default silently)
    for name, value in (("block_rows", block_rows), ("num_warps", num_warps)):
        if value is not None and (not is_bits(value) or value < 1 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    block_rows = None if block_rows is None else int(block_rows)
    block_rows, warps_default = solver_launch_config(d_out, block_cols, device, block_rows)
    num_warps = warps_default if num_warps is None else int(num_warps)
    grid = (triton.cdiv(d_out, block_rows),)
    # (one block's errors, contiguous [d_out, i2 - i1], as the reference's product reads them)
    Err_flat = _workspace((d_out * width,), torch.float32, device)
    starts = block_starts(d_in, blocksize, group_size)
    n_blocks = len(starts)
    err_sq = _workspace((d_out, n_blocks), torch.float32, device)
    work = _workspace((d_out, d_in), torch.float32, device) if d_in > B else None
    # torch divides by a Python scalar on the CPU but multiplies by its fp32 reciprocal on CUDA
    maxq_rcp = float(torch.tensor(1.0 / maxq, dtype=torch.float32))

    with ieee_fp32_matmul():
        for block, i1 in enumerate(starts):
            i2 = starts[block + 1] if block + 1 < n_blocks else d_in
            Err = Err_flat[: d_out * (i2 - i1)].view(d_out, i2 - i1)
            first = i1 == 0
            src = W if first else work
            spans = dynamic and group_size > B
            if spans and i1 % group_size == 0:
                # A group that runs past the block starts here; every earlier block's error is
                # already in its columns in memory, so its grid is found there, with the
                # reference's own torch code (no in-kernel reduction over a loop of chunks,
                # which Triton 3.6's thread-locality pass cannot compile).
                cols = src[:, i1 : i1 + group_size]
                if first and R is not None:
                    cols = cols + R[:, i1 : i1 + group_size]
                g = i1 // group_size
                scales[:, g], zeros[:, g] = find_params(cols, bits, sym)
            _gptq_block_kernel[grid](
                src,
                R if (first and R is not None) else src,
                Hinv[i1:],
                Q,
                codes,
                Err,
                err_sq,
                scales,
                zeros,
                col_group_i32,
                d_out,
                d_in,
                i1,
                i2 - i1,
                n_groups,
                group_size if dynamic else 1,
                block,
                n_blocks,
                HAS_R=first and R is not None,
                DYNAMIC=dynamic,
                GROUP_SPANS=spans,
                SYM=sym,
                MAXQ=float(maxq),
                SCALE_BY_RCP=device.type == "cuda",
                MAXQ_RCP=maxq_rcp,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=num_warps,
                enable_fp_fusion=False,
            )
            if i2 == d_in:
                break
            P = Err @ Hinv[i1:i2, i2:]
            if not first:
                work[:, i2:] -= P
            elif R is None:
                torch.sub(W[:, i2:], P, out=work[:, i2:])
            else:
                BLOCK = 1024
                _target_minus_update_kernel[(triton.cdiv(d_out * (d_in - i2), BLOCK),)](
                    W, R, P, work, d_out * (d_in - i2), d_in - i2, i2, d_in, BLOCK=BLOCK
                )
    return check_solved(SolveOut(Q, codes, scales, zeros, err_sq), W, R, starts)


def gptq_solve(W, Hinv, *, backend: str = "torch", **kwargs) -> SolveOut:
    """Dispatch to the torch reference or the fused Triton kernel."""
    if backend == "torch":
        return gptq_solve_reference(W, Hinv, **kwargs)
    if backend == "triton":
        return gptq_solve_triton(W, Hinv, **kwargs)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
