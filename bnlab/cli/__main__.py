"""``python -m bnlab.cli``: the same command as ``bnlab``."""

import sys

from bnlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
