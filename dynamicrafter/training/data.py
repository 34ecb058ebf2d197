"""Training clips: finding them, sampling frames like the original's loader, decoding with PyAV.

Sources: a folder of clips (``.mp4``, ``.mov``, ``.webm``, ``.gif``; also ``.mkv``, ``.avi``) with
same-stem ``.txt`` captions, or a CSV in WebVid's layout (``videoid,name[,page_dir]``, clips at
``<video_root>/[<page_dir>/]<videoid>.mp4``) or ``path,caption`` (paths relative to the CSV's folder
or to ``video_root``).

Frame sampling follows the original's WebVid loader: a frame stride drawn uniformly from
``[stride_min, stride_max]``; a clip too short for it gets the stride ``frames_in_clip // T``;
``T`` frames from a uniformly drawn start. The UNet's condition is that stride (256 model) or
the clip's frame rate divided by it, rounded down (the others). Frames are resized to cover the
model's size and centre-cropped (:func:`dynamicrafter.images.fit_image`, as the pipeline does).
A clip whose frames are larger than an input image may be (``images.MAX_IMAGE_PIXELS``, the
aspect-ratio limit) is refused from its header, before a frame is decoded.

Every random choice for a sample comes from a seed the sampler hands over with its index, so a
run is the same with any number of worker processes and resumes exactly.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import UserError
from ..images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, fit_image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".gif", ".mkv", ".avi")


@dataclass(frozen=True)
class Clip:
    """One training clip: its file and caption."""

    path: Path
    caption: str


def find_clips(source: str | Path, video_root: str | Path | None = None) -> list[Clip]:
    """The clips of a folder (with same-stem ``.txt`` captions) or of a CSV file."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"No video clips ({', '.join(VIDEO_SUFFIXES)}) in {source}.")
        clips, uncaptioned = [], 0
        for path in files:
            caption_file = path.with_suffix(".txt")
            if caption_file.is_file():
                caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
            else:
                caption, uncaptioned = "", uncaptioned + 1
            clips.append(Clip(path, caption))
        if uncaptioned:
            logger.warning("%d of %d clips in %s have no same-name .txt caption; they train with an empty prompt.",
                           uncaptioned, len(clips), source)
        return clips
    if source.suffix.lower() == ".csv" and source.is_file():
        return _read_csv(source, Path(video_root) if video_root else source.parent)
    if not source.exists():
        raise UserError(f"Training data {source} does not exist.")
    raise UserError(f"Training data {source} must be a folder of clips or a .csv file.")


def _read_csv(path: Path, root: Path) -> list[Clip]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark spreadsheets write
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in a spreadsheet).") from None
    except csv.Error as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc}).") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    if {"videoid", "name"} <= columns:
        def clip(row: dict[str, str]) -> Clip:
            folder = root / row["page_dir"] if row.get("page_dir") else root
            return Clip(folder / f"{row['videoid']}.mp4", row["name"] or "")
    elif {"path", "caption"} <= columns:
        def clip(row: dict[str, str]) -> Clip:
            return Clip(root / row["path"], row["caption"] or "")
    else:
        raise UserError(f"{path} needs the columns videoid,name (WebVid) or path,caption; "
                         f"it has {', '.join(sorted(columns)) or 'none'}.")
    clips = [clip(row) for row in rows if row.get("videoid") or row.get("path")]
    if not clips:
        raise UserError(f"{path} lists no clips.")
    return clips


class ClipError(Exception):
    """A clip that cannot be used (unreadable, too short)."""


def choose_frames(num_frames: int, frames: int, stride_min: int, stride_max: int,
                  rng: random.Random) -> tuple[list[int], int]:
    """Frame indices and stride for a clip of ``num_frames`` frames, as the original's loader picks them."""
    if num_frames < frames:
        raise ClipError(f"it has {num_frames} frame(s), fewer than the {frames} needed")
    stride = rng.randint(stride_min, stride_max)
    required = stride * (frames - 1) + 1
    if num_frames < required:
        stride = num_frames // frames
        required = stride * (frames - 1) + 1
    spare = num_frames - required
    start = rng.randint(0, spare) if spare > 0 else 0
    return [start + stride * i for i in range(frames)], stride


def check_frame_size(width: int, height: int) -> None:
    """Refuse frames larger than an input image may be (:data:`~dynamicrafter.images.MAX_IMAGE_PIXELS`, the aspect ratio)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ClipError(f"its frames are {width}x{height} pixels ({width * height / 1e6:.3g} megapixels), over the "
                        f"limit of {MAX_IMAGE_PIXELS / 1e6:g}")
    if min(width, height) > 0 and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ClipError(f"its frames are {width}x{height} pixels, a strip narrower than 1:{MAX_ASPECT_RATIO}")


def _count_frames(path: Path, decode: bool = False) -> tuple[int, float]:
    """Frames in the clip (from the header, or by decoding where it has none) and its frame rate.

    The frame size in the header is checked first, before a frame is decoded.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        check_frame_size(stream.codec_context.width, stream.codec_context.height)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        count = 0 if decode else stream.frames
        if count <= 0:  # not in the header (webm, some gifs): count by decoding
            count = sum(1 for _ in container.decode(stream))
    return count, rate


