"""``dynamicrafter train``: fine-tune a DynamiCrafter model on your clips (LoRA or full).

    dynamicrafter train examples/clips --resolution 256 --max_steps 500 --output_dir runs/clips
    torchrun --nproc_per_node=4 -m dynamicrafter.training.cli CLIPS --resolution 512 ...

Every option is a field of :class:`~dynamicrafter.training.config.TrainConfig` under the same
name, with the help written on the field; the parser is made from that dataclass, so the two
cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any, Sequence

from ..distributed import Ranks
from ..frontend import EXIT_INTERRUPTED, Parser, configure_logging, run_command
from .config import TrainConfig

logger = logging.getLogger(__name__)


def _choices(hint: Any) -> list[str] | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and all(isinstance(a, str) for a in args):
        return args
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            return list(typing.get_args(a))
    return None


def _scalar(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for kind in (bool, int, float):
        if kind in args:
            return kind
    return str


def _help(f: dataclasses.Field) -> str:
    """The field's help, with its default appended unless the help says it (argparse's ``%`` escaped)."""
    text = f.metadata.get("help", "")
    default = f.default
    if "(default" not in text and default is not None and default is not dataclasses.MISSING:
        if isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, tuple):
            shown = " ".join(map(str, default))
        else:
            shown = str(default)
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def build_parser(prog: str = "dynamicrafter train") -> argparse.ArgumentParser:
    """The command line, one option per :class:`TrainConfig` field (help and defaults from the dataclass)."""
    parser = Parser(prog=prog, description="Fine-tune a DynamiCrafter model on your own clips (LoRA or full).")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        helptext = _help(f)
        if f.name == "data":
            parser.add_argument("data", help=helptext)
            continue
        default = f.default
        flag = f"--{f.name}"
        origin = typing.get_origin(hint)
        if origin is tuple or (origin is typing.Union and any(typing.get_origin(a) is tuple for a in typing.get_args(hint))):
            item = float if f.name == "adam_betas" else str
            parser.add_argument(flag, nargs="+", type=item, default=default, help=helptext)
        elif _scalar(hint) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            parser.add_argument(flag, type=_scalar(hint), default=default, choices=_choices(hint), help=helptext)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None, prog: str = "dynamicrafter train") -> int:
    """Run a fine-tuning job from command-line arguments; returns the exit status."""
    configure_logging()
    return run_command(lambda: _train(argv, prog),
                       out_of_memory="Out of GPU memory; try --gradient_checkpointing, a smaller --batch_size, "
                                     "fewer --frames or a lower --lora_rank.")


def _train(argv: Sequence[str] | None, prog: str) -> int:
    if Ranks.from_env().rank > 0:  # under torchrun only the first process reports progress
        logging.getLogger().setLevel(logging.WARNING)
    cfg = config_from_args(build_parser(prog).parse_args(argv))
    from .trainer import train  # after parsing: --help stays fast

    result = train(cfg)
    where = f"; checkpoint: {result.checkpoint}" if result.checkpoint else ""
    if result.interrupted:
        logger.warning("Interrupted at step %d%s (continue with --resume %s).", result.step, where,
                       result.checkpoint or "latest")
        return EXIT_INTERRUPTED
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    logger.info("Done: %d steps%s%s.", result.step, last, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
