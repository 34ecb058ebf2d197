"""Command line: ``run_pipeline.py <resolution> [options]`` turns still images into videos.

The images come from ``--image_path`` or from every image in ``--prompt_dir`` (one video per
image, per pair with ``--interp``, a looping video per image with ``--loop``); each gets a
prompt and becomes ``<output_dir>/<image stem>.mp4``. Under ``torchrun`` the videos are shared
out over the processes. docs/cli.md describes every option, how prompts are found, how videos
are named, seeds, resuming and the exit codes.

``dynamicrafter`` with no command name runs this too (see :mod:`dynamicrafter.__main__`).

A run is checked before anything heavy is imported: the arguments, the model's config and the
request rules, the images and prompts, and which videos are already made (a complete video of
the expected frame count is skipped). torch and the model are loaded only when something is
left to make, so a mistake or a finished run answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import distributed
from .configs import ModelConfig, model_config
from .errors import GenerationError, UserError
from .files import missing_folders, remove_empty
from .frontend import (
    EXIT_FAILED,
    EXIT_USAGE,
    CliError,
    Parser,
    add_model_choice,
    build_pipeline,
    chosen_model,
    configure_logging,
    run_command,
)
from .images import load_image
from .jobs import PROMPT_LIST_NAME, Job, find_images, make_jobs, make_sequence_jobs
from .manifest import MANIFEST_NAME, append_record
from .masks import load_mask
from .options import CALL_OPTIONS, OPTIONS, SAMPLING_OPTIONS, add_arguments, add_model_arguments
from .prompt_schedule import EXAMPLE, check_schedule, parse_prompt
from .request import (
    check_frames,
    check_keyframe_sizes,
    check_keyframes,
    check_mode,
    check_segments,
    check_start_step,
    check_windows,
    close_loop,
    default_overlap,
    joined_frames,
    model_defaults,
)
from .video import is_complete_video

if TYPE_CHECKING:
    import torch

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

#: Options handed as they are to every pipeline call (the jobs give the prompts, seeds and samples).
PIPELINE_OPTIONS = tuple(name for name in CALL_OPTIONS if name not in ("num_videos_per_prompt", "negative_prompt"))
#: The original's application defaults (run_application.sh): seed per mode.
MODE_SEEDS = {"interp": 12306, "loop": 234}


def build_parser(prog: str = "run_pipeline.py", usage: str | None = None,
                 description: str = "Animate images with a DynamiCrafter model; see docs/cli.md.") -> argparse.ArgumentParser:
    """The parser of ``run_pipeline.py``; names and defaults follow the usage guide.

    ``prog``, ``usage`` and ``description`` are how the ``dynamicrafter`` command shows it, with its other commands.
    """
    parser = Parser(prog=prog, usage=usage, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_choice(parser)
    add_arguments(parser, [o.name for o in SAMPLING_OPTIONS], defaults={"seed": None},
                  shown={"seed": "123; 12306 with --interp, 234 with --loop, as the original"})
    inputs = parser.add_argument_group("inputs and outputs")
    inputs.add_argument("--prompt_dir", type=Path, help="folder of input images and prompts (default: prompts/<resolution>/)")
    inputs.add_argument("--output_dir", type=Path,
                        help="where videos go (default: results/dynamicrafter_pipeline_<resolution>_seed<seed>/)")
    inputs.add_argument("--image_path", type=Path, help="animate this one image instead of --prompt_dir")
    inputs.add_argument("--prompt_text", help="prompt for every image, instead of the prompt files; "
                        f"'{EXAMPLE}' is several prompts over time (so is such a line in a prompt file)")
    mode = inputs.add_mutually_exclusive_group()
    mode.add_argument("--interp", action="store_true",
                      help="interpolation model: one video between each pair of consecutive images")
    mode.add_argument("--loop", action="store_true", help="interpolation model: one looping video per image")
    inputs.add_argument("--mask", type=Path, metavar="FILE",
                        help="motion mask for every image: a greyscale image of the images' size or aspect ratio; "
                             "black is held to the image, any other value moves (see docs/control.md)")
    inputs.add_argument("--keyframes", type=Path, nargs="+", metavar="IMAGE",
                        help="interpolation model: one video through these keyframes, in order, named after the "
                             "first (with --loop back to the first); see docs/long-videos.md")
    inputs.add_argument("--sequence", action="store_true",
                        help="with --interp or --loop: one video through every image of --prompt_dir in sorted "
                             "order as keyframes, named after the folder, instead of one video per pair or image")
    add_arguments(inputs, ["batch_size"])
    inputs.add_argument("--control", type=Path, action="append", metavar="FILE",
                        help="a ControlNet (Stable Diffusion 2.1, original or diffusers layout) or ToonCrafter's "
                             "sketch_encoder.ckpt; repeat for several (their residuals add up); needs --control_dir")
    inputs.add_argument("--control_dir", type=Path, action="append", metavar="DIR",
                        help="the control images, one --control_dir per --control: for image cat.png, DIR/cat/ "
                             "(one image per frame, or files named by frame number), DIR/cat.mp4 (a line-art video) "
                             "or DIR/cat.png (every frame); see docs/control.md")
    inputs.add_argument("--overwrite", action="store_true", help="make videos again even if their files exist")
    add_model_arguments(parser.add_argument_group("model and hardware"))
    return parser


def _mode(args: argparse.Namespace) -> str:
    if args.keyframes and not args.loop:
        return "interp"
    return "interp" if args.interp else "loop" if args.loop else "single"


def _keyframed(args: argparse.Namespace) -> bool:
    """Whether the run makes one keyframe sequence (``--keyframes``, or ``--sequence`` over a folder)."""
    return bool(args.keyframes) or args.sequence


def _model_config(args: argparse.Namespace) -> ModelConfig:
    try:
        return model_config(args.resolution, args.config)
    except UserError as exc:
        raise CliError(str(exc)) from None


def _defaults(args: argparse.Namespace, mode: str) -> tuple[int, Path, Path]:
    """Seed, prompt folder and output folder, with the guide's (and the original's) defaults."""
    seed = args.seed if args.seed is not None else MODE_SEEDS.get(mode, OPTIONS["seed"].default)
    name = args.resolution
    folder = {"single": name, "interp": name, "loop": name.replace("_interp", "") + "_loop"}[mode]
    prompt_dir = args.prompt_dir or Path("prompts") / folder
    tag = f"{name}_loop" if mode == "loop" else name
    output_dir = args.output_dir or Path("results") / f"dynamicrafter_pipeline_{tag}_seed{seed}"
    return seed, prompt_dir, output_dir


def _check_request(args: argparse.Namespace, mode: str, config: ModelConfig) -> None:
    """Refuse, before the model loads, a mode or a frame count the model cannot make (the request rules)."""
    try:
        check_mode(config, mode, "--keyframes" if args.keyframes else f"--{mode}")
        check_frames(config, args.num_frames, mode, "--video_length")
        check_windows(config, args.window_size, args.window_stride, ("--window_size", "--window_stride"))
        _check_sequence_flags(args, mode, config)
        check_start_step(args.start_step, args.num_inference_steps, config.diffusion.timesteps,
                         ("--start_step", "--num_inference_steps"))
    except UserError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.image_embed_ratio != 1.0 and mode == "single":
        raise CliError("--image_embed_ratio mixes the start and end images' embeddings; use it with --interp "
                       "or --loop.", EXIT_USAGE)
    if args.analytic_init and args.analytic_init_path is None:
        from .hub import analytic_init_missing

        missing = analytic_init_missing(config.name, ("--analytic_init", "--analytic_init_path"))
        if missing:
            raise CliError(missing, EXIT_USAGE)
    if args.mask is not None and mode != "single":
        raise CliError(f"--mask holds parts of the video to the one input image; it cannot be used with --{mode}.",
                       EXIT_USAGE)
    if args.prompt_text is not None:
        try:
            _timed_prompt(args.prompt_text, args.num_frames)
        except UserError as exc:
            raise CliError(f"--prompt_text: {exc}", EXIT_USAGE) from None
    controls, folders = args.control or [], args.control_dir or []
    if controls and (args.keyframes or args.sequence or args.segments > 1):
        raise CliError("--control cannot be combined with --segments or keyframes; make each piece with its own run.",
                       EXIT_USAGE)
    if len(controls) != len(folders):
        raise CliError(f"Give one --control_dir per --control (got {len(controls)} --control and {len(folders)} "
                       "--control_dir).", EXIT_USAGE)
    for path in controls:
        if not path.is_file():
            raise CliError(f"ControlNet {path} does not exist.", EXIT_USAGE)
    for folder in folders:
        if not folder.is_dir():
            raise CliError(f"Control folder {folder} does not exist.", EXIT_USAGE)


def _check_controls(args: argparse.Namespace, jobs: list[Job]) -> None:
    """Refuse, before the model loads, a job whose control images are not there."""
    from .control_images import find_control_images

    for folder in args.control_dir or []:
        for job in jobs:
            try:
                find_control_images(folder, job.image)
            except UserError as exc:
                raise CliError(str(exc)) from None


def _timed_prompt(text: str, frames: int) -> str | dict[int, str]:
    """A job's prompt as the pipeline takes it: the text, or its schedule checked for ``frames`` frames."""
    prompt = parse_prompt(text)
    return check_schedule(prompt, frames) if isinstance(prompt, dict) else prompt


