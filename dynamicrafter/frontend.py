"""What every command shares: its parser, exit codes, error reporting and the pipeline it builds.

Each front end (``run_pipeline.py`` in :mod:`.cli`, ``app``, ``convert``, ``train``, the
benchmarks) imports this module and none imports another. A command's ``main`` hands its body to
:func:`run_command`, which turns a :class:`~dynamicrafter.errors.UserError` into one ``ERROR:``
line and a non-zero exit status, Ctrl-C into 130 and a GPU out of memory into one hint; any other
exception is a bug and keeps its traceback. Nothing here imports torch at module level, so a
command answers a usage error without loading it.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any, Callable, NoReturn

from .configs import PRESETS, resolve_resolution
from .errors import UserError

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "CliError", "Parser", "resolution_arg",
           "configure_logging", "run_command", "build_pipeline"]

logger = logging.getLogger("dynamicrafter")

EXIT_OK = 0
#: Something failed: a bad file, an item that could not be made, a missing checkpoint.
EXIT_FAILED = 1
#: The command line itself is wrong (an unknown flag, a value out of range, options that exclude each other).
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
LOG_FORMAT = "%(levelname)s: %(message)s"


class CliError(UserError):
    """A user error with the exit status it should end the command with (default :data:`EXIT_FAILED`)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a single sentence and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --video_length/--num_frames/--frames: ..." names the option by its first flag only
        message = re.sub(r"^argument (-[^/:\s]+)(/[^:]+)?:", r"\1:", message)
        raise CliError(f"{message[:1].upper()}{message[1:]}.", EXIT_USAGE)


def resolution_arg(text: str) -> str:
    """An argparse type: any accepted spelling of a resolution, returned as the preset name."""
    try:
        return resolve_resolution(text)
    except ValueError:
        choices = ", ".join(PRESETS)
        raise argparse.ArgumentTypeError(
            f"unknown resolution {text!r}; choose one of {choices} (or an alias such as 256_256 or 320_512)"
        ) from None


def configure_logging(fmt: str = LOG_FORMAT) -> None:
    """INFO logging for the commands, without a line per HTTP request."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, recognised without importing torch here
    return type(exc).__name__ == "OutOfMemoryError"


def run_command(body: Callable[[], int | None], *, out_of_memory: str = "Out of GPU memory.",
                interrupted: str = "Interrupted.") -> int:
    """Run a command's ``body`` and return its exit status, reporting what stops it in one line.

    A :class:`CliError` exits with its code, any other :class:`UserError` with
    :data:`EXIT_FAILED`, a GPU out of memory with ``out_of_memory`` and :data:`EXIT_FAILED`, Ctrl-C
    with ``interrupted`` and :data:`EXIT_INTERRUPTED`.
    """
    try:
        return int(body() or EXIT_OK)
    except CliError as exc:
        logger.error("%s", exc)
        return exc.code
    except UserError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        logger.error("%s", interrupted)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        logger.error("%s", out_of_memory)
        return EXIT_FAILED


def build_pipeline(args: argparse.Namespace, resolution: str, device: Any) -> Any:
    """The pipeline the model options of ``args`` describe (:data:`~dynamicrafter.options.MODEL_ARGUMENTS`), LoRA applied.

    Shared by the command line and the app (the benchmark also builds random-weight models, so it
    makes its own); raises the pipeline's one-sentence :class:`UserError`.
    """
    from .pipeline import DynamiCrafterImg2VideoPipeline

    pipe = DynamiCrafterImg2VideoPipeline(
        resolution=resolution, device=device, checkpoint=args.checkpoint, config=args.config,
        dtype=None if args.dtype == "auto" else args.dtype, offload=args.offload, compile=args.compile,
        quantize=args.quantize, clip_checkpoint=args.clip_checkpoint)
    if args.lora:
        pipe.load_lora_weights(args.lora, scale=args.lora_scale)
    return pipe
