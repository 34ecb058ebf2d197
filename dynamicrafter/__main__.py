"""The ``dynamicrafter`` command: ``dynamicrafter <command> ...``, or ``run_pipeline.py``'s arguments.

``python -m dynamicrafter`` runs it too. Each command is a module whose ``main(argv)`` returns the
exit status; it is imported only when named, so one command never loads another's dependencies.
``dynamicrafter --help`` lists the commands, then the options of making videos.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "main", "usage", "description"]

#: ``dynamicrafter <command> ...``: the module whose ``main(argv)`` runs it, and what it does in one line.
COMMANDS = {
    "app": ("dynamicrafter.app", "serve the browser demo for one model (Gradio)"),
    "bench": ("dynamicrafter.bench.generation", "time a guided step and a video; memory and TFLOP/s"),
    "convert": ("dynamicrafter.convert", "write any DynamiCrafter checkpoint as one .safetensors file"),
    "train": ("dynamicrafter.training.cli", "fine-tune a model on your own clips (LoRA or full)"),
}
#: What runs when the first argument names no command: making videos (``run_pipeline.py``).
DEFAULT_COMMAND = "dynamicrafter.cli"


def usage() -> str:
    """The usage lines of ``dynamicrafter --help``: making videos, or one of :data:`COMMANDS`."""
    return ("dynamicrafter [RESOLUTION] [options]     make videos (the options below)\n"
            f"       dynamicrafter COMMAND [options]          COMMAND: {', '.join(COMMANDS)}")


def description() -> str:
    """The opening text of ``dynamicrafter --help``: what it does and every command in one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(["Animate images with a DynamiCrafter model (docs/cli.md), or run one of its commands:", *lines,
                      "dynamicrafter COMMAND --help shows a command's options."])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: making videos); returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    module = importlib.import_module(DEFAULT_COMMAND)
    return int(module.main(argv, prog="dynamicrafter", usage=usage(), description=description()) or 0)


if __name__ == "__main__":
    sys.exit(main())
