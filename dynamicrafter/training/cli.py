"""``dynamicrafter train``: fine-tune a DynamiCrafter model on your clips (LoRA or full).

    dynamicrafter train 256 examples/clips --max_steps 500 --output_dir runs/clips
    torchrun --nproc_per_node=4 -m dynamicrafter.training.cli 512 CLIPS ...

Every option is a field of :class:`~dynamicrafter.training.config.TrainConfig`, with the help
written on the field; the parser is made from that dataclass, so the two cannot disagree. The
model is given as every command takes it (the first argument or ``--resolution``), and the
fields that the option table also has take its flags and checks (``--config``,
``--video_length``, ``--height``, ``--device``, ``--threads``, ...; ``--dtype`` for the
precision); their earlier spellings (``--model_config``, ``--precision``) are still accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any, Sequence

from ..distributed import Ranks
from ..frontend import EXIT_INTERRUPTED, Parser, add_model_choice, chosen_model, configure_logging, run_command
from ..options import OPTIONS
from .config import TrainConfig, flag, precision_arg

#: The fields that are rows of the option table: the same flags (aliases too) and checks as every command's.
TABLE_ROWS = {"model_config": "config", "checkpoint": "checkpoint", "clip_checkpoint": "clip_checkpoint",
              "frames": "num_frames", "height": "height", "width": "width", "batch_size": "batch_size", "seed": "seed",
              "device": "device", "threads": "threads", "compile": "compile"}

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


def _field_argument(parser: Parser, f: dataclasses.Field, hint: Any) -> None:
    """The option of one :class:`TrainConfig` field; its flag is :func:`~.config.flag`, its own name a hidden alias."""
    helptext, default, kwargs = _help(f), f.default, {}
    flags: tuple[str, ...] = (flag(f.name),)
    origin = typing.get_origin(hint)
    if f.name in TABLE_ROWS:
        row = OPTIONS[TABLE_ROWS[f.name]]
        flags = row.flags
        if row.type is bool:
            kwargs = {"action": argparse.BooleanOptionalAction}
        elif row.type is not str or row.text_check is not None:
            kwargs = {"type": row.parse, "metavar": row.name.upper() if row.type is str else "N"}
        else:
            kwargs = {"metavar": row.name.upper()}
    elif f.name == "precision":
        kwargs = {"type": precision_arg, "metavar": "{auto,bfloat16,float32}"}
    elif origin is tuple or (origin is typing.Union and any(typing.get_origin(a) is tuple for a in typing.get_args(hint))):
        kwargs = {"nargs": "+", "type": float if f.name == "adam_betas" else str}
    elif _scalar(hint) is bool:
        kwargs = {"action": argparse.BooleanOptionalAction}
    else:
        kwargs = {"type": _scalar(hint), "choices": _choices(hint)}
    parser.add_argument(*flags, dest=f.name, default=default, help=helptext, **kwargs)
    if f"--{f.name}" not in flags:
        parser.add_hidden_alias(f"--{f.name}", f.name, **kwargs)


def build_parser(prog: str = "dynamicrafter train") -> argparse.ArgumentParser:
    """The command line, one option per :class:`TrainConfig` field (help and defaults from the dataclass)."""
    parser = Parser(prog=prog, description="Fine-tune a DynamiCrafter model on your own clips (LoRA or full).")
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    add_model_choice(parser, fields["resolution"].default, what="base model",
                     help=fields["resolution"].metadata["help"])
    parser.add_argument("data", help=_help(fields["data"]))
    for f in fields.values():
        if f.name not in ("data", "resolution"):
            _field_argument(parser, f, hints[f.name])
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    args.resolution = chosen_model(args, TrainConfig.resolution)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None, prog: str = "dynamicrafter train") -> int:
    """Run a fine-tuning job from command-line arguments; returns the exit status."""
    configure_logging()
    return run_command(lambda: _train(argv, prog),
                       out_of_memory="Out of GPU memory; try --gradient_checkpointing, a smaller --batch_size, "
                                     "a shorter --video_length or a lower --lora_rank.")


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
