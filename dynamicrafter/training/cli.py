"""``dynamicrafter train``: fine-tune a DynamiCrafter model on your clips (LoRA or full).

    dynamicrafter train examples/clips --resolution 256 --max_steps 500 --output_dir runs/clips
    torchrun --nproc_per_node=4 -m dynamicrafter.training.cli CLIPS --resolution 512 ...

Every option is a field of :class:`~dynamicrafter.training.config.TrainConfig` under the same
name; the parser is made from that dataclass, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any, Sequence

from ..frontend import EXIT_INTERRUPTED, Parser, configure_logging, run_command
from .config import TrainConfig

logger = logging.getLogger(__name__)

HELP = {
    "data": "a folder of clips (.mp4 .mov .webm .gif) with same-name .txt captions, or a CSV "
            "(videoid,name as WebVid, or path,caption)",
    "output_dir": "where checkpoints, logs/ (TensorBoard + metrics.csv) and samples/ go",
    "resolution": "base model: 256, 512, 1024 or 512_interp",
    "checkpoint": "base checkpoint (default: the released one, downloaded when missing)",
    "clip_checkpoint": "OpenCLIP ViT-H-14 weights, for a checkpoint without the CLIP towers (pruned files)",
    "model_config": "model config YAML in the original layout (default: the resolution's preset)",
    "video_root": "folder a CSV's clips are in (default: the CSV's folder)",
    "frames": "frames per training clip (default: the model's 16)",
    "height": "frame height (default: the model's)",
    "width": "frame width (default: the model's)",
    "frame_stride_min": "smallest frame stride drawn for a clip",
    "frame_stride_max": "largest frame stride drawn for a clip",
    "num_workers": "decoding processes",
    "cache_latents": "encode every clip once (VAE + CLIP) to disk; later epochs skip the encoders",
    "cache_dir": "where --cache_latents writes (default: OUTPUT_DIR/cache)",
    "uncond_prob": "probability of dropping the text, both, or the image (each), for guidance",
    "rand_cond_frame": "condition on a random frame of the clip (default: yes, except the interpolation model)",
    "unet_dropout": "dropout in the UNet's ResBlocks and temporal convolutions (the original's 0.1)",
    "mode": "lora: adapters on the attention and feed-forward projections; full: the whole UNet",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (default: the rank)",
    "lora_targets": "module-name suffixes the LoRA adapts",
    "train_image_proj": "also train the image resampler (full fine-tuning)",
    "learning_rate": "AdamW learning rate (default: 1e-4 for LoRA, 1e-5 full)",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas",
    "optimizer": "adamw, or adamw8bit (needs bitsandbytes)",
    "lr_schedule": "learning-rate schedule after the warm-up",
    "lr_warmup_steps": "steps of linear warm-up",
    "max_steps": "optimizer steps to train for",
    "batch_size": "clips per process per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "precision": "bf16 (autocast, float32 trained weights) or fp32 (default: bf16 on GPUs that have it)",
    "gradient_checkpointing": "recompute the UNet blocks' activations in the backward pass (less memory)",
    "compile": "torch.compile the UNet",
    "strategy": "under torchrun: ddp, fsdp (full fine-tuning), or auto (FSDP for full fine-tuning of 1024)",
    "seed": "seed of every random draw",
    "device": "cuda:0, cpu, ... (default: the GPU, or the CPU without one)",
    "save_every": "write a checkpoint every N steps (and at the end, and on Ctrl-C)",
    "log_every": "log loss and learning rate every N steps",
    "sample_every": "render a sample video every N steps (0: never)",
    "sample_image": "image for the samples (default: the first clip's first frame)",
    "sample_prompt": "prompt for the samples (default: the first clip's caption)",
    "sample_steps": "DDIM steps of a sample",
    "sample_frames": "frames of a sample (default: the training frames)",
    "resume": "continue from a checkpoint folder, or 'latest' in OUTPUT_DIR",
}


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


def build_parser(prog: str = "dynamicrafter train") -> argparse.ArgumentParser:
    """The command line, one option per :class:`TrainConfig` field (defaults from the dataclass)."""
    parser = Parser(prog=prog, description="Fine-tune a DynamiCrafter model on your own clips (LoRA or full).",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        helptext = HELP.get(f.name, "")
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
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only the first process reports progress
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
