"""``python -m flashdino ...``: the same command line as the ``flashdino`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
