"""The image query transformer (``image_proj_model``): a Perceiver resampler.

It turns the 257 CLIP image tokens into ``num_queries`` tokens per frame (``video_length``
frames, so 16 x 16 = 256 tokens for the released models) that the UNet cross-attends to.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs import ResamplerConfig
from .attention import attention


class PerceiverAttention(nn.Module):
    """Latent queries attend to the image tokens and to themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, bias-free MLP with GELU."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """``[B, 257, embedding_dim]`` CLIP tokens -> ``[B, num_queries * video_length, output_dim]``."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        queries = config.num_queries * (config.video_length or 1)
        self.latents = nn.Parameter(torch.randn(1, queries, config.dim) / config.dim ** 0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(config.dim, config.dim_head, config.heads),
                           feed_forward(config.dim, config.ff_mult)])
            for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))
