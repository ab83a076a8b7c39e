"""E-PMQ's calibration statistics: the expert residual ``G += a_k (W_k - W_m) H_k``, the
Hessian ``H += X^T X`` (rows of ``X`` are tokens), and the fold of the experts' Hessians into the
weighted and merged sums ``H_e += sum_k a_k H_k``, ``H_m += sum_k H_k``.

``G`` streams each expert once; the fused kernel never needs ``W_k - W_m`` as a whole (it forms
its tiles in registers). For every precision the autotuner also times cuBLAS, which does form
it (see CUBLAS below), where bf16x3 is allowed one cuBLAS product of operands split side by side
by a kernel here (SPLIT_CUBLAS), and every candidate of the more accurate precisions (AT_LEAST),
and keeps the fastest. This file holds the torch references and the Triton kernels beside them;
``accumulate_residual`` / ``accumulate_xxt`` with ``backend=`` pick one.

Configuration space: ``G``/``H`` in fp32 (the GPU statistics) or fp64 (the CPU statistics);
weights in any float dtype (converted to ``G``'s in registers; float8, and float8 Hessians, read
through fp16); activations in bf16, fp16, fp32, fp64 or float8 (read as the weights); any shapes
(tiles are masked at the edges).
"""

import math
import numbers

import torch
import triton
import triton.language as tl

from . import _runtime  # (sets TRITON_INTERPRET before the kernels are decorated)
from . import autotune_cache
from ._runtime import (_bf16_mm, bf16_mm_emulated, bf16x3_mm, check_device, check_same_device, device_values,
                       fp32_matmul, ieee_fp32_matmul, on_tensor_device, shares_memory, side_stream_launch, tf32_round,
                       tf32x3_mm)
from .bf16x3 import SPLIT_TILE as _SPLIT_TILE, split_bf16
from .grid import is_flag


def _check_tensor(t, name):
    # (a NumPy array or a list ended in "object has no attribute 'is_complex'")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_real(t, name):
    # (complex: the kernels ended in a bare KeyError on the dtype's name, and the reference dropped
    # the imaginary part with no more than torch's warning; the statistics are real)
    _check_tensor(t, name)
    if t.is_complex():
        raise ValueError(f"{name} must be real, got {t.dtype}")


def _check_sum(t, name):
    # (a sum updated in place: an integer one failed in torch on the float weight, a bool or
    # float8 one on an operation torch has not for it; the kernels take fp32 and fp64 alone)
    _check_tensor(t, name)
    if not t.is_floating_point() or t.element_size() == 1:
        raise ValueError(f"{name} must be floating point (fp16, bf16, fp32 or fp64): it is a sum updated in "
                         f"place, got {t.dtype}")


def _read_fp8(t: torch.Tensor) -> torch.Tensor:
    """A float8 operand read through fp16, exactly, as the references read it: loaded as float8,
    e4m3 does not compile for sm_80, and the interpreter reads a NaN as a number. e8m0fnu's
    powers of two (2^-127 to 2^127) are past fp16's range (2^20 became inf, 2^-30 zero): read
    through fp32, which holds them all."""
    if not t.is_floating_point() or t.element_size() != 1:
        return t
    return t.to(torch.float32 if t.dtype == torch.float8_e8m0fnu else torch.float16)


def _read_for(t: torch.Tensor, dtype) -> torch.Tensor:
    """An operand as the kernels read it for sums in ``dtype``: float8 as :func:`_read_fp8`, and a
    16-bit one of an fp64 sum through fp32 (exact): its tiles converted to fp64 inside the product
    do not compile for sm_80 or sm_90 (Triton's MMAv2 operand lowering asserts; a conversion
    through fp32 in the kernel is folded into the same one)."""
    t = _read_fp8(t)
    if dtype == torch.float64 and t.element_size() == 2:
        t = t.float()
    return t


def _check_residual_args(G, W_k, W_m, H_k):
    _check_sum(G, "G")
    for name, t in (("W_k", W_k), ("W_m", W_m), ("H_k", H_k)):
        _check_real(t, name)
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D [out, in], got {tuple(G.shape)}")
    d_out, d_in = G.shape
    if W_k.shape != G.shape or W_m.shape != G.shape:
        raise ValueError(
            f"expert {tuple(W_k.shape)} and merged {tuple(W_m.shape)} weights must match G {tuple(G.shape)}"
        )
    if H_k.shape != (d_in, d_in):
        raise ValueError(f"H_k must be [{d_in}, {d_in}], got {tuple(H_k.shape)}")
    # (the reference ended in torch's 'Tensor on device cpu is not on the expected device meta!',
    # naming no operand)
    check_same_device(G, W_k, W_m, H_k, names=["G", "W_k", "W_m", "H_k"])
    # G is written while the product reads the others (tile by tile, in the kernel)
    for name, t in (("W_k", W_k), ("W_m", W_m), ("H_k", H_k)):
        if shares_memory(G, t):
            raise ValueError(f"G must not share memory with {name}: it is written in place")


