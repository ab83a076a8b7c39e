"""Compiling the kernels for real GPUs on a machine without one.

A test hands a script to ``run_compile_script``: it runs in a fresh interpreter with Triton's
interpreter off and the checkout importable, so the kernels are compiled by Triton's NVIDIA
backend (ptxas included) for the targets the script names; no GPU is needed.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ptxas_available() -> bool:
    """Whether Triton's NVIDIA backend and its ptxas are installed."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


def run_compile_script(script: str, timeout: float) -> subprocess.CompletedProcess:
    """``script`` run by this Python with TRITON_INTERPRET=0 and the checkout on PYTHONPATH."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
