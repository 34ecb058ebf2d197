"""Attention layers of the DynamiCrafter UNet.

All attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, so no
``[tokens x tokens]`` matrix is ever built here; PyTorch picks a flash or memory-efficient
kernel where one exists.

Spatial transformers see one frame at a time (``[B*T, H*W, C]``) and attend to the text
tokens and, through a second set of key/value projections, to the image tokens.
Temporal transformers see one pixel at a time (``[B*H*W, T, C]``) and only self-attend; for
videos longer than the model was trained on they can attend inside overlapping windows of frames
(FreeNoise, :func:`temporal_windows`, :func:`windowed_attention`, :func:`use_temporal_windows`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on ``[batch, tokens, heads * dim]`` tensors."""
    b, n, inner = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], heads, inner // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, inner)


def temporal_windows(frames: int, size: int, stride: int) -> list[tuple[int, int]]:
    """FreeNoise's windows ``[i * stride, i * stride + size)`` over ``frames`` frames, each frame covered.

    Where ``(frames - size) % stride`` is not 0 FreeNoise's windows stop short of the last frames
    (they would get no temporal attention); here one more window ends at the last frame. With
    ``frames <= size`` there is one window, the whole sequence.
    """
    if frames <= size:
        return [(0, frames)]
    windows = [(start, start + size) for start in range(0, frames - size + 1, stride)]
    if windows[-1][1] < frames:
        windows.append((frames - size, frames))
    return windows


def pyramid_weights(size: int) -> list[int]:
    """A window's weight per frame: 1, 2, ..., up to the middle and back down to 1 (FreeNoise's)."""
    return [min(i + 1, size - i) for i in range(size)]


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       windows: list[tuple[int, int]]) -> torch.Tensor:
    """Self-attention inside each window of the sequence, fused with FreeNoise's pyramid weights.

    ``q``, ``k``, ``v`` are ``[batch, frames, heads * dim]``, projected on the whole sequence.
    Each window attends only to itself; a frame's result is the weighted mean of the results of
    the windows that hold it. Only one window's attention is in memory at a time.
    """
    total = torch.zeros_like(q)
    weight_sum = q.new_zeros(q.shape[1])
    for start, end in windows:
        weights = torch.tensor(pyramid_weights(end - start), dtype=q.dtype, device=q.device)
        out = attention(q[:, start:end], k[:, start:end], v[:, start:end], heads)
        total[:, start:end] += out * weights[:, None]
        weight_sum[start:end] += weights
    return total / weight_sum[:, None]


