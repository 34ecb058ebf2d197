"""Measurement tools: what generation and training cost, and how fast the samplers converge.

Nothing else in the package imports these modules; each is a command of its own, and none reads
files of the repository's checkout (the tiny test models, for one, are given as an argument).

- :mod:`.generation`: ``python -m dynamicrafter.bench`` (``dynamicrafter bench``), a guided step and a video
  (the command; the measuring is :mod:`.timing`; ``--profile``: :mod:`.profiling`, one UNet call's time by
  kind of operation);
- :mod:`.load`: ``python -m dynamicrafter.bench.load``, loading and converting a full-size checkpoint;
- :mod:`.training`: ``python -m dynamicrafter.bench.training``, a training step (``--estimate``: :mod:`.memory`,
  its peak memory estimated on the meta device);
- :mod:`.frames`: ``python -m dynamicrafter.bench.frames``, a guided step and the decode at 16 to 128 frames,
  with and without FreeNoise windows, each point in a process of its own;
- :mod:`.convergence`: ``python -m dynamicrafter.bench.convergence --data DIR``, the samplers against steps;
- :mod:`.suite`: ``python -m dynamicrafter.bench.suite``, the GPU measurements still missing, in one call.
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from ..frontend import EXIT_USAGE, CliError, chosen_model, configure_logging, run_command

__all__ = ["run_tool", "add_random_weights", "chosen_weights"]


def run_tool(argv: Sequence[str] | None, build_parser: Callable[[], argparse.ArgumentParser],
             body: Callable[[argparse.Namespace], int | None]) -> int:
    """A tool's ``main``: ``body`` of the arguments ``build_parser()`` reads from ``argv``; returns the exit status.

    It logs as every command does and runs under :func:`~dynamicrafter.frontend.run_command`, so a
    user error ends it with one ``ERROR:`` line (exit status 2 for the command line's own mistakes).
    """
    configure_logging()
    return run_command(lambda: body(build_parser().parse_args(argv)))


def add_random_weights(parser: argparse.ArgumentParser) -> None:
    """The ``--random-weights`` flag of the tools that time the full-size model."""
    parser.add_argument("--random-weights", action="store_true", help="full-size model with random weights (default)")


def chosen_weights(args: argparse.Namespace, default: str) -> None:
    """Set ``args.resolution`` (the model chosen, else ``default``); refuse ``--random-weights`` with ``--checkpoint``."""
    args.resolution = chosen_model(args, default)
    if args.checkpoint and args.random_weights:
        raise CliError("--random-weights and --checkpoint exclude each other.", EXIT_USAGE)
