"""Command line: ``run_pipeline.py <resolution> [options]`` turns still images into videos.

The images come from ``--image_path`` or from every image in ``--prompt_dir``; each gets a
prompt and becomes ``<output_dir>/<image stem>.mp4``. docs/cli.md describes every option,
how prompts are found, how videos are named and the exit codes.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .configs import PRESETS, resolve_resolution
from .hub import CheckpointError
from .pipeline import DynamiCrafterImg2VideoPipeline, load_image
from .offload import OFFLOAD_MODES
from .runtime import configure_logging, resolve_device

__all__ = ["main", "is_user_error", "IMAGE_EXTENSIONS", "PROMPT_LIST_NAME"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tiff", ".tif")
PROMPT_LIST_NAME = "test_prompts.txt"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_SEED = 2**64 - 1


class CliError(Exception):
    """A problem the user can fix: ``str(error)`` is one sentence, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Job:
    """One image to animate, its prompt and the video file it becomes."""

    image: Path
    prompt: str
    output: Path


def is_user_error(exc: BaseException) -> bool:
    """Whether a pipeline exception is the user's to fix: a bad input or a missing checkpoint."""
    return isinstance(exc, (ValueError, CheckpointError))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a single sentence and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message[:1].upper()}{message[1:]}.", EXIT_USAGE)


