"""``python -m ssa_server`` is the ``ssa-server`` command."""

import sys

from .cli import main

sys.exit(main())
