"""The videos one command-line run makes: inputs, prompt, seed and output file of each.

Three layouts of a prompt folder are understood, those of the original repository:

- one video per image (``prompts/256/``): images and their prompts;
- ``interp``: consecutive images in sorted order are pairs (``smile_01.png``, ``smile_02.png``),
  one video per pair, named after its first image;
- ``loop``: one looping video per image (the image is the start and the end frame).

A prompt is, in order: ``--prompt_text``; the text file with the (first) image's name and a
``.txt`` extension; line *i* of the folder's ``test_prompts.txt`` for video *i* (image *i*, or
pair *i*); else empty, with a warning. Any of them may be several prompts over time
(``0: a cat sits | 48: a cat jumps``, :mod:`dynamicrafter.prompt_schedule`): a job keeps the text
as written and the command line reads it. Video *i* with ``n_samples = K`` becomes ``K`` jobs whose
seeds are ``seed + k``: a job's noise depends on its seed only, never on the batch it runs in or
on the rank that runs it.

Long videos (:mod:`dynamicrafter.sequences`): with ``--segments K`` an image's own ``.txt`` file
may hold one line per segment (a single line is every segment's). A keyframe sequence
(``--keyframes a.png b.png ...``, or ``--sequence`` with ``--interp``/``--loop``: the whole
sorted folder) is one video (per sample), named after its first keyframe (after the folder with
``--sequence``); its prompts are ``--prompt_text``, else the first keyframe's ``.txt``, else the
folder's ``test_prompts.txt`` (``--sequence`` only): one line per interpolation, or one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .images import IMAGE_EXTENSIONS
from .request import MODES

__all__ = ["Job", "MODES", "PROMPT_LIST_NAME", "list_images", "find_images", "make_jobs", "output_names",
           "make_sequence_jobs"]

logger = logging.getLogger(__name__)

PROMPT_LIST_NAME = "test_prompts.txt"


@dataclass(frozen=True)
class Job:
    """One video to make.

    ``end_image`` is the interpolation partner (the image itself for a loop); ``problem`` is set
    for a job that cannot run (an image without a partner) and is reported as failed.
    ``keyframes`` are a keyframe sequence's images (``image`` is the first; ``loop`` closes it);
    ``prompts`` are the per-piece prompts of a sequence (``prompt`` is the first).
    """

    image: Path
    prompt: str
    output: Path
    seed: int
    sample: int = 0
    end_image: Path | None = None
    loop: bool = False
    problem: str | None = None
    keyframes: tuple[Path, ...] = ()
    prompts: tuple[str, ...] = ()


def list_images(folder: Path) -> list[Path]:
    """The entries directly inside ``folder`` with an image extension, sorted by name.

    Broken links and other unreadable entries are kept, so that the run reports them instead of
    dropping them silently. Raises ``UserError`` when the folder cannot be listed.
    """
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise UserError(f"Cannot read folder {folder} ({exc.strerror}).") from None
    return sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_dir(p))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a link loop: not a folder; reading it will report the problem
        return False


def find_images(image_path: Path | None, prompt_dir: Path) -> list[Path]:
    """``image_path`` alone when given, else every image in ``prompt_dir``; ``UserError`` if there are none."""
    if image_path is not None:
        if image_path.is_dir():
            raise UserError(f"Image {image_path} is a folder; pass it as --prompt_dir.")
        if not image_path.is_file():
            raise UserError(f"Image {image_path} does not exist.")
        return [image_path]
    if not prompt_dir.is_dir():
        what = "is a file, not a folder" if prompt_dir.exists() else "does not exist"
        raise UserError(f"Prompt folder {prompt_dir} {what}; pass --prompt_dir or --image_path.")
    images = list_images(prompt_dir)
    if not images:
        raise UserError(f"No images ({' '.join(IMAGE_EXTENSIONS)}) in {prompt_dir}.")
    return images


def _read_text(path: Path) -> str:
    """A prompt file's text (UTF-8, a byte-order mark allowed)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read prompt file {path} ({exc}).") from None


def _units(images: list[Path], mode: str) -> list[tuple[Path, Path | None]]:
    """(start, end) of each video: pairs of consecutive images for ``interp``, the image twice for ``loop``."""
    if mode == "interp":
        return [(images[i], images[i + 1] if i + 1 < len(images) else None) for i in range(0, len(images), 2)]
    return [(image, image if mode == "loop" else None) for image in images]


