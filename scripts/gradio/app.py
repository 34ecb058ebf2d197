"""Serve the DynamiCrafter browser demo: ``python scripts/gradio/app.py 256``.

A thin wrapper around :func:`dynamicrafter.app.main` (also installed as ``dynamicrafter-app``)
that works from a checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dynamicrafter.app import main  # noqa: E402

if __name__ == "__main__":
    main()
