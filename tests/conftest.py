import os

# Triton picks interpreter or compiler when a kernel is decorated: decide before any import.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs with one intra-op thread: the tests' tensors are tiny, and on a shared
    2-core machine OpenMP threads waiting on each other cost more than the work (10x measured
    on the walker tests, 2.4x on the rest of the suite). Restored after the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test, so every run draws new inputs; the seed is
    printed (pytest shows it on failure) and EPMQ_TEST_SEED replays it."""
    seed = int(os.environ.get("EPMQ_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"EPMQ_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def host_reads():
    """``host_reads(fn)``: how many times ``fn`` reads device values back to the host, counted as
    ``benchmarks/epmq_traffic_cpu.py`` counts them: ``float(t)``/``bool(t)``/``.item()``, a
    ``nonzero`` (its size) and ``.tolist()``. On a GPU each one waits for the queue to drain."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls[0] += func in reads
            return func(*args, **(kwargs or {}))

    def count(fn):
        calls[0] = 0
        torch.Tensor.tolist = counted_tolist
        try:
            with Count():
                fn()
        finally:
            torch.Tensor.tolist = tolist
        return calls[0]

    def counted_tolist(self, *args, **kwargs):  # (not an aten op: counted by wrapping it)
        calls[0] += 1
        return tolist(self, *args, **kwargs)

    calls, tolist = [0], torch.Tensor.tolist
    return count


_PRODUCTS = {torch.mm, torch.matmul, torch.addmm, torch.Tensor.mm, torch.Tensor.matmul, torch.Tensor.addmm,
             torch.Tensor.addmm_, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}


@pytest.fixture
def tf32_products():
    """The caller's TF32 switch on (``torch.set_float32_matmul_precision("high")``), and the list
    of the float32 matrix products run with it on, by name: on a GPU those run on TF32's 10-bit
    mantissas (the CPU has no TF32, so it is the switch that is watched)."""
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (func in _PRODUCTS and torch.backends.cuda.matmul.allow_tf32
                    and any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args)):
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with Watch():
            yield seen
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