def _check_prompts(jobs: list[Job], frames: int) -> list[Job]:
    """The jobs, each whose timed prompt is malformed or past the last frame failing (before the model loads)."""
    checked = []
    for job in jobs:
        if job.problem is None:
            try:
                _timed_prompt(job.prompt, frames)
            except UserError as exc:
                job = dataclasses.replace(job, problem=str(exc))
        checked.append(job)
    return checked


def _check_sequence_flags(args: argparse.Namespace, mode: str, config: ModelConfig) -> None:
    """The long-video flags' rules (the request's, with the flags' names) that need no image."""
    if args.sequence and mode == "single":
        raise UserError("--sequence makes one video through every image of the folder; give it with --interp "
                        "or --loop.")
    if args.keyframes and (args.sequence or args.image_path is not None):
        raise UserError("--keyframes names the images itself; leave out --sequence and --image_path.")
    if args.sequence and args.image_path is not None:
        raise UserError("--sequence makes one video of the whole --prompt_dir; leave out --image_path.")
    if args.segments > 1 and mode != "single":
        raise UserError(f"--segments chains videos of one image; it cannot be combined with "
                        f"{'--keyframes' if args.keyframes else '--sequence' if args.sequence else '--' + mode} "
                        "(keyframes already make one interpolation per pair).")
    check_segments(args.num_frames, args.segments, _overlap(args), ("--segments", "--overlap", "--video_length"))
    if args.keyframes:
        check_keyframes(config, len(args.keyframes), args.num_frames, args.cut_near_keyframes, args.loop,
                        KEYFRAME_FLAGS)


