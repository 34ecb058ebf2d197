"""ControlNet (Zhang et al. 2023) in the layout of Stable Diffusion 2.1's ``cldm.ControlNet``.

The network is a copy of the image UNet's encoder half (``input_blocks``, ``middle_block``,
2-D: no temporal layers) plus a small convolutional encoder of the control image
(``input_hint_block``, 8x down to the latent size) whose output is added after the first
convolution, and one zero-initialised 1x1 convolution per block (``zero_convs``,
``middle_block_out``) that turns the block's output into a residual for the video UNet: 12
residuals for its skip connections and one for its middle block (:meth:`UNet3D.forward`'s
``residuals``). Module names are the checkpoint keys of the original layout (lllyasviel's
``cldm``, ToonCrafter's ``sketch_encoder.ckpt``); :func:`from_diffusers` renames diffusers'
``ControlNetModel`` keys to them.

It runs on every frame on its own: ``x [N, 4, h, w]`` (the noisy latent of N = B*T frames,
without the image latents the video UNet also reads), ``hint [N, C, 8h, 8w]``, the timestep
``[N]`` and the cross-attention context ``[N, L, D]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .attention import SpatialTransformer
from .unet import Downsample, ResBlock, Stage, timestep_embedding

#: The control image encoder's widths (fixed in every released ControlNet, whatever the UNet's width).
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """The shape of a ControlNet; :func:`config_from_state_dict` reads it off a checkpoint.

    ``attention`` says per level whether its ResBlocks are followed by a spatial transformer;
    the middle block always has one. ``num_head_channels`` is not stored in a checkpoint: it is
    the width of the UNet the ControlNet was trained with (64 for Stable Diffusion 2.1).
    """

    in_channels: int = 4
    hint_channels: int = 3
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention: tuple[bool, ...] = (True, True, True, False)
    num_head_channels: int = 64
    context_dim: int = 1024
    transformer_depth: int = 1

    @property
    def residual_channels(self) -> list[int]:
        """The channels of the 13 residuals, in the order the network makes them (the middle one last)."""
        channels = [self.model_channels]
        for level, mult in enumerate(self.channel_mult):
            channels += [mult * self.model_channels] * self.num_res_blocks
            if level != len(self.channel_mult) - 1:
                channels.append(mult * self.model_channels)
        return channels + [channels[-1]]


class ControlNet(nn.Module):
    """``(x [N, 4, h, w], hint [N, C, 8h, 8w], t [N], context [N, L, D]) -> 13 residuals``."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.model_channels
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        self.zero_convs = nn.ModuleList([self._zero_conv(ch)])

        hint: list[nn.Module] = []
        widths = (cfg.hint_channels, *HINT_CHANNELS)
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            hint += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
        hint.append(nn.Conv2d(HINT_CHANNELS[-1], ch, 3, padding=1))
        self.input_hint_block = nn.Sequential(*hint)

        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * cfg.model_channels, temporal_conv=False)]
                ch = mult * cfg.model_channels
                if cfg.attention[level]:
                    layers.append(self._transformer(ch))
                self.input_blocks.append(Stage(layers))
                self.zero_convs.append(self._zero_conv(ch))
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                self.zero_convs.append(self._zero_conv(ch))
        self.middle_block = Stage([ResBlock(ch, emb_dim, temporal_conv=False), self._transformer(ch),
                                   ResBlock(ch, emb_dim, temporal_conv=False)])
        self.middle_block_out = self._zero_conv(ch)

    @staticmethod
    def _zero_conv(ch: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(ch, ch, 1))

    def _transformer(self, ch: int) -> SpatialTransformer:
        cfg = self.config
        return SpatialTransformer(ch, ch // cfg.num_head_channels, cfg.num_head_channels, cfg.transformer_depth,
                                  cfg.context_dim)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """The residuals ``[N, C_i, h_i, w_i]``: one per input block (12 for SD 2.1), then the middle block's."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        context = context.to(dtype)
        h = x.to(dtype)
        guided_hint: torch.Tensor | None = self.input_hint_block(hint.to(dtype))
        outs = []
        for block, zero_conv in zip(self.input_blocks, self.zero_convs):
            h = block(h, emb, context, 1)
            if guided_hint is not None:
                h = h + guided_hint
                guided_hint = None
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context, 1)
        outs.append(self.middle_block_out(h))
        return outs


# ------------------------------------------------------------------ layouts
#: The prefix of a ControlNet inside lllyasviel's ``ControlLDM`` checkpoints (``control_sd21_*.pth``).
CLDM_PREFIX = "control_model."
#: A key only diffusers' ``ControlNetModel`` has.
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
#: A key only the original layout has.
ORIGINAL_MARK = "input_hint_block.0.weight"

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def is_controlnet(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is a ControlNet in any layout this module reads."""
    return any(k.endswith(ORIGINAL_MARK) or k == DIFFUSERS_MARK for k in state)


