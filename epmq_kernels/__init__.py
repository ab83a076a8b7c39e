"""Triton kernels for E-PMQ: the GPTQ/E-PMQ column solver, expert-residual accumulation and the
fold of the experts' Hessians, the Hessian checks' one-pass scan, bf16x3 products as one GEMM of
side-by-side split operands, int4 bit packing and the W4A16 matmul (two of its paths in Gluon,
Triton with explicit layouts: ``w4a16_mma`` for batches up to 16, ``w4a16_wgmma`` for larger
ones on Hopper). Each kernel family lives in one file beside its torch reference. This package
never imports ``epmq``."""

from . import _runtime  # noqa: F401  (must run before any kernel is decorated)
from .grid import find_params, quantize_codes, dequantize
from .packing import pack_int4, unpack_int4, pack_int4_cols, unpack_int4_cols
from .w4a16 import w4a16_matmul, w4a16_matmul_reference, dequantize_int4_weight
# (the dispatcher gptq_solve stays in its module: exported here it would shadow the module name)
from .gptq_solve import SolveOut, gptq_solve_reference, gptq_solve_triton
from .expert_residual import (
    accumulate_residual,
    accumulate_residual_on_side,
    accumulate_residual_reference,
    accumulate_residual_triton,
    accumulate_xxt,
    accumulate_xxt_reference,
    accumulate_xxt_triton,
    fold_hessians,
    fold_hessians_reference,
    fold_hessians_triton,
)

__all__ = [
    "find_params", "quantize_codes", "dequantize",
    "pack_int4", "unpack_int4", "pack_int4_cols", "unpack_int4_cols",
    "w4a16_matmul", "w4a16_matmul_reference", "dequantize_int4_weight",
    "SolveOut", "gptq_solve_reference", "gptq_solve_triton",
    "accumulate_residual", "accumulate_residual_on_side", "accumulate_residual_reference",
    "accumulate_residual_triton",
    "accumulate_xxt", "accumulate_xxt_reference", "accumulate_xxt_triton",
    "fold_hessians", "fold_hessians_reference", "fold_hessians_triton",
]
