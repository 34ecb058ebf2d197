"""The browser demo's page: animate an uploaded image with a text prompt (Gradio).

One process serves one model. The page has the generation controls, an optional motion mask
(a brush over the input image, or a mask upload; :mod:`dynamicrafter.masks`), a video player with a
download button, the seed and time of the last run, a progress bar that follows the sampler,
and example inputs from ``prompts/<model>/`` when that folder ships with the checkout. For the
interpolation model the page instead has an "Interpolation / looping" tab (start and end image)
and a "Keyframes" tab (several images, one video through all of them). A longer video from one
image comes in chained segments ("Longer video": ``segments``, ``overlap``; the prompt's lines
are the segments' prompts).

Everything is served locally: no share link unless asked for, no telemetry, no version check.
The generation endpoints (``/generate``, and ``/interpolate`` and ``/keyframes`` for the interpolation model) can
also be called with ``gradio_client``. ``dynamicrafter app`` (:mod:`dynamicrafter.app`) checks its
flags, loads the model and serves this page.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import torch
from PIL import Image

from .app import KEEP_MINUTES, MB
from .configs import PRESETS, ModelConfig
from .errors import GenerationError, UserError
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, load_image
from .masks import load_mask
from .options import MAX_FRAMES, MAX_SEED, OPTIONS, Option, check_number, motion_control
from .prompt_schedule import EXAMPLE, parse_prompt
from .request import check_frames, close_loop

logger = logging.getLogger(__name__)

DEFAULT_SEED = OPTIONS["seed"].default
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
#: The sampling controls on the page, in order (the endpoints take them as keyword arguments of
#: these names, the pipeline's): shown, then folded under "Advanced settings".
MAIN_CONTROLS = ("num_inference_steps", "frame_stride", "num_frames", "seed")
ADVANCED_CONTROLS = ("negative_prompt", "guidance_scale", "image_guidance_scale", "sampler", "eta", "fps",
                     "augmentation_level")
#: Shown only when the app loaded a ControlNet or sketch encoder (``--control``): its strength and steps.
CONTROL_CONTROLS = ("control_scale", "control_start", "control_end")
#: FreeNoise's windows: shown only while the frame count is above the model's trained length.
WINDOW_CONTROLS = ("window_size", "window_stride")
#: The leakage-free start (Zhao et al. 2024), a row of its own under "Advanced settings".
LEAKAGE_CONTROLS = ("start_step", "analytic_init", "analytic_init_path")
CONTROLS = (*MAIN_CONTROLS, *ADVANCED_CONTROLS, *WINDOW_CONTROLS, *LEAKAGE_CONTROLS)
#: Chained segments of ``/generate`` (folded under "Longer video") and the keyframe cut of ``/keyframes``.
SEGMENT_CONTROLS = ("segments", "overlap")
KEYFRAME_CONTROLS = ("cut_near_keyframes",)
#: The start/end image embedding mix of ``/interpolate``.
INTERP_CONTROLS = ("image_embed_ratio",)


def _fail(message: str) -> gr.Error:
    """A one-sentence error shown in the page (and raised to API clients) without a traceback."""
    return gr.Error(message, print_exception=False)


def _slider(option: Option, config: ModelConfig) -> tuple[str, tuple[float, float, float]]:
    """The label and ``(low, high, step)`` of an option's slider for this model."""
    if option.name == "frame_stride":
        name, hint, ui = motion_control(config)
        return f"{name} ({hint})", ui
    if option.name == "num_frames":
        low, high, step = option.ui or (1, MAX_FRAMES, 1)
        return option.label, (low, max(high, config.unet.temporal_length), step)
    if option.name == "start_step":
        return option.label, (1, config.diffusion.timesteps, 1)
    return option.label, option.ui or (option.minimum or 0, option.maximum or 100, 1)


