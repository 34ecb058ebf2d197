"""Write generated frames to MP4 (H.264) or animated GIF files, atomically and checked.

A video is written under a temporary name, re-opened and its frames counted, and only then
renamed into place: a final name only ever holds a complete, playable video. A write that fails
(a full disk, a file size limit, an encoder that died) raises :class:`VideoWriteError` and
leaves nothing under the final name. :func:`is_complete_video` is the same check for a file
that is already there (the command line makes again what fails it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import imageio_ffmpeg
import numpy as np
from PIL import Image

from .errors import UserError
from .files import write_atomically

logger = logging.getLogger(__name__)

# x264 settings: visually lossless for generated clips, widely playable, streamable from the start.
MP4_OUTPUT_PARAMS = ["-crf", "17", "-preset", "medium", "-movflags", "+faststart"]


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Convert one video to a uint8 array shaped [T, H, W, 3].

    Args:
        frames: a torch tensor or numpy array, float in [0, 1] (values outside are clamped) or
            uint8, laid out as [T, 3, H, W] or [T, H, W, 3].
    """
    if hasattr(frames, "detach"):  # a torch tensor; avoid importing torch just for the check
        tensor = frames.detach().cpu()
        frames = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or 3 not in (array.shape[1], array.shape[-1]) or array.shape[0] == 0:
        raise UserError(f"Expected one video shaped [T, 3, H, W] or [T, H, W, 3], got shape {tuple(array.shape)}.")
    if array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    if np.issubdtype(array.dtype, np.floating):
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.dtype != np.uint8:
        raise UserError(f"Expected float frames in [0, 1] or uint8 frames, got dtype {array.dtype}.")
    return np.ascontiguousarray(array)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row/column where needed: yuv420p needs an even width and height."""
    _, height, width, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    frames = _pad_to_even(frames)
    _, height, width, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
        quality=None, macro_block_size=1, output_params=MP4_OUTPUT_PARAMS,
    )
    try:
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(frame)
    finally:
        writer.close()


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    first, *rest = (Image.fromarray(frame) for frame in frames)
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)


WRITERS: dict[str, Callable[[np.ndarray, Path, float], None]] = {".mp4": _write_mp4, ".gif": _write_gif}


class VideoWriteError(OSError):
    """A video could not be written completely; nothing was left under its name."""


def count_frames(path: str | os.PathLike) -> int:
    """The frames a video file decodes to (0 for a file that is not a readable MP4 or GIF)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gif":
            with Image.open(path) as gif:
                return int(getattr(gif, "n_frames", 1))
        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except (OSError, RuntimeError, ValueError, SyntaxError):  # SyntaxError: Pillow's word for a broken file
        return 0


def is_complete_video(path: str | os.PathLike, frames: int) -> bool:
    """Whether ``path`` is a playable video of exactly ``frames`` frames."""
    return Path(path).is_file() and count_frames(path) == frames


def _check_frames(path: Path, expected: int) -> None:
    found = count_frames(path)
    if found != expected:
        raise VideoWriteError(f"the written file holds {found} of {expected} frames")


def save_video(frames: Any, path: str | os.PathLike, fps: float = 8) -> Path:
    """Save one video as an H.264 MP4 or a looping GIF, chosen by the file extension.

    The file is written under a temporary name in the same folder, re-opened and its frames
    counted, and renamed into place only when all are there, so `path` either holds the complete
    video or is left untouched.

    Args:
        frames: one video as a torch tensor or numpy array: float in [0, 1] or uint8,
            shaped [T, 3, H, W] or [T, H, W, 3]. Odd sizes are padded to even for MP4.
        path: destination ending in .mp4 or .gif; missing parent folders are created.
        fps: frames per second.
    Returns:
        The destination path.
    Raises:
        VideoWriteError: the video could not be written completely (one sentence naming the file).
    """
    path = Path(path)
    writer = WRITERS.get(path.suffix.lower())
    if writer is None:
        raise UserError(f"Unsupported video extension '{path.suffix}'; use .mp4 or .gif.")
    if fps <= 0:
        raise UserError(f"fps must be positive, got {fps}.")
    video = to_uint8_frames(frames)
    try:
        write_atomically(path, lambda temporary: writer(video, temporary, fps),
                         verify=lambda temporary: _check_frames(temporary, len(video)))
    except (OSError, RuntimeError) as exc:  # imageio-ffmpeg reports a dead encoder as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise VideoWriteError(f"Cannot write {path} ({reason}).") from exc
    logger.debug("Saved %d frames to %s", len(video), path)
    return path