def _number(kind: type, minimum: float, maximum: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` (int or float) between ``minimum`` and ``maximum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            bounds = f"at least {minimum}" if maximum == math.inf else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _resolution(text: str) -> str:
    """An argparse type: any accepted spelling of a resolution, returned as the preset name."""
    try:
        return resolve_resolution(text)
    except ValueError:
        choices = ", ".join(PRESETS)
        raise argparse.ArgumentTypeError(
            f"unknown resolution {text!r}; choose one of {choices} (or an alias such as 256_256 or 320_512)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``run_pipeline.py``; defaults follow the usage guide."""
    parser = _Parser(description="Animate images with a DynamiCrafter model; see docs/cli.md.")
    add = parser.add_argument
    add("resolution", type=_resolution, help="model: 256, 512, 1024 or 512_interp")
    add("--seed", type=_number(int, 0, MAX_SEED), default=123, help="random seed of every batch (default: 123)")
    add("--device", help="torch device (default: cuda:0, or cpu when CUDA is not available)")
    add("--num_inference_steps", type=_number(int, 1), default=50, help="DDIM steps (default: 50)")
    add("--guidance_scale", type=_number(float, 0), default=7.5, help="text guidance strength (default: 7.5)")
    add("--eta", type=_number(float, 0), default=1.0, help="DDIM eta; 0 is deterministic (default: 1.0)")
    add("--video_length", type=_number(int, 1), default=16, help="frames per video (default: 16)")
    add("--frame_stride", type=_number(int, 1),
        help="motion: frame stride for 256, frames per second for the others (default: the model's)")
    add("--prompt_dir", type=Path, help="folder of input images and prompts (default: prompts/<resolution>/)")
    add("--output_dir", type=Path,
        help="where videos go (default: results/dynamicrafter_pipeline_<resolution>_seed<seed>/)")
    add("--image_path", type=Path, help="animate this one image instead of --prompt_dir")
    add("--prompt_text", help="prompt for every image, instead of the prompt files")
    add("--negative_prompt", help="what the videos should not show (default: none)")
    add("--batch_size", type=_number(int, 1), default=1, help="images per pipeline call (default: 1)")
    add("--fps", type=_number(int, 1), default=8, help="frame rate of the written MP4 (default: 8)")
    add("--checkpoint", type=Path, help="model checkpoint (default: downloaded to checkpoints/)")
    add("--config", type=Path, help="model config YAML in the original layout (default: the preset)")
    add("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
        help="weights and compute precision (default: auto, chosen per device)")
    add("--guidance_rescale", type=_number(float, 0), help="rescale of guided noise, 0-1 (default: the model's)")
    add("--timestep_spacing", choices=("uniform", "uniform_trailing"), help="DDIM timesteps (default: the model's)")
    add("--offload", choices=OFFLOAD_MODES,
        help="what stays in host memory between uses (default: encoders on CUDA); 'model' needs the least GPU memory")
    add("--compile", action="store_true", help="torch.compile the UNet (slow first video, faster after)")
    return parser


def _resolve_device(name: str | None) -> torch.device:
    """The requested device, checked; without a request cuda:0, or the CPU when CUDA is absent."""
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise CliError(f"--device: {exc}", EXIT_USAGE) from None


def _list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError as exc:
        raise CliError(f"Cannot read folder {folder} ({exc.strerror}).") from None


def _find_images(image_path: Path | None, prompt_dir: Path) -> list[Path]:
    """``image_path`` alone when given, else every image in ``prompt_dir``."""
    if image_path is not None:
        if not image_path.is_file():
            raise CliError(f"Image {image_path} does not exist.")
        return [image_path]
    if not prompt_dir.is_dir():
        raise CliError(f"Prompt folder {prompt_dir} does not exist; pass --prompt_dir or --image_path.")
    images = _list_images(prompt_dir)
    if not images:
        raise CliError(f"No images ({' '.join(IMAGE_EXTENSIONS)}) in {prompt_dir}.")
    return images


def _read_text(path: Path) -> str:
    """A prompt file's text (UTF-8, a byte-order mark allowed)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"Cannot read prompt file {path} ({exc}).") from None


def _listed_prompts(folder: Path) -> dict[Path, str]:
    """Pair the non-empty lines of the folder's test_prompts.txt with its sorted images."""
    path = folder / PROMPT_LIST_NAME
    if not path.is_file():
        return {}
    lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    images = _list_images(folder)
    if len(lines) != len(images):
        logger.warning("%s has %d prompts for %d images; pairing them in sorted order.", path, len(lines), len(images))
    return dict(zip(images, lines))


def _prompts(images: list[Path], prompt_text: str | None) -> list[str]:
    """Each image's prompt: ``prompt_text``, else ``<stem>.txt``, else its line of test_prompts.txt."""
    if prompt_text is not None:
        return [prompt_text] * len(images)
    listed = _listed_prompts(images[0].parent)  # the images share one folder
    prompts = []
    for image in images:
        own = image.with_suffix(".txt")
        if own.is_file():
            prompts.append(_read_text(own).strip())
        elif image in listed:
            prompts.append(listed[image])
        else:
            logger.warning("No prompt for %s (no %s, no %s line); using an empty prompt.",
                           image, own.name, PROMPT_LIST_NAME)
            prompts.append("")
    return prompts


def _output_paths(images: list[Path], output_dir: Path) -> list[Path]:
    """``<stem>.mp4`` per image; a later image whose stem is taken gets its extension added (``a_jpg.mp4``).

    Names are compared case-insensitively so that no two videos of a run collide on any file system.
    """
    taken: set[str] = set()
    paths = []
    for image in images:
        name = image.stem
        if name.casefold() in taken:
            name = f"{image.stem}_{image.suffix[1:]}"
        base, number = name, 2
        while name.casefold() in taken:
            name, number = f"{base}_{number}", number + 1
        taken.add(name.casefold())
        paths.append(output_dir / f"{name}.mp4")
    return paths


def _load_pipeline(args: argparse.Namespace, device: torch.device) -> Any:
    """Build the pipeline; a bad config or a missing checkpoint becomes a :class:`CliError`."""
    logger.info("Loading the %s model on %s.", args.resolution, device)
    try:
        return DynamiCrafterImg2VideoPipeline(
            resolution=args.resolution,
            device=device,
            checkpoint=args.checkpoint,
            config=args.config,
            dtype=None if args.dtype == "auto" else args.dtype,
            offload=args.offload,
            compile=args.compile,
        )
    except Exception as exc:
        if is_user_error(exc):
            raise CliError(str(exc)) from None
        raise


def _animate(pipe: Any, jobs: list[Job], images: list[Image.Image], args: argparse.Namespace) -> int:
    """Animate ``jobs`` in one pipeline call and write their videos; returns how many failed."""
    if not jobs:
        return 0
    generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
    negative = None if args.negative_prompt is None else [args.negative_prompt] * len(jobs)
    try:
        videos = pipe(
            image=images,
            prompt=[job.prompt for job in jobs],
            negative_prompt=negative,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            eta=args.eta,
            frame_stride=args.frame_stride,
            num_frames=args.video_length,
            guidance_rescale=args.guidance_rescale,
            timestep_spacing=args.timestep_spacing,
            generator=generator,
        )["videos"]
    except ValueError as exc:
        if len(jobs) == 1:
            logger.warning("Skipping %s: %s", jobs[0].image, exc)
            return 1
        # Some image of the batch was refused: run them one at a time so that only it is skipped.
        return sum(_animate(pipe, [job], [image], args) for job, image in zip(jobs, images))
    failed = 0
    for index, job in enumerate(jobs):
        try:
            pipe.save_video(videos[index : index + 1], job.output, fps=args.fps)
        except OSError as exc:
            logger.warning("Cannot write %s (%s).", job.output, exc)
            failed += 1
        else:
            logger.info("%s -> %s", job.image, job.output)
    return failed


def _run_batch(pipe: Any, jobs: list[Job], args: argparse.Namespace) -> int:
    """Read the batch's images, skipping unreadable ones, and animate the rest; returns failures."""
    readable, images = [], []
    for job in jobs:
        try:
            images.append(load_image(job.image))
        except ValueError as exc:
            logger.warning("Skipping %s: %s", job.image, exc)
        else:
            readable.append(job)
    return len(jobs) - len(readable) + _animate(pipe, readable, images, args)


def _run(args: argparse.Namespace) -> int:
    """Animate every image the arguments name; returns the exit status."""
    device = _resolve_device(args.device)
    prompt_dir = args.prompt_dir or Path("prompts") / args.resolution
    output_dir = args.output_dir or Path("results") / f"dynamicrafter_pipeline_{args.resolution}_seed{args.seed}"
    images = _find_images(args.image_path, prompt_dir)
    prompts = _prompts(images, args.prompt_text)
    jobs = [Job(*fields) for fields in zip(images, prompts, _output_paths(images, output_dir))]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"Cannot create output folder {output_dir} ({exc.strerror}).") from None
    pipe = _load_pipeline(args, device)

    failed = 0
    with logging_redirect_tqdm(), tqdm(total=len(jobs), desc="Videos", unit="image") as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            failed += _run_batch(pipe, batch, args)
            bar.update(len(batch))
    logger.info("%d done, %d failed", len(jobs) - failed, failed)
    return EXIT_FAILED if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``run_pipeline.py`` with ``argv`` (default: the command line); returns the exit status."""
    configure_logging()
    try:
        return _run(build_parser().parse_args(argv))
    except CliError as exc:
        logger.error("%s", exc)
        return exc.code
    except torch.cuda.OutOfMemoryError:
        logger.error("Out of GPU memory; try a smaller --batch_size, a shorter --video_length or a lower resolution.")
        return EXIT_FAILED
    except KeyboardInterrupt:
        logger.error("Interrupted.")
        return EXIT_INTERRUPTED
