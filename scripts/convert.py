#!/usr/bin/env python3
"""Convert a DynamiCrafter-family checkpoint to .safetensors; see the README's checkpoint table.

    python scripts/convert.py model.ckpt dynamicrafter_512_fp16.safetensors [--dtype float16] [--without-clip]
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, ROOT)

from dynamicrafter.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
