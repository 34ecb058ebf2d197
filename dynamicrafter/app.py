"""Browser demo: animate an uploaded image with a text prompt (Gradio).

One process serves one model. The page has the generation controls, a video player with a
download button, the seed and time of the last run, a progress bar that follows the sampler,
and example inputs from ``prompts/<model>/`` when that folder ships with the checkout. For the
interpolation model the page instead has an "Interpolation / looping" tab (start and end image).

Everything is served locally: no share link unless asked for, no telemetry, no version check.
The generation endpoints (``/generate``, and ``/interpolate`` for the interpolation model) can
also be called with ``gradio_client``.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .configs import PRESETS, ModelConfig, resolve_resolution
from .hub import CheckpointError
from .pipeline import DynamiCrafterImg2VideoPipeline
from .runtime import configure_logging

logger = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
SAVE_FPS = 8
MAX_STEPS = 60
MAX_FRAMES = 32
DEFAULT_SEED = 123
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP"})
IMAGE_KINDS = "PNG, JPEG, WebP or BMP"
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
MB = 1024 * 1024


@dataclass
class _Controls:
    """The sampling controls shared by both tabs, in the order the handlers take them."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    steps: gr.Slider
    guidance_scale: gr.Slider
    eta: gr.Slider
    frame_stride: gr.Slider
    seed: gr.Number
    random_seed: gr.Checkbox
    num_frames: gr.Slider

    def inputs(self) -> list[gr.components.Component]:
        """The controls as an event's input list."""
        return [self.prompt, self.negative_prompt, self.steps, self.guidance_scale, self.eta,
                self.frame_stride, self.seed, self.random_seed, self.num_frames]


def _fail(message: str) -> gr.Error:
    """A one-sentence error shown in the page (and raised to API clients) without a traceback."""
    return gr.Error(message, print_exception=False)