def _check_scalar(value, name: str) -> None:
    """A ValueError unless ``value`` (a task's weight) is a finite number: float() took NaN and
    inf, which made G or H_e non-finite silently, and a YAML string or a bool as its number. A
    tensor is taken unread (reading a device scalar would wait for the device)."""
    if isinstance(value, torch.Tensor):
        # (its shape and dtype, unread: two values ended in torch's bare 'only one element tensors can be
        # converted to Python scalars', a complex one's imaginary part was dropped)
        if value.numel() != 1 or value.is_complex():
            got = "complex" if value.numel() == 1 else f"of {value.numel()} values"
            raise ValueError(f"{name} must be a finite number, got a tensor {got} ({tuple(value.shape)} {value.dtype})")
        return
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_flag(value, name: str) -> None:
    """A ValueError unless ``value`` is a bool (numpy's too): a truthy 'no' from a YAML or CLI ran
    as True (``read='no'`` returned a float where a tensor, left unread, was asked for)."""
    if not is_flag(value):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_residual_precision(value, name: str = "input_precision") -> None:
    """A clear error unless ``value`` is one of RESIDUAL_PRECISIONS (``name``: the argument)."""
    if value not in RESIDUAL_PRECISIONS:
        raise ValueError(f"{name} must be one of {RESIDUAL_PRECISIONS}, got {value!r}")


@torch.no_grad()  # (as the kernels: the statistics keep no autograd graph of their inputs)
def accumulate_residual_reference(G, W_k, W_m, H_k, a: float, *, input_precision: str = "ieee",
                                  read: bool = True):
    """In place ``G += a * D @ H_k`` with ``D = W_k - W_m``, in G's precision.

    ``input_precision="tf32"`` emulates a TF32 tensor-core product: ``D`` (formed in fp32) and
    ``H_k`` rounded to TF32, their product accumulated in G's precision; "bf16x3" emulates three
    bf16 products of split operands (``_runtime.bf16x3_mm``). "ieee" and "tf32x3" (about fp32
    accuracy) multiply the operands as they are.

    Returns ``tr(D H_k D^T)`` (unweighted): the constant of task k's expert term, which the
    solver needs to report that term's value; with ``read=False`` as a float64 scalar tensor on
    G's device (no wait for the device until it is read).
    """
    _check_residual_args(G, W_k, W_m, H_k)
    _check_scalar(a, "a")
    _check_flag(read, "read")
    check_residual_precision(input_precision)
    D = W_k.to(G.dtype) - W_m.to(G.dtype)
    if input_precision == "tf32":
        D_in = tf32_round(W_k.float() - W_m.float()).to(G.dtype)
        P = D_in @ tf32_round(H_k).to(G.dtype)
    elif input_precision == "bf16x3":
        P = bf16x3_mm(W_k.float() - W_m.float(), H_k.float(), mm=bf16_mm_emulated).to(G.dtype)
    else:
        with ieee_fp32_matmul():  # (whatever the caller set for TF32: accumulate_residual's promise)
            P = D @ H_k.to(G.dtype)
    G.add_(P, alpha=float(a))
    trace = (P * D).sum().double()
    return float(trace) if read else trace


def _length(values):
    """``len(values)``, or None where it has none (a number, a 0-d tensor, a generator)."""
    try:
        return len(values)
    except TypeError:
        return None