class _VideoMaker:
    """Validates what the page sends, runs the pipeline and hands the MP4 to Gradio's cache."""

    def __init__(self, pipeline: Any, max_upload_mb: float) -> None:
        self.pipeline = pipeline
        self.config: ModelConfig = pipeline.config
        self.max_upload_mb = max_upload_mb
        self.cache_dir: str | None = None  # Gradio's file cache, set when the page is built

    def load_image(self, payload: Any, noun: str, loader: Any = load_image) -> Image.Image:
        """Read an uploaded image (a Gradio file payload) with the project's one image loader (or ``loader``)."""
        if not payload:
            raise _fail(f"Please upload the {noun}.")
        path = payload.get("path") if isinstance(payload, dict) else None
        if not path:  # e.g. a payload with only a URL: nothing is fetched on the client's behalf
            raise _fail(f"Please upload the {noun} as a file.")
        try:
            size = Path(path).stat().st_size
        except OSError:
            raise _fail(f"Please upload the {noun} again; the upload is gone.") from None
        if size > self.max_upload_mb * MB:
            raise _fail(f"The {noun} is larger than the {self.max_upload_mb:g} MB upload limit.")
        try:
            return loader(path, f"The {noun}")
        except UserError as exc:
            raise _fail(str(exc)) from None

    def check(self, values: dict[str, Any], mode: str) -> dict[str, Any]:
        """The controls' values checked against the page's ranges and the request rules of ``mode``.

        A page error names the control.
        """
        checked: dict[str, Any] = {}
        optional = (*SEGMENT_CONTROLS, *KEYFRAME_CONTROLS, *INTERP_CONTROLS)  # the tabs' own controls
        for name in (*CONTROLS, *(n for n in optional if n in values)):
            option, value = OPTIONS[name], values[name]
            if option.type is bool:  # a checkbox
                checked[name] = bool(value)
                continue
            label, (low, high, _) = _slider(option, self.config)
            if option.choices is not None:
                try:
                    checked[name] = option.check(value, label.lower())
                except UserError as exc:
                    raise _fail(str(exc)) from None
                continue
            if option.type is str:
                checked[name] = str(value or "") or None
                continue
            if name == "seed":
                label, (low, high) = "Seed", (0, MAX_SEED)
            if isinstance(value, float) and value.is_integer() and option.type is int:
                value = int(value)  # numbers arrive from the page as JSON
            try:
                checked[name] = check_number(value, label.split(" (")[0], integer=option.type is int,
                                             minimum=low, maximum=high)
            except UserError as exc:
                raise _fail(str(exc)) from None
        if checked.get("image_guidance_scale") == 0:  # the slider's "off"
            checked["image_guidance_scale"] = None
        try:
            check_frames(self.config, checked["num_frames"], mode, OPTIONS["num_frames"].label)
        except UserError as exc:
            raise _fail(str(exc)) from None
        return checked

    def run(self, image: Image.Image | None, end_image: Image.Image | None, mode: str, prompt: Any,
            values: dict[str, Any], random_seed: Any, progress: gr.Progress, **extra: Any) -> tuple[str, int, str]:
        """Generate one video of ``mode`` (see :data:`~dynamicrafter.request.MODES`); ``extra``: more pipeline keywords.

        ``extra`` may hold the pipeline's keyframe keywords (``keyframes``, ``loop``). With chained
        segments or keyframes, each non-empty line of the prompt is one piece's prompt.
        Returns (mp4 path in Gradio's cache, seed used, timing message).
        """
        control = self.control_kwargs(values)
        settings = self.check(values, mode)
        text = str(prompt or "")
        if settings.get("segments", 1) > 1 or "keyframes" in extra:
            prompt = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        settings.update(control)
        seed = random.randint(0, MAX_SEED) if random_seed else settings.pop("seed")
        settings.pop("seed", None)
        fps = settings.pop("fps")
        generator = torch.Generator(device=self.pipeline.device).manual_seed(seed)

        def report(step: int, total: int) -> None:
            progress((step, total), desc="Sampling", unit="steps")

        progress(0, desc="Preparing")
        started = time.perf_counter()
        logger.info("Generating %d frames, %d steps, seed %d, prompt %r", settings["num_frames"],
                    settings["num_inference_steps"], seed, prompt)
        try:
            videos = self.pipeline(image, prompt=prompt if isinstance(prompt, list) else parse_prompt(text),
                                   generator=generator, end_image=end_image, callback=report, **extra,
                                   **settings)["videos"]
            if mode == "loop":
                videos = close_loop(videos)
            path = self._publish(videos, fps)
        except (UserError, GenerationError) as exc:
            raise _fail(str(exc)) from None
        except Exception:
            logger.exception("Generation failed")
            raise _fail("Generation failed because of an internal error; see the server log.") from None
        elapsed = time.perf_counter() - started
        logger.info("Wrote %s in %.1f s", path, elapsed)
        return path, seed, f"Generated {videos.shape[1]} frames in {elapsed:.1f} s"

    def _publish(self, videos: Any, fps: int) -> str:
        """Write the MP4 once, straight into Gradio's cache (where ``delete_cache`` ages it out)."""
        from gradio.processing_utils import save_file_to_cache

        with tempfile.TemporaryDirectory(dir=self.cache_dir) as staging:
            written = self.pipeline.save_video(videos, Path(staging) / f"{uuid.uuid4().hex}.mp4", fps=fps)
            # Gradio moves what an event returns into its cache; putting it there first (the same
            # content-addressed place) means the output is never copied a second time.
            return save_file_to_cache(written, self.cache_dir or tempfile.gettempdir())

    def generate(self, image: Any, prompt: Any, random_seed: Any, progress: gr.Progress, mask: Any = None,
                 **values: Any) -> tuple[str, int, str]:
        """Animate one image (the ``/generate`` endpoint); ``mask``: an optional motion mask upload."""
        picture = self.load_image(image, "input image")
        motion = self.load_motion_mask(mask, picture.size)
        extra = {} if motion is None else {"mask": motion}
        return self.run(picture, None, "single", prompt, values, random_seed, progress, **extra)

    def load_motion_mask(self, payload: Any, size: tuple[int, int]) -> Image.Image | None:
        """The motion mask of the page's mask editor, or ``None`` when it is empty.

        Painted strokes are what moves and the rest is still (the editor's background, e.g. the
        input image, is only a guide to paint over); the painting is stretched to the input
        image's ``size`` (width, height), nearest-neighbour. With nothing painted the uploaded
        image is the mask itself (black is still, any other value moves; its size is checked as
        the pipeline's ``mask``; see :mod:`dynamicrafter.masks`).
        """
        if not payload:
            return None
        if isinstance(payload, dict) and ("layers" in payload or "background" in payload):
            for layer in payload.get("layers") or []:
                painted = self._painted(layer)
                if painted is not None:
                    return painted.resize(size, Image.NEAREST)
            payload = payload.get("background")
            if not payload:
                return None
        return self.load_image(payload, "motion mask", load_mask)

    def _painted(self, layer: Any) -> Image.Image | None:
        """A brush layer as a mask (painted pixels move, 255; the rest is still, 0), or ``None`` if unpainted."""
        path = layer.get("path") if isinstance(layer, dict) else None
        if not path:
            return None
        try:
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise _fail("The motion mask is too large.")
                alpha = opened.convert("RGBA").getchannel("A")
        except OSError:
            raise _fail("The motion mask's brush layer cannot be read; draw it again.") from None
        if alpha.getbbox() is None:  # nothing painted
            return None
        return alpha.point(lambda value: 255 if value else 0)

    def control_kwargs(self, values: dict[str, Any]) -> dict[str, Any]:
        """Pop the control inputs from ``values``: the pipeline's ``control_images`` and strengths (see docs/control.md).

        ``control_files_<i>`` (ControlNet ``i``): uploaded images (one for every frame, one per
        frame in upload order, or named by frame number: ``0.png``, ``15.png``) or one line-art
        video. No upload: that ControlNet is left out of the call (with none, no control).
        """
        from .control_images import VIDEO_EXTENSIONS, read_video_frames

        count = len(getattr(self.pipeline, "controlnets", []))
        uploads = [values.pop(f"control_files_{i}", None) or [] for i in range(count)]
        settings = {name: values.pop(name) for name in CONTROL_CONTROLS if name in values}
        settings = {name: value for name, value in settings.items() if value is not None}  # left out by an API client
        if not any(uploads):
            return {}
        if not all(uploads):
            raise _fail("Upload control images for every loaded ControlNet, or none.")
        images = []
        for files in uploads:
            paths = [Path(f.get("path") if isinstance(f, dict) else f) for f in (files if isinstance(files, list)
                                                                             else [files])]
            for path in paths:
                if path.stat().st_size > self.max_upload_mb * MB:
                    raise _fail(f"The control file {path.name} is larger than the {self.max_upload_mb:g} MB upload "
                                "limit.")
            try:
                if len(paths) == 1 and paths[0].suffix.lower() in VIDEO_EXTENSIONS:
                    images.append(read_video_frames(paths[0]))
                elif len(paths) > 1 and all(p.stem.isdigit() for p in paths):
                    images.append({int(p.stem): p for p in paths})
                else:
                    images.append(paths[0] if len(paths) == 1 else paths)
            except UserError as exc:
                raise _fail(str(exc)) from None
        return {"control_images": images[0] if count == 1 else images, **settings}


    def interpolate(self, start_image: Any, end_image: Any, loop: Any, prompt: Any, random_seed: Any,
                    progress: gr.Progress, image_embed_ratio: Any = OPTIONS["image_embed_ratio"].default,
                    **values: Any) -> tuple[str, int, str]:
        """Fill the motion between two images, or loop one (the ``/interpolate`` endpoint)."""
        start = self.load_image(start_image, "start image")
        end = start if loop else self.load_image(end_image, "end image")
        if image_embed_ratio is not None:  # optional for API clients
            values["image_embed_ratio"] = image_embed_ratio
        return self.run(start, end, "loop" if loop else "interp", prompt, values, random_seed, progress)


    def keyframes(self, keyframes: Any, loop: Any, prompt: Any, random_seed: Any, progress: gr.Progress,
                  **values: Any) -> tuple[str, int, str]:
        """One video through several keyframes in the order of their file names (the ``/keyframes`` endpoint)."""
        files = keyframes if isinstance(keyframes, list) else [keyframes] if keyframes else []
        if not files:
            raise _fail("Please upload the keyframes.")
        files = sorted(files, key=lambda f: str(f.get("orig_name") or Path(f.get("path") or "").name)
                       if isinstance(f, dict) else "")
        images = [self.load_image(f, f"keyframe {i + 1}") for i, f in enumerate(files)]
        return self.run(None, None, "interp", prompt, values, random_seed, progress, keyframes=images,
                        loop=bool(loop))


