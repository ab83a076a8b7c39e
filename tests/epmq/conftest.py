"""Fixtures shared by the tests of ``epmq``.

``tiny`` / ``bench``: a module that sets ``WRITE_TINY`` (one of ``epmq.benches.tiny``'s
``write_tiny_*``) and ``TASKS`` gets ``tiny`` = ``(root, config)`` of that tiny bench, written
once per module, and ``bench`` = the bench built from it.
"""

import pytest

from epmq.benches import build_bench


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    write = request.module.WRITE_TINY
    root = tmp_path_factory.mktemp(write.__name__.removeprefix("write_"))
    return root, write(root, request.module.TASKS)


@pytest.fixture(scope="module")
def bench(tiny):
    root, config = tiny
    return build_bench(config, base_dir=root, progress=False)
