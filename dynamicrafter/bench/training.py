"""Training benchmark: seconds per optimizer step and peak memory of the real training loop.

    python -m dynamicrafter.bench.training 512 --video_length 16 --mode lora --lora_rank 64 \\
        --device cuda --random-weights --max_steps 5 --json

It writes one synthetic clip at the model's size (or ``--height``/``--width``) to a temporary
folder and runs :func:`~dynamicrafter.training.trainer.train` on it for ``--max_steps``
optimizer steps: decoding, the frozen encoders, forward, backward and the optimizer, as a real
run does (one checkpoint is written at the end, to the temporary folder). ``--random-weights``
builds the full-size model with random weights (the same arithmetic as the released one, no
download). Reported: the median seconds per step after the first (warm-up) step, and the peak
memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak resident set on the CPU.
``--estimate`` instead estimates the peak memory of a step on the meta device, without a GPU or
weights (:mod:`dynamicrafter.bench.memory`). The flags are ``dynamicrafter train``'s (the model as the
first argument or ``--resolution``, ``--config``, ``--video_length``, ``--dtype``, ...); the earlier
``--frames``, ``--precision`` and ``--steps`` are still accepted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..configs import ModelConfig, model_config
from ..frontend import EXIT_USAGE, CliError, Parser, add_model_choice, chosen_model
from ..options import add_arguments
from ..training.config import TrainConfig, precision_arg
from . import run_tool


def write_clip(path: Path, frames: int, height: int, width: int, fps: int = 24) -> Path:
    """A synthetic H.264 clip: a bright square moving over a gradient."""
    import av
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                            np.full_like(x, 96)], axis=-1).astype(np.uint8)
            left = (i * 7) % max(1, width - height // 4)
            img[height // 3: height // 3 + height // 4, left: left + height // 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dynamicrafter.bench.training", description=__doc__.split("\n\n")[0])
    add_model_choice(p, "512")
    add_arguments(p, ("config", "checkpoint", "clip_checkpoint", "device", "threads"),
                  shown={"checkpoint": "needed unless --random-weights"})
    p.add_argument("--dtype", dest="precision", type=precision_arg, metavar="{auto,bfloat16,float32}",
                   help="training precision (default: auto, bfloat16 on GPUs that have it, else float32)")
    p.add_hidden_alias("--precision", "precision", type=precision_arg)
    p.add_argument("--random-weights", action="store_true", help="full-size model with random weights")
    add_arguments(p, ("num_frames", "height", "width", "batch_size", "compile"))
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--train_image_proj", action="store_true")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max_steps", type=int, default=5, help="optimizer steps (the first is the warm-up; default 5)")
    p.add_hidden_alias("--steps", "max_steps", type=int)
    p.add_argument("--estimate", action="store_true",
                   help="estimate the peak memory on the meta device instead of running (no GPU, no weights)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _train_config(args: argparse.Namespace, config: ModelConfig, **run: Any) -> TrainConfig:
    """The fine-tuning settings the benchmark's flags describe; ``run`` adds where and how it runs."""
    return TrainConfig(resolution=args.resolution, model_config=args.config, frames=args.num_frames,
                       height=args.height or config.height, width=args.width or config.width,
                       batch_size=args.batch_size, mode=args.mode, lora_rank=args.lora_rank,
                       train_image_proj=args.train_image_proj, gradient_checkpointing=args.gradient_checkpointing,
                       **run)


def _settings(cfg: TrainConfig, config: ModelConfig, precision: str) -> dict:
    """The report's description of what was measured or estimated."""
    import torch

    return {
        "resolution": config.name, "height": cfg.height, "width": cfg.width, "frames": cfg.frames,
        "batch_size": cfg.batch_size, "mode": cfg.mode, "lora_rank": cfg.lora_rank if cfg.mode == "lora" else None,
        "precision": precision, "gradient_checkpointing": cfg.gradient_checkpointing, "torch": torch.__version__,
    }


def estimate(args: argparse.Namespace) -> dict:
    """The ``--estimate`` report: :func:`~dynamicrafter.bench.memory.estimate_step_memory`."""
    from .memory import estimate_step_memory

    config = model_config(args.resolution, args.config)
    cfg = _train_config(args, config, data=".", output_dir=".", optimizer="adamw", precision=args.precision or "bf16")
    result = estimate_step_memory(config, cfg)
    return {
        **_settings(cfg, config, cfg.precision), "trained_values": result.trained_values,
        "weights_bytes": result.weights, "peak_mem_bytes": result.peak, "s_per_step": None,
        "peak_mem": "estimated on the meta device (fused attention, no autocast; see dynamicrafter.bench.memory)",
        "device_name": "meta",
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..runtime import resolve_device
    from ..training.model import resolve_precision
    from ..training.trainer import train
    from .timing import random_model

    device = resolve_device(args.device)
    config = model_config(args.resolution, args.config)
    with tempfile.TemporaryDirectory(prefix="dc-train-bench-") as tmp:
        clips = Path(tmp) / "clips"
        clips.mkdir()
        cfg = _train_config(args, config, data=str(clips), output_dir=str(Path(tmp) / "out"),
                            checkpoint=args.checkpoint, clip_checkpoint=args.clip_checkpoint, optimizer=args.optimizer,
                            precision=args.precision, compile=args.compile, max_steps=args.max_steps,
                            save_every=10**9, num_workers=1, threads=args.threads,
                            device=str(device), frame_stride_min=1, frame_stride_max=1)
        write_clip(clips / "clip.mp4", max(args.num_frames * 2, 32), cfg.height, cfg.width)
        (clips / "clip.txt").write_text("a bright square moving over a gradient\n")
        precision = resolve_precision(cfg, device)
        model = None
        if args.random_weights:
            model = random_model(config, device, torch.bfloat16 if precision == "bf16" else torch.float32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = train(cfg, model)
    times = result.step_seconds[1:] or result.step_seconds
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = "cpu"
    return {
        **_settings(cfg, config, precision), "compile": args.compile, "optimizer": args.optimizer,
        "steps": result.step, "s_per_step": statistics.median(times), "step_seconds": result.step_seconds,
        "losses": result.losses, "peak_mem_bytes": peak,
        "peak_mem": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "device_name": name,
    }


def describe(report: dict) -> str:
    """The one-line summary printed without ``--json``."""
    rank = "" if report["lora_rank"] is None else f" r{report['lora_rank']}"
    timing = "" if report["s_per_step"] is None else f"{report['s_per_step']:.3f} s/step, "
    return (f"{report['resolution']} {report['height']}x{report['width']}, {report['frames']} frames, batch "
            f"{report['batch_size']}, {report['mode']}{rank}, {report['precision']}, checkpointing "
            f"{'on' if report['gradient_checkpointing'] else 'off'} on {report['device_name']}: {timing}"
            f"peak {report['peak_mem_bytes'] / 2**30:.2f} GiB ({report['peak_mem']})")


def main(argv: list[str] | None = None) -> int:
    """Run (or estimate) the training step; returns the exit status (2 with one line for bad arguments)."""
    return run_tool(argv, build_parser, _benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    args.resolution = chosen_model(args, "512")
    if not args.random_weights and not args.checkpoint and not args.estimate:
        raise CliError("Give --checkpoint, or --random-weights for a full-size model with random weights.", EXIT_USAGE)
    report = estimate(args) if args.estimate else run(args)
    print(json.dumps(report) if args.json else describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