def _check_range(label: str, value: Any, low: float, high: float) -> float:
    """``value`` as a number within [low, high], or a page error naming the control."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(f"{label} must be a number.") from None
    if not low <= number <= high:
        raise _fail(f"{label} must be between {low:g} and {high:g}.")
    return number


class _VideoMaker:
    """Validates what the page sends, runs the pipeline and writes the MP4."""

    def __init__(self, pipeline: Any, max_upload_mb: float) -> None:
        self.pipeline = pipeline
        self.max_upload_mb = max_upload_mb
        self.out_dir = Path(tempfile.mkdtemp(prefix="dynamicrafter-app-"))
        atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)
        config: ModelConfig = pipeline.config
        if config.fs_kind == "frame_stride":
            self.fs_name, self.fs_hint, self.fs_range = "Frame stride", "larger = more motion", (1, 10)
        else:
            self.fs_name, self.fs_hint, self.fs_range = "FPS", "smaller = more motion", (5, 30)
        self.max_frames = max(MAX_FRAMES, config.unet.temporal_length)

    def load_image(self, payload: Any, noun: str) -> Image.Image:
        """Open an uploaded image (a Gradio file payload), checking its size and format."""
        if not payload:
            raise _fail(f"Please upload the {noun}.")
        path = Path(payload["path"])  # the events skip preprocessing: uploads arrive as file payloads
        if path.stat().st_size > self.max_upload_mb * MB:
            raise _fail(f"The {noun} is larger than the {self.max_upload_mb:g} MB upload limit.")
        try:
            with Image.open(path) as opened:
                if opened.format not in IMAGE_FORMATS:
                    raise _fail(f"The {noun} is a {opened.format} file; please upload a {IMAGE_KINDS} image.")
                return ImageOps.exif_transpose(opened).convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
            raise _fail(f"The {noun} is not a readable image; please upload a {IMAGE_KINDS} file.") from None

    def run(self, image: Image.Image, end_image: Image.Image | None, loop: bool, prompt: Any,
            negative_prompt: Any, steps: Any, guidance_scale: Any, eta: Any, frame_stride: Any,
            seed: Any, random_seed: Any, num_frames: Any, progress: gr.Progress) -> tuple[str, int, str]:
        """Generate one video; returns (mp4 path, seed used, timing message)."""
        steps = int(_check_range("Sampling steps", steps, 1, MAX_STEPS))
        frames = int(_check_range("Number of frames", num_frames, 2 if loop else 1, self.max_frames))
        frame_stride = int(_check_range(self.fs_name, frame_stride, *self.fs_range))
        guidance_scale = _check_range("Guidance scale", guidance_scale, 1.0, 15.0)
        eta = _check_range("ETA", eta, 0.0, 1.0)
        seed = random.randint(0, MAX_SEED) if random_seed else int(_check_range("Seed", seed, 0, MAX_SEED))
        generator = torch.Generator(device=self.pipeline.device).manual_seed(seed)

        def report(step: int, total: int) -> None:
            progress((step, total), desc="Sampling", unit="steps")

        progress(0, desc="Preparing")
        started = time.perf_counter()
        logger.info("Generating %d frames, %d steps, seed %d, prompt %r", frames, steps, seed, prompt)
        try:
            videos = self.pipeline(
                image, prompt=str(prompt or ""), negative_prompt=str(negative_prompt or "") or None,
                num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta,
                frame_stride=frame_stride, num_frames=frames, generator=generator,
                end_image=end_image, callback=report,
            )["videos"]
            if loop:
                videos = videos[:, :-1]  # the last frame repeats the first: drop it to loop seamlessly
            path = self.out_dir / f"{uuid.uuid4().hex}.mp4"
            self.pipeline.save_video(videos, path, fps=SAVE_FPS)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        except Exception:
            logger.exception("Generation failed")
            raise _fail("Generation failed because of an internal error; see the server log.") from None
        elapsed = time.perf_counter() - started
        logger.info("Wrote %s in %.1f s", path, elapsed)
        return str(path), seed, f"Generated {videos.shape[1]} frames in {elapsed:.1f} s"

    def generate(self, image: Any, prompt: Any, negative_prompt: Any, steps: Any,
                 guidance_scale: Any, eta: Any, frame_stride: Any, seed: Any, random_seed: Any,
                 num_frames: Any, progress: gr.Progress = gr.Progress()) -> tuple[str, int, str]:
        """Animate one image (the ``/generate`` endpoint)."""
        return self.run(self.load_image(image, "input image"), None, False, prompt, negative_prompt,
                        steps, guidance_scale, eta, frame_stride, seed, random_seed, num_frames, progress)

    def interpolate(self, start_image: Any, end_image: Any, loop: Any, prompt: Any,
                    negative_prompt: Any, steps: Any, guidance_scale: Any, eta: Any,
                    frame_stride: Any, seed: Any, random_seed: Any, num_frames: Any,
                    progress: gr.Progress = gr.Progress()) -> tuple[str, int, str]:
        """Fill the motion between two images, or loop one (the ``/interpolate`` endpoint)."""
        start = self.load_image(start_image, "start image")
        end = start if loop else self.load_image(end_image, "end image")
        return self.run(start, end, bool(loop), prompt, negative_prompt, steps, guidance_scale, eta,
                        frame_stride, seed, random_seed, num_frames, progress)


def find_examples(config: ModelConfig, examples_dir: str | os.PathLike | None = None) -> list[list[str]]:
    """Example rows ``[image path, prompt]``: the images that have a same-name ``.txt`` prompt.

    The default folder is ``prompts/<model name>/`` of the checkout (``prompts/256`` for a
    custom config); a missing folder gives no examples.
    """
    folder = Path(examples_dir) if examples_dir is not None else (
        PROMPTS_DIR / (config.name if config.name in PRESETS else "256"))
    if not folder.is_dir():
        return []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)
    return [[str(image), image.with_suffix(".txt").read_text(encoding="utf-8").strip()]
            for image in images if image.with_suffix(".txt").is_file()]


def _controls(maker: _VideoMaker, config: ModelConfig, min_frames: int) -> _Controls:
    """Lay out the prompt and sampling controls for one tab (rarely changed ones folded away)."""
    prompt = gr.Textbox(label="Prompt", placeholder="Describe the motion, e.g. 'waves crashing on rocks'",
                        elem_id="prompt")
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, value=50, step=1, label="Sampling steps", elem_id="steps")
        low, high = maker.fs_range
        fs = gr.Slider(low, high, value=min(max(config.default_fs, low), high), step=1,
                       label=f"{maker.fs_name} ({maker.fs_hint})", elem_id="motion")
    with gr.Row():
        frames = gr.Slider(min_frames, maker.max_frames, value=config.unet.temporal_length, step=1,
                           label="Number of frames", elem_id="frames")
        seed = gr.Number(value=DEFAULT_SEED, label="Seed", precision=0, minimum=0, maximum=MAX_SEED,
                         elem_id="seed")
        random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
    with gr.Accordion("Advanced settings", open=False):
        negative = gr.Textbox(value="", label="Negative prompt", placeholder="What to avoid (optional)",
                              elem_id="negative-prompt")
        with gr.Row():
            guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance scale", elem_id="guidance")
            eta = gr.Slider(0.0, 1.0, value=1.0, step=0.1, label="ETA (0 = deterministic sampling)",
                            elem_id="eta")
    return _Controls(prompt, negative, steps, guidance, eta, fs, seed, random_seed, frames)


def _image_input(label: str, elem_id: str) -> gr.Image:
    """An image upload (file or clipboard) handed to the events as a file path."""
    return gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], elem_id=elem_id)


def _outputs() -> tuple[gr.Video, gr.Number, gr.Textbox]:
    """The video player and the seed and timing read-outs."""
    video = gr.Video(label="Generated video", autoplay=True, loop=True, buttons=["download"],
                     interactive=False, elem_id="video")
    with gr.Row():
        seed_used = gr.Number(value=None, label="Seed used", placeholder="shown after a run", precision=0,
                              interactive=False, elem_id="seed-used")
        timing = gr.Textbox(label="Time", interactive=False, elem_id="timing")
    return video, seed_used, timing


def _image_to_video_tab(maker: _VideoMaker, config: ModelConfig, examples: list[list[str]]) -> None:
    """Controls and ``/generate`` event for animating one image."""
    with gr.Row():
        with gr.Column():
            image = _image_input("Input image", "image")
            controls = _controls(maker, config, min_frames=1)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
            outputs = _outputs()
    if examples:
        gr.Examples(examples, inputs=[image, controls.prompt], label="Examples")
    button.click(maker.generate, inputs=[image, *controls.inputs()], outputs=list(outputs),
                 api_name="generate", preprocess=False, show_progress_on=outputs[0],
                 concurrency_limit=1, concurrency_id="pipeline")


def _interpolation_tab(maker: _VideoMaker, config: ModelConfig, examples: list[list[str]]) -> None:
    """Controls and ``/interpolate`` event for two-image interpolation and looping."""
    with gr.Row():
        with gr.Column():
            with gr.Row():
                start = _image_input("Start image", "start-image")
                end = _image_input("End image", "end-image")
            loop = gr.Checkbox(value=False, label="Loop (use the start image as the end image)",
                               elem_id="loop")
            controls = _controls(maker, config, min_frames=2)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
            outputs = _outputs()
    if examples:
        gr.Examples([[image, True, prompt] for image, prompt in examples],
                    inputs=[start, loop, controls.prompt], label="Examples (looping)")
    loop.change(lambda looping: gr.Image(visible=not looping), inputs=loop, outputs=end,
                queue=False, api_visibility="private")
    button.click(maker.interpolate, inputs=[start, end, loop, *controls.inputs()], outputs=list(outputs),
                 api_name="interpolate", preprocess=False, show_progress_on=outputs[0],
                 concurrency_limit=1, concurrency_id="pipeline")


def build_demo(pipeline: Any, examples_dir: str | os.PathLike | None = None, *,
               max_upload_mb: float = 20) -> gr.Blocks:
    """Build the page for one loaded pipeline.

    Args:
        pipeline: a ``DynamiCrafterImg2VideoPipeline`` (anything with its ``config``,
            ``device``, ``__call__`` and ``save_video``).
        examples_dir: folder of example images with same-name ``.txt`` prompts; default
            ``prompts/<model name>/`` of the checkout.
        max_upload_mb: uploads larger than this are refused with a message.
    Returns:
        The Blocks; call ``.queue()`` / ``.launch()`` on it (``main`` does both).
    """
    config: ModelConfig = pipeline.config
    maker = _VideoMaker(pipeline, max_upload_mb)
    examples = find_examples(config, examples_dir)
    with gr.Blocks(title="DynamiCrafter", analytics_enabled=False) as demo:
        gr.Markdown(f"# DynamiCrafter: animate an image\nModel **{config.name}**, "
                    f"{config.width}×{config.height} video. Upload an image, describe the motion "
                    f"and press **Generate**. One video is made at a time; others wait in a queue.")
        if config.interp:
            with gr.Tab("Interpolation / looping"):
                _interpolation_tab(maker, config, examples)
        else:
            _image_to_video_tab(maker, config, examples)
    return demo


def _resolution(value: str) -> str:
    """argparse type: a preset resolution name (aliases such as 320_512 accepted)."""
    try:
        return resolve_resolution(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    """Command-line options of ``dynamicrafter-app``."""
    parser = argparse.ArgumentParser(prog="dynamicrafter-app", description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=_resolution, default="256",
                        help="model: 256, 512, 1024 or 512_interp (default 256)")
    parser.add_argument("--checkpoint", help="model.ckpt / .safetensors (default: the released one)")
    parser.add_argument("--config", help="model config YAML in the original layout")
    parser.add_argument("--device", help="torch device (default cuda:0 when available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest upload in MB (default 20)")
    parser.add_argument("--queue-size", type=int, default=8, help="most waiting requests (default 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Load one model and serve the page until interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging("%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version check from gradio
    try:
        pipeline = DynamiCrafterImg2VideoPipeline(args.res, device=args.device, checkpoint=args.checkpoint,
                                                  config=args.config, dtype=args.dtype)
    except (ValueError, CheckpointError) as exc:  # bad config, missing or undownloadable checkpoint
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    demo = build_demo(pipeline, max_upload_mb=args.max_upload_mb)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=int(args.max_upload_mb * MB), show_error=False, ssr_mode=False)


if __name__ == "__main__":
    main()