def _check_fold_args(H_e, H_m, hessians, weights, overwrite):
    if not is_flag(overwrite):  # (overwrite='no', truthy, dropped the sum H_e held, silently)
        raise ValueError(f"overwrite must be a bool, got {overwrite!r}")
    _check_sum(H_e, "H_e")
    if H_e.dim() != 2 or H_e.shape[0] != H_e.shape[1]:
        raise ValueError(f"H_e must be a square matrix, got {tuple(H_e.shape)}")
    if overwrite and H_m is not None:
        raise ValueError("overwrite folds into H_e alone: H_m must be None")
    if H_m is not None:  # (an ndarray was refused as unlike H_e's dtype, a list ended in "no attribute 'shape'")
        _check_tensor(H_m, "H_m")
    if H_m is not None and (H_m.shape != H_e.shape or H_m.dtype != H_e.dtype):
        raise ValueError(f"H_m must be {tuple(H_e.shape)} {H_e.dtype} like H_e, got "
                         f"{tuple(H_m.shape)} {H_m.dtype}")
    # (one weight or one Hessian for the lists of them ended in "object of type 'float' has no len()" or
    # "len() of a 0-d tensor"; a 2-D tensor's rows were taken as Hessians, refused as 'Hessian 0 is (d,)')
    if _length(hessians) is None or getattr(hessians, "ndim", 3) != 3:
        got = f"one {tuple(hessians.shape)} tensor" if hasattr(hessians, "shape") else type(hessians).__name__
        raise ValueError(f"hessians must be a sequence of Hessians (a list, or a [K, d, d] tensor), got {got}")
    if _length(weights) is None or getattr(weights, "ndim", 1) != 1 or isinstance(weights, (str, bytes)):
        got = f"a {weights.ndim}-d tensor" if hasattr(weights, "ndim") else type(weights).__name__
        raise ValueError(f"weights must be a sequence of the Hessians' weights (a list, or a 1-D tensor), got {got}")
    if len(hessians) != len(weights):
        raise ValueError(f"{len(hessians)} Hessians but {len(weights)} weights")
    if not isinstance(weights, torch.Tensor):
        for k, a in enumerate(weights):
            _check_scalar(a, f"weights[{k}]")
    # (a tensor's values are taken unread, as a's: its dtype alone. A complex one ended in torch's bare
    # 'value cannot be converted to type double without overflow', a bool one was taken as weights 0 and 1
    # where a list's bools are refused, a meta one ended in 'Tensor.item() cannot be called on meta tensors')
    elif weights.is_complex() or weights.dtype == torch.bool or weights.is_meta:
        raise ValueError(f"weights must be real numbers, got a {weights.dtype} tensor on {weights.device}")
    for k, H_k in enumerate(hessians):
        _check_real(H_k, f"Hessian {k}")
        if H_k.shape != H_e.shape:
            raise ValueError(f"Hessian {k} is {tuple(H_k.shape)}, H_e {tuple(H_e.shape)}")
    sums = [("H_e", H_e)] + ([] if H_m is None else [("H_m", H_m)])  # (devices: as in _check_residual_args)
    given = sums + [(f"Hessian {k}", H_k) for k, H_k in enumerate(hessians)]
    check_same_device(*(t for _, t in given), names=[name for name, _ in given])
    # H_e and H_m are written while the Hessians are read (FOLD_ARITY of them a pass, in the
    # kernel): as G in _check_residual_args, sharing memory with what is read is refused
    for out_name, out in (("H_e", H_e), ("H_m", H_m)):
        read = [("H_e", H_e)] if out is H_m else []
        for name, t in read + [(f"Hessian {k}", H_k) for k, H_k in enumerate(hessians)]:
            if shares_memory(out, t):
                raise ValueError(f"{out_name} must not share memory with {name}: it is written in place")


@torch.no_grad()
def fold_hessians_reference(H_e, H_m, hessians, weights, *, overwrite: bool = False):
    """In place, in H_e's precision and the order given: ``H_e += a_k H_k`` and (``H_m`` not None)
    ``H_m += H_k`` for each Hessian ``H_k`` and weight ``a_k``. ``overwrite``: ``H_e`` starts from
    zero (its values are not read; ``H_m`` must be None)."""
    _check_fold_args(H_e, H_m, hessians, weights, overwrite)
    start = 0
    if overwrite:  # (0 + 1 H_0 is H_0 rounded once: copied, without a pass that zeroes H_e first)
        if hessians and float(weights[0]) == 1.0:
            H_e.copy_(hessians[0])
            start = 1
        else:
            H_e.zero_()
    for H_k, a in zip(hessians[start:], weights[start:]):
        if H_k.element_size() == 1:  # (float8, which torch promotes with nothing: as the kernel reads it)
            H_k = H_k.to(H_e.dtype)
        H_e.add_(H_k, alpha=float(a))
        if H_m is not None:
            H_m.add_(H_k)


def _check_xxt_args(H, X):
    # (H first: a 1-D H failed on H.shape[1] with "tuple index out of range", and a non-square
    # one was reported as X's fault)
    _check_sum(H, "H")
    _check_real(X, "X")
    # (integer or bool X, token ids for activations, was summed as numbers by the reference and
    # refused by the kernel: both refuse it)
    if not X.is_floating_point():
        raise ValueError(f"X must be floating point (activations), got {X.dtype}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix [d_in, d_in], got {tuple(H.shape)}")
    if X.dim() != 2 or X.shape[1] != H.shape[0]:
        raise ValueError(f"X must be [n, {H.shape[0]}] for H {tuple(H.shape)}, got {tuple(X.shape)}")
    check_same_device(H, X, names=["H", "X"])  # (as in _check_residual_args)
    # H is written tile by tile while X is read: as G in _check_residual_args
    if shares_memory(H, X):
        raise ValueError("H must not share memory with X: it is written in place")


