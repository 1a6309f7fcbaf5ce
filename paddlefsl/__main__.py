"""``python -m paddlefsl``: the same as the ``paddlefsl`` console command."""

import sys

from paddlefsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
