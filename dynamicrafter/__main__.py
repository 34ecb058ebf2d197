"""The ``dynamicrafter`` command: ``dynamicrafter <command> ...``, or ``run_pipeline.py``'s arguments.

``python -m dynamicrafter`` runs it too. Each command is a module whose ``main(argv)`` returns the
exit status; it is imported only when named, so one command never loads another's dependencies.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "main"]

#: ``dynamicrafter <command> ...``: the module whose ``main(argv)`` runs it.
COMMANDS = {
    "app": "dynamicrafter.app",
    "bench": "dynamicrafter.bench.generation",
    "convert": "dynamicrafter.convert",
    "train": "dynamicrafter.training.cli",
}
#: What runs when the first argument names no command: making videos (``run_pipeline.py``).
DEFAULT_COMMAND = "dynamicrafter.cli"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: the command line); returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module, argv = COMMANDS[argv[0]], argv[1:]
    else:
        module = DEFAULT_COMMAND
    return int(importlib.import_module(module).main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
