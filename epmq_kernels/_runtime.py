"""Where Triton kernels run.

Triton decides between compiling for a GPU and interpreting on the CPU when a kernel is
*decorated*, from the TRITON_INTERPRET environment variable. On a machine without CUDA the
kernels can therefore only ever run interpreted, so we set the variable before any kernel
module is imported. On a CUDA machine we leave it as the user set it.
"""

import contextlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors, names=None):
    """All tensors on one device, and that device one the kernels can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        listing = ", ".join(
            f"{n}={t.device}" for n, t in zip(names or range(len(tensors)), tensors)
        )
        raise ValueError(f"tensors are on different devices: {listing}")
    device = devices.pop()
    if device.type == "cuda" and INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)"
        )
    return device


@contextlib.contextmanager
def fp32_matmul(tf32: bool):
    """torch's fp32 matrix products inside run on the TF32 tensor cores if and only if ``tf32``,
    whatever the caller set globally."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def ieee_fp32_matmul():
    """Full fp32 products (TF32 off): the solver and the IEEE residual promise them."""
    return fp32_matmul(False)