def _endpoint(method: Any, leading: Sequence[str], controls: Sequence[str] = CONTROLS,
              trailing: Sequence[str] = ()) -> Any:
    """``method`` as an event function whose parameters are ``leading``, ``controls``, ``random_seed`` and ``trailing``.

    The ``trailing`` parameters are optional for API clients (default ``None``).

    Gradio names an endpoint's API parameters after the function's; giving the function the
    controls' option names makes ``client.predict(num_inference_steps=25, ...)`` work.
    """
    names = [*leading, *controls, "random_seed", *trailing]

    def event(*args: Any, progress: gr.Progress = gr.Progress()) -> tuple[str, int, str]:
        values = dict(zip(names, args))
        fixed = {name: values.pop(name) for name in (*leading, "random_seed")}
        return method(*(fixed[name] for name in leading), random_seed=fixed["random_seed"], progress=progress,
                      **values)

    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    **({"default": None} if name in trailing else {})) for name in names]
    parameters.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress()))
    event.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    event.__doc__ = method.__doc__
    return event


def find_examples(config: ModelConfig, examples_dir: str | os.PathLike | None = None) -> list[list[str]]:
    """Example rows ``[image path, prompt]``: the images that have a same-name ``.txt`` prompt.

    The default folder is ``prompts/<model name>/`` of the checkout (``prompts/256`` for a
    custom config); a missing folder gives no examples.
    """
    folder = Path(examples_dir) if examples_dir is not None else (
        PROMPTS_DIR / (config.name if config.name in PRESETS else "256"))
    if not folder.is_dir():
        return []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [[str(image), image.with_suffix(".txt").read_text(encoding="utf-8").strip()]
            for image in images if image.with_suffix(".txt").is_file()]


