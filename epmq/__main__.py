"""``python -m epmq``: the ``epmq`` command."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # (the package's own imports are caught in its __init__)
    print("\nepmq: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
