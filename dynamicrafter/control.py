"""Control images: ToonCrafter's sketch encoder and Stable Diffusion 2.1 ControlNets on the video UNet.

A ControlNet (:mod:`.models.controlnet`) reads the noisy latent of each frame (the first four
channels of the UNet's input, without the image latents concatenated to it), that frame's
control image and the guidance branch's cross-attention context, and returns 13 residuals
that :meth:`UNet3D.forward` adds to its 12 skip connections and its middle block, scaled by
``control_scale`` (the way ToonCrafter's sketch guidance, mattyamonaca's ``cldm``, and
ComfyUI-DynamiCrafterWrapper apply them). Every guidance branch gets the control, each with its
own context. Several ControlNets add their residuals.

What a file is, is read off its keys:

- **sketch encoder**: a ControlNet with a one-channel control image (ToonCrafter's
  ``sketch_encoder.ckpt``, or a float16 ``.safetensors`` copy). Its control images are line art,
  black lines on white, which :func:`sketch_hint` turns into what it was trained on: grey,
  inverted (white lines on black), in [0, 1].
- **ControlNet**: a three-channel one in the original layout (``control_model.*`` inside a
  ``ControlLDM`` checkpoint, or bare) or diffusers' (``diffusion_pytorch_model.safetensors``).
  Its control images are used as given (RGB in [0, 1]): depth maps, edges, line art made
  beforehand, e.g. with ``controlnet-aux``.

Frames: one control image for every frame, one per frame, or a dict ``{frame: image}``
(negative indices count from the end); the frames without an image get no control (their
residuals are zero). ``control_start``/``control_end``: the fraction of the sampling steps the
control is applied in (step ``i`` of ``n`` when ``start <= i / n`` and ``(i + 1) / n <= end``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .checkpoints import UNET_PREFIX, CheckpointMismatchError, _describe, read_release_state_dict
from .images import fit_image, load_image
from .models import controlnet as cn

if TYPE_CHECKING:
    from .configs import UNetConfig

logger = logging.getLogger(__name__)

#: The control strength when none is given: ToonCrafter's sketch guidance's default.
DEFAULT_SCALE = 0.6
#: The cross-attention width of Stable Diffusion 1.x, whose ControlNets do not fit these UNets.
SD1_CONTEXT_DIM = 768


def unet_residual_channels(config: UNetConfig) -> list[int]:
    """The channels of the skips and the middle block of a UNet, in a ControlNet's order."""
    return cn.ControlNetConfig(model_channels=config.model_channels, channel_mult=tuple(config.channel_mult),
                               num_res_blocks=config.num_res_blocks).residual_channels


def load_controlnet(path: str | Path, unet: UNetConfig, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> cn.ControlNet:
    """A ControlNet or sketch encoder file, checked against the UNet it will steer and loaded strictly.

    Raises :class:`CheckpointMismatchError` (one sentence) for an unreadable file, a file that is
    not a ControlNet, one for another UNet (Stable Diffusion 1.x's among them) or one whose keys
    or shapes are not a ControlNet's.
    """
    path = Path(path)
    state, _ = read_release_state_dict(path)
    if not cn.is_controlnet(state):
        if any(k.startswith(UNET_PREFIX) for k in state):
            raise CheckpointMismatchError(
                f"{path} is a DynamiCrafter model checkpoint, not a ControlNet; give it as the model's checkpoint "
                "and a ControlNet or sketch encoder as the control.")
        raise CheckpointMismatchError(
            f"{path} is not a ControlNet: none of its {len(state)} tensors (such as {next(iter(state), 'none')}) "
            "is a control-image encoder (input_hint_block.* or controlnet_cond_embedding.*).")
    state = cn.to_original_layout(state)
    try:
        config = cn.config_from_state_dict(state, unet.num_head_channels)
    except (KeyError, ValueError) as exc:
        raise CheckpointMismatchError(f"{path} is an incomplete or damaged ControlNet ({exc}).") from None
    if config.context_dim != unet.context_dim:
        if config.context_dim == SD1_CONTEXT_DIM:
            raise CheckpointMismatchError(
                f"{path} is a ControlNet for Stable Diffusion 1.x (cross-attention width 768); this model's UNet "
                f"needs one made for Stable Diffusion 2.1 (width {unet.context_dim}).")
        raise CheckpointMismatchError(
            f"{path} is a ControlNet for a UNet of cross-attention width {config.context_dim}; this model's is "
            f"{unet.context_dim}.")
    expected = unet_residual_channels(unet)
    if config.residual_channels != expected or config.in_channels != unet.out_channels:
        raise CheckpointMismatchError(
            f"{path} is a ControlNet for another UNet: its residuals have {config.residual_channels} channels "
            f"where this model's skips have {expected}.")
    with torch.device("meta"):
        net = cn.ControlNet(config)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"missing {_describe(missing)}"] if missing else []
        parts += [f"unexpected {_describe(unexpected)}"] if unexpected else []
        raise CheckpointMismatchError(f"{path} does not match a ControlNet: {'; '.join(parts)}.")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointMismatchError(f"{path} does not match a ControlNet: shapes differ for {_describe(wrong)}.")
    if not all(v.is_floating_point() for v in state.values()):
        raise CheckpointMismatchError(f"{path} stores integer tensors where a ControlNet has weights; it is damaged.")
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    kind = "sketch encoder" if is_sketch_encoder(net) else "ControlNet"
    logger.info("Loaded the %s %s (%d tensors) as %s on %s.", kind, path, len(state), dtype, device)
    return net.eval().requires_grad_(False)


