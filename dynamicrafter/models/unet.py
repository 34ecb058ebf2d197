"""The 3-D denoising UNet of DynamiCrafter (``model.diffusion_model`` in the checkpoints).

A Stable-Diffusion-style 2-D UNet run on every frame (``[B*T, C, H, W]``), made temporal by
a temporal convolution inside each ResBlock and a temporal transformer after each spatial
one, plus one extra temporal transformer (``init_attn``) after the input convolution.
Conditioning: the diffusion timestep and the frame stride / frame rate (sinusoidal
embeddings added to every ResBlock), text and image tokens through cross-attention, and the
image latent concatenated to the noisy latent on the channel axis (``in_channels = 8``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configs import UNetConfig
from . import fused_norm
from .attention import SpatialTransformer, TemporalTransformer, frames_to_time_major, time_major_to_frames

#: Whether the UNet uses the fused group norm + SiLU kernel on CUDA unless told (``UNet3D.fused_norm``).
#: Off: the kernel is tested under Triton's interpreter and compiled for sm_90, but not yet timed
#: or run on a GPU; ``fused_norm = True`` (or the benchmark's ``--fused-norm on``) opts in.
FUSED_NORM_BY_DEFAULT = False


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t * f), sin(t * f)]`` of a batch of (integer) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in float32 whatever the input dtype.

    PyTorch's kernels already compute the statistics and the normalisation of bfloat16 and
    float16 inputs in float32 and round once at the end, which is what converting the input to
    float32 and the result back would give, without the two extra copies of the activations.
    Only when the weights' dtype differs from the input's is the input converted explicitly.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def norm_silu(layers: nn.Sequential, x: torch.Tensor, fused: bool = False,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """``layers[1](layers[0](x + shift))``: the group norm and SiLU that open ``layers``.

    ``x``: ``[N, C, *spatial]``; ``shift``: ``[N, C]`` or ``None``, added to every pixel of its
    (sample, channel) first. With ``fused`` (see :meth:`UNet3D.use_fused_norm`), and where
    :func:`fused_norm.kernel_applies` (CUDA, no autograd), one Triton kernel does it all
    (float32 inside, one rounding); otherwise the modules themselves run, as they always did.
    """
    norm, silu, *_ = layers  # unpacked: indexing an nn.Sequential is what torch.compile's tracing spends most on
    # Not while torch.compile traces (Inductor fuses these ops itself): asked first, because reading
    # Triton's interpreter setting off CUDA would break the graph.
    if fused and not torch.compiler.is_compiling() and fused_norm.kernel_applies(x, norm.weight, norm.bias, shift):
        return fused_norm.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift)
    if shift is not None:
        x = x + shift.reshape(*shift.shape, *([1] * (x.ndim - 2)))
    return silu(norm(x))


class TemporalConvBlock(nn.Module):
    """Four (norm, SiLU, 3x1x1 conv) stages along time, added back to the input.

    The checkpoints hold ``Conv3d`` weights ``[C, C, 3, 1, 1]``; they are applied as a ``3x1``
    2-D convolution over the ``[B, C, T, H*W]`` layout (the same arithmetic, and the same
    statistics for the norms, which span time too). oneDNN runs that up to twice as fast as the
    3-D convolution on an AVX-512 CPU, and on channels-last activations it needs no transpose.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        def stage(with_dropout_slot: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(32, channels), nn.SiLU()]
            if with_dropout_slot:  # keeps the checkpoint's layer indices (conv at index 3)
                layers.append(nn.Identity())
            layers.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
            return nn.Sequential(*layers)

        self.conv1 = stage(False)
        self.conv2 = stage(True)
        self.conv3 = stage(True)
        self.conv4 = stage(True)

    @staticmethod
    def _stage(stage: nn.Sequential, x: torch.Tensor, fused: bool) -> torch.Tensor:
        x = norm_silu(stage, x, fused)
        _, _, *dropout_slot, conv = stage  # unpacked, not sliced (see norm_silu)
        for layer in dropout_slot:
            x = layer(x)
        return F.conv2d(x, conv.weight.squeeze(-1), conv.bias, padding=(1, 0))

    def forward(self, x: torch.Tensor, fused_norm: bool = False) -> torch.Tensor:
        """``x``: ``[B, C, T, N]`` (``N`` = pixels of a frame; a 5-D ``[B, C, T, H, W]`` works too).

        ``fused_norm``: run each stage's norm and SiLU as one kernel where it applies (:func:`norm_silu`).
        """
        if x.ndim == 5:
            b, c, t, h, w = x.shape
            return self.forward(x.flatten(3), fused_norm).unflatten(3, (h, w))
        h = x
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = self._stage(stage, h, fused_norm)
        return x + h


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added between its two convolutions."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 temporal_conv: bool = True) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        # The misspelling is the checkpoints' key name.
        self.temopral_conv = TemporalConvBlock(out_channels) if temporal_conv else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int, fused_norm: bool = False) -> torch.Tensor:
        """``x``: ``[B*T, C, H, W]``, ``emb``: ``[B*T, E]`` -> ``[B*T, C_out, H, W]``.

        ``fused_norm``: run each norm and SiLU (with the embedding added before the second) as
        one kernel where it applies (:func:`norm_silu`); the layers and their keys are the same.
        """
        *_, in_conv = self.in_layers  # unpacked, not indexed or sliced (see norm_silu)
        *_, dropout_slot, out_conv = self.out_layers
        h = in_conv(norm_silu(self.in_layers, x, fused_norm))
        h = norm_silu(self.out_layers, h, fused_norm, shift=self.emb_layers(emb).to(h.dtype))
        h = out_conv(dropout_slot(h))
        h = self.skip_connection(x) + h
        if self.temopral_conv is None:
            return h
        time_major = frames_to_time_major(h, num_frames)
        return time_major_to_frames(self.temopral_conv(time_major, fused_norm), *h.shape[2:])


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """One entry of the UNet's block lists: layers applied in order, each given what it needs."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int,
                fused_norm: bool = False) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, num_frames, fused_norm)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, TemporalTransformer):
                h = layer(h, num_frames)
            else:
                h = layer(h)
        return h


class UNet3D(nn.Module):
    """The denoiser: ``(x [B, 8, T, h, w], t [B], context [B, L, D] or [B, T, L, D], fs [B]) -> [B, 4, T, h, w]``."""

    #: The blocks that repeat through the network, what regional compilation compiles one by one
    #: (:func:`dynamicrafter.runtime.compile_repeated_blocks`): each traces to one graph, no break.
    repeated_blocks: tuple[type[nn.Module], ...] = (ResBlock, SpatialTransformer, TemporalTransformer)

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.model_channels
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.fs_condition:
            self.fps_embedding = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        if cfg.addition_attention:
            self.init_attn = Stage([TemporalTransformer(ch, 8, cfg.num_head_channels, cfg.transformer_depth,
                                                        use_linear=False)])
        skip_channels = [ch]
        downscale = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * cfg.model_channels, cfg.temporal_conv)]
                ch = mult * cfg.model_channels
                if downscale in cfg.attention_resolutions:
                    layers += self._attention_layers(ch)
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)
                downscale *= 2

        self.middle_block = Stage([ResBlock(ch, emb_dim, temporal_conv=cfg.temporal_conv),
                                   *self._attention_layers(ch),
                                   ResBlock(ch, emb_dim, temporal_conv=cfg.temporal_conv)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * cfg.model_channels, cfg.temporal_conv)]
                ch = mult * cfg.model_channels
                if downscale in cfg.attention_resolutions:
                    layers += self._attention_layers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    downscale //= 2
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        #: Recompute each block's activations in the backward pass instead of keeping them (training).
        self.gradient_checkpointing = False
        #: Activations channels-last: ``None`` decides by device (see :meth:`use_channels_last`).
        self.channels_last: bool | None = None
        #: Norm + SiLU as one Triton kernel: ``None`` decides by device (see :meth:`use_fused_norm`).
        self.fused_norm: bool | None = None

    def _attention_layers(self, ch: int) -> list[nn.Module]:
        cfg = self.config
        heads = ch // cfg.num_head_channels
        layers: list[nn.Module] = [SpatialTransformer(
            ch, heads, cfg.num_head_channels, cfg.transformer_depth, cfg.context_dim,
            cfg.image_cross_attention, cfg.image_cross_attention_scale_learnable, cfg.text_context_len)]
        if cfg.temporal_attention:
            layers.append(TemporalTransformer(ch, heads, cfg.num_head_channels, cfg.transformer_depth, use_linear=True))
        return layers

    def use_channels_last(self, device: torch.device) -> bool:
        """Whether activations run channels-last (``[B*T, C, H, W]`` stored as ``[B, T, H, W, C]``).

        ``self.channels_last`` decides when set; ``None`` (the default) means on the CPU, where
        oneDNN's convolutions and PyTorch's group norm are fastest in that layout and the spatial
        and temporal layers then need no transposes (measured in docs/benchmarks.md). Only the
        speed depends on it, never the values.
        """
        return self.channels_last if self.channels_last is not None else device.type == "cpu"

    def use_fused_norm(self, device: torch.device) -> bool:
        """Whether the group norms and the SiLUs after them run as one kernel (``fused_norm.py``).

        ``self.fused_norm`` decides when set; ``None`` (the default) means
        :data:`FUSED_NORM_BY_DEFAULT` on CUDA when Triton is importable: off, until the kernel
        has been timed on a GPU (``python -m dynamicrafter.bench --fused-norm on|off``). Even
        when this says yes, each call falls back to the unfused layers where
        the kernel does not apply: a tensor off CUDA, or autograd recording (training). The
        values differ from the unfused path by at most about one rounding of the dtype.
        """
        if self.fused_norm is not None:
            return self.fused_norm
        return FUSED_NORM_BY_DEFAULT and device.type == "cuda" and fused_norm.triton_available()

    def channels_last_weights(self) -> "UNet3D":
        """Store the convolution weights channels-last, for channels-last activations; returns ``self``.

        oneDNN otherwise copies each weight into that layout at every call (about 1.7 GB per
        call of the 256 model in bfloat16). Values, shapes and key names are unchanged; only the
        strides of the ``Conv2d`` (and the temporal ``Conv3d``) weights are. Their ``state_dict()``
        tensors are then not contiguous: call ``.contiguous()`` on them before writing them with
        safetensors.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                layout = torch.channels_last if module.weight.ndim == 4 else torch.channels_last_3d
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
        return self

    def frame_context(self, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Give each frame its context: ``[B, L, D] -> [B*T, L', D]``.

        When the context holds exactly ``text + num_frames * 16`` tokens, frame ``i`` gets the
        text tokens and its own 16 image tokens; otherwise every frame gets the whole context.
        A per-frame context ``[B, T, L, D]`` (several prompts over time, FreeNoise's multi-prompt
        mode) gives frame ``i`` row ``i``, split by the same rule.
        """
        cfg = self.config
        per_frame = cfg.image_tokens_per_frame
        if context.dim() == 4:
            b, _, length, dim = context.shape
            if length == cfg.text_context_len + num_frames * per_frame:
                own = torch.arange(num_frames, device=context.device)
                image = context[:, :, cfg.text_context_len:].unflatten(2, (num_frames, per_frame))[:, own, own]
                context = torch.cat([context[:, :, : cfg.text_context_len], image], dim=2)
            return context.reshape(b * num_frames, -1, dim)
        b, length, dim = context.shape
        if length == cfg.text_context_len + num_frames * per_frame:
            text = context[:, : cfg.text_context_len].repeat_interleave(num_frames, dim=0)
            image = context[:, cfg.text_context_len:].reshape(b * num_frames, per_frame, dim)
            return torch.cat([text, image], dim=1)
        return context.repeat_interleave(num_frames, dim=0)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fs: torch.Tensor | None = None, residuals: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``residuals``: a ControlNet's outputs ``[B*T, C_i, h_i, w_i]``, one per input block then the
        middle block's (:mod:`.controlnet`), added to the skips and to the middle block's output."""
        b, _, t, h, w = x.shape
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.fs_condition:
            if fs is None:
                fs = torch.full((b,), self.config.default_fs, dtype=torch.long, device=x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fs, self.config.model_channels).to(dtype))
        emb = emb.repeat_interleave(t, dim=0)
        context = self.frame_context(context.to(dtype), t)

        hidden = x.to(dtype).transpose(1, 2).reshape(b * t, -1, h, w)
        if self.use_channels_last(x.device):
            hidden = hidden.contiguous(memory_format=torch.channels_last)
        fused = self.use_fused_norm(x.device)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            def run(block: Stage, h: torch.Tensor) -> torch.Tensor:
                return checkpoint(block, h, emb, context, t, fused, use_reentrant=False)
        else:
            def run(block: Stage, h: torch.Tensor) -> torch.Tensor:
                return block(h, emb, context, t, fused)
        skips = []
        for i, block in enumerate(self.input_blocks):
            hidden = run(block, hidden)
            if i == 0 and self.config.addition_attention:
                hidden = run(self.init_attn, hidden)
            skips.append(hidden)
        hidden = run(self.middle_block, hidden)
        if residuals is not None:
            hidden = hidden + residuals[-1].to(hidden.dtype)
            skips = [s + r.to(s.dtype) for s, r in zip(skips, residuals[:-1], strict=True)]
        for block in self.output_blocks:
            hidden = run(block, torch.cat([hidden, skips.pop()], dim=1))
        *_, out_conv = self.out
        out = out_conv(norm_silu(self.out, hidden, fused))
        return out.view(b, t, -1, h, w).transpose(1, 2).to(x.dtype)
