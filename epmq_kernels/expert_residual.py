"""E-PMQ's calibration statistics: the expert residual ``G += a_k (W_k - W_m) H_k`` and the
Hessian ``H += X^T X`` (rows of ``X`` are tokens).

``G`` streams each expert once; ``W_k - W_m`` is never needed as a whole (the kernel forms its
tiles in registers). This file holds the torch references and the Triton kernels beside them;
``accumulate_residual`` / ``accumulate_xxt`` with ``backend=`` pick one.

Configuration space: ``G``/``H`` in fp32 (the GPU statistics) or fp64 (the CPU statistics);
weights in any float dtype (converted to ``G``'s in registers); activations in bf16, fp16, fp32
or fp64; any shapes (tiles are masked at the edges).
"""

import torch
import triton
import triton.language as tl

from . import _runtime  # (sets TRITON_INTERPRET before the kernels are decorated)
from ._runtime import check_device


def _check_residual_args(G, W_k, W_m, H_k):
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D [out, in], got {tuple(G.shape)}")
    d_out, d_in = G.shape
    if W_k.shape != G.shape or W_m.shape != G.shape:
        raise ValueError(
            f"expert {tuple(W_k.shape)} and merged {tuple(W_m.shape)} weights must match G {tuple(G.shape)}"
        )
    if H_k.shape != (d_in, d_in):
        raise ValueError(f"H_k must be [{d_in}, {d_in}], got {tuple(H_k.shape)}")


def accumulate_residual_reference(G, W_k, W_m, H_k, a: float) -> float:
    """In place ``G += a * D @ H_k`` with ``D = W_k - W_m``, in G's precision.

    Returns ``tr(D H_k D^T)`` (unweighted): the constant of task k's expert term, which the
    solver needs to report that term's value.
    """
    _check_residual_args(G, W_k, W_m, H_k)
    D = W_k.to(G.dtype) - W_m.to(G.dtype)
    P = D @ H_k.to(G.dtype)
    G.add_(P, alpha=float(a))
    return float((P * D).sum())


def accumulate_xxt_reference(H, X):
    """In place: ``H += X^T X`` for token rows ``X[n, d_in]``, in H's precision."""
    if X.dim() != 2 or X.shape[1] != H.shape[0] or H.shape[0] != H.shape[1]:
        raise ValueError(f"X must be [n, {H.shape[0]}] for H {tuple(H.shape)}, got {tuple(X.shape)}")
    X = X.to(H.dtype)
    H.addmm_(X.T, X)
    return H


# =========================================================================== Triton kernels
#
# Expert residual: a GEMM ``P = D @ H_k`` whose A operand is formed in registers as the
# difference of two weight tiles, with the epilogue ``G += a * P`` (read-modify-write of the
# output tile) and the tile's share of ``tr(D H_k D^T) = sum(P * D)``, for which the epilogue
# also forms D's tile at the output's position (D and P are both [d_out, d_in]). Programs
# write their trace partial to a buffer that torch sums in float64: deterministic, no atomics.
# The products run in G's precision: fp32 with input_precision="ieee" (FMA, no TF32) or fp64.
#
# X^T X: H is symmetric, so only the tiles on and above the diagonal are computed; an
# off-diagonal program adds its tile to H[m, n] and its transpose to H[n, m]. 16-bit
# activations go to the tensor cores as they are (their products are exact in fp32, the
# accumulator is fp32); fp32 activations use IEEE fp32 products.

# Launch configurations, fixed rather than autotuned (the first call costs no tuning and G is
# never accumulated twice), chosen so that sm_90 compiles them without register spills: the
# A operand of the residual is a difference of two tiles, and the X^T X epilogue holds a tile
# and its transpose, both heavier than a plain GEMM's.
#   residual: (dtype, input_precision) -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_RESIDUAL_CONFIG = {
    (torch.float32, "ieee"): (64, 64, 16, 4, 2),
    (torch.float32, "tf32x3"): (64, 64, 16, 4, 3),
    (torch.float64, "ieee"): (32, 32, 16, 4, 2),
}
#   X^T X: kind of product -> (BLOCK, BLOCK_K, num_warps, num_stages)
_XXT_CONFIG = {"16bit": (64, 64, 4, 3), torch.float32: (64, 16, 4, 2), torch.float64: (32, 16, 4, 2)}


