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
