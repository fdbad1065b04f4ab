"""``python -m shardlib COMMAND ...``: the ``shardlib`` console command without installing its script."""

import sys

from shardlib.commands import main

if __name__ == "__main__":
    sys.exit(main())
