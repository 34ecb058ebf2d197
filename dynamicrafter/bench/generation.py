"""Benchmark: seconds per guided step and per video, peak memory and achieved TFLOP/s.

``python -m dynamicrafter.bench 256 --video_length 16 --num_inference_steps 50 --device cuda --dtype bfloat16
--random-weights --json`` (``dynamicrafter bench`` is the same). The flags are the command line's: the model
as the first argument or ``--resolution``, the generation options (``--height``, ``--width``, ``--sampler``,
...), ``--config``, ``--checkpoint``, ``--device``, ``--dtype``, ``--threads``; ``--frames``/``--steps`` are accepted too.

``--random-weights`` builds the full-size model with random weights (the same arithmetic as the
released one, no download). The UNet's FLOP count comes from PyTorch's flop counter run on the
meta device; the achieved rate is compared with a large matmul measured on the same device.

``--fused-norm {auto,on,off}`` sets the UNet's fused group norm + SiLU kernel
(:attr:`~dynamicrafter.models.unet.UNet3D.fused_norm`; ``auto``: the library's default,
:data:`~dynamicrafter.models.unet.FUSED_NORM_BY_DEFAULT`), to time the UNet with and without it;
the report says the setting and whether the kernel ran. ``--channels-last {auto,on,off}`` does
the same for the UNet's memory layout, and ``--profile`` adds one UNet call's time by kind of
operation (:mod:`dynamicrafter.bench.profiling`).

``--quantize fp8|fp8_weights`` first samples the latents with the unquantized UNet, then quantizes
it in place and samples them again from the same noise with the same settings; the report gives
their relative L2 difference (``quantized_latent_rel_diff``) and the UNet's weight bytes before
and after, besides the timings of the quantized model.

``--first-compiled-video [MODE]`` measures what compilation costs a user: after the eager
measurements above, it times one more eager video, compiles the UNet (``MODE``, default
``regional``: its repeated blocks) and times the first video, compilation included, and a second
one, each against that eager video; run it twice for the second process's figure (the kernels
from the on-disk cache, ``--compile-cache DIR`` or :func:`~dynamicrafter.runtime.compile_cache_dir`).
The report says how many files the cache held before and how many graphs were compiled.

``--compare-reference DIR`` then times the original implementation's guided step from a
DynamiCrafter checkout at ``DIR`` (never part of this package: imported from there only when
asked) on the same device, shapes and weights, right after ours, and reports the ratio.

This module is the command: its flags are checked before torch is imported; the measuring is
:mod:`.timing`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..frontend import EXIT_USAGE, CliError, Parser, add_model_choice
from ..options import COMPILE_MODES, add_arguments, add_model_arguments
from . import add_random_weights, chosen_weights, run_tool

__all__ = ["BENCH_OPTIONS", "FUSED_NORM_SETTINGS", "REFERENCE_UNET", "build_parser", "check_reference_checkout", "main"]

#: The generation options a benchmark call takes (the option table's flags, as the command line's).
BENCH_OPTIONS = ("num_inference_steps", "num_frames", "height", "width", "guidance_scale", "image_guidance_scale",
                 "sampler", "eta", "frame_stride", "guidance_rescale", "timestep_spacing", "window_size", "window_stride",
                 "noise_rescheduling")
#: ``--fused-norm`` choices and the ``UNet3D.fused_norm`` value each sets.
FUSED_NORM_SETTINGS = {"auto": None, "on": True, "off": False}

#: The original's UNet in a DynamiCrafter checkout (``--compare-reference``).
REFERENCE_UNET = Path("lvdm", "modules", "networks", "openaimodel3d.py")


def check_reference_checkout(directory: str | Path) -> Path:
    """``directory`` as a path, or a :class:`UserError` when it holds no original DynamiCrafter code."""
    root = Path(directory).expanduser()
    if not (root / REFERENCE_UNET).is_file():
        raise UserError(f"--compare-reference: {directory} is not a DynamiCrafter checkout "
                         f"(it has no {REFERENCE_UNET.as_posix()}).")
    return root


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags: the command line's names for the shared options."""
    parser = Parser(prog="python -m dynamicrafter.bench", description=__doc__.splitlines()[0])
    add_model_choice(parser, "256")
    add_arguments(parser, BENCH_OPTIONS)
    add_model_arguments(parser)
    add_random_weights(parser)
    parser.add_argument("--sequential-guidance", action="store_true", help="run the two guidance branches apart")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="compile the UNet in this mode: regional (its repeated blocks, what --compile does) or "
                             "a torch.compile mode for the whole UNet (reduce-overhead adds CUDA graphs)")
    parser.add_argument("--first-compiled-video", nargs="?", const="regional", choices=COMPILE_MODES, metavar="MODE",
                        help="after the eager figures, compile the UNet (default regional) and time its first video, "
                             "compilation included, and a second one against the eager video")
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="Inductor's on-disk kernel cache for this run (default: TORCHINDUCTOR_CACHE_DIR or "
                             "~/.cache/dynamicrafter/inductor)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="UNet activations (and, with on, convolution weights) channels-last; auto: on the CPU only")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one UNet call and report its time by kind of operation")
    parser.add_argument("--fused-norm", choices=tuple(FUSED_NORM_SETTINGS), default="auto",
                        help="the UNet's fused group norm + SiLU kernel on CUDA: on, off, or auto (the library's "
                             "default, off until measured)")
    parser.add_argument("--compare-reference", metavar="DIR",
                        help="also time the original implementation's guided step from a DynamiCrafter checkout")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (2 with one line for bad arguments)."""
    return run_tool(argv, build_parser, _benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    chosen_weights(args, "256")
    if args.num_inference_steps < 2:
        raise CliError("--num_inference_steps must be at least 2 (the first step is the warm-up).", EXIT_USAGE)
    if args.compare_reference and args.quantize != "none":
        raise CliError("--compare-reference runs the original on unquantized weights; leave out --quantize.",
                       EXIT_USAGE)
    if args.first_compiled_video and (args.compile or args.compile_mode):
        raise CliError("--first-compiled-video compiles the UNet after timing it eagerly; leave out --compile and "
                       "--compile-mode.", EXIT_USAGE)
    if args.compare_reference:
        try:
            check_reference_checkout(args.compare_reference)
        except UserError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    from .timing import run  # the arguments are checked: now torch

    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    profile = result.pop("profile", None)
    for key, value in result.items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    if profile:
        what = "GPU kernels" if result["device"] == "cuda" else "CPU time"
        print(f"\nOne UNet call, {profile['total_ms']:.1f} ms of {what}:")
        for kind, entry in profile["by_category"].items():
            print(f"{kind:>22}: {entry['ms']:9.1f} ms {entry['share']:6.1%} ({entry['calls']} calls)")
    return 0
