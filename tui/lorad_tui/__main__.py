"""``python -m lorad_tui``: the same as ``lorad tui``."""

import sys

from lorad_tui import run

sys.exit(run())
