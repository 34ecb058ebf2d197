"""ToonCrafter's autoencoder: the KL encoder, and a temporal decoder that looks at two key frames.

ToonCrafter (Xing et al., SIGGRAPH Asia 2024) keeps DynamiCrafter's encoder and replaces the
decoder (``first_stage_model.decoder`` in its checkpoint, released as ``AutoencoderKL_Dualref``):

* every residual block gets a temporal residual block (``time_stack``: two 3x1x1 convolutions
  over time) whose output is blended with the spatial one by ``sigmoid(mix_factor)``;
* the output convolution is followed by a 3x1x1 temporal convolution (``conv_out.time_mix_conv``);
* after the residual blocks of each resolution level (``attn_refinement[i]``), the frames read
  the encoder features of the first and the last key frame at that resolution: through
  cross-attention (8 heads of 64) on the levels in ``reference_attention_levels`` (the two
  lowest resolutions), elsewhere by adding a 1x1-convolved copy of the first key frame's
  features to the first frame and of the last one's to the last frame
  (``attn_refinement[-1]`` does the same after the final normalization, with ``conv_in``'s features).

The decoder sees a window of consecutive frames of one video at a time. :meth:`decode_video`
decodes as ToonCrafter's inference does: windows of ``window`` frames (its UNet's
``temporal_length``), latents divided by the scale factor *without* ``post_quant_conv`` (its
inference never applies it with this decoder; the weights are in the checkpoint, unused), and a
second pass without the second and the second-to-last frame whose results replace the two
middle frames. Module names match the checkpoint keys under ``first_stage_model.``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import DUAL_REFERENCE_MIN_FRAMES, VAEConfig
from ..errors import UserError
from .attention import attention
from .unet import GroupNorm32
from .vae import AttnBlock, AutoencoderKL, ResnetBlock, Upsample, group_norm

__all__ = ["AutoencoderKLDualRef", "DualRefDecoder", "splice_frames"]


def _video(x: Tensor, num_frames: int) -> Tensor:
    """``[B*T, C, H, W]`` -> ``[B, C, T, H, W]``."""
    bt, c, h, w = x.shape
    return x.view(bt // num_frames, num_frames, c, h, w).transpose(1, 2)


def _frames(x: Tensor) -> Tensor:
    """``[B, C, T, H, W]`` -> ``[B*T, C, H, W]``."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


class TemporalResBlock(nn.Module):
    """Two (norm, SiLU, 3x1x1 conv) stages over time with a residual (``time_stack``); ``[B, C, T, H, W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()

        def conv() -> nn.Conv3d:
            return nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), conv())
        # index 2 of out_layers is the training-time dropout slot, kept for the key names
        self.out_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Identity(), conv())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out_layers(self.in_layers(x))


class VideoResnetBlock(ResnetBlock):
    """The 2-D residual block, then a temporal one, blended by the learned ``sigmoid(mix_factor)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.time_stack = TemporalResBlock(out_channels)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        """``x``: ``[B*T, C, H, W]``, frames of a video adjacent."""
        spatial = _video(super().forward(x), num_frames)
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return _frames(alpha * self.time_stack(spatial) + (1 - alpha) * spatial)