def _control(option: Option, config: ModelConfig) -> gr.components.Component:
    """The page control of one option, from the options table."""
    elem_id = option.name.replace("_", "-")
    if option.name == "seed":
        return gr.Number(value=option.default, label="Seed", precision=0, minimum=0, maximum=MAX_SEED,
                         elem_id=elem_id)
    if option.choices is not None:
        return gr.Dropdown(list(option.choices), value=option.default, label=option.label, elem_id=elem_id)
    if option.type is bool:
        return gr.Checkbox(value=option.default, label=option.label, elem_id=elem_id)
    if option.name == "analytic_init_path":
        return gr.Textbox(value="", label=option.label, placeholder="e.g. checkpoints/initial_noise_512.pt "
                          "(empty = the authors' file of the 512 or 1024 model)", elem_id=elem_id)
    if option.type is str:
        return gr.Textbox(value="", label=option.label, placeholder="What to avoid (optional)", elem_id=elem_id)
    label, (low, high, step) = _slider(option, config)
    default = config.default_fs if option.name == "frame_stride" else option.default or 0
    if option.name in ("num_frames", "window_size"):
        default = config.unet.temporal_length
    if option.name == "start_step":  # the model's last timestep: the usual start
        default = config.diffusion.timesteps
    elif option.name == "overlap":
        default = 1  # the pipeline's default: the frame two segments share
    return gr.Slider(low, high, value=min(max(default, low), high), step=step, label=label, elem_id=elem_id)


