"""``python -m lorad.cli``: the same as the ``lorad`` command."""

import sys

from lorad.cli.main import main

sys.exit(main())
