"""DynamiCrafter: animate a still image with a text prompt (Xing et al., ECCV 2024)."""

from .configs import ModelConfig, get_config, load_config

__all__ = ["DynamiCrafterImg2VideoPipeline", "ModelConfig", "get_config", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in torch and open_clip; import it only when it is asked for.
    if name == "DynamiCrafterImg2VideoPipeline":
        from .pipeline import DynamiCrafterImg2VideoPipeline

        return DynamiCrafterImg2VideoPipeline
    raise AttributeError(f"module 'dynamicrafter' has no attribute {name!r}")