def _controls(config: ModelConfig) -> tuple[gr.Textbox, list[gr.components.Component], gr.Checkbox]:
    """Lay out the prompt and the sampling controls (rarely changed ones folded away), in ``CONTROLS`` order."""
    prompt = gr.Textbox(label="Prompt", placeholder="Describe the motion, e.g. 'waves crashing on rocks'",
                        elem_id="prompt", info=f"Several prompts over time: '{EXAMPLE}' (frame: prompt)")
    controls: dict[str, gr.components.Component] = {}
    with gr.Row():
        for name in MAIN_CONTROLS[:2]:
            controls[name] = _control(OPTIONS[name], config)
    with gr.Row():
        for name in MAIN_CONTROLS[2:]:
            controls[name] = _control(OPTIONS[name], config)
        random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
    trained = config.unet.temporal_length
    with gr.Row(visible=False, elem_id="windows") as windows:
        for name in WINDOW_CONTROLS:
            controls[name] = _control(OPTIONS[name], config)
    controls["num_frames"].change(lambda frames: gr.Row(visible=(frames or 0) > trained), inputs=controls["num_frames"],
                                  outputs=windows, queue=False, api_visibility="private")
    with gr.Accordion("Advanced settings", open=False):
        controls["negative_prompt"] = _control(OPTIONS["negative_prompt"], config)
        for row in (ADVANCED_CONTROLS[1:3], ADVANCED_CONTROLS[3:]):
            with gr.Row():
                for name in row:
                    controls[name] = _control(OPTIONS[name], config)
        with gr.Row(elem_id="leakage-free-start"):
            for name in LEAKAGE_CONTROLS:
                controls[name] = _control(OPTIONS[name], config)
    return prompt, [controls[name] for name in CONTROLS], random_seed