def _decode(path: Path, indices: Sequence[int], height: int, width: int) -> list[torch.Tensor]:
    import av

    wanted = set(indices)
    last = max(indices)
    got: dict[int, torch.Tensor] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            check_frame_size(frame.width, frame.height)  # a size change mid-stream
            if i in wanted:
                got[i] = fit_image(frame.to_image(), height, width)
            if i >= last:
                break
    return [got[i] for i in indices if i in got]


def read_clip(path: Path, frames: int, height: int, width: int, stride_min: int, stride_max: int,
              rng: random.Random) -> tuple[torch.Tensor, int, float]:
    """Decode ``frames`` frames of a clip: ``([3, T, H, W] in [-1, 1], stride, frame rate)``.

    Raises :class:`ClipError` when the clip cannot be read or is too short.
    """
    try:
        count, rate = _count_frames(path)
        indices, stride = choose_frames(count, frames, stride_min, stride_max, rng)
        video = _decode(path, indices, height, width)
        if len(video) < frames:  # the header overstated the frame count: count again by decoding
            count, rate = _count_frames(path, decode=True)
            indices, stride = choose_frames(count, frames, stride_min, stride_max, rng)
            video = _decode(path, indices, height, width)
            if len(video) < frames:
                raise ClipError(f"only {len(video)} of {frames} frames could be decoded")
    except ClipError:
        raise
    except Exception as exc:  # PyAV raises many types; to the user they all mean "unreadable"
        raise ClipError(f"cannot be read ({type(exc).__name__}: {exc})") from None
    return torch.stack(video, dim=1), stride, rate


def fs_value(fs_kind: str, stride: int, rate: float) -> int:
    """The UNet's condition: the frame stride, or the sampled clip's frame rate ``rate // stride``."""
    return int(stride) if fs_kind == "frame_stride" else int(rate // stride)


class ClipDataset(Dataset):
    """Decoded training samples, indexed by :class:`StreamSampler`'s ``(index, seed, epoch, position)``
    (or a bare index).

    An item is ``{"video": [3, T, H, W], "caption": str, "fs": int, "index": int}``, or
    ``{"error": str, "index": int}`` for a clip that cannot be used; both also carry the
    sampler's ``epoch`` and ``position``.
    """

    def __init__(self, clips: Sequence[Clip], frames: int, height: int, width: int, stride_min: int,
                 stride_max: int, fs_kind: str) -> None:
        if not clips:
            raise UserError("The training data has no clips.")
        self.clips = list(clips)
        self.frames, self.height, self.width = frames, height, width
        self.stride_min, self.stride_max = stride_min, stride_max
        self.fs_kind = fs_kind

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, int, int, int] | int) -> dict[str, Any]:
        index, seed, epoch, position = key if isinstance(key, tuple) else (key, key, 0, 0)
        clip = self.clips[index]
        where = {"epoch": epoch, "position": position}
        try:
            video, stride, rate = read_clip(clip.path, self.frames, self.height, self.width,
                                            self.stride_min, self.stride_max, random.Random(seed))
        except ClipError as exc:
            return {"error": f"{clip.path}: {exc}", "index": index, **where}
        return {"video": video, "caption": clip.caption, "fs": fs_value(self.fs_kind, stride, rate), "index": index,
                **where}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample of one epoch, independent of workers and of where a run was resumed."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class StreamSampler(Sampler):
    """This rank's samples, epoch after epoch without end: ``(index, seed, epoch, position)``.

    Each epoch is a seeded shuffle of the clips, padded to a multiple of the number of ranks and
    dealt out rank by rank, so every rank gets ``per_rank`` samples per epoch; ``position`` is
    how many of them have been used once this one is (``per_rank`` at the epoch's last sample).
    The stream starts at ``(epoch, position)``, which is how a resumed run picks up where it stopped.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, epoch: int = 0, position: int = 0,
                 shuffle: bool = True) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.position, self.shuffle = epoch, position, shuffle
        self.per_rank = -(-size // world)

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world
        while len(order) < total:  # pad by repeating from the start
            order += order[: total - len(order)]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        epoch, position = self.epoch, self.position
        while True:
            order = self.order(epoch)
            for i in range(position, self.per_rank):
                yield order[i], sample_seed(self.seed, epoch, order[i]), epoch, i + 1
            epoch, position = epoch + 1, 0


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable samples; report the unusable ones under ``"errors"``, and the stream
    position after the last item under ``"epoch"`` / ``"position"``."""
    good = [item for item in items if "error" not in item]
    batch: dict[str, Any] = {"errors": [item["error"] for item in items if "error" in item],
                             "epoch": items[-1]["epoch"], "position": items[-1]["position"], "count": len(items)}
    if not good:
        return batch
    for key in good[0]:
        if key in ("epoch", "position"):
            continue
        values = [item[key] for item in good]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def first_frame(path: Path):
    """The first frame of a clip as an RGB PIL image (for the training samples' default image)."""
    import av

    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                check_frame_size(frame.width, frame.height)
                return frame.to_image().convert("RGB")
    except ClipError:
        raise
    except Exception as exc:  # PyAV raises many types
        raise ClipError(f"cannot be read ({type(exc).__name__}: {exc})") from None
    raise ClipError("it has no frames")
