"""bf16x3 products in two bf16 GEMMs, of operands split side by side.

An fp32 matrix ``x`` is split into two bf16 parts, ``hi = bf16(x)`` and ``mid = bf16(x - hi)``
(``_runtime.bf16_split``), and ``A @ B`` taken as ``A_mid B_hi + A_hi B_mid + A_hi B_hi``
(``_runtime.bf16x3_mm``: three products and two fp32 additions). Written side by side, the two
small terms are one product, ``[A_mid | A_hi] @ [B_hi; B_mid]`` along the summed dimension K,
and the large one a second, whose epilogue adds the first: two GEMMs and no elementwise pass,
the small terms still summed apart from the large one. The residual (``expert_residual``,
SPLIT_CUBLAS) lays its three parts out whole after each other in one GEMM; E-PMQ's triangular
and symmetric products (``R = (G Hinv^T) Hinv``, the anchor term) slice one operand along K into
column blocks of every width, so here the pairs are interleaved along K instead (``K`` index
``2 k + p``): any slice of K is then a slice of the split operand, split once.

``split_bf16`` (the kernel, ``_split_kernel``) writes the parts of ``X`` (or of ``X - Y``) into
any ``[rows, 2 or 3, cols]`` view, and the hi part alone beside; ``Bf16x3Parts`` holds a matrix,
its slices and transpose, and makes its split layouts when a product first needs them;
``side_by_side()`` is the ``(parts, product)`` pair of ``_runtime.split_once`` for
``bf16x3_mm``. Off CUDA without Triton's interpreter the parts are made by torch (bit for bit the
kernel's; tested).
"""

import torch
import triton
import triton.language as tl

from . import _runtime
from ._runtime import _bf16_mm, bf16_split, check_device, on_tensor_device, shares_memory
from .grid import is_integer

SPLIT_TILE = (32, 128, 4)  # BLOCK_R, BLOCK_C, num_warps of the split (and the residual's epilogue)


@triton.jit
def _bf16_rne(x):
    """fp32 ``x`` rounded to bf16 (to nearest, ties to even, as torch's ``.bfloat16()`` does for
    finite values), returned as fp32: integer operations only, which the interpreter runs too."""
    u = x.to(tl.int32, bitcast=True)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) & -65536
    # (a NaN's payload can carry the addition past int32, 0x7FFFFFFF the GPU's own NaN: kept,
    # with its quiet bit (bit 22) set: the caller keeps the top 16 bits, and a NaN whose payload
    # lies in the low 16 bits alone (0x7F800001, or fp16's NaNs 0x7C01..0x7C07 converted) would
    # leave 0x7F80 there, bf16's inf, where torch's .bfloat16() gives a NaN)
    return tl.where(x != x, (u | 0x400000).to(tl.float32, bitcast=True),
                    rounded.to(tl.float32, bitcast=True))