@torch.no_grad()
def accumulate_xxt_reference(H, X):
    """In place: ``H += X^T X`` for token rows ``X[n, d_in]``, in H's precision (TF32 off)."""
    _check_xxt_args(H, X)
    X = X.to(H.dtype)
    with ieee_fp32_matmul():  # (whatever the caller set: GPTQ's H in TF32 is off by ~5e-4)
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

# Launch configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), stated once here.
# The fp32 residual is autotuned over RESIDUAL_SPACE[p] and cuBLAS for each p in
# AT_LEAST[input_precision] (timed on a scratch G, so the caller's G is accumulated once; winners
# cached on disk per GPU by autotune_cache):
#   "ieee": FMA on CUDA cores (no TF32), square-ish tiles of 64-128.
#   "tf32x3": three TF32 tensor-core products (hi*hi + hi*lo + lo*hi; about fp32 accuracy), so
#       about a third of TF32's rate: tiles the tensor cores like (128 x 128, BLOCK_K = 32, 8
#       warps = two warpgroups, 3 stages), where the old 64 x 64 x 16 tile ran slower than IEEE
#       (38 ms vs 33 ms for 8 products at 4096^2 on an H200; the ideal is ~8 ms).
# The A operand of the residual is the difference of two tiles formed in registers (wgmma takes
# A from registers); compiled for sm_90 by Triton 3.6 and 3.8 none of these spill
# (benchmarks/compile_report.py; 128 x 128 x 32 with 4 warps, 128 x 256 and 256 x 128 spilled
# over 1 KB and were dropped, as were IEEE 128 x 128 tiles, which spill with 3.6).
#   "bf16x3": three bf16 products of operands split into two bf16 parts (hi*hi + hi*mid +
#       mid*hi; errs by ~2^-16 of each term, between tf32 and tf32x3), Triton's own
#       decomposition; bf16's tensor-core rate is twice TF32's, so twice tf32x3's speed. Operands
#       are split in registers from fp32 tiles: tf32x3's tiles, plus a 64-deep K step at 128 x 64
#       (bf16 wgmma is 16 deep; 128 x 128 x 64 and 4-warp 64-deep tiles spill with Triton 3.6).
#   "tf32": one TF32 product (operands keep 10 mantissa bits; products exact, fp32 sums), three
#       times tf32x3's rate. The residual is the experts' small deviation from the merge, so its
#       relative error of ~1e-3 moves the target W* = W_m + R by ~1e-3 |R|, far below a grid step
#       (benchmarks/residual_precision_study.py measures what it does to codes and loss). The same
#       tiles as tf32x3 plus a 64-deep K step: one product leaves registers for a deeper pipeline
#       (128 x 256 spills ~900 bytes with Triton 3.6 and 3.8 and was dropped).
RESIDUAL_SPACE = {
    "ieee": [(64, 64, 16, 4, 2), (128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (64, 64, 32, 4, 3)],
    "tf32x3": [(128, 128, 32, 8, 3), (128, 128, 16, 8, 4), (128, 64, 32, 8, 3),
               (64, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4)],
    "bf16x3": [(128, 128, 32, 8, 3), (128, 128, 16, 8, 4), (128, 64, 32, 8, 3),
               (64, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4), (128, 64, 64, 8, 3)],
    "tf32": [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 2), (128, 64, 32, 4, 4),
             (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)],
}
RESIDUAL_PRECISIONS = tuple(RESIDUAL_SPACE)
# A precision is a floor, not a recipe: the autotuner may also pick any candidate at least as
# accurate (IEEE is, for "tf32x3"; it and tf32x3, for "bf16x3"; all three, for "tf32"). The fast
# options are thus never slower than IEEE on a card where the tensor cores do not pay (consumer
# GPUs, whose TF32 rate is 1-2x their fp32 rate, so three TF32 products lose), up to the timing's
# noise.
AT_LEAST = {"ieee": ("ieee",), "tf32x3": ("tf32x3", "ieee"), "bf16x3": ("bf16x3", "tf32x3", "ieee"),
            "tf32": ("tf32", "bf16x3", "tf32x3", "ieee")}