#: The names the keyframe rules use on the command line.
KEYFRAME_FLAGS = ("--keyframes", "--cut_near_keyframes", "--video_length")


def _overlap(args: argparse.Namespace) -> int:
    """The chained segments' overlap used: ``--overlap``, else the default (1)."""
    return default_overlap(args.num_frames) if args.overlap is None else args.overlap


def _sequence_jobs(args: argparse.Namespace, images: list[Path], prompt_dir: Path, output_dir: Path,
                   seed: int, config: ModelConfig) -> list[Job]:
    """The one keyframe sequence of ``--keyframes`` or ``--sequence``, its keyframes checked (count, one size)."""
    try:
        check_keyframes(config, len(images), args.num_frames, args.cut_near_keyframes, args.loop,
                        ("--sequence" if args.sequence else "--keyframes", *KEYFRAME_FLAGS[1:]))
    except UserError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    check_keyframe_sizes([load_image(image) for image in images], [image.name for image in images])
    name = (prompt_dir.resolve().name or "keyframes") if args.sequence else images[0].stem
    return make_sequence_jobs(images, output_dir, name=name, loop=args.loop, prompt_text=args.prompt_text,
                              prompt_list=prompt_dir / PROMPT_LIST_NAME if args.sequence else None, seed=seed,
                              n_samples=args.num_videos_per_prompt)


