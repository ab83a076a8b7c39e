"""gpu_suite.sh's preamble in one Python start: the card, the stack and the commit measured, and
which of the modules the steps need import, printed as shell assignments the suite evaluates.

Each of these had a Python start of its own, torch imported anew by most: the preamble took 35 s
of a 311 s run on an H200 (2026-12-04), against the 25 s the 8-minute budget had left it.
"""

import importlib
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("open_clip", "epmq_kernels", "xdist")  # (the suite installs or does without them)


def transformers_floor() -> str:
    """The transformers setup.py requires: the one the tests were written against and pass with."""
    found = re.search(r'"transformers>=([0-9.]+)"', (ROOT / "setup.py").read_text())
    if found is None:
        raise ValueError(f"no 'transformers>=X' requirement in {ROOT / 'setup.py'}")
    return found.group(1)


def transformers_line() -> str:
    """transformers' version, with a warning where it is missing or older than the tests' (the CUDA
    tests build models of its classes: an older one fails those of families it lacks)."""
    floor = transformers_floor()
    try:
        import transformers
    except Exception as e:
        return f"warning: transformers is missing ({type(e).__name__}: {e}): the CUDA tests fail"
    from packaging.version import Version

    line = f"transformers {transformers.__version__}"
    if Version(transformers.__version__) < Version(floor):
        line += (f"\nwarning: transformers {transformers.__version__} is older than {floor}, the one the tests "
                 f"were written against (setup.py): expect CUDA tests of the families it lacks to fail")
    return line


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def preamble() -> dict:
    import torch
    import triton

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import checkout_revision

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
    stack = (f"python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__} "
             f"cuda {torch.version.cuda} revision {checkout_revision()}\n{transformers_line()}")
    missing = " ".join(name for name in OPTIONAL if not importable(name))
    return dict(CARD=card, STACK=stack, MISSING=missing)


def main() -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # (stdout is the suite's to evaluate: assignments only)
        found = preamble()
    for name, value in found.items():
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