@triton.jit
def _residual_kernel(
    G,  # [d_out, d_in], fp32 or fp64, updated in place
    W_k,  # [d_out, d_in]
    W_m,  # [d_out, d_in]
    H_k,  # [d_in, d_in]
    a_ptr,  # [1] in G's dtype: the task weight a_k
    partial,  # [n_programs] in G's dtype: the programs' shares of tr(D H_k D^T)
    d_out,
    d_in,  # also the row stride of every operand (all contiguous)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    acc_ty = G.dtype.element_ty
    # grouped program order: GROUP_M row tiles share each column panel of H_k while it is in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(d_out, BLOCK_M)
    n_n = tl.cdiv(d_in, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < d_out
    n_ok = offs_n < d_in
    # W_k and W_m share their offsets; one pointer moves per operand along K
    row_off = offs_m.to(tl.int64)[:, None] * d_in
    wk_ptrs = W_k + row_off + offs_k[None, :]
    wm_ptrs = W_m + row_off + offs_k[None, :]
    h_ptrs = H_k + offs_k.to(tl.int64)[:, None] * d_in + offs_n[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    for k0 in range(0, d_in, BLOCK_K):
        k_ok = (k0 + offs_k) < d_in
        a_ok = m_ok[:, None] & k_ok[None, :]
        D = tl.load(wk_ptrs, mask=a_ok, other=0.0).to(acc_ty)
        D = D - tl.load(wm_ptrs, mask=a_ok, other=0.0).to(acc_ty)
        Hb = tl.load(h_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(acc_ty)
        acc = tl.dot(D, Hb, acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        wk_ptrs += BLOCK_K
        wm_ptrs += BLOCK_K
        h_ptrs += BLOCK_K * d_in

    out_ok = m_ok[:, None] & n_ok[None, :]
    out_off = row_off + offs_n[None, :]
    D_out = tl.load(W_k + out_off, mask=out_ok, other=0.0).to(acc_ty) - tl.load(
        W_m + out_off, mask=out_ok, other=0.0
    ).to(acc_ty)
    tl.store(partial + pid, tl.sum(tl.sum(acc * D_out, axis=1), axis=0))
    a = tl.load(a_ptr)
    tl.store(G + out_off, tl.load(G + out_off, mask=out_ok, other=0.0) + a * acc, mask=out_ok)


@triton.jit
def _xxt_kernel(
    H,  # [d, d], fp32 or fp64, updated in place
    X,  # [n, d] token rows
    n,
    d,
    stride_h,
    stride_x,
    DOT_DTYPE: tl.constexpr,  # the dtype the tiles enter tl.dot in
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,  # square output tiles: the transpose of a tile is a tile
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n >= pid_m:  # tiles on and above the diagonal; the others are their transposes
        acc_ty = H.dtype.element_ty
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
        m_ok = offs_m < d
        n_ok = offs_n < d
        acc = tl.zeros([BLOCK, BLOCK], dtype=acc_ty)
        for k0 in range(0, n, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < n
            tok = offs_k.to(tl.int64)[:, None] * stride_x
            Xm = tl.load(X + tok + offs_m[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            Xn = tl.load(X + tok + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(
                tl.trans(Xm.to(DOT_DTYPE)), Xn.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                out_dtype=acc_ty,
            )
        ok = m_ok[:, None] & n_ok[None, :]
        p = H + offs_m.to(tl.int64)[:, None] * stride_h + offs_n[None, :]
        tl.store(p, tl.load(p, mask=ok, other=0.0) + acc, mask=ok)
        if pid_n > pid_m:
            pt = H + offs_n.to(tl.int64)[None, :] * stride_h + offs_m[:, None]
            tl.store(pt, tl.load(pt, mask=ok, other=0.0) + acc, mask=ok)


def _check_float_out(t, name):
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64 for the Triton kernels, got {t.dtype}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension")


def accumulate_residual_triton(G, W_k, W_m, H_k, a: float, *, input_precision: str = "ieee") -> float:
    """``G += a (W_k - W_m) H_k`` in place; returns ``tr(D H_k D^T)`` like the reference.

    ``input_precision`` ("ieee", or "tf32x3" for a faster near-fp32 product on tensor cores)
    applies to fp32 ``G`` only; fp64 ``G`` always multiplies in fp64.
    """
    _check_residual_args(G, W_k, W_m, H_k)
    check_device(G, W_k, W_m, H_k, names=["G", "W_k", "W_m", "H_k"])
    _check_float_out(G, "G")
    if input_precision not in ("ieee", "tf32x3"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32x3', got {input_precision!r}")
    d_out, d_in = G.shape
    if not G.is_contiguous():
        raise ValueError("G must be contiguous (it is updated in place)")
    W_k, W_m, H_k = W_k.contiguous(), W_m.contiguous(), H_k.contiguous()
    precision = "ieee" if G.dtype == torch.float64 else input_precision
    BM, BN, BK, warps, stages = _RESIDUAL_CONFIG[(G.dtype, precision)]
    n_programs = triton.cdiv(d_out, BM) * triton.cdiv(d_in, BN)
    partial = torch.empty(n_programs, dtype=G.dtype, device=G.device)
    a_t = torch.tensor([float(a)], dtype=G.dtype, device=G.device)
    _residual_kernel[(n_programs,)](
        G, W_k, W_m, H_k, a_t, partial, d_out, d_in,
        INPUT_PRECISION=precision,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return float(partial.double().sum())


def accumulate_xxt_triton(H, X):
    """In place ``H += X^T X`` for token rows ``X[n, d_in]`` (bf16, fp16, fp32 or fp64)."""
    if X.dim() != 2 or X.shape[1] != H.shape[0] or H.shape[0] != H.shape[1]:
        raise ValueError(f"X must be [n, {H.shape[0]}] for H {tuple(H.shape)}, got {tuple(X.shape)}")
    check_device(H, X, names=["H", "X"])
    _check_float_out(H, "H")
    if X.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"X must be bf16, fp16, fp32 or fp64, got {X.dtype}")
    n, d = X.shape
    if n == 0:
        return H
    X = X if X.stride(1) == 1 else X.contiguous()
    sixteen = X.dtype in (torch.bfloat16, torch.float16) and H.dtype == torch.float32
    if sixteen:
        dot_dtype, precision = _TL_DTYPE[X.dtype], "ieee"
        if X.dtype == torch.bfloat16 and _runtime.INTERPRETED:
            # the interpreter's tl.dot mishandles bf16 operands; fp32 operands give the same
            # products (a bf16 product is exact in fp32)
            dot_dtype = tl.float32
        BLOCK, BK, warps, stages = _XXT_CONFIG["16bit"]
    else:
        dot_dtype, precision = _TL_DTYPE[H.dtype], "ieee"
        BLOCK, BK, warps, stages = _XXT_CONFIG[H.dtype]
    nb = triton.cdiv(d, BLOCK)
    _xxt_kernel[(nb, nb)](
        H, X, n, d, H.stride(0), X.stride(0),
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, BLOCK=BLOCK, BLOCK_K=BK,
        num_warps=warps, num_stages=stages,
    )
    return H


_TL_DTYPE = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def accumulate_residual(G, W_k, W_m, H_k, a: float, *, backend: str = "torch"):
    if backend == "torch":
        return accumulate_residual_reference(G, W_k, W_m, H_k, a)
    if backend == "triton":
        return accumulate_residual_triton(G, W_k, W_m, H_k, a)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def accumulate_xxt(H, X, *, backend: str = "torch"):
    if backend == "torch":
        return accumulate_xxt_reference(H, X)
    if backend == "triton":
        return accumulate_xxt_triton(H, X)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
