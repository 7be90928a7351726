"""Old entry point of distributed training, kept: ``torchrun -m ehi.train ARGS`` runs
``ehi.cli.torchrun`` (the arguments of ``ehi train``)."""

import sys

from ehi.cli.torchrun import main

if __name__ == "__main__":
    sys.exit(main())