def _frames_written(job: Job, args: argparse.Namespace) -> int:
    """How many frames the video of ``job`` has once written: a loop drops its repeated last frame,
    a sequence joins its pieces (:func:`~dynamicrafter.request.joined_frames`)."""
    frames = args.num_frames
    if job.keyframes:
        pieces = len(job.keyframes) if job.loop else len(job.keyframes) - 1
        return joined_frames(frames, pieces, cut=args.cut_near_keyframes, loop=job.loop)
    if args.segments > 1:
        return joined_frames(frames, args.segments, _overlap(args))
    return frames - 1 if job.loop else frames


def _still_to_make(jobs: list[Job], args: argparse.Namespace) -> list[Job]:
    """The jobs whose video is not yet a complete, playable file of the expected frame count (or all, ``--overwrite``)."""
    todo = []
    for job in jobs:
        expected = _frames_written(job, args)
        if args.overwrite or not job.output.exists():
            todo.append(job)
        elif not is_complete_video(job.output, expected):
            logger.warning("Making %s again: it is not a complete video of %d frames.", job.output, expected)
            todo.append(job)
    return todo


def _prepare_output_dir(output_dir: Path) -> None:
    """Create the output folder and make sure files can be written there, before any model work."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"Cannot create output folder {output_dir} ({exc.strerror or exc}).") from None
    try:
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CliError(f"Cannot write to output folder {output_dir} ({exc.strerror or exc}).") from None


def _resolve_device(args: argparse.Namespace, ranks: distributed.Ranks) -> torch.device:
    """The requested device, checked (this imports torch); under torchrun ``cuda`` (or nothing) means ``cuda:LOCAL_RANK``."""
    try:
        return ranks.device_for(args.device)
    except UserError as exc:
        raise CliError(f"--device: {exc}", EXIT_USAGE) from None


def _check_quantize(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse, before the model loads, a ``--quantize`` mode this device, dtype or installation cannot run."""
    if args.quantize in (None, "none"):
        return
    from .quantization import quantize_mode
    from .runtime import resolve_dtype

    try:
        quantize_mode(args.quantize, device, resolve_dtype(args.dtype, device))
    except UserError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _load_pipeline(args: argparse.Namespace, device: torch.device) -> Any:
    """Build the pipeline; a bad config or a missing checkpoint becomes a :class:`CliError`."""
    logger.info("Loading the %s model on %s.", args.resolution, device)
    pipe = build_pipeline(args, args.resolution, device)
    for path in args.control or []:
        pipe.load_controlnet(path)
    return pipe