def from_diffusers(state: Mapping[str, torch.Tensor], num_res_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict to the original layout (same tensors).

    ``num_res_blocks`` (diffusers' ``layers_per_block``) is read off the keys when not given.
    Keys it does not know are kept as they are, for the strict check to name.
    """
    if num_res_blocks is None:
        found = [int(m[1]) for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
        num_res_blocks = max(found) + 1 if found else 2
    out = {}
    for key, value in state.items():
        new = _diffusers_key(key, num_res_blocks)
        out[new if new is not None else key] = value
    return out


def _resnet(rest: str) -> str | None:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}" if name in _RESNET else None


def _diffusers_key(key: str, nrb: int) -> str | None:
    simple = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
              "time_embedding.linear_2.": "time_embed.2.", "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
              "controlnet_cond_embedding.conv_out.": "input_hint_block.14.",
              "controlnet_mid_block.": "middle_block_out.0."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = 1 + int(m[1]) * (nrb + 1) + int(m[3])
        if m[2] == "attentions":
            return f"input_blocks.{block}.1.{m[4]}"
        rest = _resnet(m[4])
        return None if rest is None else f"input_blocks.{block}.0.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (nrb + 1) + nrb}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        rest = _resnet(m[2])
        return None if rest is None else f"middle_block.{2 * int(m[1])}.{rest}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    return None


def to_original_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout -> the original one: diffusers keys renamed, the ``control_model.`` prefix taken off,
    1x1-convolution transformer projections (the SD 1.x layout) stored as the linear weights they are."""
    if DIFFUSERS_MARK in state:
        state = from_diffusers(state)
    elif any(k.startswith(CLDM_PREFIX + ORIGINAL_MARK) for k in state):
        state = {k[len(CLDM_PREFIX):]: v for k, v in state.items() if k.startswith(CLDM_PREFIX)}
    out = {}
    for key, value in state.items():
        if re.search(r"\.proj_(in|out)\.weight$", key) and value.ndim == 4 and value.shape[-2:] == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def config_from_state_dict(state: Mapping[str, torch.Tensor], num_head_channels: int) -> ControlNetConfig:
    """The :class:`ControlNetConfig` of an original-layout state dict (shapes and key names only).

    Raises ``KeyError`` or ``ValueError`` when the keys do not form a ControlNet.
    """
    first = state["input_blocks.0.0.weight"]
    model_channels = first.shape[0]
    blocks = sorted({int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    mults: list[int] = []
    attention: list[bool] = []
    num_res_blocks = 0
    per_level = 0
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            num_res_blocks = num_res_blocks or per_level
            per_level = 0
            continue
        out = state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
        if per_level == 0:
            mults.append(out // model_channels)
            attention.append(f"input_blocks.{i}.1.proj_in.weight" in state)
        per_level += 1
    num_res_blocks = num_res_blocks or per_level
    if not mults or len(blocks) != 1 + len(mults) * (num_res_blocks + 1) - 1:
        raise ValueError("the input blocks do not form levels of equal depth")
    depth = len({m[1] for k in state if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k))})
    return ControlNetConfig(
        in_channels=first.shape[1], hint_channels=state[ORIGINAL_MARK].shape[1], model_channels=model_channels,
        channel_mult=tuple(mults), num_res_blocks=num_res_blocks, attention=tuple(attention),
        num_head_channels=num_head_channels,
        context_dim=state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        transformer_depth=depth)