def _listed_prompts(folder: Path, mode: str) -> dict[Path, str]:
    """Line *i* of the folder's test_prompts.txt for video *i* of the whole folder, by its (first) image.

    The pairing uses every image of the folder, so a single ``--image_path`` gets its own line.
    """
    path = folder / PROMPT_LIST_NAME
    if not path.is_file():
        return {}
    lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    units = _units(list_images(folder), mode)
    if len(lines) != len(units):
        unit = "image pairs" if mode == "interp" else "images"
        logger.warning("%s has %d prompts for %d %s; pairing them in sorted order.", path, len(lines), len(units), unit)
    return {first: line for (first, _), line in zip(units, lines)}


def output_names(stems: list[tuple[str, str]]) -> list[str]:
    """Unique file names (without extension) for ``(stem, suffix)`` inputs, compared ignoring case.

    A later input whose stem is taken gets its extension added (``a_jpg``), then ``_2``, ``_3`` ...
    """
    taken: set[str] = set()
    names = []
    for stem, suffix in stems:
        name = stem
        if name.casefold() in taken:
            name = f"{stem}_{suffix.lstrip('.')}"
        base, number = name, 2
        while name.casefold() in taken:
            name, number = f"{base}_{number}", number + 1
        taken.add(name.casefold())
        names.append(name)
    return names


def make_jobs(images: list[Path], output_dir: Path, *, mode: str = "single", prompt_text: str | None = None,
              seed: int = 123, n_samples: int = 1, segments: int = 1) -> list[Job]:
    """Every job of a run, in a fixed order (the same list on every rank).

    ``images`` share one folder (or are a single ``--image_path``). With ``mode="interp"`` they
    are paired in order; an odd image out becomes a job with a ``problem``. With ``segments > 1``
    an image's own ``.txt`` gives one prompt per line (``Job.prompts``).
    """
    if mode not in MODES:  # a programming error: the command line offers only these
        raise UserError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}.")
    units = _units(images, mode)
    listed = {} if prompt_text is not None else _listed_prompts(images[0].parent, mode)
    names = output_names([(first.stem, first.suffix) for first, _ in units])
    jobs = []
    for (first, second), name in zip(units, names):
        prompt = _prompt(first, prompt_text, listed)
        lines = _lines(prompt) if segments > 1 and prompt_text is None else (prompt,)
        prompt = lines[0]
        problem = None
        if mode == "interp" and second is None:
            problem = f"{first.name} has no partner image (interpolation needs images in pairs)"
        for sample in range(n_samples):
            suffix = f"_sample{sample}" if n_samples > 1 else ""
            jobs.append(Job(first, prompt, output_dir / f"{name}{suffix}.mp4", seed + sample, sample,
                            second, mode == "loop", problem, prompts=lines))
    return jobs


def _lines(text: str) -> tuple[str, ...]:
    """A prompt file's non-empty lines, stripped (at least one, perhaps empty)."""
    return tuple(line.strip() for line in text.splitlines() if line.strip()) or ("",)


def make_sequence_jobs(keyframes: list[Path], output_dir: Path, *, name: str, loop: bool = False,
                       prompt_text: str | None = None, prompt_list: Path | None = None, seed: int = 123,
                       n_samples: int = 1) -> list[Job]:
    """The jobs of one keyframe sequence: one video ``<name>.mp4`` (per sample) through every keyframe.

    The prompts are ``prompt_text``, else the lines of the first keyframe's ``.txt``, else those
    of ``prompt_list`` (a folder's ``test_prompts.txt``), else empty with a warning: one line per
    interpolation, or one for all.
    """
    first = keyframes[0]
    own = first.with_suffix(".txt")
    if prompt_text is not None:
        prompts: tuple[str, ...] = (prompt_text,)
    elif own.is_file():
        prompts = _lines(_read_text(own))
    elif prompt_list is not None and prompt_list.is_file():
        prompts = _lines(_read_text(prompt_list))
    else:
        logger.warning("No prompt for the keyframes of %s (no %s%s); using an empty prompt.", first.parent, own.name,
                       "" if prompt_list is None else f", no {prompt_list.name}")
        prompts = ("",)
    return [Job(first, prompts[0], output_dir / f"{name}{f'_sample{k}' if n_samples > 1 else ''}.mp4", seed + k, k,
                loop=loop, keyframes=tuple(keyframes), prompts=prompts) for k in range(n_samples)]


def _prompt(image: Path, prompt_text: str | None, listed: dict[Path, str]) -> str:
    if prompt_text is not None:
        return prompt_text
    own = image.with_suffix(".txt")
    if own.is_file():
        return _read_text(own).strip()
    if image in listed:
        return listed[image]
    logger.warning("No prompt for %s (no %s, no %s line); using an empty prompt.", image, own.name, PROMPT_LIST_NAME)
    return ""
