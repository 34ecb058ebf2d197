"""Sample videos during training: the fixed image and prompt rendered with the model as trained so far."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from . import data as data_mod
from .config import TrainConfig

if TYPE_CHECKING:
    from .trainer import TrainState


@dataclass(frozen=True)
class SampleInput:
    image: Any  # a PIL image
    prompt: str


def sample_input(cfg: TrainConfig, clips: data_mod.ClipDataset) -> SampleInput:
    """The image and prompt of every sample: ``--sample_image``/``--sample_prompt`` or the first clip's."""
    from ..images import load_image

    if cfg.sample_image:
        return SampleInput(load_image(cfg.sample_image), cfg.sample_prompt or "")
    clip = clips.clips[0]
    try:
        image = data_mod.first_frame(clip.path)
    except data_mod.ClipError as exc:
        raise UserError(f"The samples' image cannot be taken from {clip.path} ({exc}); give --sample_image.") from None
    return SampleInput(image, clip.caption if cfg.sample_prompt is None else cfg.sample_prompt)


def render_sample(state: TrainState, sample: SampleInput) -> Path:
    """Render ``samples/step_<step>.mp4`` (main process; not under FSDP, whose weights are sharded)."""
    from ..pipeline import DynamiCrafterImg2VideoPipeline

    run, cfg = state.run, state.run.cfg
    # Share the training model as it is (no cast): its float32 trained weights must stay float32.
    pipe = DynamiCrafterImg2VideoPipeline.from_model(state.model, run.device, torch.float32, cast=False, offload="none")
    was_training = state.model.unet.training
    state.model.unet.eval()
    try:
        with run.autocast(), torch.no_grad():
            frames = pipe(sample.image, sample.prompt, num_inference_steps=cfg.sample_steps,
                          num_frames=cfg.sample_frames or run.frames, height=run.height, width=run.width,
                          generator=torch.Generator(run.device).manual_seed(cfg.seed))["videos"]
    finally:
        state.model.unet.train(was_training)
    path = run.out / "samples" / f"step_{state.step:06d}.mp4"
    try:
        pipe.save_video(frames, path, fps=8)
    except OSError as exc:
        raise UserError(f"Could not write the sample video {path} ({exc.strerror or exc}).") from None
    return path
