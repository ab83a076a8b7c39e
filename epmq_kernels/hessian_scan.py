"""The numbers a Hessian's checks judge it by, in one pass over it.

``epmq.checks`` judges a Hessian ``H [d, d]`` to be a Gram matrix by seven numbers: its smallest
and largest entries (NaN if it has one), the smallest diagonal entry, the number of zero
diagonal entries, the symmetry gap ``u^T H v - v^T H u`` and ``|H v|`` for two fixed random
probe vectors ``vu = [v, u]`` (``[d, 2]``), and the trace. E-PMQ checks one Hessian per expert of
every layer. torch takes two passes over ``H`` (``aminmax`` and the product ``H @ vu``, after a
conversion in slabs for half precision) and about seventeen operations; the kernel reads ``H``
once, converting in registers, and a second one-program kernel reduces the programs' partial
numbers: two launches.

This file holds the torch reference (``hessian_numbers_reference``) and the kernels
(``hessian_numbers_triton``); ``hessian_numbers(..., backend=)`` picks one. Both return the
numbers as a float64 vector on H's device, not read (each read waits for the device's queue).

Configuration space: ``H`` square, fp16, bf16, fp32 or fp64 (float8 read through fp16), unit
stride along its rows (any row stride); ``vu`` ``[d, 2]`` in fp32 or fp64, the precision of the products and sums.
"""

import torch
import triton
import triton.language as tl

from . import _runtime  # noqa: F401  (sets TRITON_INTERPRET before the kernels are decorated)
from ._runtime import check_device, ieee_fp32_matmul, on_tensor_device

N_NUMBERS = 7  # lo, hi, min of the diagonal, zero diagonal entries, symmetry gap, |H v|, trace
_N_PARTIAL = 10  # per program: the seven's shares, with u^T H v and v^T H u apart, a NaN flag, and the
# largest |(H v)_i| of its rows, its |H v| held over it (in fp32 a program's |H v| of entries near 1e37 is inf)
# (BLOCK_R rows a program, BLOCK_C columns a step, num_warps) by the products' dtype: fp64's
# 16 rows spilled (255 registers on sm_90)
_SCAN_TILE = {torch.float32: (16, 128, 4), torch.float64: (8, 128, 4)}
_FINISH_BLOCK = 256


def _check_numbers_args(H, vu):
    # (a NumPy H ended in "object has no attribute 'dim'"; a NumPy vu of the right shape and
    # dtype was refused as 'must be float64, got (5, 2) float64')
    for name, t in (("H", H), ("vu", vu)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got {tuple(H.shape)}")
    if not H.is_floating_point():
        raise ValueError(f"H must be floating point, got {H.dtype}")
    if vu.shape != (H.shape[0], 2) or vu.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"vu must be [{H.shape[0]}, 2] float32 or float64, got "
                         f"{tuple(vu.shape)} {vu.dtype}")


@torch.no_grad()
def _read_fp8(H: torch.Tensor) -> torch.Tensor:
    """A float8 ``H`` through fp16, which holds every value of e4m3 and e5m2 (NaN and inf kept);
    e8m0fnu's powers of two (2^-127 to 2^127) through fp32: in fp16 2^20 became inf, 2^-30 zero."""
    return H.to(torch.float32 if H.dtype == torch.float8_e8m0fnu else torch.float16)


