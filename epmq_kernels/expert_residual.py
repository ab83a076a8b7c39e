"""E-PMQ's calibration statistics: the expert residual ``G += a_k (W_k - W_m) H_k`` and the
Hessian ``H += X^T X`` (rows of ``X`` are tokens).

``G`` streams each expert once; ``W_k - W_m`` is never needed as a whole (the kernel forms its
tiles in registers). This file holds the torch reference; the Triton kernels live beside it.
"""

import torch


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


def accumulate_residual(G, W_k, W_m, H_k, a: float, *, backend: str = "torch"):
    if backend == "torch":
        return accumulate_residual_reference(G, W_k, W_m, H_k, a)
    if backend == "triton":
        raise NotImplementedError("the Triton expert-residual kernel is not built yet")
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def accumulate_xxt(H, X, *, backend: str = "torch"):
    if backend == "torch":
        return accumulate_xxt_reference(H, X)
    if backend == "triton":
        raise NotImplementedError("the Triton X^T X kernel is not built yet")
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
