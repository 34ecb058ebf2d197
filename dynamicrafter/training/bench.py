"""``python -m dynamicrafter.training.bench``: the training benchmark, moved to :mod:`dynamicrafter.bench.training`."""

import sys

from ..bench.training import main

if __name__ == "__main__":
    sys.exit(main())
