"""Where a video's control images come from on disk: a folder per input image, one image, or a line-art video.

For the input image ``cat.png`` and a control folder ``DIR`` (``--control_dir``), the first of
these that exists gives the control images (see :mod:`dynamicrafter.control` for what they do):

- ``DIR/cat/``: a folder of images. When every file is named by a frame number (``0.png``,
  ``15.png``, ...), they are ``{frame: image}`` (the other frames get no control); otherwise they
  are taken in name order, one per frame (or one for all frames).
- ``DIR/cat.mp4`` (or ``.mov``, ``.webm``, ``.mkv``, ``.avi``, ``.gif``): a video, one frame per frame.
- ``DIR/cat.png`` (any image extension): one control image for every frame.

Torch-free: the command line finds and checks them before the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError
from .jobs import IMAGE_EXTENSIONS, list_images

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")


def find_control_images(control_dir: Path, image: Path) -> Path:
    """The folder, video or image of ``control_dir`` that holds ``image``'s control images.

    Raises :class:`UserError` (one sentence) when there is none.
    """
    stem = image.stem
    folder = control_dir / stem
    if folder.is_dir():
        return folder
    for suffix in (*VIDEO_EXTENSIONS, *IMAGE_EXTENSIONS):
        for candidate in (control_dir / f"{stem}{suffix}", control_dir / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise UserError(f"No control images for {image.name} in {control_dir}: give {folder}/ (one image per frame, "
                    f"or files named by frame number), {stem}.mp4 (a line-art video) or {stem}.png (every frame).")


def read_control_images(path: Path) -> Any:
    """What :func:`find_control_images` found, as a pipeline's ``control_images``: a list, a dict or one image path."""
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise UserError(f"Control folder {path} holds no images ({' '.join(IMAGE_EXTENSIONS)}).")
        if all(f.stem.isdigit() for f in files):
            return {int(f.stem): f for f in files}
        return files
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return read_video_frames(path)
    return path


def read_video_frames(path: Path | str) -> list[Any]:
    """Every frame of a video file as an RGB PIL image (a line-art video: one sketch per frame)."""
    import imageio_ffmpeg  # ffmpeg, as video.py writes with it
    from PIL import Image

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        return [Image.frombytes("RGB", (width, height), frame) for frame in reader]
    except (OSError, RuntimeError, StopIteration) as exc:
        raise UserError(f"Cannot read control video {path} ({str(exc).splitlines()[0] if str(exc) else exc!r}).") from None
