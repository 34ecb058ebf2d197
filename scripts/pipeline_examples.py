#!/usr/bin/env python3
"""Runnable examples of the DynamiCrafterImg2VideoPipeline Python API, one function each.

    python scripts/pipeline_examples.py                    # every example with the 256 model
    python scripts/pipeline_examples.py --steps 10 --device cpu --output_dir /tmp/examples

The model is downloaded to checkpoints/ on first use, as the pipeline always does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from dynamicrafter.errors import UserError  # noqa: E402
from dynamicrafter.images import load_image  # noqa: E402
from scripts.gradio.dynamicrafter_pipeline import DynamiCrafterImg2VideoPipeline  # noqa: E402

logger = logging.getLogger("pipeline_examples")


@dataclass
class Example:
    """What every example shares: the pipeline, an input image and the run's settings."""

    pipe: DynamiCrafterImg2VideoPipeline
    image: Image.Image
    prompt: str
    steps: int
    height: int
    width: int
    seed: int
    output_dir: Path

    @property
    def frames(self) -> int:
        """The clip length the model was trained on (16 for the released models)."""
        return self.pipe.config.unet.temporal_length

    def generator(self) -> torch.Generator:
        """A fresh generator, so that each example is reproducible on its own."""
        return torch.Generator(device=self.pipe.device).manual_seed(self.seed)

    def options(self) -> dict[str, Any]:
        """This run's steps, frames and size, and a fresh generator: the same in every example."""
        return dict(num_inference_steps=self.steps, num_frames=self.frames, height=self.height, width=self.width,
                    generator=self.generator())

    def save(self, videos: torch.Tensor, name: str) -> None:
        """Write ``videos[0]`` to ``output_dir/name`` (MP4 or GIF, by the extension)."""
        self.pipe.save_video(videos, self.output_dir / name, fps=8)


def basic(ex: Example) -> None:
    """One image and one prompt; everything else at the model's defaults."""
    result = ex.pipe(image=ex.image, prompt=ex.prompt, **ex.options())
    ex.save(result["videos"], "basic.mp4")


def with_negative_prompt(ex: Example) -> None:
    """Steer away from what the video should not look like."""
    result = ex.pipe(image=ex.image, prompt=ex.prompt, negative_prompt="blurry, low quality, static", **ex.options())
    ex.save(result["videos"], "negative_prompt.mp4")


def custom_settings(ex: Example) -> None:
    """Every sampling knob of the usage guide spelled out."""
    config = ex.pipe.config
    result = ex.pipe(
        image=ex.image,
        prompt=ex.prompt,
        negative_prompt="blurry, low quality",
        num_inference_steps=ex.steps,  # DDIM steps
        guidance_scale=9.0,  # stronger text guidance than the default 7.5
        eta=0.0,  # deterministic DDIM
        frame_stride=config.default_fs,  # 256 model: frame stride; 512/1024: frames per second
        num_frames=ex.frames,
        height=ex.height,  # multiples of 64; the model's own size by default
        width=ex.width,
        generator=ex.generator(),
        return_dict=True,
    )
    ex.save(result["videos"], "custom_settings.mp4")


def batch(ex: Example) -> None:
    """Several images in one call, one prompt each; video i belongs to image i."""
    images = [ex.image, ImageOps.mirror(ex.image)]
    prompts = [ex.prompt, f"{ex.prompt}, seen in a mirror"]
    videos = ex.pipe(image=images, prompt=prompts, **ex.options())["videos"]
    for index in range(len(images)):
        ex.save(videos[index : index + 1], f"batch_{index}.mp4")


def mp4_and_gif(ex: Example) -> None:
    """The same video as an H.264 MP4 and as a looping GIF."""
    videos = ex.pipe(image=ex.image, prompt=ex.prompt, **ex.options())["videos"]
    ex.save(videos, "video.mp4")
    ex.save(videos, "video.gif")


def other_output_types(ex: Example) -> None:
    """output_type="np" returns numpy frames; "latent" skips decoding and returns the latents."""
    for output_type in ("np", "latent"):
        videos = ex.pipe(image=ex.image, prompt=ex.prompt, output_type=output_type, **ex.options())["videos"]
        logger.info("output_type=%r: %s of shape %s", output_type, type(videos).__name__, tuple(videos.shape))


EXAMPLES: tuple[Callable[[Example], None], ...] = (
    basic, with_negative_prompt, custom_settings, batch, mp4_and_gif, other_output_types,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: which model, where it runs, how many steps, where videos go."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="256", help="model: 256, 512, 1024 or 512_interp (default: 256)")
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint (default: downloaded to checkpoints/)")
    parser.add_argument("--config", type=Path, help="model config YAML in the original layout (default: the preset)")
    parser.add_argument("--device", help="torch device (default: cuda:0, or cpu without CUDA)")
    parser.add_argument("--num_inference_steps", "--steps", dest="steps", type=int, default=50,
                        help="sampling steps of every example (default: 50)")
    parser.add_argument("--height", type=int, help="video height, a multiple of 64 (default: the model's)")
    parser.add_argument("--width", type=int, help="video width, a multiple of 64 (default: the model's)")
    parser.add_argument("--seed", type=int, default=123, help="random seed (default: 123)")
    parser.add_argument("--image", type=Path, default=ROOT / "prompts" / "256" / "cat.png", help="input image")
    parser.add_argument("--prompt", default="a cat turning its head and blinking", help="prompt for the image")
    parser.add_argument("--output_dir", type=Path, default=Path("results") / "pipeline_examples",
                        help="where the videos go (default: results/pipeline_examples)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--num_inference_steps must be at least 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every example; returns the exit status (1 with a one-line error for a user mistake)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        picture = load_image(args.image)  # the project's one loader: EXIF orientation, bit depths, alpha
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    try:
        pipe = DynamiCrafterImg2VideoPipeline(resolution=args.resolution, device=args.device,
                                              checkpoint=args.checkpoint, config=args.config)
        ex = Example(pipe, picture, args.prompt, args.steps, args.height or pipe.config.height,
                     args.width or pipe.config.width, args.seed, args.output_dir)
        for example in EXAMPLES:
            logger.info("Example %s: %s", example.__name__, example.__doc__.splitlines()[0])
            example(ex)
    except UserError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
