"""pytest-benchmark mode of the benchmarks: ``pytest benchmarks/bench_w4a16.py`` (CUDA only)."""

import os
import sys

import torch

# The kernels pick interpreter or compiler when decorated: decide before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
