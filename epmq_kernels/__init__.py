"""Triton kernels for E-PMQ: the GPTQ/E-PMQ column solver, expert-residual accumulation,
int4 bit packing and the W4A16 matmul. Each kernel family lives in one file beside its torch
reference. This package never imports ``epmq``."""

from . import _runtime  # noqa: F401  (must run before any kernel is decorated)
from .grid import find_params, quantize_codes, dequantize