class VideoConv(nn.Conv2d):
    """A 3x3 convolution per frame followed by a 3x1x1 convolution over time (``conv_out``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        return _frames(self.time_mix_conv(_video(super().forward(x), num_frames)))


class ReferenceAttention(nn.Module):
    """Every frame attends to the features of both key frames at its resolution (8 heads of 64).

    Queries come from the normalized frame, keys and values from the (unnormalized) encoder
    features of the first and the last key frame; the result is added to the frame.
    """

    heads = 8
    dim_head = 64

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = self.heads * self.dim_head
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, channels))

    def forward(self, x: Tensor, reference: Tensor, num_frames: int) -> Tensor:
        """``x``: ``[B*T, C, H, W]``; ``reference``: ``[B, C, 2, H, W]`` (first, last key frame)."""
        bt, c, h, w = x.shape
        b = reference.shape[0]
        # every query of a video's T frames sees the same 2*H*W key-frame tokens, so the frames
        # are folded into the query length: [B, T*H*W, C] against [B, 2*H*W, C]
        q = self.to_q(self.norm(x).flatten(2).transpose(1, 2).reshape(b, num_frames * h * w, c))
        tokens = reference.permute(0, 2, 3, 4, 1).reshape(b, 2 * h * w, c)
        out = attention(q, self.to_k(tokens), self.to_v(tokens), self.heads)
        out = self.to_out(out).view(bt, h * w, c).transpose(1, 2).reshape(bt, c, h, w)
        return x + out


class ReferenceAdd(nn.Module):
    """Adds the 1x1-convolved features of the first key frame to the first frame, the last's to the last."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, reference: Tensor, num_frames: int) -> Tensor:
        """``x``: ``[B*T, C, H, W]`` (changed in place and returned); ``reference``: ``[B, C, 2, H, W]``."""
        first, last = self.conv(_frames(reference)).view(reference.shape[0], 2, *x.shape[1:]).unbind(1)
        video = x.view(-1, num_frames, *x.shape[1:])
        video[:, 0] += first
        video[:, -1] += last  # with a single frame both are added to it
        return x


class VideoLevel(nn.Module):
    """The residual blocks (and attention, where configured) of one decoder resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(VideoResnetBlock(i, o) for i, o in zip(channels[:-1], channels[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x, num_frames)
            if self.attn:
                x = self.attn[i](x)
        return x


class VideoMidBlock(nn.Module):
    """Temporal residual block, spatial self-attention, temporal residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = VideoResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = VideoResnetBlock(channels, channels)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x, num_frames)), num_frames)


