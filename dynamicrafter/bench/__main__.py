"""``python -m dynamicrafter.bench``: the generation benchmark, :mod:`dynamicrafter.bench.generation`."""

import sys

from .generation import main

if __name__ == "__main__":
    sys.exit(main())
