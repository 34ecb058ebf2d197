"""OpenCLIP text and image encoders, built from open_clip without downloading any weights.

The released checkpoints already hold both CLIP towers (``cond_stage_model.model`` for text,
``embedder.model`` for images), so the towers are built empty from their architecture and
filled by the checkpoint loader. Files without them are completed from an OpenCLIP state dict
(``state_from_open_clip``), cut the way the released checkpoints cut it: the text encoder keeps
everything but the vision tower, the image encoder everything but the text transformer.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import kornia
import open_clip
import torch
from torch import nn

from ..configs import CLIPConfig
from ..errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prompt_token_count(text: str) -> int:
    """How many tokens the OpenCLIP tokenizer makes of ``text``, start and end tokens included.

    The text tower reads 77; a longer prompt is cut (the pipeline warns).
    """
    return len(open_clip.tokenizer._tokenizer.encode(text)) + 2


def build_clip(config: CLIPConfig) -> nn.Module:
    """An untrained ``open_clip.CLIP`` of the configured architecture."""
    model_cfg = config.model_cfg or open_clip.get_model_config(config.arch)
    if model_cfg is None:
        raise UserError(f"open_clip knows no architecture {config.arch!r} and the config defines none.")
    return open_clip.CLIP(**model_cfg)


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def _run_blocks(transformer: nn.Module, x: torch.Tensor, blocks: Sequence[nn.Module],
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run residual blocks on batch-first ``x`` whatever layout open_clip's transformer uses."""
    batch_first = getattr(transformer, "batch_first", False)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)


class CLIPTextEncoder(nn.Module):
    """Prompts -> ``[B, 77, width]`` tokens from the text tower (penultimate layer by default)."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        model = build_clip(config)
        del model.visual
        del model.attn_mask  # rebuilt on the fly: it must not be a (meta) buffer
        self.model = model
        self.skip_last = 1 if config.text_layer == "penultimate" else 0

    @staticmethod
    def state_from_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict from an ``open_clip.CLIP`` state dict: all but ``visual.*``.

        The last block stays although only the penultimate layer's tokens are used, as in the
        released checkpoints.
        """
        return {f"model.{k}": v for k, v in state.items() if not k.startswith("visual.")}

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        m = self.model
        tokens = open_clip.tokenize(list(prompts)).to(m.token_embedding.weight.device)
        x = m.token_embedding(tokens) + m.positional_embedding
        blocks = list(m.transformer.resblocks)
        blocks = blocks[: len(blocks) - self.skip_last]
        x = _run_blocks(m.transformer, x, blocks, _causal_mask(x.shape[1], x.device, x.dtype))
        return m.ln_final(x)


class CLIPImageEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] -> all ``[B, 257, width]`` tokens of the vision tower.

    The image is resized to 224x224 as the original does (kornia bicubic, ``align_corners``,
    antialiased) and normalised with the CLIP mean and std. No pooling, no projection.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        model = build_clip(config)
        del model.transformer
        del model.attn_mask
        self.model = model
        self.image_size = config.image_size

    @staticmethod
    def state_from_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict from an ``open_clip.CLIP`` state dict: all but the text ``transformer.*``.

        The token embedding, final norm and projections stay (unused, as in the released checkpoints).
        """
        return {f"model.{k}": v for k, v in state.items() if not k.startswith("transformer.")}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = kornia.geometry.resize(images.float(), (self.image_size, self.image_size), interpolation="bicubic",
                                   align_corners=True, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
        return ((x + 1) / 2 - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        dtype = visual.conv1.weight.dtype
        x = visual.conv1(self.preprocess(images).to(dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        return _run_blocks(visual.transformer, x, visual.transformer.resblocks)
