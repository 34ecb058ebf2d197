"""The options of a fine-tuning run: one dataclass, each field with its help, checked when it is made.

The command line (:mod:`dynamicrafter.training.cli`) is built from these fields: an option per
field under the same name, its help text from the field's ``metadata["help"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import UserError

Mode = Literal["lora", "full"]
Schedule = Literal["constant", "cosine", "linear"]
Strategy = Literal["auto", "ddp", "fsdp"]

#: Learning rates used when none is given: the original's 1e-5 for full fine-tuning, 1e-4 for LoRA.
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}
#: The largest float32: the optimizer's settings are used in float32 arithmetic.
FLOAT32_MAX = 3.4028234663852886e38
#: ``dynamicrafter.lora.DEFAULT_TARGETS``, spelled here so that the options are read without torch (a test holds
#: the two equal).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_k_ip", "to_v_ip", "ff.net.0.proj", "ff.net.2")
#: The fields whose flag is the shared vocabulary's (:mod:`dynamicrafter.options`), not ``--<field>``; the
#: field's own name stays accepted for one release.
FLAGS = {"model_config": "--config", "frames": "--video_length", "precision": "--dtype"}


#: ``--dtype``: the option table's names of the two training precisions (and the field's own values), as the field's.
PRECISIONS = {"auto": None, "bfloat16": "bf16", "float32": "fp32", "bf16": "bf16", "fp32": "fp32"}


def flag(name: str) -> str:
    """The command-line flag of the field ``name``."""
    return FLAGS.get(name, f"--{name}")


def precision_arg(text: str) -> str | None:
    """An argparse type: ``--dtype`` (``auto``, ``bfloat16``, ``float32``) as the ``precision`` field's value."""
    if text not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose auto, bfloat16 or float32; "
                                         "training has no float16)")
    return PRECISIONS[text]


