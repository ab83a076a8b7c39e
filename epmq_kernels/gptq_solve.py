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

With dynamic groups the block size is aligned to the group size (``effective_blocksize``) so
that a group always starts with every earlier column's error already applied to it; the
blocked loop then computes exactly what the unblocked column loop of the paper computes.

This file holds the torch reference; the fused Triton kernel lives beside it.
"""

from typing import NamedTuple, Optional

import torch

from .grid import dequantize, find_params, quantize_codes


class SolveOut(NamedTuple):
    Q: torch.Tensor  # float32 [out, in], dequantized, processing order
    codes: torch.Tensor  # int32 [out, in], processing order
    scales: torch.Tensor  # float32 [out, G]
    zeros: torch.Tensor  # float32 [out, G], integer-valued


def effective_blocksize(blocksize: int, group_size: int) -> int:
    """Block size used with dynamic groups: groups must not start inside a block and run past it."""
    if group_size <= 0:
        return blocksize
    if group_size <= blocksize:
        return (blocksize // group_size) * group_size
    return max(d for d in range(1, blocksize + 1) if group_size % d == 0)


def check_solve_args(W, Hinv, bits, R, group_size, scales, zeros, col_group):
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    if Hinv.shape != (d_in, d_in):
        raise ValueError(f"Hinv must be [{d_in}, {d_in}] for W {tuple(W.shape)}, got {tuple(Hinv.shape)}")
    if R is not None and R.shape != W.shape:
        raise ValueError(f"R must have W's shape {tuple(W.shape)}, got {tuple(R.shape)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if group_size > 0:
        if d_in % group_size:
            raise ValueError(f"group_size={group_size} does not divide d_in={d_in}")
        if scales is not None or zeros is not None or col_group is not None:
            raise ValueError("dynamic groups (group_size > 0) take no static scales/zeros/col_group")
    else:
        if scales is None or zeros is None or col_group is None:
            raise ValueError("a static grid needs scales, zeros and col_group")
        if scales.dim() != 2 or scales.shape[0] != d_out or zeros.shape != scales.shape:
            raise ValueError(
                f"scales/zeros must be [{d_out}, G], got {tuple(scales.shape)} and {tuple(zeros.shape)}"
            )
        if col_group.shape != (d_in,):
            raise ValueError(f"col_group must be [{d_in}], got {tuple(col_group.shape)}")
        if int(col_group.min()) < 0 or int(col_group.max()) >= scales.shape[1]:
            raise ValueError(f"col_group out of range [0, {scales.shape[1]})")


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
    check_solve_args(W, Hinv, bits, R, group_size, scales, zeros, col_group)
    maxq = 2**bits - 1
    W = W.float().clone() if R is None else W.float() + R.float()
    Hinv = Hinv.float()
    d_out, d_in = W.shape
    dynamic = group_size > 0
    if dynamic:
        n_groups = d_in // group_size
        scales = torch.empty(d_out, n_groups, dtype=torch.float32, device=W.device)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = scales.float(), zeros.float()
    B = effective_blocksize(blocksize, group_size)

    Q = torch.empty_like(W)
    codes = torch.empty(d_out, d_in, dtype=torch.int32, device=W.device)
    for i1 in range(0, d_in, B):
        i2 = min(i1 + B, d_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic:
                g = j // group_size
                if j % group_size == 0:
                    # aligned blocks: a group starting at i == 0 may run past the block, and
                    # then W[:, j:] (every earlier block applied) is current; otherwise it lies inside W1
                    group = W[:, j : j + group_size] if i == 0 else W1[:, i : i + group_size]
                    scales[:, g], zeros[:, g] = find_params(group, bits, sym)
            else:
                g = int(col_group[j])
            scale, zero = scales[:, g], zeros[:, g]
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, maxq)
            codes[:, j] = q.to(torch.int32)
            Q[:, j] = dequantize(q, scale, zero)
            err = (w - Q[:, j]) / Hinv[j, j]
            W1[:, i:] -= err.unsqueeze(1) * Hinv[j, j:i2].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return SolveOut(Q, codes, scales, zeros)


def gptq_solve(W, Hinv, *, backend: str = "torch", **kwargs) -> SolveOut:
    """Dispatch to the torch reference or the fused Triton kernel."""
    if backend == "torch":
        return gptq_solve_reference(W, Hinv, **kwargs)
    if backend == "triton":
        raise NotImplementedError("the fused Triton GPTQ solver is not built yet")
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