class DualRefDecoder(nn.Module):
    """Latents of one window of frames ``[B*T, z_channels, h, w]`` -> frames ``[B*T, out_ch, H, W]``.

    ``up[i]`` works at the resolution of ``encoder.down[i]``; ``attn_refinement[i]`` follows it and
    reads the encoder's level-``i`` features, ``attn_refinement[-1]`` reads ``conv_in``'s.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = VideoMidBlock(widths[-1])
        levels, refinement = [], []
        in_width = widths[-1]
        for i in reversed(range(n)):
            level = VideoLevel(in_width, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions)
            level.upsample = Upsample(widths[i]) if i != 0 else nn.Identity()
            res *= 2
            levels.append(level)
            refinement.append(ReferenceAttention(widths[i]) if i in cfg.reference_attention_levels
                              else ReferenceAdd(widths[i]))
            in_width = widths[i]
        self.up = nn.ModuleList(reversed(levels))
        self.attn_refinement = nn.ModuleList([*reversed(refinement), ReferenceAdd(widths[0])])
        self.norm_out = group_norm(widths[0])
        self.conv_out = VideoConv(widths[0], cfg.out_ch)

    def forward(self, z: Tensor, reference: Sequence[Tensor] | None, num_frames: int) -> Tensor:
        """``reference``: the encoder features of the key frames, one ``[B, C_i, 2, H_i, W_i]`` per
        level and a last one for ``conv_in`` (see :meth:`AutoencoderKLDualRef.key_frame_states`);
        ``None`` skips the refinement."""
        h = self.mid(self.conv_in(z), num_frames)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = level(h, num_frames)
            if reference:
                h = self.attn_refinement[i](h, reference[i], num_frames)
            h = level.upsample(h)
        h = F.silu(self.norm_out(h))
        if reference:
            h = self.attn_refinement[-1](h, reference[-1], num_frames)
        return self.conv_out(h, num_frames)


#: Fewest frames the two-pass decoding can make (it leaves out the second and second-to-last frame).
MIN_FRAMES = DUAL_REFERENCE_MIN_FRAMES


def splice_frames(num_frames: int) -> tuple[list[int], slice, slice]:
    """ToonCrafter's second decoding pass for ``num_frames`` frames.

    Returns the frames the second pass decodes (all but the second and the second-to-last), the
    positions of the final video it fills (the two middle frames) and where those come from in
    the second pass. For 16 frames: frames ``[0, 2, ..., 13, 15]``; frames 7 and 8 of the video
    are that pass's 6 and 7 (the latents of frames 7 and 8 decoded in a 14-frame window).
    """
    if num_frames < MIN_FRAMES:
        raise UserError(f"ToonCrafter's decoding needs at least {MIN_FRAMES} frames, got {num_frames}.")
    keep = list(range(num_frames))
    del keep[1]
    del keep[-2]
    half = num_frames // 2
    return keep, slice(half - 1, half + 1), slice(half - 2, half)


class AutoencoderKLDualRef(AutoencoderKL):
    """ToonCrafter's ``first_stage_model``: the KL encoder and :class:`DualRefDecoder`."""

    decoder_class = DualRefDecoder

    def key_frame_states(self, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Encode the key frames ``[B, 3, H, W]`` (in [-1, 1]) in one batch.

        Returns the posterior means of ``start`` and ``end`` (unscaled, ``[B, embed_dim, h, w]``)
        and the decoder's reference features: per encoder level, then ``conv_in``,
        ``[B, C_i, 2, H_i, W_i]`` with the start frame at index 0 and the end frame at index 1.
        """
        b = start.shape[0]
        mean, _, states = self.encode(torch.cat([start, end]), return_hidden_states=True)
        return mean[:b], mean[b:], [torch.stack([s[:b], s[b:]], dim=2) for s in states]

    def decode(self, z: Tensor, reference: Sequence[Tensor] | None = None, num_frames: int | None = None) -> Tensor:
        """One window: ``[B*T, embed_dim, h, w]`` unscaled latents of ``B`` videos of ``num_frames``
        frames -> ``[B*T, 3, H, W]``. As ToonCrafter's inference, ``post_quant_conv`` is not applied."""
        return self.decoder(z, reference, num_frames or z.shape[0])

    def decode_video(self, z: Tensor, reference: Sequence[Tensor], window: int) -> Tensor:
        """Decode ``[B, embed_dim, T, h, w]`` unscaled latents to ``[B, 3, T, H, W]`` as ToonCrafter does.

        Each video is decoded on its own, in windows of ``window`` consecutive frames (its
        ``perframe_ae`` decoding; ``window`` is its UNet's ``temporal_length``, 16); then the
        frames without the second and the second-to-last are decoded again and the two middle
        frames taken from that pass (:func:`splice_frames`). Only the windows of the second pass
        that hold those two frames are computed. Needs at least 4 frames.
        """
        num_frames = z.shape[2]
        keep, target, source = splice_frames(num_frames)
        video = self._decode_windows(z, reference, window)
        wanted = range(source.start, source.stop)
        video[:, :, target] = self._decode_windows(z[:, :, keep], reference, window, wanted)[:, :, source]
        return video

    def _decode_windows(self, z: Tensor, reference: Sequence[Tensor], window: int,
                        wanted: range | None = None) -> Tensor:
        """Decode each video in windows of ``window`` frames; with ``wanted``, only windows holding those frames."""
        out = None
        for b in range(z.shape[0]):
            refs = [r[b:b + 1] for r in reference]
            for start in range(0, z.shape[2], window):
                stop = min(start + window, z.shape[2])
                if wanted is not None and not any(start <= i < stop for i in wanted):
                    continue
                frames = self.decode(_frames(z[b:b + 1, :, start:stop]), refs, stop - start)
                if out is None:
                    out = frames.new_zeros(z.shape[0], frames.shape[1], z.shape[2], *frames.shape[2:])
                out[b, :, start:stop] = frames.transpose(0, 1)
        return out
