"""``python -m epmq``: the ``epmq`` command."""

import sys

from .cli import main

sys.exit(main())