def is_sketch_encoder(net: cn.ControlNet) -> bool:
    """Whether the network reads one-channel control images (ToonCrafter's sketch encoder)."""
    return net.config.hint_channels == 1


# ------------------------------------------------------------------ control images
def sketch_hint(image: Any, height: int, width: int) -> torch.Tensor:
    """Line art (dark lines on a light ground) as the sketch encoder reads it: ``[1, height, width]`` in [0, 1].

    Grey (ITU-R 601 luma, OpenCV's ``COLOR_BGR2GRAY``), inverted (``255 - v``: light lines on
    black), scaled to cover the frame and centre-cropped like the video's frames.
    """
    from PIL import ImageOps

    grey = ImageOps.invert(load_image(image, "The control image").convert("L")).convert("RGB")
    return (fit_image(grey, height, width)[:1] + 1.0) / 2.0


def rgb_hint(image: Any, height: int, width: int) -> torch.Tensor:
    """A control image (depth map, edges, ...) as a ControlNet reads it: ``[3, height, width]`` RGB in [0, 1]."""
    return (fit_image(load_image(image, "The control image"), height, width) + 1.0) / 2.0


@dataclass
class Control:
    """One ControlNet with its control images for a call.

    ``hints`` ``[F, C, H, W]`` in [0, 1] for the frames ``frames`` (sorted, of ``num_frames``);
    ``scale`` multiplies its residuals; it acts on steps ``start <= i / n`` and ``(i + 1) / n <= end``.
    """

    net: cn.ControlNet
    hints: torch.Tensor
    frames: list[int]
    num_frames: int
    scale: float = DEFAULT_SCALE
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, total: int) -> bool:
        return self.scale != 0 and self.start <= step / total and (step + 1) / total <= self.end

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """The scaled residuals ``[B*T, C_i, h_i, w_i]`` for the noisy latent ``x`` ``[B, 4, T, h, w]``.

        ``t`` ``[B]``, ``context`` ``[B, L, D]`` (every frame of a video gets its video's whole
        context) or, with prompts over time, ``[B, T, L, D]`` (each frame its own row); frames
        without a control image get zeros.
        """
        b, _, t_frames, h, w = x.shape
        n = len(self.frames)
        frames_x = x[:, :, self.frames].transpose(1, 2).reshape(b * n, -1, h, w)
        hints = self.hints.to(x.device).repeat(b, 1, 1, 1)
        if context.ndim == 4:  # a context per frame: the controlled frames' own rows
            frame_context = context[:, self.frames].reshape(b * n, *context.shape[2:])
        else:
            frame_context = context.repeat_interleave(n, dim=0)
        outs = self.net(frames_x, hints, t.repeat_interleave(n), frame_context)
        if n == t_frames:
            return [o * self.scale for o in outs]
        index = (torch.arange(b, device=x.device)[:, None] * t_frames
                 + torch.tensor(self.frames, device=x.device)[None]).flatten()
        full = []
        for o in outs:
            z = o.new_zeros(b * t_frames, *o.shape[1:])
            z[index] = o * self.scale
            full.append(z)
        return full


def prepare_control(net: cn.ControlNet, by_frame: dict[int, Any], num_frames: int, height: int, width: int,
                    scale: float = DEFAULT_SCALE, start: float = 0.0, end: float = 1.0) -> Control:
    """Fit a ControlNet's control images ``{frame: image}`` (the request's, checked and read) to ``height x width``."""
    hint = sketch_hint if is_sketch_encoder(net) else rgb_hint
    frames = sorted(by_frame)
    cache: dict[int, torch.Tensor] = {}  # one image for every frame is fitted once
    hints = []
    for f in frames:
        key = id(by_frame[f])
        if key not in cache:
            cache[key] = hint(by_frame[f], height, width)
        hints.append(cache[key])
    dtype = next(net.parameters()).dtype
    return Control(net, torch.stack(hints).to(dtype), frames, num_frames, scale, start, end)


def controlled(unet: Callable[..., torch.Tensor], controls: Sequence[Control], step_of: Callable[[int], int],
               total: int, latent_channels: int = 4) -> Callable[..., torch.Tensor]:
    """The UNet function ``(x_in, t, context, fs)`` with the controls' summed residuals added.

    ``x_in``'s first ``latent_channels`` channels are the noisy latent the ControlNets read;
    ``step_of(timestep)`` gives the sampling step of a timestep, of ``total``.
    """
    def unet_fn(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        step = step_of(int(t[0]))
        total_res: list[torch.Tensor] | None = None
        for control in controls:
            if not control.active(step, total):
                continue
            res = control.residuals(x_in[:, :latent_channels], t, context)
            total_res = res if total_res is None else [a + r for a, r in zip(total_res, res)]
        if total_res is None:
            return unet(x_in, t, context, fs)
        return unet(x_in, t, context, fs, residuals=total_res)

    return unet_fn
