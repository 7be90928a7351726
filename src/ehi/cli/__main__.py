"""``python -m ehi.cli ARGS``: the ``ehi`` command."""

import sys

from ehi.cli import main

sys.exit(main())
