"""``python -m intercascade_core``: the same command line as ``intercascade``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
