"""Fine-tuning DynamiCrafter models: the original's objective, clip data, the training loop.

``diffusion_loss`` is importable without peft or TensorBoard; the loop needs the ``train`` extra.
"""

from typing import Any

from .config import TrainConfig

__all__ = ["TrainConfig", "diffusion_loss", "train"]


def __getattr__(name: str) -> Any:
    """``diffusion_loss`` is imported when first used: ``dynamicrafter train`` checks its arguments without torch."""
    if name == "diffusion_loss":
        from .objective import diffusion_loss

        return diffusion_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(cfg: TrainConfig, model=None):
    """Run a fine-tuning job (see :func:`dynamicrafter.training.trainer.train`)."""
    from .trainer import train as _train

    return _train(cfg, model)
