#!/usr/bin/env python3
"""Animate images with DynamiCrafter from the command line; see docs/cli.md.

    python scripts/run_pipeline.py 256 --image_path cat.png --prompt_text "a cat yawning"
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, ROOT)

from dynamicrafter.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
