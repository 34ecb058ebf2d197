"""The Stable-Diffusion KL autoencoder that maps frames to and from latents.

DynamiCrafter keeps it as ``first_stage_model``: an image is encoded to a diagonal
Gaussian posterior over a latent 8x smaller per side (for the released ``ch_mult``), and
latents are decoded back to images one frame at a time. Module and parameter names match
the released checkpoints with the ``first_stage_model.`` prefix removed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dynamicrafter.configs import VAEConfig

from ..errors import UserError

__all__ = ["AutoencoderKL"]


def group_norm(channels: int) -> nn.GroupNorm:
    """The 32-group normalization used throughout the autoencoder."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two norm-SiLU-conv stages with a residual; a 1x1 conv matches channels when they change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [b, c, h, w] -> [b, 1 head, h*w tokens, c]
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve height and width: pad one pixel on the right and bottom, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks at one resolution, each followed by attention when the level has it."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(channels[:-1], channels[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class MidBlock(nn.Module):
    """Residual block, full self-attention, residual block at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> posterior moments [B, 2*z_channels, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in (1, *cfg.ch_mult)]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i in range(len(cfg.ch_mult)):
            level = Level(widths[i], widths[i + 1], cfg.num_res_blocks, res in cfg.attn_resolutions)
            level.downsample = Downsample(widths[i + 1]) if i != len(cfg.ch_mult) - 1 else nn.Identity()
            res //= 2
            self.down.append(level)
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor, return_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """With ``return_hidden_states``, also the features ToonCrafter's decoder reads: the output of
        each level before its downsampling (``[B, ch*ch_mult[i], H/2^i, W/2^i]``), then ``conv_in``'s."""
        first = h = self.conv_in(x)
        states = []
        for level in self.down:
            h = level(h)
            states.append(h)
            h = level.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return (h, states + [first]) if return_hidden_states else h


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f].

    ``up[i]`` works at the resolution of ``encoder.down[i]``; they run from the last to the first.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        levels = []
        in_width = widths[-1]
        for i in reversed(range(n)):
            level = Level(in_width, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions)
            level.upsample = Upsample(widths[i]) if i != 0 else nn.Identity()
            res *= 2
            levels.append(level)
            in_width = widths[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularized autoencoder (``first_stage_model``) between images in [-1, 1] and latents.

    Latents here are unscaled: the diffusion model's latents are these times the config's
    ``scale_factor`` (0.18215), which the caller applies.
    """

    decoder_class: type[nn.Module] = Decoder

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not config.double_z:
            raise UserError("AutoencoderKL needs double_z=True: the encoder must output a mean and a log-variance.")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = self.decoder_class(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: Tensor, return_hidden_states: bool = False) -> tuple[Tensor, ...]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of images [B, 3, H, W].

        With ``return_hidden_states`` a third item: the encoder's per-level features
        (:meth:`Encoder.forward`), which ToonCrafter's decoder reads.
        """
        h = self.encoder(x, return_hidden_states)
        h, states = h if return_hidden_states else (h, None)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        if return_hidden_states:
            return mean, logvar.clamp(-30.0, 20.0), states
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Images [B, 3, H, W] in about [-1, 1] from unscaled latents [B, embed_dim, h, w]."""
        return self.decoder(self.post_quant_conv(z))
