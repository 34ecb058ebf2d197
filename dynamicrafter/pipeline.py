"""Image-to-video pipeline (being written: this is its public contract)."""

from __future__ import annotations

from typing import Any, Callable


class DynamiCrafterImg2VideoPipeline:
    """Turn an image and a prompt into a short video with a DynamiCrafter model.

    Args:
        resolution: '256', '512', '1024', '512_interp' or an alias ('256_256', '320_512', ...).
        device: torch device; default cuda:0 when available, else cpu (with a warning).
        checkpoint: path to model.ckpt / .safetensors; default
            checkpoints/dynamicrafter_{name}_v1/model.ckpt, downloaded when missing.
        config: a ModelConfig or a path to an original-format YAML config.
        dtype: torch dtype or 'float32' / 'float16' / 'bfloat16'; default chosen per device.
    Attributes:
        config: the ModelConfig (name, height, width, default_fs, fs_kind, interp).
        device, dtype.
    """

    def __init__(self, resolution: str = "256", device: Any = None, checkpoint: Any = None,
                 config: Any = None, dtype: Any = None) -> None:
        raise NotImplementedError

    def __call__(self, image: Any, prompt: Any = "", negative_prompt: Any = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float = 1.0,
                 frame_stride: int | None = None, num_frames: int = 16, height: int | None = None,
                 width: int | None = None, guidance_rescale: float | None = None,
                 timestep_spacing: str | None = None, generator: Any = None, latents: Any = None,
                 output_type: str = "pt", return_dict: bool = True, end_image: Any = None,
                 callback: Callable[[int, int], None] | None = None) -> Any:
        """Returns {"videos": [B,T,3,H,W] float in [0,1]} for output_type="pt"."""
        raise NotImplementedError

    @staticmethod
    def save_video(videos: Any, path: Any, fps: int = 8) -> None:
        """Write videos[0] (or a [T,3,H,W] tensor) to an MP4 (H.264) or GIF, atomically."""
        raise NotImplementedError
