"""The GPU suite stays one call under 8 minutes of device time and names scripts that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_steps_fit_in_eight_minutes():
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    steps = re.findall(r"^step (\S+) (\d+) (.*)$", text, re.M)
    assert [name for name, _, _ in steps][:1] == ["cuda-tests"]
    # every step may run to its limit; keep ~30 s for the device query, install and start-up
    assert sum(int(seconds) for _, seconds, _ in steps) <= 450
    for _, _, command in steps:
        for script in re.findall(r"benchmarks/\S+\.py", command):
            assert (ROOT / script).is_file(), script