def _control_inputs(pipeline: Any, config: ModelConfig) -> tuple[list[str], list[gr.components.Component]]:
    """The control uploads (one per loaded ControlNet) and strength sliders, with their endpoint names; none
    without a ControlNet."""
    from .control import is_sketch_encoder

    nets = getattr(pipeline, "controlnets", [])
    if not nets:
        return [], []
    names, inputs = [], []
    with gr.Accordion("Control images", open=True):
        for i, net in enumerate(nets):
            what = ("Sketches (line art, dark on light): one per key frame named by frame number (0.png, 15.png), "
                    "one per frame, or a line-art video" if is_sketch_encoder(net) else
                    "Control maps (depth, edges, ...): one for all frames, one per frame, files named by frame "
                    "number, or a video")
            names.append(f"control_files_{i}")
            inputs.append(gr.File(file_count="multiple", label=f"{what} (ControlNet {i + 1})",
                                  elem_id=f"control-files-{i}"))
        with gr.Row():
            for name in CONTROL_CONTROLS:
                names.append(name)
                inputs.append(_control(OPTIONS[name], config))
    return names, inputs


def _image_input(label: str, elem_id: str) -> gr.Image:
    """An image upload (file or clipboard) handed to the events as a file path."""
    return gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], elem_id=elem_id)


def _mask_input(config: ModelConfig) -> gr.ImageMask:
    """The optional motion mask, folded: paint in white what moves (over the input image, uploaded), or upload a mask."""
    with gr.Accordion("Motion mask (optional): hold parts of the image still", open=False):
        return gr.ImageMask(label="Motion mask (optional): paint what moves", type="filepath",
                            sources=["upload", "clipboard"], brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                            transforms=(), layers=False, canvas_size=(config.width, config.height), elem_id="mask")


def _outputs() -> tuple[gr.Video, gr.Number, gr.Textbox]:
    """The video player and the seed and timing read-outs."""
    video = gr.Video(label="Generated video", autoplay=True, loop=True, buttons=["download"],
                     interactive=False, elem_id="video")
    with gr.Row():
        seed_used = gr.Number(value=None, label="Seed used", placeholder="shown after a run", precision=0,
                              interactive=False, elem_id="seed-used")
        timing = gr.Textbox(label="Time", interactive=False, elem_id="timing")
    return video, seed_used, timing


def _image_to_video_tab(maker: _VideoMaker, config: ModelConfig, examples: list[list[str]]) -> gr.Video:
    """Controls and ``/generate`` event for animating one image; returns the video output."""
    with gr.Row():
        with gr.Column():
            image = _image_input("Input image", "image")
            prompt, controls, random_seed = _controls(config)
            segments = _extra_controls("Longer video (chained segments; one prompt line per segment)",
                                       SEGMENT_CONTROLS, config)
            mask = _mask_input(config)
            extra, extra_inputs = _control_inputs(maker.pipeline, config)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
            outputs = _outputs()
    if examples:
        gr.Examples(examples, inputs=[image, prompt], label="Examples")
    button.click(_endpoint(maker.generate, ("image", "prompt"), (*CONTROLS, *SEGMENT_CONTROLS), ("mask", *extra)),
                 inputs=[image, prompt, *controls, *segments, random_seed, mask, *extra_inputs],
                 outputs=list(outputs), api_name="generate", preprocess=False, show_progress_on=outputs[0],
                 concurrency_limit=1, concurrency_id="pipeline")
    return outputs[0]