class _Runner:
    """Makes this rank's jobs in batches, writes their videos and manifest lines, and counts."""

    def __init__(self, pipe: Any, args: argparse.Namespace, output_dir: Path, ranks: distributed.Ranks) -> None:
        self.pipe = pipe
        self.args = args
        self.manifest = output_dir / MANIFEST_NAME
        self.ranks = ranks
        self.settings = {name: getattr(args, name) for name in PIPELINE_OPTIONS}
        #: The motion mask of every image (read once; checked against each image's size by the pipeline).
        self.mask = None if args.mask is None else load_mask(args.mask, f"--mask {args.mask}")
        # what the manifest records: the values used, the model's where the command line left them to it
        used = model_defaults(pipe.config)
        self.recorded = {name: used[name] if value is None and name in used else value
                         for name, value in self.settings.items()}
        self.recorded["overlap"] = _overlap(args)
        self.done = self.failed = 0

    def run(self, jobs: list[Job]) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        show = self.ranks.is_main
        with logging_redirect_tqdm(), tqdm(total=len(jobs), desc="Videos", unit="video", disable=not show) as bar:
            for start in range(0, len(jobs), self.args.batch_size):
                batch = jobs[start : start + self.args.batch_size]
                self._batch(batch)
                bar.update(len(batch))

    def _fail(self, job: Job, reason: Any) -> None:
        logger.warning("Skipping %s: %s", job.image, str(reason).rstrip("."))
        self.failed += 1

    def _batch(self, jobs: list[Job]) -> None:
        """Read the batch's images (skipping bad ones) and animate the rest in one call."""
        ready = []
        for job in jobs:
            if job.problem:
                self._fail(job, job.problem)
                continue
            try:
                images = (load_image(job.image), None if job.end_image is None else load_image(job.end_image))
            except UserError as exc:
                self._fail(job, exc)
            else:
                ready.append((job, images))
        self._animate(ready)

    def _animate(self, ready: list[tuple[Job, tuple[Any, Any]]]) -> None:
        import torch

        if not ready:
            return
        if any(job.keyframes or self.args.segments > 1 for job, _ in ready):
            for job, (start, _) in ready:  # a sequence is one video per call
                self._write(job, lambda job=job, start=start: self._sequence(job, start))
            return
        if self.args.control and len(ready) > 1:  # each video has its own control images: one call each
            for item in ready:
                self._animate([item])
            return
        jobs = [job for job, _ in ready]
        ends = [end for _, (_, end) in ready]
        negative = self.args.negative_prompt
        started = time.perf_counter()
        try:
            videos = self.pipe(
                image=[start for _, (start, _) in ready],
                prompt=[_timed_prompt(job.prompt, self.args.num_frames) for job in jobs],
                negative_prompt=None if negative is None else [negative] * len(jobs),
                end_image=None if all(end is None for end in ends) else ends,
                generator=[torch.Generator(device=self.pipe.device).manual_seed(job.seed) for job in jobs],
                **({} if self.mask is None else {"mask": self.mask}), **self._control_images(jobs[0]),
                **self.settings,
            )["videos"]
        except (UserError, GenerationError) as exc:
            if len(ready) == 1:
                self._fail(jobs[0], exc)
                return
            # Something in the batch was refused: run the jobs one at a time so only the bad one is skipped.
            for item in ready:
                self._animate([item])
            return
        seconds = (time.perf_counter() - started) / len(jobs)
        for index, job in enumerate(jobs):
            video = videos[index : index + 1]
            if job.loop:
                video = close_loop(video)
            self._save(job, video, seconds)

    def _sequence(self, job: Job, start: Any) -> Any:
        """The video of a sequence job: chained segments of its image, or its keyframes (see docs/long-videos.md)."""
        import torch

        negative = self.args.negative_prompt
        return self.pipe(
            image=None if job.keyframes else start, keyframes=list(job.keyframes) or None, loop=bool(job.keyframes)
            and job.loop, prompt=list(job.prompts or (job.prompt,)), negative_prompt=negative,
            generator=torch.Generator(device=self.pipe.device).manual_seed(job.seed),
            **({} if self.mask is None or job.keyframes else {"mask": self.mask}), **self.settings)["videos"]

    def _write(self, job: Job, make: Any) -> None:
        """Make one job's video with ``make()`` and save it; a refused input or a non-finite result fails the job."""
        started = time.perf_counter()
        try:
            video = make()
        except (UserError, GenerationError) as exc:
            self._fail(job, exc)
            return
        self._save(job, video, time.perf_counter() - started)

    def _save(self, job: Job, video: Any, seconds: float) -> None:
        """Write one video (aside, checked, renamed) and its manifest line."""
        try:
            self.pipe.save_video(video, job.output, fps=self.args.fps)  # written aside, checked, renamed
        except OSError as exc:
            self._fail(job, exc)
            return
        try:
            self._record(job, seconds, frames=video.shape[1])
        except OSError as exc:
            self._fail(job, f"{job.output} was written but its line in {self.manifest} was not "
                            f"({exc.strerror or exc})")
            return
        self.done += 1
        logger.info("%s -> %s", job.image, job.output)

    def _control_images(self, job: Job) -> dict[str, Any]:
        """The ``control_images`` keyword for ``job`` (nothing without ``--control``)."""
        if not self.args.control:
            return {}
        from .control_images import find_control_images, read_control_images

        found = [read_control_images(find_control_images(folder, job.image)) for folder in self.args.control_dir]
        return {"control_images": found[0] if len(found) == 1 else found}

    def _record(self, job: Job, seconds: float, frames: int) -> None:
        config = self.pipe.config
        append_record(self.manifest, {
            "video": job.output.name, "image": str(job.image),
            "end_image": None if job.end_image is None or job.loop else str(job.end_image),
            "loop": job.loop, "prompt": job.prompt, "prompt_schedule": _schedule_record(job.prompt),
            "negative_prompt": self.args.negative_prompt,
            "seed": job.seed, "sample": job.sample, "frames": int(frames), "fps": self.args.fps,
            "keyframes": [str(k) for k in job.keyframes] or None,
            "prompts": list(job.prompts) if job.keyframes or self.args.segments > 1 else None,
            "settings": self.recorded, **({} if self.args.mask is None else {"mask": str(self.args.mask)}),
            "model": config.name, "checkpoint": None if self.pipe.checkpoint is None else str(self.pipe.checkpoint),
            "dtype": str(self.pipe.dtype).replace("torch.", ""), "quantize": self.pipe.quantize,
            "lora": self.args.lora, "lora_scale": self.args.lora_scale if self.args.lora else None,
            **self._control_record(job),
            "seconds": round(seconds, 3),
            "rank": self.ranks.rank, "host": socket.gethostname(),
        })


    def _control_record(self, job: Job) -> dict[str, Any]:
        """The manifest's control fields: the ControlNet files and where this video's control images came from."""
        if not self.args.control:
            return {}
        from .control_images import find_control_images

        return {"control": [str(p) for p in self.args.control],
                "control_images": [str(find_control_images(d, job.image)) for d in self.args.control_dir]}