# E-PMQ's default: three bf16 products, the fastest tensor-core product whose effect on E-PMQ is
# within IEEE fp32's own (residual_precision_study.py: G within 4.5e-6 of float64, against 4.6e-7
# for IEEE and 3e-4 for one TF32 product; at most 0.03% of codes and 2.6e-5 of the objective
# change, where IEEE's rounding ties change 0.01% and 3.2e-5). The autotuner keeps tf32x3 or IEEE
# where those are faster on the card.
DEFAULT_RESIDUAL_PRECISION = "bf16x3"
# cuBLAS is one more candidate for every precision: it forms D = W_k - W_m and P = D @ H_k in
# memory (weight-sized temporaries) with its own tuned tiles. For IEEE it beat the fused kernel
# at every layer shape on the H200 (2026-11-28, 8 experts: 23 ms against 33 ms at 4096^2), so
# the autotuner times both and keeps the faster. Its TF32 product may round the operands to
# TF32 otherwise than the kernel's cvt.rna (truncation errs up to 2^-10 instead of 2^-11), the
# same precision class. Its tf32x3 is three TF32 cuBLAS products of the operands split as the
# kernel splits them (``_runtime.tf32x3_mm``): the dropped lo*lo term and the TF32 conversion of
# the lo parts err by about 2^-21 of each term, whichever way cuBLAS converts.
CUBLAS = ("cublas",)
# bf16x3 by one cuBLAS product (a candidate where bf16x3 is allowed). The cuBLAS bf16x3 above
# splits its operands and adds its three products with torch's elementwise kernels: about
# 24.5 + 5.5 r passes over the fp32 weight per expert (r = d_in / d_out), 44 at 4096 x 14336, where
# 8 experts took 78 ms on an H200 and the products' FLOPs about 55 of them at cuBLAS's rate. Here
# one kernel writes the split operands side by side in bf16, A = [D_hi | D_mid | D_hi] and
# B = [H_hi; H_hi; H_mid], so that A @ B (K = 3 d_in) is the three products in one bf16 GEMM with
# fp32 accumulation, and another adds the product to G and takes its share of tr(D H_k D^T):
# about 9.5 + 2.5 r passes (transient memory 2.5 + 1.5 r of them, against ~6 + 2 r).
SPLIT_CUBLAS = ("cublas_split",)
_RESIDUAL_FP64 = (32, 32, 16, 4, 2)  # fp64 G: no tensor cores for fp64 in Triton; fixed
_RESIDUAL_INTERPRETED = (32, 32, 16, 4, 1)  # under TRITON_INTERPRET nothing is timed
# Fixed, rather than autotuned (the first call costs no tuning), chosen so that sm_90 compiles
# them without register spills: the X^T X epilogue holds a tile and its transpose.
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
def _add_product_kernel(
    G,  # [n_rows, n_cols] fp32, updated in place
    P,  # [n_rows, n_cols] fp32: D @ H_k
    W_k,  # [n_rows, n_cols]
    W_m,  # [n_rows, n_cols]
    a_ptr,  # [1] fp32: the task weight a_k
    partial,  # [n_programs] fp32: the programs' shares of tr(D H_k D^T) = sum(P * D)
    n_rows,
    n_cols,  # also the row stride of every operand (all contiguous)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``G += a P`` and this tile's ``sum(P * D)``, ``D = W_k - W_m`` formed in fp32 again."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    off = rows[:, None] * n_cols + cols[None, :]
    Pt = tl.load(P + off, mask=ok, other=0.0)
    D = tl.load(W_k + off, mask=ok, other=0.0).to(tl.float32) - tl.load(
        W_m + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(partial + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(Pt * D, axis=1), axis=0))
    a = tl.load(a_ptr)
    tl.store(G + off, tl.load(G + off, mask=ok, other=0.0) + a * Pt, mask=ok)


# The fold of FOLD_ARITY Hessians per pass: each pass reads H_e, H_m and its Hessians once and
# writes H_e and H_m once, (2 + n) + 2 passes over a d_in x d_in matrix for n Hessians where
# torch's two in-place adds per Hessian take 6 n (8 experts at 14336 inputs: 24 GB of traffic
# against 39 GB; 2 launches against 16). E-PMQ's float64 H = H_e + lam H_m is one more such
# pass, overwriting (H_e's values not read): 4 passes of fp32 size where torch's copy and add took 8.
FOLD_ARITY = 4
_FOLD_BLOCK = (1024, 4)  # elements per program, num_warps


@triton.jit
def _fold_one(e, m, src, a_ptr, K: tl.constexpr, offs, ok, HAS_M: tl.constexpr):
    h = tl.load(src + offs, mask=ok, other=0.0).to(e.dtype)
    e = e + tl.load(a_ptr + K) * h
    if HAS_M:
        m = m + h
    return e, m


@triton.jit
def _fold_kernel(
    H_e,  # [n] (flat), updated in place: += sum_k a_k H_k
    H_m,  # [n] in H_e's dtype, updated in place: += sum_k H_k (read only when HAS_M)
    H0, H1, H2, H3,  # [n] each, any float dtype: the first N_IN are read
    a_ptr,  # [N_IN] in H_e's dtype: the weights a_k
    n,
    N_IN: tl.constexpr,
    HAS_M: tl.constexpr,
    READ_E: tl.constexpr,  # False: H_e starts from zero (overwritten, not read)
    BLOCK: tl.constexpr,
):
    """The Hessians are added one after the other, in the order given, each sum rounded to H_e's
    dtype as the reference's ``add_`` rounds it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    e = tl.zeros([BLOCK], H_e.dtype.element_ty)
    if READ_E:
        e = tl.load(H_e + offs, mask=ok, other=0.0)
    m = e
    if HAS_M:
        m = tl.load(H_m + offs, mask=ok, other=0.0)
    e, m = _fold_one(e, m, H0, a_ptr, 0, offs, ok, HAS_M)
    if N_IN > 1:
        e, m = _fold_one(e, m, H1, a_ptr, 1, offs, ok, HAS_M)
    if N_IN > 2:
        e, m = _fold_one(e, m, H2, a_ptr, 2, offs, ok, HAS_M)
    if N_IN > 3:
        e, m = _fold_one(e, m, H3, a_ptr, 3, offs, ok, HAS_M)
    tl.store(H_e + offs, e, mask=ok)
    if HAS_M:
        tl.store(H_m + offs, m, mask=ok)


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
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()} "
                         f"for {tuple(t.shape)} (a transposed or sliced view?)")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        # (an expanded H: the kernel added each tile into rows that are one row, silently, where the
        # reference's add_ refuses it)
        raise ValueError(f"{name}'s rows share memory (strides {tuple(t.stride())}: an expanded tensor?); "
                         f"give one whose elements are each its own, e.g. {name}.clone()")


_RESIDUAL_CHOSEN = {}


def _residual_config(G, W_k, W_m, H_k, precision):
    """``(precision, config)`` for this problem: the precision the product runs in (``precision``
    or one more accurate, see AT_LEAST) and its (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    or CUBLAS. Fixed for fp64 and under the interpreter, else autotuned once per (GPU, precision,
    shape, weight dtype)."""
    if G.dtype == torch.float64:
        return "ieee", _RESIDUAL_FP64
    if _runtime.INTERPRETED:
        return precision, _RESIDUAL_INTERPRETED
    d_out, d_in = G.shape
    memo = (G.device, precision, d_out, d_in, W_k.dtype, W_m.dtype)
    chosen = _RESIDUAL_CHOSEN.get(memo)
    if chosen is not None:
        return chosen
    # the requested precision's own candidates first: the first is taken when timing is off
    candidates = [dict(precision=p, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                  for p in AT_LEAST[precision] for bm, bn, bk, w, s in RESIDUAL_SPACE[p]]
    candidates += [dict(precision=p, impl=CUBLAS[0]) for p in AT_LEAST[precision]]
    if "bf16x3" in AT_LEAST[precision]:
        candidates.append(dict(precision="bf16x3", impl=SPLIT_CUBLAS[0]))
    cache = autotune_cache.cache_for("residual", G.device,
                                     [RESIDUAL_SPACE, CUBLAS, SPLIT_CUBLAS, AT_LEAST])
    key = f"{precision}|{d_out}x{d_in}|W={str(W_k.dtype)[6:]},{str(W_m.dtype)[6:]}"
    scratch = torch.zeros_like(G)  # timed runs accumulate here, never into the caller's G

    def run(config):
        _launch_residual(scratch, W_k, W_m, H_k, 1.0, *_config_pair(config))

    chosen = _config_pair(autotune_cache.tune(cache, key, candidates, run))
    if not torch.cuda.is_current_stream_capturing():
        _RESIDUAL_CHOSEN[memo] = chosen
    return chosen


def _config_pair(config: dict) -> tuple:
    """An autotune candidate as ``(precision, CUBLAS or the kernel's launch tuple)``."""
    if config.get("impl") == CUBLAS[0]:
        return config["precision"], CUBLAS
    if config.get("impl") == SPLIT_CUBLAS[0]:
        return "bf16x3", SPLIT_CUBLAS
    return config["precision"], (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"],
                                 config["num_warps"], config["num_stages"])


def _residual_cublas(G, W_k, W_m, H_k, a, precision):
    """The torch reference's product by cuBLAS: IEEE, one TF32 product, three (tf32x3), or three
    bf16 ones (bf16x3); returns ``tr(D H_k D^T)`` as a one-element tensor, like the kernel's
    shares."""
    if precision in ("ieee", "tf32"):
        with fp32_matmul(tf32=precision == "tf32"):
            return accumulate_residual_reference(G, W_k, W_m, H_k, a, read=False).reshape(1)
    D = W_k.float() - W_m.float()
    P = (tf32x3_mm if precision == "tf32x3" else bf16x3_mm)(D, H_k.float())
    G.add_(P, alpha=float(a))
    return torch.sum(P * D, dtype=torch.float64).reshape(1)


def _residual_split_cublas(G, W_k, W_m, H_k, a):
    """bf16x3 ``G += a D H_k`` by one cuBLAS product of the side-by-side split operands (see
    SPLIT_CUBLAS; on the CPU the bf16 product is emulated exactly); returns the programs' shares
    of ``tr(D H_k D^T)``."""
    d_out, d_in = G.shape
    A = torch.empty(d_out, 3 * d_in, dtype=torch.bfloat16, device=G.device)  # [D_hi | D_mid | D_hi]
    B = torch.empty(3 * d_in, d_in, dtype=torch.bfloat16, device=G.device)  # [H_hi; H_hi; H_mid]
    split_bf16(W_k, W_m, A.view(d_out, 3, d_in), mid=1)
    split_bf16(H_k, None, B.view(3, d_in, d_in).transpose(0, 1), mid=2)
    P = _bf16_mm(A, B)
    del A, B
    BR, BC, warps = _SPLIT_TILE
    grid = (triton.cdiv(d_out, BR), triton.cdiv(d_in, BC))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=G.device)
    a_t = device_values([a], torch.float32, G.device)
    _add_product_kernel[grid](G, P, W_k, W_m, a_t, partial, d_out, d_in, BLOCK_R=BR, BLOCK_C=BC,
                              num_warps=warps)
    return partial


@torch.no_grad()  # (the cuBLAS configs' torch products, tf32x3 and bf16x3, wrote W_k's and H_k's graph into G)
def _launch_residual(G, W_k, W_m, H_k, a, precision, config):
    """``config``: CUBLAS or the kernel's launch tuple. Returns the launch's shares of
    ``tr(D H_k D^T)`` (the caller sums them in float64)."""
    d_out, d_in = G.shape
    if config == CUBLAS:
        return _residual_cublas(G, W_k, W_m, H_k, a, precision)
    if config == SPLIT_CUBLAS:
        return _residual_split_cublas(G, W_k, W_m, H_k, a)
    BM, BN, BK, warps, stages = config
    n_programs = triton.cdiv(d_out, BM) * triton.cdiv(d_in, BN)
    partial = torch.empty(n_programs, dtype=G.dtype, device=G.device)
    a_t = device_values([a], G.dtype, G.device)
    if _runtime.INTERPRETED and precision == "bf16x3":
        precision = "ieee"  # the interpreter knows no bf16x3 (its products are IEEE for all)
    _residual_kernel[(n_programs,)](
        G, W_k, W_m, H_k, a_t, partial, d_out, d_in,
        INPUT_PRECISION=precision,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return partial


@on_tensor_device
def accumulate_residual_triton(G, W_k, W_m, H_k, a: float, *, input_precision: str = "ieee",
                               read: bool = True):
    """``G += a (W_k - W_m) H_k`` in place; returns ``tr(D H_k D^T)`` like the reference (a
    float64 scalar tensor on G's device with ``read=False``).

    ``input_precision`` ("ieee"; "tf32x3", a near-fp32 product on tensor cores; "bf16x3", three
    bf16 products, ~2^-16; "tf32", one TF32 product; see RESIDUAL_SPACE) is the least accurate
    product allowed: the autotuner picks
    the fastest candidate of it or of a more accurate one (AT_LEAST). It applies to fp32 ``G``
    only; fp64 ``G`` always multiplies in fp64. The choice is made on the first call for a shape
    (timed on a scratch G).
    """
    _check_flag(read, "read")
    launch, _, _ = _prepare_residual(G, W_k, W_m, H_k, a, input_precision)
    trace = launch()
    return float(trace) if read else trace


def _prepare_residual(G, W_k, W_m, H_k, a, input_precision):
    """Checks, the launch's configuration (autotuned here, on the current stream, on a shape's
    first call) and ``(launch, operands, copied)``: ``launch()`` enqueues the product and returns
    the trace as a float64 scalar tensor; ``copied``: an operand was made contiguous by a copy."""
    _check_residual_args(G, W_k, W_m, H_k)
    _check_scalar(a, "a")
    check_device(G, W_k, W_m, H_k, names=["G", "W_k", "W_m", "H_k"])
    _check_float_out(G, "G")
    check_residual_precision(input_precision)
    if not G.is_contiguous():
        raise ValueError(f"G must be contiguous (it is updated in place), got strides {G.stride()} for "
                         f"{tuple(G.shape)}")
    given = (W_k, W_m, H_k)
    W_k, W_m, H_k = (_read_for(t, G.dtype).contiguous() for t in given)
    precision = "ieee" if G.dtype == torch.float64 else input_precision
    config = _residual_config(G, W_k, W_m, H_k, precision)
    copied = any(t is not g for t, g in zip((W_k, W_m, H_k), given))
    return ((lambda: _launch_residual(G, W_k, W_m, H_k, a, *config).double().sum()),
            (G, W_k, W_m, H_k), copied)


@on_tensor_device
def accumulate_residual_on_side(G, W_k, W_m, H_k, a: float, *, input_precision: str = "ieee",
                                holds: bool = False):
    """:func:`accumulate_residual_triton` (CUDA tensors) enqueued on the device's side stream
    (``_runtime.side_stream_launch``: after the current stream's work so far) so that the current
    stream goes on meanwhile. Returns ``(trace, event)``: ``tr(D H_k D^T)`` as a float64 scalar
    tensor, and the event the consumer's stream must wait for before reading it or ``G``.
    ``holds``: ``W_k`` or ``H_k`` is a copy the caller drops (see SIDE_HELD_MAX; an operand
    copied here to make it contiguous counts too). The caller must not write to the operands
    until it has waited for the event (the side stream reads them after this returns)."""
    _check_flag(holds, "holds")
    launch, operands, copied = _prepare_residual(G, W_k, W_m, H_k, a, input_precision)
    return side_stream_launch(launch, list(operands), holds=holds or copied)


@on_tensor_device
def fold_hessians_triton(H_e, H_m, hessians, weights, *, overwrite: bool = False):
    """As :func:`fold_hessians_reference`, FOLD_ARITY Hessians a pass (``H_e``, ``H_m``
    contiguous; Hessians that are not are copied first)."""
    _check_fold_args(H_e, H_m, hessians, weights, overwrite)
    check_device(H_e, *([] if H_m is None else [H_m]), *hessians,
                 names=["H_e"] + ([] if H_m is None else ["H_m"])
                 + [f"Hessian {k}" for k in range(len(hessians))])
    _check_float_out(H_e, "H_e")
    for name, t in (("H_e", H_e), ("H_m", H_m)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {t.stride()} for "
                             f"{tuple(t.shape)}")
    if overwrite and not hessians:
        H_e.zero_()  # (the empty sum)
    n = H_e.numel()
    BLOCK, warps = _FOLD_BLOCK
    for start in range(0, len(hessians), FOLD_ARITY):
        chunk = [_read_fp8(H).contiguous() for H in hessians[start:start + FOLD_ARITY]]
        a = device_values(weights[start:start + FOLD_ARITY], H_e.dtype, H_e.device)
        pad = chunk + [chunk[0]] * (FOLD_ARITY - len(chunk))  # (unread pointers)
        _fold_kernel[(triton.cdiv(n, BLOCK),)](
            H_e, H_e if H_m is None else H_m, *pad, a, n,
            N_IN=len(chunk), HAS_M=H_m is not None, READ_E=not (overwrite and start == 0),
            BLOCK=BLOCK, num_warps=warps)


@on_tensor_device
def accumulate_xxt_triton(H, X):
    """In place ``H += X^T X`` for token rows ``X[n, d_in]`` (bf16, fp16, fp32, fp64 or float8)."""
    _check_xxt_args(H, X)
    check_device(H, X, names=["H", "X"])
    _check_float_out(H, "H")
    # (float8 activations, which the reference takes: read exactly, as the weights; 16-bit ones of an fp64 H
    # through fp32)
    X = _read_for(X, H.dtype)
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


def accumulate_residual(G, W_k, W_m, H_k, a: float, *, backend: str = "torch",
                        input_precision: str = "ieee", read: bool = True):
    """``G += a (W_k - W_m) H_k``; ``input_precision`` selects the Triton kernel's fp32 product
    (one of RESIDUAL_PRECISIONS); the torch backend always multiplies in G's precision (TF32
    off): the precisions are options for the GPU's speed, not for the CPU reference. Returns
    ``tr(D H_k D^T)``, a float (``read=False``: a float64 scalar tensor on G's device)."""
    check_residual_precision(input_precision)
    if backend == "torch":
        return accumulate_residual_reference(G, W_k, W_m, H_k, a, read=read)
    if backend == "triton":
        return accumulate_residual_triton(G, W_k, W_m, H_k, a, input_precision=input_precision,
                                          read=read)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def accumulate_xxt(H, X, *, backend: str = "torch"):
    if backend == "torch":
        return accumulate_xxt_reference(H, X)
    if backend == "triton":
        return accumulate_xxt_triton(H, X)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def fold_hessians(H_e, H_m, hessians, weights, *, backend: str = "torch", overwrite: bool = False):
    """In place: ``H_e += sum_k a_k H_k`` (``overwrite``: ``H_e = ...``, its values not read) and
    (``H_m`` not None) ``H_m += sum_k H_k``, in H_e's precision, adding the Hessians in the order
    given."""
    if backend == "torch":
        return fold_hessians_reference(H_e, H_m, hessians, weights, overwrite=overwrite)
    if backend == "triton":
        return fold_hessians_triton(H_e, H_m, hessians, weights, overwrite=overwrite)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