def _interpolation_tab(maker: _VideoMaker, config: ModelConfig, examples: list[list[str]]) -> gr.Video:
    """Controls and ``/interpolate`` event for two-image interpolation and looping; returns the video output."""
    with gr.Row():
        with gr.Column():
            with gr.Row():
                start = _image_input("Start image", "start-image")
                end = _image_input("End image", "end-image")
            loop = gr.Checkbox(value=False, label="Loop (use the start image as the end image)",
                               elem_id="loop")
            prompt, controls, random_seed = _controls(config)
            ratio = _control(OPTIONS["image_embed_ratio"], config)
            extra, extra_inputs = _control_inputs(maker.pipeline, config)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
            outputs = _outputs()
    if examples:
        gr.Examples([[image, True, text] for image, text in examples],
                    inputs=[start, loop, prompt], label="Examples (looping)")
    loop.change(lambda looping: gr.Image(visible=not looping), inputs=loop, outputs=end,
                queue=False, api_visibility="private")
    button.click(_endpoint(maker.interpolate, ("start_image", "end_image", "loop", "prompt"), CONTROLS,
                           (*INTERP_CONTROLS, *extra)),
                 inputs=[start, end, loop, prompt, *controls, random_seed, ratio, *extra_inputs], outputs=list(outputs),
                 api_name="interpolate", preprocess=False, show_progress_on=outputs[0],
                 concurrency_limit=1, concurrency_id="pipeline")
    return outputs[0]


def _extra_controls(title: str, names: Sequence[str], config: ModelConfig) -> list[gr.components.Component]:
    """Sliders of ``names`` folded under ``title``."""
    with gr.Accordion(title, open=False), gr.Row():
        return [_control(OPTIONS[name], config) for name in names]


def _keyframes_tab(maker: _VideoMaker, config: ModelConfig) -> gr.Video:
    """Controls and ``/keyframes`` event: one video through several keyframes; returns the video output."""
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Keyframes (two or more images of one size, in file-name order)",
                            file_count="multiple", file_types=["image"], elem_id="keyframes")
            loop = gr.Checkbox(value=False, label="Loop (back to the first keyframe)", elem_id="keyframes-loop")
            prompt, controls, random_seed = _controls(config)
            cut = _control(OPTIONS["cut_near_keyframes"], config)
            button = gr.Button("Generate", variant="primary", elem_id="generate-keyframes")
        with gr.Column():
            outputs = _outputs()
    button.click(_endpoint(maker.keyframes, ("keyframes", "loop", "prompt"), (*CONTROLS, *KEYFRAME_CONTROLS)),
                 inputs=[files, loop, prompt, *controls, cut, random_seed], outputs=list(outputs),
                 api_name="keyframes", preprocess=False, show_progress_on=outputs[0],
                 concurrency_limit=1, concurrency_id="pipeline")
    return outputs[0]


def build_demo(pipeline: Any, examples_dir: str | os.PathLike | None = None, *,
               max_upload_mb: float = 20, keep_minutes: float = KEEP_MINUTES) -> gr.Blocks:
    """Build the page for one loaded pipeline.

    Args:
        pipeline: a ``DynamiCrafterImg2VideoPipeline`` (anything with its ``config``,
            ``device``, ``__call__`` and ``save_video``).
        examples_dir: folder of example images with same-name ``.txt`` prompts; default
            ``prompts/<model name>/`` of the checkout.
        max_upload_mb: uploads larger than this are refused with a message.
        keep_minutes: uploads and generated videos are deleted this long after they were made
            (checked every ``keep_minutes / 4`` minutes, at most every 10 minutes).
    Returns:
        The Blocks; call ``.queue()`` / ``.launch()`` on it (``main`` does both).
    """
    config: ModelConfig = pipeline.config
    maker = _VideoMaker(pipeline, max_upload_mb)
    examples = find_examples(config, examples_dir)
    age = max(1, int(keep_minutes * 60))
    with gr.Blocks(title="DynamiCrafter", analytics_enabled=False,
                   delete_cache=(max(1, min(600, age // 4)), age)) as demo:
        gr.Markdown(f"# DynamiCrafter: animate an image\nModel **{config.name}**, "
                    f"{config.width}×{config.height} video. Upload an image, describe the motion "
                    f"and press **Generate**. One video is made at a time; others wait in a queue.")
        if config.interp:
            with gr.Tab("Interpolation / looping"):
                video = _interpolation_tab(maker, config, examples)
            with gr.Tab("Keyframes"):
                _keyframes_tab(maker, config)
        else:
            video = _image_to_video_tab(maker, config, examples)
    maker.cache_dir = video.GRADIO_CACHE
    return demo
