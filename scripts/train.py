#!/usr/bin/env python3
"""Fine-tune a DynamiCrafter model on your clips (LoRA or full); see the README's Fine-tuning section.

    python scripts/train.py examples/clips --resolution 256 --max_steps 500 --output_dir runs/clips
    torchrun --nproc_per_node=2 scripts/train.py CLIPS --resolution 512 ...
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, ROOT)

from dynamicrafter.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="scripts/train.py"))