def _schedule_record(text: str) -> dict[str, str] | None:
    """A timed prompt's schedule as the manifest records it (frames as JSON keys), else ``None``."""
    prompt = parse_prompt(text)
    return {str(frame): part for frame, part in sorted(prompt.items())} if isinstance(prompt, dict) else None


def _run(args: argparse.Namespace) -> int:
    """Make every video the arguments name; returns the exit status."""
    args.resolution = chosen_model(args)
    ranks = distributed.Ranks.from_env()
    mode = _mode(args)
    config = _model_config(args)
    _check_request(args, mode, config)
    if args.mask is not None:  # an unreadable mask fails the run before anything else
        try:
            load_mask(args.mask, f"--mask {args.mask}")
        except UserError as exc:
            raise CliError(str(exc)) from None
    seed, prompt_dir, output_dir = _defaults(args, mode)
    try:
        images = list(args.keyframes) if args.keyframes else find_images(args.image_path, prompt_dir)
        if _keyframed(args):
            jobs = _sequence_jobs(args, images, prompt_dir, output_dir, seed, config)
        else:
            jobs = make_jobs(images, output_dir, mode=mode, prompt_text=args.prompt_text, seed=seed,
                             n_samples=args.num_videos_per_prompt, segments=args.segments)
    except UserError as exc:
        raise CliError(str(exc)) from None
    jobs = _check_prompts(jobs, args.num_frames)
    mine = ranks.share(jobs)
    todo = _still_to_make(mine, args)
    _check_controls(args, todo)
    skipped = len(mine) - len(todo)
    device = None
    if todo:  # something to make: only now torch is imported, to check the device and --quantize
        device = _resolve_device(args, ranks)
        _check_quantize(args, device)
    made = missing_folders(output_dir)
    _prepare_output_dir(output_dir)
    distributed.init(ranks)
    try:
        done = failed = 0
        if todo:
            runner = _Runner(_load_pipeline(args, device), args, output_dir, ranks)
            runner.run(todo)
            done, failed = runner.done, runner.failed
        if ranks.distributed:
            logger.info("Rank %d: %d done, %d failed, %d skipped", ranks.rank, done, failed, skipped)
        done, failed, skipped = distributed.sum_counts([done, failed, skipped], ranks)
    finally:
        distributed.shutdown(ranks)
        if made and not ranks.distributed:
            remove_empty(made)  # nothing was made (a missing checkpoint, say): leave no empty folder
    if ranks.is_main:
        logger.info("%d done, %d failed, %d skipped", done, failed, skipped)
    return EXIT_FAILED if failed else 0


def main(argv: Sequence[str] | None = None, prog: str = "run_pipeline.py", **shown: str) -> int:
    """Run ``run_pipeline.py`` with ``argv`` (default: the command line); returns the exit status.

    ``prog`` and ``shown`` (``usage``, ``description``) are what its ``--help`` shows.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    return run_command(lambda: _run(build_parser(prog, **shown).parse_args(argv)),
                       out_of_memory="Out of GPU memory; try a smaller --batch_size, a shorter --video_length "
                                     "or a lower resolution.")
