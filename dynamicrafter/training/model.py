"""The model side of a run: what is trained (LoRA or the full UNet), its optimizer, schedule and wrapping.

:func:`prepare_model` makes a loaded :class:`~dynamicrafter.models.dynamicrafter.DynamiCrafter`
trainable as a :class:`~dynamicrafter.training.config.TrainConfig` says; :func:`make_optimizer` and
:func:`lr_factor` are AdamW and the learning-rate schedule; :func:`wrap` puts the loss module
under DDP or FSDP for a torchrun run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..configs import ModelConfig, model_config, resolve_resolution
from ..errors import UserError
from ..lora import add_lora
from ..models.dynamicrafter import DynamiCrafter
from ..models.unet import ResBlock, TemporalConvBlock
from .config import TrainConfig
from .distributed import Dist
from .objective import EncodedBatch, NullConditioning, loss_on_encoded


def set_unet_dropout(unet: nn.Module, p: float) -> None:
    """Put the original's training dropout in the UNet's empty dropout slots (no new keys).

    The original trains with dropout ``p`` in every ResBlock (before its second convolution)
    and 0.1 in the temporal convolutions' last three stages; both are set to ``p`` here.
    """
    for module in unet.modules():
        if isinstance(module, ResBlock):
            module.out_layers[2] = nn.Dropout(p) if p > 0 else nn.Identity()
        elif isinstance(module, TemporalConvBlock):
            for stage in (module.conv2, module.conv3, module.conv4):
                stage[2] = nn.Dropout(p) if p > 0 else nn.Identity()


class LossModule(nn.Module):
    """The trained parts (UNet, resampler) with the objective as ``forward``: what DDP/FSDP wrap."""

    def __init__(self, model: DynamiCrafter) -> None:
        super().__init__()
        self.unet = model.unet
        self.image_proj = model.image_proj_model
        object.__setattr__(self, "_model", model)  # not a submodule: the encoders stay outside
        self._unet_call: nn.Module = self.unet

    def compile_unet(self) -> None:
        self._unet_call = torch.compile(self.unet)

    def forward(self, encoded: EncodedBatch, fs: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                cond_frame: torch.Tensor, drop_text: torch.Tensor, drop_image: torch.Tensor,
                null: NullConditioning) -> torch.Tensor:
        return loss_on_encoded(self._model, encoded, fs, timesteps=timesteps, noise=noise, cond_frame=cond_frame,
                               drop_text=drop_text, drop_image=drop_image, null=null, unet=self._unet_call,
                               image_proj=self.image_proj)


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    name = resolve_resolution(cfg.resolution)
    return model_config(name, cfg.model_config)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision is not None:
        return cfg.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def prepare_model(model: DynamiCrafter, cfg: TrainConfig) -> tuple[LossModule, list[nn.Parameter], Any]:
    """Make the model trainable as ``cfg`` says: dropout, LoRA or full UNet, checkpointing, modes.

    Returns the loss module, the trained parameters (float32) and the LoRA config (or ``None``).
    """
    model.requires_grad_(False)
    model.eval()
    set_unet_dropout(model.unet, cfg.unet_dropout)
    lora_config = None
    if cfg.mode == "lora":
        lora_config = add_lora(model.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    else:
        model.unet.float().requires_grad_(True)
        if cfg.train_image_proj:
            model.image_proj_model.float().requires_grad_(True)
    params = [p for p in list(model.unet.parameters()) + list(model.image_proj_model.parameters()) if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    model.unet.gradient_checkpointing = cfg.gradient_checkpointing
    model.unet.train()
    if cfg.train_image_proj:
        model.image_proj_model.train()
    module = LossModule(model)
    if cfg.compile:
        module.compile_unet()
    return module, params, lora_config


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("The 8-bit optimizer needs bitsandbytes: pip install bitsandbytes.") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    fused = all(p.is_cuda for p in params)  # one kernel for all parameters; else the multi-tensor path
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / (cfg.lr_warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def set_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, step: int) -> None:
    """Put ``cfg``'s learning rate (as the schedule has it at ``step``), betas and weight decay in the
    optimizer: after a resume the saved optimizer's would be used otherwise."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(step, cfg), betas=cfg.adam_betas,
                     weight_decay=cfg.weight_decay)


def wrap(module: LossModule, dist: Dist, device: torch.device, strategy: str,
         precision: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """``module`` under DDP or FSDP for a distributed run (as it is for one process).

    Also returns the parameters FSDP leaves whole (scalars it cannot shard: the 256 model's image
    cross-attention weights); :func:`sync_unsharded` averages their gradients by hand.
    """
    if not dist.distributed:
        return module, []
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                      reduce_dtype=torch.float32)
        unsharded = [p for p in module.parameters() if p.ndim == 0]
        unet = module.unet
        for block in [*unet.input_blocks, *([unet.init_attn] if hasattr(unet, "init_attn") else []),
                      unet.middle_block, *unet.output_blocks]:
            fully_shard(block, mp_policy=policy, ignored_params=set(unsharded))
        fully_shard(module, mp_policy=policy, ignored_params=set(unsharded))
        return module, unsharded
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids), []


def sync_unsharded(unsharded: list[nn.Parameter]) -> None:
    """Average the gradients of the parameters FSDP left whole (see :func:`wrap`)."""
    for p in unsharded:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
