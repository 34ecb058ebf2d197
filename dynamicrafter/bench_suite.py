"""``python -m dynamicrafter.bench_suite``: the GPU measurement suite, moved to :mod:`dynamicrafter.bench.suite`."""

import sys

from .bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
