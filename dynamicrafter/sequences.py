"""Long videos made of pieces: chained segments and keyframe sequences, joined into one video.

Two ways of making a video longer than one call, both driving the pipeline's ordinary call
(check → encode → prepare → denoise → decode) once per piece and joining the frames with
:func:`join_pieces`:

- **chained segments** (``segments=K``, any model): segment 0 animates the image; segment
  ``i + 1`` animates the last frame of segment ``i`` (decoded, as an 8-bit image), and the last
  ``overlap`` frames of segment ``i`` are cross-faded with the first ``overlap`` of segment
  ``i + 1`` (the default 1: the shared frame, which both have, once);
- **keyframes** (``keyframes=[k0, ..., kN-1]``, 512_interp and tooncrafter): one interpolation
  per pair of consecutive keyframes (and ``kN-1 → k0`` with ``loop``), joined where they meet at
  a keyframe by cutting ``cut_near_keyframes`` frames as kijai's ComfyUI node does (1: the
  repeated keyframe).

Every piece draws its noise from the call's one generator, in order, so a seed gives the same
video and the first piece is exactly the plain call with that seed. The checks are
:class:`~dynamicrafter.request.SequenceRequest` (and each piece's own call); the frame counts are
:func:`~dynamicrafter.request.joined_frames`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .request import SequenceRequest

if TYPE_CHECKING:
    from .pipeline import DynamiCrafterImg2VideoPipeline

__all__ = ["join_pieces", "make_sequence", "crossfade_weights", "conditioning_frame"]

logger = logging.getLogger(__name__)


def crossfade_weights(overlap: int) -> torch.Tensor:
    """The later piece's weight on each of ``overlap`` shared frames: ``(j + 1) / (overlap + 1)``.

    The earlier piece gets one minus it, so the blend moves evenly from one to the other and
    neither piece is ever taken alone inside the overlap.
    """
    return torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)


def conditioning_frame(num_frames: int) -> int:
    """Index of the frame of a segment that the next segment animates: its last."""
    return num_frames - 1


def _cut(before: torch.Tensor, after: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop ``cut`` frames where ``before`` meets ``after`` (dim 1), as kijai's node does on their concatenation.

    kijai removes the ``cut`` frames starting ``cut // 2`` before the first frame of ``after``:
    ``cut // 2`` from the end of ``before``, the rest from the start of ``after`` (1: ``after``'s
    copy of the shared keyframe).
    """
    tail = cut // 2
    return before[:, : before.shape[1] - tail], after[:, cut - tail:]


def join_pieces(pieces: Sequence[torch.Tensor], *, overlap: int = 0, cut: int = 0, loop: bool = False
                ) -> torch.Tensor:
    """Join videos ``[B, T_i, ...]`` along the frames into one ``[B, F, ...]`` video.

    At each junction ``cut`` frames are dropped (see :func:`_cut`) and then the last ``overlap``
    frames of the video so far and the first ``overlap`` of the next piece are cross-faded with
    :func:`crossfade_weights`. With ``loop`` the last piece also meets the first: the cut there is
    mirrored (with 1 the last frame, the repeat of the first, goes, as a plain loop drops it).
    ``F`` is :func:`~dynamicrafter.request.joined_frames`.
    """
    if loop and overlap:
        raise ValueError("A looping join cuts frames; it does not cross-fade.")
    video = pieces[0]
    for piece in pieces[1:]:
        video, piece = _cut(video, piece, cut)
        if overlap:
            weights = crossfade_weights(overlap).to(video.device, video.dtype)
            weights = weights.view(1, overlap, *[1] * (video.ndim - 2))
            blend = video[:, -overlap:] * (1 - weights) + piece[:, :overlap] * weights
            video = torch.cat([video[:, :-overlap], blend, piece[:, overlap:]], dim=1)
        else:
            video = torch.cat([video, piece], dim=1)
    if loop and cut:  # mirrored: the larger half from the end
        video = video[:, cut // 2: video.shape[1] - (cut - cut // 2)]
    return video


def _frame_image(frame: torch.Tensor) -> np.ndarray:
    """A decoded frame ``[3, H, W]`` in [0, 1] as the 8-bit ``H x W x 3`` image the next segment animates."""
    return (frame.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def make_sequence(pipe: "DynamiCrafterImg2VideoPipeline", sequence: SequenceRequest, output_type: str,
                  options: dict[str, Any]) -> Any:
    """Make each piece of ``sequence`` with ``pipe``'s plain call and join them: ``[1, F, 3, H, W]``.

    ``options`` are the rest of the call's keywords (steps, guidance, frames, callbacks, ...),
    given to every piece. Returns a ``'pt'`` tensor or an ``'np'`` array ``[1, F, H, W, 3]``.
    """
    pieces: list[torch.Tensor] = []
    for index in range(sequence.pieces):
        if sequence.kind == "segments":
            image = sequence.starts[0] if index == 0 else _frame_image(
                pieces[-1][0, conditioning_frame(sequence.num_frames)])
            end = None
        else:
            image, end = sequence.starts[index], sequence.ends[index]
        logger.info("Making %s %d of %d.", "segment" if sequence.kind == "segments" else "interpolation",
                    index + 1, sequence.pieces)
        pieces.append(pipe(image, sequence.prompts[index], sequence.negative_prompts[index], end_image=end,
                           generator=sequence.generator, output_type="pt", return_dict=False, **options))
    video = join_pieces(pieces, overlap=sequence.overlap, cut=sequence.cut, loop=sequence.loop)
    return video if output_type == "pt" else video.permute(0, 1, 3, 4, 2).cpu().numpy()