@triton.jit
def _split_kernel(
    X,  # [n_rows, n_cols], any float dtype, unit column stride
    Y,  # [n_rows, n_cols], subtracted from X when HAS_Y
    OUT,  # N_PARTS parts of [n_rows, n_cols] bf16, written as their int16 bits
    HI,  # [n_rows, n_cols] bf16 (int16 bits): the hi part alone, written when HAS_HI
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    stride_row,  # OUT's row stride
    stride_part,  # OUT's stride between the parts
    stride_col,  # OUT's column stride (1: parts after each other; N_PARTS: interleaved along columns)
    stride_hi,  # HI's row stride
    N_PARTS: tl.constexpr,  # 2 or 3
    MID: tl.constexpr,  # the part that takes the remainder; the others take x rounded
    HAS_Y: tl.constexpr,
    HAS_HI: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``x = X - Y`` in fp32 split as ``_runtime.bf16_split`` does: ``hi = bf16(x)``, ``mid =
    bf16(x - hi)`` (``x - hi`` is exact in fp32)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_Y:
        x = x - tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    hi = _bf16_rne(x)
    hi_bits = (hi.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    mid_bits = (_bf16_rne(x - hi).to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    out = OUT + rows[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    # (tl.cast: stride_part may be a constant, 1 at d_in = 1; specialised, it keeps the
    # divisibility that vectorizes the stores of the parts after the first)
    for part in tl.static_range(N_PARTS):
        if part == MID:
            tl.store(out + part * tl.cast(stride_part, tl.int64), mid_bits, mask=ok)
        else:
            tl.store(out + part * tl.cast(stride_part, tl.int64), hi_bits, mask=ok)
    if HAS_HI:
        tl.store(HI + rows[:, None] * stride_hi + cols[None, :], hi_bits, mask=ok)


@torch.no_grad()  # (as the kernel, which writes the parts' bits: torch's fallback wrote X's graph into them)
@on_tensor_device
def split_bf16(X, Y, parts, mid, hi=None):
    """``X - Y`` (``Y`` None: ``X``) split into ``hi, mid`` bf16 parts written to ``parts``, a
    ``[n_rows, P, n_cols]`` bf16 view (P = 2 or 3 parts; any strides), the remainder at part
    ``mid`` and ``hi`` at the others; ``hi`` (a ``[n_rows, n_cols]`` bf16 view with unit column
    stride), if given, takes the hi part alone too. ``X`` and ``Y`` need a unit column stride
    for the kernel (else copied); off CUDA without the interpreter, torch writes the same bits."""
    # (a 1-D X ended in "not enough values to unpack", None parts in "no attribute 'dim'", and a NumPy Y in
    # 'tensors are on different devices: X=cpu, Y=cpu, parts=cpu': no argument named, or the wrong fault)
    for name, t in (("X", X), ("Y", Y), ("parts", parts), ("hi", hi)):
        if not isinstance(t, torch.Tensor) and not (t is None and name in ("Y", "hi")):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if X.dim() != 2:
        raise ValueError(f"X must be a matrix [rows, cols], got {tuple(X.shape)}")
    n_rows, n_cols = X.shape
    if Y is not None and Y.shape != X.shape:  # (the kernel reads Y with X's rows and columns)
        raise ValueError(f"Y must have X's shape {tuple(X.shape)}, got {tuple(Y.shape)}")
    if parts.dim() != 3 or parts.shape[0] != n_rows or parts.shape[2] != n_cols \
            or parts.shape[1] not in (2, 3) or parts.dtype != torch.bfloat16:
        raise ValueError(f"parts must be a [{n_rows}, 2 or 3, {n_cols}] bf16 view, got "
                         f"{tuple(parts.shape)} {parts.dtype}")
    if hi is not None and (hi.shape != (n_rows, n_cols) or hi.dtype != torch.bfloat16
                           or (n_cols > 1 and hi.stride(1) != 1)):
        raise ValueError(f"hi must be a [{n_rows}, {n_cols}] bf16 view with unit column stride, got "
                         f"{tuple(hi.shape)} {hi.dtype} of strides {hi.stride()}")
    # (mid past the parts wrote hi into every one of them, silently: no remainder anywhere)
    if not is_integer(mid) or not 0 <= mid < parts.shape[1]:
        raise ValueError(f"mid must be the index of one of the {parts.shape[1]} parts, got {mid!r}")
    mid = int(mid)  # (numpy's, as Python's: the kernel is specialised on it)
    if X.device.type != "cuda" and not _runtime.INTERPRETED:
        x_hi, x_mid = bf16_split(X.float() if Y is None else X.float() - Y.float())
        for p in range(parts.shape[1]):
            parts[:, p] = x_mid if p == mid else x_hi
        if hi is not None:
            hi.copy_(x_hi)
        return
    # (the kernel writes through every pointer given: parts on another device than X wrote into that
    # device's memory at X's addresses, or failed in the interpreter with 'Cannot copy out of meta tensor')
    given = [("X", X), ("Y", Y), ("parts", parts), ("hi", hi)]
    check_device(*(t for _, t in given if t is not None), names=[n for n, t in given if t is not None])
    for name, out in (("parts", parts), ("hi", hi)):
        # (programs write their tiles while others still read theirs: unlike torch's, which splits first)
        if shares_memory(out, X, Y):
            raise ValueError(f"{name} must not share memory with X or Y: the kernel writes it while reading them")
    X = X if X.stride(1) == 1 else X.contiguous()
    Y = None if Y is None else (Y if Y.stride(1) == 1 else Y.contiguous())
    BR, BC, warps = SPLIT_TILE
    bits = parts.view(torch.int16)
    hi_bits = bits if hi is None else hi.view(torch.int16)
    _split_kernel[(triton.cdiv(n_rows, BR), triton.cdiv(n_cols, BC))](
        X, X if Y is None else Y, bits, hi_bits, n_rows, n_cols, X.stride(0),
        X.stride(0) if Y is None else Y.stride(0), bits.stride(0), bits.stride(1), bits.stride(2),
        hi_bits.stride(0), N_PARTS=parts.shape[1], MID=mid, HAS_Y=Y is not None,
        HAS_HI=hi is not None, BLOCK_R=BR, BLOCK_C=BC, num_warps=warps)


# The pairs of small terms: A's [mid, hi] against B's [hi, mid] along K (mid*hi + hi*mid).
_MID_OF_ROLE = {"A": 0, "B": 1}


class Bf16x3Parts:
    """A matrix to be split for bf16x3 products, sliced (``P[r0:r1, c0:c1]``) and transposed
    (``P.T``) like a tensor; its split layouts are made for the whole stored matrix when a
    product first needs them and shared by every slice and transpose: the hi part alone
    (``[R, C]``), and the pair of parts an operand's small terms take, interleaved along the
    stored rows (``[R, 2, C]``) or columns (``[R, C, 2]``), whichever is the product's K (an A
    operand's columns, a B operand's rows), in the role's order."""

    def __init__(self, X, *, _layouts=None, _rows=None, _cols=None, _transposed=False):
        if _layouts is None:  # (a new matrix: stored with unit column stride)
            if X.stride(0) == 1 and X.stride(1) != 1:  # (a transposed view: stored as its rows)
                X, _transposed = X.T, True
            X = X.float()
            X = X if X.stride(1) == 1 else X.contiguous()
            _layouts, _rows, _cols = {}, (0, X.shape[0]), (0, X.shape[1])
        self.X, self.layouts, self.rows, self.cols = X, _layouts, _rows, _cols
        self.transposed = _transposed

    @property
    def shape(self):
        shape = (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])
        return shape[::-1] if self.transposed else shape

    @property
    def T(self):
        return Bf16x3Parts(self.X, _layouts=self.layouts, _rows=self.rows, _cols=self.cols,
                           _transposed=not self.transposed)

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            index = (index, slice(None))
        if len(index) != 2 or not all(isinstance(s, slice) for s in index):
            raise TypeError(f"Bf16x3Parts: index with two slices, got {index!r}")
        first, second = index[::-1] if self.transposed else index

        def narrow(span, s):
            start, stop, step = s.indices(span[1] - span[0])
            if step != 1:
                raise ValueError("Bf16x3Parts: slices must have step 1")
            return span[0] + start, span[0] + max(start, stop)

        return Bf16x3Parts(self.X, _layouts=self.layouts, _rows=narrow(self.rows, first),
                           _cols=narrow(self.cols, second), _transposed=self.transposed)

    def _layout(self, axis, role):
        """The pair layout of ``role`` along ``axis`` ("rows": ``[R, 2, C]``; "cols":
        ``[R, C, 2]``) of the stored matrix; the first one made also writes the hi part."""
        key = (axis, role)
        if key not in self.layouts:
            R, C = self.X.shape
            hi = None
            if "hi" not in self.layouts:
                hi = self.layouts["hi"] = torch.empty(R, C, dtype=torch.bfloat16, device=self.X.device)
            if axis == "rows":
                F = torch.empty(R, 2, C, dtype=torch.bfloat16, device=self.X.device)
                split_bf16(self.X, None, F, _MID_OF_ROLE[role], hi)
            else:
                F = torch.empty(R, C, 2, dtype=torch.bfloat16, device=self.X.device)
                split_bf16(self.X, None, F.transpose(1, 2), _MID_OF_ROLE[role], hi)
            self.layouts[key] = F
        return self.layouts[key]

    def operands(self, role):
        """This slice as the bf16 operands of ``role``: its pair (``[M, 2K]`` for "A", ``[2K, N]``
        for "B") and its hi part (``[M, K]``, ``[K, N]``), views of its layouts."""
        (r0, r1), (c0, c1) = self.rows, self.cols
        # K is the operand's columns (A) or rows (B): stored rows where that flips with the
        # transpose, stored columns where it does not
        k_on_rows = (role == "A") == self.transposed
        if k_on_rows:
            F = self._layout("rows", role)[r0:r1, :, c0:c1].reshape(2 * (r1 - r0), c1 - c0)
            pair = F.T if role == "A" else F  # ([M = cols, 2K]; [2K, N = cols])
        else:
            F = self._layout("cols", role)[r0:r1, c0:c1, :].reshape(r1 - r0, 2 * (c1 - c0))
            pair = F if role == "A" else F.T  # ([M = rows, 2K]; [2K, N = rows])
        hi = self.layouts["hi"][r0:r1, c0:c1]
        return pair, (hi.T if self.transposed else hi)


def _bf16_mm_plus(C, A, B):
    """``C + A @ B`` for bf16 ``A``, ``B`` and fp32 ``C``, one rounding: cuBLAS's epilogue on
    CUDA, else the sum of the exact emulated product."""
    if A.is_cuda:
        try:
            return torch.addmm(C, A, B, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # (a torch without addmm's out_dtype)
            pass
    return C + _bf16_mm(A, B)


def bf16x3_product(A: Bf16x3Parts, B: Bf16x3Parts) -> torch.Tensor:
    """``A @ B`` in fp32 as bf16x3: the two small terms ``A_mid B_hi + A_hi B_mid`` by one GEMM of
    the pairs, then ``A_hi B_hi`` by a second whose epilogue adds them (the small terms summed
    apart, then added to the large one once, as ``_runtime.bf16x3_mm`` does with three
    products and two additions)."""
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"bf16x3_product: shapes {A.shape} and {B.shape} do not chain")
    A_pair, A_hi = A.operands("A")
    B_pair, B_hi = B.operands("B")
    return _bf16_mm_plus(_bf16_mm(A_pair, B_pair), A_hi, B_hi)


def side_by_side():
    """``(parts, product)`` for ``_runtime.split_once(bf16x3_mm)``: each operand split once into
    a ``Bf16x3Parts``, each product two GEMMs."""
    return (lambda X: (Bf16x3Parts(X),)), (lambda A_parts, B_parts: bf16x3_product(A_parts[0], B_parts[0]))
