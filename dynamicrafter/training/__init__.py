"""Fine-tuning DynamiCrafter models: the original's objective, clip data, the training loop.

``diffusion_loss`` is importable without peft or TensorBoard; the loop needs the ``train`` extra.
"""

from .config import TrainConfig
from .objective import diffusion_loss

__all__ = ["TrainConfig", "diffusion_loss", "train"]


def train(cfg: TrainConfig, model=None):
    """Run a fine-tuning job (see :func:`dynamicrafter.training.trainer.train`)."""
    from .trainer import train as _train

    return _train(cfg, model)
