"""The options of a fine-tuning run: one dataclass, checked when it is made."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UserError
from ..lora import DEFAULT_TARGETS

Mode = Literal["lora", "full"]
Schedule = Literal["constant", "cosine", "linear"]
Strategy = Literal["auto", "ddp", "fsdp"]

#: Learning rates used when none is given: the original's 1e-5 for full fine-tuning, 1e-4 for LoRA.
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs. Defaults follow the original's training configs
    (``uncond_prob`` 0.05, random conditioning frame, frame stride 1-6, UNet dropout 0.1,
    gradient clipping at 0.5) where they apply.

    Data:
        data: a folder of clips with same-stem ``.txt`` captions, or a CSV (``videoid,name`` or ``path,caption``).
        video_root: where a CSV's clips are (default: the CSV's folder).
        frames: frames per clip (default: the model's 16); height/width: default the model's.
        frame_stride_min, frame_stride_max: the range the frame stride is drawn from.
        cache_latents: encode every clip once (VAE moments, text and CLIP tokens) into ``cache_dir``
            (default ``<output_dir>/cache``) and train from that; each clip keeps the frames drawn for it then.
    Model:
        resolution: ``256``/``512``/``1024``/``512_interp`` (any spelling the pipeline accepts).
        checkpoint: the base model (default the released one, downloaded when missing).
        clip_checkpoint: OpenCLIP weights for a checkpoint without the CLIP towers (as the pipeline's).
        model_config: a model YAML in the original layout (default the resolution's preset).
    What is trained:
        mode: ``lora`` (adapters on the UNet's attention and feed-forward projections) or
            ``full`` (the whole UNet; with ``train_image_proj`` the image resampler too).
        lora_rank, lora_alpha (default = rank), lora_targets: module-name suffixes.
    Optimisation:
        learning_rate (default 1e-4 for LoRA, 1e-5 full), lr_schedule with lr_warmup_steps,
        max_steps (optimizer steps), batch_size (per process), grad_accum, max_grad_norm (0 = off),
        optimizer (``adamw`` or ``adamw8bit`` with bitsandbytes), precision (``bf16`` autocast with
        float32 trained weights, or ``fp32``; default bf16 on GPUs that have it), gradient_checkpointing,
        compile (``torch.compile`` the UNet), strategy (``auto``: FSDP for full fine-tuning of the
        1024 model under torchrun, else DDP).
    Output:
        output_dir; save_every (steps; a checkpoint is also written at the end and on Ctrl-C);
        sample_every (0 = never) with sample_image/sample_prompt (default: the first clip's first
        frame and caption), sample_steps, sample_frames; resume (a checkpoint folder or ``latest``).
    """

    data: str
    output_dir: str = "runs/finetune"
    resolution: str = "256"
    checkpoint: str | None = None
    clip_checkpoint: str | None = None
    model_config: str | None = None
    video_root: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    frame_stride_min: int = 1
    frame_stride_max: int = 6
    num_workers: int = 2
    cache_latents: bool = False
    cache_dir: str | None = None
    uncond_prob: float = 0.05
    rand_cond_frame: bool | None = None
    unet_dropout: float = 0.1
    mode: Mode = "lora"
    lora_rank: int = 64
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    train_image_proj: bool = False
    learning_rate: float | None = None
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    lr_schedule: Schedule = "constant"
    lr_warmup_steps: int = 0
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 0.5
    precision: Literal["bf16", "fp32"] | None = None
    gradient_checkpointing: bool = True
    compile: bool = False
    strategy: Strategy = "auto"
    seed: int = 0
    device: str | None = None
    save_every: int = 500
    log_every: int = 1
    sample_every: int = 0
    sample_image: str | None = None
    sample_prompt: str | None = None
    sample_steps: int = 25
    sample_frames: int | None = None
    resume: str | None = None

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lora_rank": self.lora_rank, "save_every": self.save_every, "log_every": self.log_every,
                    "sample_steps": self.sample_steps, "frame_stride_min": self.frame_stride_min}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}.")
        for name in ("frames", "height", "width", "sample_frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}.")
        if self.frame_stride_max < self.frame_stride_min:
            raise UserError(f"frame_stride_max ({self.frame_stride_max}) is below frame_stride_min ({self.frame_stride_min}).")
        if self.mode not in ("lora", "full"):
            raise UserError(f"Unknown mode {self.mode!r}; choose lora or full.")
        if self.mode == "lora" and self.train_image_proj:
            raise UserError("train_image_proj is for full fine-tuning (mode full), not LoRA.")
        if not 0 <= self.uncond_prob <= 1 / 3:
            raise UserError(f"uncond_prob must be between 0 and 1/3, got {self.uncond_prob}.")
        if not 0 <= self.unet_dropout < 1:
            raise UserError(f"unet_dropout must be in [0, 1), got {self.unet_dropout}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise UserError(f"Unknown lr_schedule {self.lr_schedule!r}; choose constant, cosine or linear.")
        if self.lr_warmup_steps < 0 or self.sample_every < 0 or self.num_workers < 0 or self.max_grad_norm < 0:
            raise UserError("lr_warmup_steps, sample_every, num_workers and max_grad_norm must not be negative.")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise UserError(f"Unknown optimizer {self.optimizer!r}; choose adamw or adamw8bit.")
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("The 8-bit optimizer needs bitsandbytes: pip install bitsandbytes.")
        if self.precision not in (None, "bf16", "fp32"):
            raise UserError(f"Unknown precision {self.precision!r}; choose bf16 or fp32.")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise UserError(f"Unknown strategy {self.strategy!r}; choose auto, ddp or fsdp.")
        if self.strategy == "fsdp" and self.mode != "full":
            raise UserError("FSDP is for full fine-tuning; LoRA runs data-parallel (ddp).")
        if not self.lora_targets:
            raise UserError("lora_targets must name at least one module.")

    @property
    def lr(self) -> float:
        """The learning rate in force (the mode's default when none was given)."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