@torch.no_grad()  # (as the kernels: numbers to judge H by, not a function of it to differentiate)
def hessian_numbers_reference(H: torch.Tensor, vu: torch.Tensor) -> torch.Tensor:
    """``[lo, hi, min(diag), #(diag == 0), u^T H v - v^T H u, |H v|, tr(H)]`` as float64 on H's
    device: the products in vu's dtype (half-precision ``H`` converted in slabs of 2^24
    entries), the range, diagonal and trace in H's; all 0 for an empty ``H``."""
    _check_numbers_args(H, vu)
    d_in = H.shape[0]
    if d_in == 0:  # (no entry: the numbers of an empty sum, the range 0)
        return torch.zeros(N_NUMBERS, dtype=torch.float64, device=H.device)
    if H.element_size() == 1:  # (float8: torch reduces none; fp16 holds each value, NaN and inf)
        H = _read_fp8(H)
    diag = torch.diagonal(H)
    dtype = vu.dtype
    with ieee_fp32_matmul():  # (TF32's rounding, ~5e-4 of H v, would read as H not symmetric)
        if H.dtype == dtype:
            H_vu = H @ vu  # (both vectors in one pass over H)
        else:
            H_vu = torch.empty(d_in, 2, dtype=dtype, device=H.device)
            rows = max(1, (1 << 24) // max(1, d_in))
            for r in range(0, d_in, rows):
                H_vu[r:r + rows] = H[r:r + rows].to(dtype) @ vu
    # [u^T H v, v^T H u]: the columns of vu swapped, times H_vu, summed down
    uHv, vHu = (vu.flip(1) * H_vu).sum(dim=0)
    lo, hi = torch.aminmax(H)  # (NaN propagates through both)
    lo, hi, diag_min, dead, gap, trace = (t.to(dtype).to(torch.float64) for t in (
        lo, hi, diag.min(), (diag == 0).sum(), uHv - vHu, diag.sum()))
    # |H v| in float64, over its largest entry: its square neither underflows nor overflows, for
    # a float64 H too (as in the kernel; torch squares as they are, 0 below ~1e-154, inf above 1e154)
    Hv = H_vu[:, 0].double()
    top = Hv.abs().max()
    Hv_norm = torch.where((top > 0) & (top < float("inf")), top * torch.linalg.vector_norm(Hv / top), top)
    return torch.stack([lo, hi, diag_min, dead, gap, Hv_norm, trace])


@triton.jit
def _scan_kernel(
    H,  # [d, d], row stride stride_h
    vu,  # [d, 2] contiguous: the probes v, u, in the products' dtype
    partial,  # [n_programs, _N_PARTIAL] out, in vu's dtype
    d,
    stride_h,
    N_PARTIAL: tl.constexpr,
    NARROWS: tl.constexpr,  # H's dtype is wider than vu's (fp64 H, fp32 products)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows [pid * BLOCK_R, ...) of H, all of their columns: the program's shares of the
    numbers (lo, hi, min of the diagonal, zero diagonal entries, u^T H v, v^T H u, |H v|,
    trace, NaN seen)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < d
    ty = vu.dtype.element_ty
    row_ptr = H + rows.to(tl.int64)[:, None] * stride_h
    Hv = tl.zeros([BLOCK_R, BLOCK_C], ty)
    Hu = tl.zeros([BLOCK_R, BLOCK_C], ty)
    lo = tl.full([BLOCK_R, BLOCK_C], float("inf"), ty)
    hi = tl.full([BLOCK_R, BLOCK_C], float("-inf"), ty)
    nan = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    # the diagonal in H's own dtype where the conversion narrows it (one entry a row: the sum is exact), so
    # that its zeros are H's: in fp32 an fp64 H's 1e-50 is 0, a dead entry the reference, in H's dtype, does
    # not count. (Only then: half precision converts exactly, and its tile held twice cost registers.)
    diag_h = tl.zeros([BLOCK_R], H.dtype.element_ty if NARROWS else ty)
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < d
        ok = r_ok[:, None] & c_ok[None, :]
        h = tl.load(row_ptr + cols[None, :], mask=ok, other=0.0)
        # (to fp32 or fp64, rounded as the reference rounds its range: NaN and order are those of H)
        x = h.to(ty)
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
        nan = tl.maximum(nan, (x != x).to(tl.int32))
        diag_h += tl.sum(tl.where(rows[:, None] == cols[None, :], h if NARROWS else x, 0.0), axis=1)
        Hv += x * tl.load(vu + cols * 2, mask=c_ok, other=0.0)[None, :]
        Hu += x * tl.load(vu + cols * 2 + 1, mask=c_ok, other=0.0)[None, :]
    diag = diag_h.to(ty)
    Hv_r = tl.sum(Hv, axis=1)
    Hu_r = tl.sum(Hu, axis=1)
    v_r = tl.load(vu + rows * 2, mask=r_ok, other=0.0)
    u_r = tl.load(vu + rows * 2 + 1, mask=r_ok, other=0.0)
    out = partial + pid * N_PARTIAL
    tl.store(out + 0, tl.min(tl.min(lo, axis=1), axis=0))
    tl.store(out + 1, tl.max(tl.max(hi, axis=1), axis=0))
    # (NaN where the program's diagonal has one, as torch's min: min and minimum skip it)
    diag_nan = tl.max(tl.where(r_ok & (diag != diag), 1, 0), axis=0) > 0
    tl.store(out + 2, tl.where(diag_nan, float("nan"), tl.min(tl.where(r_ok, diag, float("inf")), axis=0)))
    tl.store(out + 3, tl.sum(tl.where(r_ok & (diag_h == 0), 1.0, 0.0), axis=0).to(ty))
    tl.store(out + 4, tl.sum(u_r * Hv_r, axis=0))
    tl.store(out + 5, tl.sum(v_r * Hu_r, axis=0))
    # |H v| of the rows: squares in float64 over the largest, which neither underflow nor
    # overflow for any H v, float64's too (a scaled Gram matrix, 1e-30 X X^T in float32, 1e-200 X X^T
    # in float64, must pass the symmetry test it feeds); stored as the largest and the norm over it
    # (1 to sqrt(BLOCK_R)), which the products' dtype holds where the norm itself may overflow it
    Hv_64 = Hv_r.to(tl.float64)
    top = tl.max(tl.abs(Hv_64), axis=0)
    Hv_s = Hv_64 / tl.where((top > 0) & (top < float("inf")), top, 1.0)
    tl.store(out + 6, tl.sqrt(tl.sum(Hv_s * Hv_s, axis=0)).to(ty))
    tl.store(out + 9, top.to(ty))
    tl.store(out + 7, tl.sum(diag, axis=0))
    tl.store(out + 8, tl.max(tl.max(nan, axis=1), axis=0).to(ty))


@triton.jit
def _finish_kernel(partial, numbers, n_programs, N_PARTIAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the programs' shares reduced to the seven numbers (float64)."""
    ty = partial.dtype.element_ty
    lo = tl.full([BLOCK], float("inf"), ty)
    hi = tl.full([BLOCK], float("-inf"), ty)
    dmin = tl.full([BLOCK], float("inf"), ty)
    dmin_nan = tl.zeros([BLOCK], ty)  # (a NaN on the diagonal: the minimum NaN, as the reference's)
    dead = tl.zeros([BLOCK], ty)
    uHv = tl.zeros([BLOCK], ty)
    vHu = tl.zeros([BLOCK], ty)
    Hv_sq = tl.zeros([BLOCK], tl.float64)
    trace = tl.zeros([BLOCK], ty)
    nan = tl.zeros([BLOCK], ty)
    # (the programs' |H v| summed in squares over the largest: see _scan_kernel)
    Hv_top = tl.zeros([BLOCK], tl.float64)
    for p0 in range(0, n_programs, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        Hv_top = tl.maximum(Hv_top, tl.load(partial + p * N_PARTIAL + 9, mask=p < n_programs, other=0.0).to(tl.float64))
    top = tl.max(Hv_top, axis=0)
    Hv_scale = tl.where(top > 0, top, 1.0)
    for p0 in range(0, n_programs, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        ok = p < n_programs
        row = partial + p * N_PARTIAL
        lo = tl.minimum(lo, tl.load(row + 0, mask=ok, other=float("inf")))
        hi = tl.maximum(hi, tl.load(row + 1, mask=ok, other=float("-inf")))
        dmin_p = tl.load(row + 2, mask=ok, other=float("inf"))
        dmin = tl.minimum(dmin, dmin_p)
        dmin_nan = tl.maximum(dmin_nan, (dmin_p != dmin_p).to(ty))
        dead += tl.load(row + 3, mask=ok, other=0.0)
        uHv += tl.load(row + 4, mask=ok, other=0.0)
        vHu += tl.load(row + 5, mask=ok, other=0.0)
        # (each program's |H v|, its largest over the largest of all times its norm over its own)
        Hv_p = tl.load(row + 9, mask=ok, other=0.0).to(tl.float64) / Hv_scale * tl.load(
            row + 6, mask=ok, other=0.0).to(tl.float64)
        Hv_sq += Hv_p * Hv_p
        trace += tl.load(row + 7, mask=ok, other=0.0)
        nan = tl.maximum(nan, tl.load(row + 8, mask=ok, other=0.0))
    has_nan = tl.max(nan, axis=0) > 0
    # (NaN where H has one, whatever min and max made of it: the checks' first test)
    tl.store(numbers + 0, tl.where(has_nan, float("nan"), tl.min(lo, axis=0)).to(tl.float64))
    tl.store(numbers + 1, tl.where(has_nan, float("nan"), tl.max(hi, axis=0)).to(tl.float64))
    tl.store(numbers + 2, tl.where(tl.max(dmin_nan, axis=0) > 0, float("nan"), tl.min(dmin, axis=0)).to(tl.float64))
    tl.store(numbers + 3, tl.sum(dead, axis=0).to(tl.float64))
    tl.store(numbers + 4, (tl.sum(uHv, axis=0) - tl.sum(vHu, axis=0)).to(tl.float64))
    tl.store(numbers + 5, tl.where(top < float("inf"), Hv_scale * tl.sqrt(tl.sum(Hv_sq, axis=0)), top))
    tl.store(numbers + 6, tl.sum(trace, axis=0).to(tl.float64))


@on_tensor_device
def hessian_numbers_triton(H: torch.Tensor, vu: torch.Tensor) -> torch.Tensor:
    """As :func:`hessian_numbers_reference`, in one pass over ``H``: every sum in vu's dtype,
    in another order (the trace and the count of zero diagonal entries too)."""
    _check_numbers_args(H, vu)
    check_device(H, vu, names=["H", "vu"])
    d = H.shape[0]
    if d == 0:
        return hessian_numbers_reference(H, vu)
    if H.element_size() == 1:
        # float8 read through fp16, as the reference reads it (every value, NaN and inf kept):
        # loaded as float8, e4m3 does not compile for sm_80, float8 -> fp64 not at all, and the
        # interpreter reads a NaN as a number
        H = _read_fp8(H)
    if H.stride(1) != 1:
        H = H.contiguous()
    vu = vu.contiguous()
    BLOCK_R, BLOCK_C, warps = _SCAN_TILE[vu.dtype]
    n_programs = triton.cdiv(d, BLOCK_R)
    partial = torch.empty(n_programs, _N_PARTIAL, dtype=vu.dtype, device=H.device)
    numbers = torch.empty(N_NUMBERS, dtype=torch.float64, device=H.device)
    _scan_kernel[(n_programs,)](H, vu, partial, d, H.stride(0), N_PARTIAL=_N_PARTIAL,
                                NARROWS=H.element_size() > vu.element_size(), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                num_warps=warps)
    _finish_kernel[(1,)](partial, numbers, n_programs, N_PARTIAL=_N_PARTIAL, BLOCK=_FINISH_BLOCK,
                         num_warps=4)
    return numbers


def hessian_numbers(H: torch.Tensor, vu: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    """The seven numbers of :func:`hessian_numbers_reference`, by ``backend``."""
    if backend == "torch":
        return hessian_numbers_reference(H, vu)
    if backend == "triton":
        return hessian_numbers_triton(H, vu)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
