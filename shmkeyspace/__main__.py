"""``python -m shmkeyspace``: the same command line as the ``shmkeyspace`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