def option(default: Any, help: str) -> Any:
    """A field with its command-line help (``default`` must be immutable)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs (each field's help says what it does).

    Defaults follow the original's training configs where they apply: ``uncond_prob`` 0.05, a
    random conditioning frame, frame stride 1-6, UNet dropout 0.1, gradient clipping at 0.5.
    """

    # -- data
    data: str = field(metadata={"help": "a folder of clips (.mp4 .mov .webm .gif) with same-name .txt captions, "
                                        "or a CSV (videoid,name as WebVid, or path,caption)"})
    output_dir: str = option("runs/finetune", "where checkpoints, logs/ (TensorBoard + metrics.csv) and samples/ go")
    # -- model
    resolution: str = option("256", "base model: 256, 512, 1024, 512_interp or tooncrafter, as the first argument or "
                                    "--resolution")
    checkpoint: str | None = option(None, "base checkpoint (default: the released one, downloaded when missing)")
    clip_checkpoint: str | None = option(None, "OpenCLIP ViT-H-14 weights, for a checkpoint without the CLIP towers "
                                               "(pruned files)")
    model_config: str | None = option(None, "model config YAML in the original layout (default: the resolution's preset)")
    # -- clips
    video_root: str | None = option(None, "folder a CSV's clips are in (default: the CSV's folder)")
    frames: int | None = option(None, "frames per training clip (default: the model's 16)")
    height: int | None = option(None, "frame height (default: the model's)")
    width: int | None = option(None, "frame width (default: the model's)")
    frame_stride_min: int = option(1, "smallest frame stride drawn for a clip")
    frame_stride_max: int = option(6, "largest frame stride drawn for a clip")
    num_workers: int = option(2, "decoding processes")
    cache_latents: bool = option(False, "encode every clip once (VAE + CLIP) to disk; later epochs skip the encoders "
                                        "(each clip keeps the frames drawn for it then)")
    cache_dir: str | None = option(None, "where --cache_latents writes (default: OUTPUT_DIR/cache)")
    # -- objective
    uncond_prob: float = option(0.05, "probability of dropping the text, both, or the image (each), for guidance")
    rand_cond_frame: bool | None = option(None, "condition on a random frame of the clip "
                                                "(default: yes, except the interpolation model)")
    unet_dropout: float = option(0.1, "dropout in the UNet's ResBlocks and temporal convolutions (the original's 0.1)")
    # -- what is trained
    mode: Mode = option("lora", "lora: adapters on the attention and feed-forward projections; full: the whole UNet")
    lora_rank: int = option(64, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)")
    lora_targets: tuple[str, ...] = option(DEFAULT_TARGETS, "module-name suffixes the LoRA adapts")
    train_image_proj: bool = option(False, "also train the image resampler (full fine-tuning)")
    # -- optimisation
    learning_rate: float | None = option(None, "AdamW learning rate (default: 1e-4 for LoRA, 1e-5 full; "
                                               "on --resume, the saved run's)")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "adamw, or adamw8bit (needs bitsandbytes)")
    lr_schedule: Schedule = option("constant", "learning-rate schedule after the warm-up")
    lr_warmup_steps: int = option(0, "steps of linear warm-up")
    max_steps: int = option(1000, "optimizer steps to train for")
    batch_size: int = option(1, "clips per process per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_grad_norm: float = option(0.5, "clip the gradient norm to this (0: no clipping)")
    precision: Literal["bf16", "fp32"] | None = option(None, "bfloat16 (autocast, float32 trained weights) or "
                                                             "float32 (default: auto, bfloat16 on GPUs that have it)")
    gradient_checkpointing: bool = option(True, "recompute the UNet blocks' activations in the backward pass "
                                                "(less memory)")
    compile: bool = option(False, "torch.compile the UNet")
    strategy: Strategy = option("auto", "under torchrun: ddp, fsdp (full fine-tuning), or auto "
                                        "(FSDP for full fine-tuning of 1024)")
    seed: int = option(0, "seed of every random draw")
    device: str | None = option(None, "cuda:0, cpu, ... (default: the GPU, or the CPU without one)")
    threads: int | None = option(None, "CPU threads for the arithmetic on the CPU (default: the usable CPUs not busy "
                                       "with other work, said in the log)")
    # -- output
    save_every: int = option(500, "write a checkpoint every N steps (and at the end, and on Ctrl-C)")
    log_every: int = option(1, "log loss and learning rate every N steps")
    sample_every: int = option(0, "render a sample video every N steps (0: never)")
    sample_image: str | None = option(None, "image for the samples (default: the first clip's first frame)")
    sample_prompt: str | None = option(None, "prompt for the samples (default: the first clip's caption)")
    sample_steps: int = option(25, "DDIM steps of a sample")
    sample_frames: int | None = option(None, "frames of a sample (default: the training frames)")
    resume: str | None = option(None, "continue from a checkpoint folder, or 'latest' in OUTPUT_DIR (add it to the "
                                      "command that started the run)")
    overwrite: bool = option(False, "start over in an OUTPUT_DIR that holds a run: its checkpoints, logs and samples "
                                    "are deleted first")

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lora_rank": self.lora_rank, "save_every": self.save_every, "log_every": self.log_every,
                    "sample_steps": self.sample_steps, "frame_stride_min": self.frame_stride_min}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}.")
        for name in ("frames", "height", "width", "sample_frames", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}.")
        numbers = {"uncond_prob": self.uncond_prob, "unet_dropout": self.unet_dropout, "learning_rate": self.learning_rate,
                   "lora_alpha": self.lora_alpha, "weight_decay": self.weight_decay, "adam_betas": self.adam_betas,
                   "max_grad_norm": self.max_grad_norm}
        for name, value in numbers.items():
            values = value if isinstance(value, tuple) else (value,)
            if any(v is not None and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX) for v in values):
                raise UserError(f"{name} must be a finite number (float32's: at most 3.4e38), "
                                 f"got {' '.join(map(str, values))}.")
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
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UserError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"adam_betas must be two numbers in [0, 1), got {' '.join(map(str, self.adam_betas))}.")
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
        if self.resume is not None and self.overwrite:
            raise UserError("--resume continues a run and --overwrite deletes one: give only one of them.")

    @property
    def lr(self) -> float:
        """The learning rate in force (the mode's default when none was given)."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
