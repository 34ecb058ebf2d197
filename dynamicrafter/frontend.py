"""What every command shares: its parser, exit codes, error reporting and the pipeline it builds.

Each front end (``run_pipeline.py`` in :mod:`.cli`, ``app``, ``convert``, ``train``, the
benchmarks) imports this module and none imports another. A command's ``main`` hands its body to
:func:`run_command`, which turns a :class:`~dynamicrafter.errors.UserError` into one ``ERROR:``
line and a non-zero exit status, Ctrl-C into 130 and a GPU out of memory into one hint; any other
exception is a bug and keeps its traceback. Nothing here imports torch at module level, so a
command answers a usage error without loading it.

Every command that loads a model takes it the same way (:func:`add_model_choice`): the resolution
or preset as the first argument or ``--resolution``; the rest of the shared vocabulary is the
option table's (:func:`dynamicrafter.options.add_model_arguments`). A spelling that an earlier
release used is still accepted for one release, hidden from ``--help`` (:meth:`Parser.add_hidden_alias`).
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any, Callable, NoReturn

from .configs import PRESETS, resolve_resolution
from .errors import UserError

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "CliError", "Parser", "resolution_arg",
           "add_model_choice", "chosen_model", "configure_logging", "run_command", "build_pipeline"]

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
    """An argument parser whose errors are a single sentence and exit status 2.

    Positional arguments may come among the options (``train 256 --max_steps 5 clips``).
    """

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # "argument --video_length/--num_frames/--frames: ..." names the option by its first flag only
        message = re.sub(r"^argument (-[^/:\s]+)(/[^:]+)?:", r"\1:", message)
        raise CliError(f"{message[:1].upper()}{message[1:]}.", EXIT_USAGE)

    def add_hidden_alias(self, flag: str, dest: str, **kwargs: Any) -> None:
        """Accept ``flag`` for ``dest`` as an earlier release spelled it, without showing it in ``--help``.

        ``kwargs`` are the canonical flag's (``type``, ``choices``, ``action``); the canonical flag's default stays.
        """
        self.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def resolution_arg(text: str) -> str:
    """An argparse type: any accepted spelling of a resolution, returned as the preset name."""
    try:
        return resolve_resolution(text)
    except ValueError:
        choices = ", ".join(PRESETS)
        raise argparse.ArgumentTypeError(
            f"unknown resolution {text!r}; choose one of {choices} (or an alias such as 256_256 or 320_512)"
        ) from None


def add_model_choice(parser: Parser, default: str | None = None, what: str = "model", help: str | None = None) -> None:
    """The model as every command takes it: the first argument (optional) or ``--resolution``.

    ``default`` is the resolution used when neither is given (``None``: one must be);
    :func:`chosen_model` reads the choice. ``--res`` is the earlier spelling of the flag. ``help``
    replaces the first argument's help (``what`` names the model in it).
    """
    shown = f" (default: {default})" if default else ""
    help = help or f"{what}: {', '.join(PRESETS)}, as the first argument or --resolution"
    parser.add_argument("resolution", nargs="?", type=resolution_arg, metavar="RESOLUTION", help=f"{help}{shown}")
    parser.add_argument("--resolution", dest="resolution_flag", type=resolution_arg, metavar="RESOLUTION",
                        help=f"the {what}, as a flag instead of the first argument")
    parser.add_hidden_alias("--res", "resolution_flag", type=resolution_arg)


def chosen_model(args: argparse.Namespace, default: str | None = None) -> str:
    """The preset name :func:`add_model_choice` read: the argument or ``--resolution``, else ``default``."""
    given = {name for name in (args.resolution, getattr(args, "resolution_flag", None)) if name is not None}
    if len(given) > 1:
        raise CliError(f"The model is given twice, as {args.resolution} and --resolution {args.resolution_flag}; "
                       "give it once.", EXIT_USAGE)
    if given:
        return given.pop()
    if default is None:
        raise CliError(f"Give the model as the first argument or --resolution ({', '.join(PRESETS)}); "
                       "--help lists the options.", EXIT_USAGE)
    return default


class _KnownHarmless(logging.Filter):
    """Drops third-party log records that are known and harmless: no user can act on them.

    - torchao (which peft imports) registers its enums with PyTorch's pytree, which PyTorch 2.10 and
      later deprecate with a warning per enum on every run that imports it (LoRA, training).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torch.utils._pytree" and str(record.msg).startswith("%s is an Enum subclass"):
            enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
            return not getattr(enum, "__module__", "").startswith("torchao")
        return True


def configure_logging() -> None:
    """INFO logging in the one format of every command, without a line per HTTP request or known noise."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    pytree = logging.getLogger("torch.utils._pytree")  # the logger torch uses, made before torch is imported
    if not any(isinstance(f, _KnownHarmless) for f in pytree.filters):
        pytree.addFilter(_KnownHarmless())


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
    """The pipeline the model options of ``args`` describe (:data:`~dynamicrafter.options.MODEL_ARGUMENTS`), LoRA applied,
    its CPU threads set (:func:`~dynamicrafter.runtime.use_cpu_threads`).

    Shared by the command line and the app (the benchmark also builds random-weight models, so it
    makes its own); raises the pipeline's one-sentence :class:`UserError`.
    """
    from .pipeline import DynamiCrafterImg2VideoPipeline
    from .runtime import use_cpu_threads

    pipe = DynamiCrafterImg2VideoPipeline(
        resolution=resolution, device=device, checkpoint=args.checkpoint, config=args.config,
        dtype=None if args.dtype == "auto" else args.dtype, offload=args.offload, compile=args.compile,
        quantize=args.quantize, clip_checkpoint=args.clip_checkpoint)
    if args.lora:
        pipe.load_lora_weights(args.lora, scale=args.lora_scale)
    use_cpu_threads(args.threads, pipe.device)
    return pipe
