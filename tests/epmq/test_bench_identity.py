"""A bench's identity (what ``epmq run`` compares before reusing stored results) follows every
setting and file its numbers depend on."""

import copy
import os

import pytest

from epmq.benches import build_bench
from epmq.benches.tiny import write_tiny_clip

WRITE_TINY = write_tiny_clip
TASKS = ("alpha", "beta")


@pytest.mark.parametrize("change", [
    lambda c: c.setdefault("data", {}).setdefault("calibration", {}).update(samples=3),
    lambda c: c.setdefault("data", {}).setdefault("calibration", {}).update(batch_size=1),
    lambda c: c.setdefault("eval", {}).update(max_samples={"val": 2, "test": None}),
    lambda c: c.update(seed=c.get("seed", 0) + 1),
    lambda c: c["model"].update(dtype="bfloat16"),  # (a model in another precision scores otherwise)
])
def test_settings_the_numbers_depend_on_change_the_identity(tiny, bench, change):
    root, config = tiny
    config = copy.deepcopy(config)
    change(config)
    assert build_bench(config, base_dir=root, progress=False).identity != bench.identity


def test_new_expert_weights_at_the_same_path_change_the_identity(bench):
    before = bench.identity
    expert = before["tasks"][0]["expert"]
    assert os.path.isdir(expert) and before["tasks"][0]["expert_files"]
    f = next(p for p in sorted(__import__("pathlib").Path(expert).rglob("*")) if p.is_file())
    stat = f.stat()
    try:
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert bench.identity["tasks"][0]["expert_files"] != before["tasks"][0]["expert_files"]
        assert bench.identity != before
    finally:
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert bench.identity == before