def frames_to_time_major(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[B*T, C, H, W] -> [B, C, T, H*W]``, a view when ``x`` is channels-last.

    A channels-last ``[B*T, C, H, W]`` tensor lies in memory as ``[B, T, H, W, C]``, which is
    also a channels-last ``[B, C, T, H*W]`` image: the temporal layers then run as 2-D
    operations on it with no copy. Other layouts are copied once into the contiguous format.
    """
    bt = x.shape[0]
    y = x.unflatten(0, (bt // num_frames, num_frames)).flatten(3).transpose(1, 2)
    if y.is_contiguous(memory_format=torch.channels_last):
        return y
    return y.contiguous()


def time_major_to_frames(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`frames_to_time_major`: ``[B, C, T, H*W] -> [B*T, C, H, W]``."""
    b, c, t, _ = y.shape
    return y.transpose(1, 2).reshape(b * t, c, height, width)


class CrossAttention(nn.Module):
    """Self- or cross-attention, with an optional second branch over image tokens.

    With ``image_cross_attention`` the context is ``[text tokens | image tokens]``: the first
    ``text_context_len`` tokens go through ``to_k``/``to_v``, the rest through
    ``to_k_ip``/``to_v_ip``, and the two results are added, the image branch weighted by
    ``1 + tanh(alpha)`` when that weight is learnable.

    The branches stay two attention calls: each normalises its own softmax over its own keys, and
    one call over the concatenated keys would normalise over both, a different function. (Stacking
    the branches as extra heads would need the image keys padded to the text's 77 with a mask,
    which rules out the flash kernels and costs more than the second call's launch.)
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 image_cross_attention: bool = False, learnable_alpha: bool = False,
                 text_context_len: int = 77) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.text_context_len = text_context_len
        self.image_cross_attention = image_cross_attention
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.alpha = nn.Parameter(torch.zeros(())) if image_cross_attention and learnable_alpha else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                windows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """``windows``: self-attention inside these frame windows (:func:`windowed_attention`)."""
        q = self.to_q(x)
        if context is None:
            if windows is not None:
                return self.to_out(windowed_attention(q, self.to_k(x), self.to_v(x), self.heads, windows))
            return self.to_out(attention(q, self.to_k(x), self.to_v(x), self.heads))
        # Contiguous slices: a strided 3-D input would make the projections batched matmuls
        # over a copy of the weight per frame.
        # Without image cross-attention every token is text (the original splits only with it).
        text = context[:, : self.text_context_len].contiguous() if self.image_cross_attention else context
        out = attention(q, self.to_k(text), self.to_v(text), self.heads)
        if self.image_cross_attention:
            image = context[:, self.text_context_len:].contiguous()
            out_ip = attention(q, self.to_k_ip(image), self.to_v_ip(image), self.heads)
            if self.alpha is not None:
                out_ip = out_ip * (torch.tanh(self.alpha) + 1)
            out = out + out_ip
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: ``a * gelu(b)`` for ``[a, b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x hidden width.

    Its hidden activations are the largest tensors of the UNet at high resolution (1.5 GB at
    576x1024 with 2 x 16 frames), so big inputs are run in slices of whole sequences, each with
    at most ``max_hidden`` hidden values: the same result with a bounded peak.
    """

    max_hidden = 2 ** 27

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.hidden = dim * mult * 2
        # Index 1 is where the training-time dropout sat; keeping the slot keeps the key names.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, self.max_hidden // (x.shape[1] * self.hidden))
        if x.shape[0] <= rows:
            return self.net(x)
        return torch.cat([self.net(part) for part in x.split(rows)])


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention (or a second self-attention), feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 image_cross_attention: bool = False, learnable_alpha: bool = False,
                 text_context_len: int = 77) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, image_cross_attention,
                                    learnable_alpha, text_context_len)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                windows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """``windows`` apply to the self-attentions (both of a temporal block, whose ``context`` is ``None``)."""
        x = x + self.attn1(self.norm1(x), windows=windows)
        x = x + self.attn2(self.norm2(x), context, windows=windows)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of each frame, conditioned on text and image tokens."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 image_cross_attention: bool = False, learnable_alpha: bool = False,
                 text_context_len: int = 77) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, image_cross_attention,
                                  learnable_alpha, text_context_len)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B*T, C, H, W]``; ``context``: ``[B*T, tokens, context_dim]``."""
        bt, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y)
        return x + y.transpose(1, 2).reshape(bt, c, h, w)


class TemporalTransformer(nn.Module):
    """Self-attention along time for every pixel.

    ``use_linear=False`` gives 1x1 ``Conv1d`` projections (the UNet's first temporal block),
    ``True`` gives ``Linear`` ones; both compute the same thing with differently shaped weights.

    ``window`` (``(size, stride)``, set by :func:`use_temporal_windows`) makes the attention run
    inside FreeNoise's windows of frames when a video has more than ``size`` frames.
    """

    window: tuple[int, int] | None = None

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, use_linear: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv1d(channels, inner, 1), nn.Conv1d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head) for _ in range(depth)
        )

    @staticmethod
    def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.Conv1d):
            return F.linear(x, layer.weight.squeeze(-1), layer.bias)
        return layer(x)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``x``: ``[B*T, C, H, W]`` with frames of one video adjacent."""
        bt, c, h, w = x.shape
        b = bt // num_frames
        y = self.norm(frames_to_time_major(x, num_frames))  # [B, C, T, H*W], statistics over T too
        y = y.permute(0, 3, 2, 1).reshape(b * h * w, num_frames, c)  # the one copy: a sequence per pixel
        y = self._project(self.proj_in, y)
        windows = None
        if self.window is not None and num_frames > self.window[0]:
            windows = temporal_windows(num_frames, *self.window)
        for block in self.transformer_blocks:
            y = block(y, windows=windows)
        y = self._project(self.proj_out, y)
        # Added back through a strided view: the sum takes x's layout, no transposed copy.
        y = y.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2)  # [B, T, C, H, W]
        return (x.view(b, num_frames, c, h, w) + y).reshape(bt, c, h, w)


@contextmanager
def use_temporal_windows(module: nn.Module, size: int | None, stride: int = 4) -> Iterator[None]:
    """Within the block, every temporal transformer of ``module`` attends in windows of ``size``
    frames ``stride`` apart (FreeNoise) when a video is longer than ``size``; ``None``: whole sequences."""
    layers = [m for m in module.modules() if isinstance(m, TemporalTransformer)]
    window = None if size is None else (size, stride)
    for layer in layers:
        layer.window = window
    try:
        yield
    finally:
        for layer in layers:
            layer.window = None
