"""Several prompts over time (FreeNoise's multi-prompt mode): a prompt schedule ``{frame: prompt}``.

A schedule such as ``{0: "a cat sits", 48: "a cat jumps"}`` gives each of its key frames the text
embedding of its prompt; a frame between two keys gets the linear interpolation of their
embeddings (all 77 text tokens, as the text encoder outputs them), a frame before the first key
the first prompt's, a frame after the last key the last prompt's (:func:`interpolate`). FreeNoise's
two-prompt mode is the schedule ``{3T // 8: first, T - 3T // 8 - 1: second}`` of a ``T``-frame video.
The image tokens stay those of a plain prompt on every frame, and the unconditional branch keeps
its negative prompt on every frame.

The text form, shared by the command line and the app, is ``"0: a cat sits | 48: a cat jumps"``
(:func:`parse_prompt`): a text is read as a schedule only when it holds a ``|`` and starts with
``<frame>:``, so every other prompt means what it always meant.

Importing this module does not import torch (the command line checks prompts before loading).
"""

from __future__ import annotations

import numbers
import re
from typing import TYPE_CHECKING, Sequence

from .errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["SEPARATOR", "EXAMPLE", "parse_prompt", "check_schedule", "prompt_text", "frame_keys", "interpolate"]

#: What separates the ``<frame>: <prompt>`` parts of a timed prompt.
SEPARATOR = "|"
#: A timed prompt as the command line and the app take it.
EXAMPLE = "0: a cat sits | 48: a cat jumps"
_PART = re.compile(r"\s*(\d+)\s*:(.*)", re.DOTALL)


def parse_prompt(text: str) -> str | dict[int, str]:
    """``text`` as a schedule ``{frame: prompt}`` when written as one (see :data:`EXAMPLE`), else unchanged.

    A text is a schedule when it contains :data:`SEPARATOR` and its first part starts with
    ``<frame>:``; then every part must be ``<frame>: <prompt>`` with a frame given once. Frames
    are checked against the video's length by :func:`check_schedule`.
    """
    parts = text.split(SEPARATOR)
    if len(parts) < 2 or not _PART.fullmatch(parts[0]):
        return text
    schedule: dict[int, str] = {}
    for part in parts:
        match = _PART.fullmatch(part)
        if match is None:
            raise UserError(f"Part {part.strip()!r} of the timed prompt {text!r} is not '<frame>: <prompt>'; "
                            f"write e.g. '{EXAMPLE}'.")
        frame = int(match.group(1))
        if frame in schedule:
            raise UserError(f"Frame {frame} is given twice in the timed prompt {text!r}.")
        schedule[frame] = match.group(2).strip()
    return schedule


def check_schedule(value: dict, num_frames: int) -> str | dict[int, str]:
    """A schedule ``{frame: prompt}`` checked for a ``num_frames`` video.

    Its frames must be integers in ``[0, num_frames)`` and its prompts strings; it is returned
    sorted by frame, and a schedule of one prompt as that prompt (it holds on every frame).
    """
    if not value:
        raise UserError("The prompt schedule is empty; give at least one frame and its prompt, "
                        "e.g. {0: 'a cat sits', 48: 'a cat jumps'}.")
    schedule = {}
    for frame, text in value.items():
        if isinstance(frame, bool) or not isinstance(frame, numbers.Integral):
            raise UserError(f"Prompt schedule frames must be integers, got {frame!r}.")
        if not 0 <= frame < num_frames:
            raise UserError(f"Prompt schedule frame {frame} is outside the video's frames 0 to {num_frames - 1}.")
        if not isinstance(text, str):
            raise UserError(f"The prompt of schedule frame {frame} must be a string, got {type(text).__name__}.")
        schedule[int(frame)] = text
    if len(schedule) == 1:
        return next(iter(schedule.values()))
    return dict(sorted(schedule.items()))


def prompt_text(prompt: str | dict[int, str]) -> list[str]:
    """The texts a prompt or schedule holds, in frame order."""
    return list(prompt.values()) if isinstance(prompt, dict) else [prompt]


def frame_keys(keys: Sequence[int], num_frames: int) -> list[tuple[int, int]]:
    """For each frame, the indices into ``keys`` (sorted) of the keys it lies between.

    Both are the same key on a key frame, before the first key (the first) and after the last
    (the last).
    """
    spans = []
    for frame in range(num_frames):
        after = next((i for i, key in enumerate(keys) if key >= frame), len(keys) - 1)
        before = after if keys[after] <= frame else max(after - 1, 0)
        spans.append((before, after))
    return spans


def interpolate(embeddings: "torch.Tensor", keys: Sequence[int], num_frames: int) -> "torch.Tensor":
    """Each frame's text embedding ``[T, L, D]`` from the key prompts' ``embeddings [K, L, D]`` at ``keys`` (sorted).

    Between keys ``a < b`` frame ``f`` gets ``e_a + (e_b - e_a) / (b - a) * (f - a)``, FreeNoise's
    arithmetic; outside them the nearest key's embedding.
    """
    frames = []
    for frame, (before, after) in enumerate(frame_keys(keys, num_frames)):
        start = embeddings[before]
        if before == after:
            frames.append(start)
        else:
            step = (embeddings[after] - start) / (keys[after] - keys[before])
            frames.append(start + step * (frame - keys[before]))
    import torch

    return torch.stack(frames)
