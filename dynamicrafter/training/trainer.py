"""The fine-tuning loop: LoRA or full fine-tuning of the UNet, on one GPU, a CPU or under torchrun.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` clips per process. Each
micro-batch: frozen encoders (or the latent cache), the step's random draws from the run's own
generator, :func:`~dynamicrafter.training.objective.loss_on_encoded` under bf16 autocast,
backward. Then gradient clipping, AdamW, the learning-rate schedule, logging, and every
``save_every`` steps an atomic checkpoint from which ``--resume`` continues exactly.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoints import load_model
from ..configs import ModelConfig, model_config, resolve_resolution
from ..errors import UserError
from ..lora import add_lora, lora_state_dict, save_lora
from ..models.dynamicrafter import DynamiCrafter
from ..models.unet import ResBlock, TemporalConvBlock
from . import data as data_mod
from .config import TrainConfig
from .distributed import init, shutdown
from .objective import EncodedBatch, NullConditioning, draw, encode_batch, loss_on_encoded, null_conditioning, sample_posterior

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
UNET_NAME = "unet.safetensors"


@dataclass
class TrainResult:
    """What a run did: optimizer steps reached, the loss of each step run here, the last checkpoint."""

    step: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    skipped_clips: int = 0
    interrupted: bool = False
    step_seconds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------- model
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


# ------------------------------------------------------------------------------- checkpoints
def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """The checkpoint folder ``resume`` names (``latest``: the newest in ``output_dir``)."""
    if resume == "latest":
        found = sorted(output_dir.glob("checkpoint-*[0-9]"))
        found = [p for p in found if (p / STATE_NAME).is_file()]
        if not found:
            raise UserError(f"There is no checkpoint in {output_dir} to resume from.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise UserError(f"{resume} is not a training checkpoint (no {STATE_NAME} in it).")
    return path


def _rng_state(device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state(), "draws": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["draws"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    """Runs one fine-tuning job described by a :class:`TrainConfig` (see :meth:`run`)."""

    def __init__(self, cfg: TrainConfig, model: DynamiCrafter | None = None) -> None:
        self.cfg = cfg
        self._given_model = model
        self._stop_requested = False
        self._warned: set[str] = set()

    # -- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.dist, self.device = init(cfg.device)
        self.out = Path(cfg.output_dir)
        self.model_config = self._given_model.config if self._given_model is not None else resolve_model_config(cfg)
        mc = self.model_config
        self.frames = cfg.frames or mc.unet.temporal_length
        self.height, self.width = cfg.height or mc.height, cfg.width or mc.width
        for label, value in (("height", self.height), ("width", self.width)):
            if value % mc.size_multiple:
                raise UserError(f"{label} must be a multiple of {mc.size_multiple} pixels for this model, got {value}.")
        self.rand_cond_frame = (not mc.interp) if cfg.rand_cond_frame is None else cfg.rand_cond_frame
        self.precision = resolve_precision(cfg, self.device)
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("This GPU has no bfloat16; use --precision fp32.")
        self.strategy = cfg.strategy
        if self.strategy == "auto":
            large = mc.height * mc.width >= 576 * 1024
            self.strategy = "fsdp" if cfg.mode == "full" and large and self.dist.distributed else "ddp"

        # The clips first: bad data is reported before any model is loaded.
        clips = data_mod.find_clips(cfg.data, cfg.video_root)
        self.clip_dataset = data_mod.ClipDataset(clips, self.frames, self.height, self.width, cfg.frame_stride_min,
                                                 cfg.frame_stride_max, mc.fs_kind)

        frozen_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if self._given_model is not None:
            self.model = self._given_model.to(self.device)
        else:
            checkpoint = cfg.checkpoint
            if checkpoint is None:
                from ..hub import ensure_checkpoint

                checkpoint = ensure_checkpoint(resolve_resolution(cfg.resolution))
            elif not Path(checkpoint).is_file():
                raise UserError(f"Checkpoint {checkpoint} does not exist.")
            self.model = load_model(mc, checkpoint, dtype=frozen_dtype, device=self.device,
                                    clip_checkpoint=cfg.clip_checkpoint)
        self.model.to(self.device)
        if self._given_model is None or frozen_dtype != torch.float32:
            for part in (self.model.vae, self.model.cond_stage_model, self.model.embedder, self.model.image_proj_model):
                part.to(frozen_dtype)
            if cfg.mode == "lora":
                self.model.unet.to(frozen_dtype)
        torch.manual_seed(cfg.seed + 7919 * self.dist.rank)  # dropout and anything else on the global RNG
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.dist.rank)
        self.module, self.params, self.lora_config = prepare_model(self.model, cfg)
        self.null = null_conditioning(self.model, self.device)
        self.ddp_module = self._wrap(self.module)
        # FSDP replaces the parameters with sharded ones: collect the trained ones after wrapping.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step, self.epoch, self.position = 0, 0, 0

        if cfg.cache_latents:
            self._build_cache()
        else:
            self.dataset = self.clip_dataset

    def _wrap(self, module: LossModule) -> nn.Module:
        if not self.dist.distributed:
            return module
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32,
                                          reduce_dtype=torch.float32)
            # FSDP cannot shard scalars (the 256 model's image cross-attention weights): they stay
            # whole on every rank and their gradients are averaged by hand (_sync_unsharded).
            self.unsharded = [p for p in module.parameters() if p.ndim == 0]
            unet = module.unet
            for block in [*unet.input_blocks, *([unet.init_attn] if hasattr(unet, "init_attn") else []),
                          unet.middle_block, *unet.output_blocks]:
                fully_shard(block, mp_policy=policy, ignored_params=set(self.unsharded))
            fully_shard(module, mp_policy=policy, ignored_params=set(self.unsharded))
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def _sync_unsharded(self) -> None:
        """Average the gradients of the parameters FSDP left whole (see :meth:`_wrap`)."""
        for p in getattr(self, "unsharded", []):
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)

    def _build_cache(self) -> None:
        from . import latent_cache

        cache_dir = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
        cond_frames = self.frames if self.rand_cond_frame else 1
        progress = (lambda xs: self._bar(xs, "Caching latents")) if self.dist.is_main else iter
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        files = latent_cache.build_cache(self.model, self.clip_dataset, cache_dir, cond_frames, self.cfg.seed,
                                         self.dist.rank, self.dist.world_size, progress, dtype)
        self.dist.barrier()
        good, errors = latent_cache.finish(files)
        for error in errors:
            self._warn_clip(error)
        if not good:
            raise UserError(self._no_usable_clip(errors))
        self.dataset = latent_cache.CachedDataset(good)
        logger.info("Latent cache: %d clips in %s.", len(good), cache_dir)

    @staticmethod
    def _bar(items: Any, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False)

    def _no_usable_clip(self, errors: list[str]) -> str:
        first = f" The first: {errors[0]}." if errors else ""
        return f"None of the {len(self.clip_dataset)} clips in {self.cfg.data} can be used for training.{first}"

    def _warn_clip(self, error: str) -> None:
        if error not in self._warned:
            self._warned.add(error)
            logger.warning("Skipping clip %s", error)

    # -- data ---------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches without end, from where the run stands (``self.epoch``, ``self.position``)."""
        sampler = data_mod.StreamSampler(len(self.dataset), self.cfg.seed, self.dist.rank, self.dist.world_size,
                                         self.epoch, self.position)
        self.samples_per_epoch = sampler.per_rank
        loader = DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                            num_workers=self.cfg.num_workers, collate_fn=data_mod.collate,
                            pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.cfg.num_workers else None,
                            generator=torch.Generator().manual_seed(self.cfg.seed))  # leaves the global RNG alone
        return iter(loader)

    def _encode(self, batch: dict[str, Any], draws: Any) -> tuple[EncodedBatch, torch.Tensor]:
        device = self.device
        if "video" in batch:
            videos = batch["video"].to(device, non_blocking=True)
            encoded = encode_batch(self.model, videos, batch["caption"], draws.cond_frame, generator=self.generator)
        else:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            latents = sample_posterior(self.model, mean, std, self.generator)
            tokens = batch["clip_tokens"].to(device)
            index = draws.cond_frame.clamp(max=tokens.shape[1] - 1).to(device)
            clip_tokens = tokens[torch.arange(tokens.shape[0], device=device), index].float()
            encoded = EncodedBatch(latents, batch["text"].to(device).float(), clip_tokens)
        return encoded, batch["fs"].to(device)

    # -- checkpoints --------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Trained weights (full tensors on the CPU) and the optimizer state, gathered under FSDP."""
        if self.strategy == "fsdp" and self.dist.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.module, options=options)
            optim = get_optimizer_state_dict(self.module, self.optimizer, options=options)
            return weights, optim
        return self.module.state_dict(), self.optimizer.state_dict()

    def save(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (a temporary folder renamed into place)."""
        cfg = self.cfg
        final = self.out / f"checkpoint-{self.step:06d}"
        rng = self.dist.gather_objects(_rng_state(self.device, self.generator))
        weights, optim = self._state_dicts() if cfg.mode == "full" else ({}, self.optimizer.state_dict())
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / f".checkpoint-{self.step:06d}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            extra = {"step": str(self.step), "base_checkpoint": str(cfg.checkpoint or "released")}
            if cfg.mode == "lora":
                save_lora(tmp, lora_state_dict(self.model.unet), self.lora_config, self.model_config, extra)
            else:
                from safetensors.torch import save_file

                prefixes = {"unet.": "model.diffusion_model.", "image_proj.": "image_proj_model."}
                tensors = {}
                for key, value in weights.items():
                    for ours, theirs in prefixes.items():
                        if key.startswith(ours) and (ours == "unet." or cfg.train_image_proj):
                            tensors[theirs + key[len(ours):]] = value.detach().to("cpu", torch.float32).contiguous()
                save_file(tensors, str(tmp / UNET_NAME), metadata={"step": str(self.step)})
            state = {"step": self.step, "epoch": self.epoch, "position": self.position, "world": self.dist.world_size,
                     "optimizer": optim, "scheduler": self.scheduler.state_dict(), "rng": rng,
                     "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}}
            torch.save(state, tmp / STATE_NAME)
            if final.exists():
                old = final.with_name(final.name + f".old{os.getpid()}")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        self.dist.barrier()
        return final

    def _resume(self, path: Path) -> None:
        cfg = self.cfg
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        saved = state.get("config", {})
        for key in ("mode", "lora_rank", "resolution", "train_image_proj"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise UserError(f"Checkpoint {path} was trained with {key}={saved[key]!r}, "
                                 f"this run has {key}={getattr(cfg, key)!r}.")
        if cfg.mode == "lora":
            from peft import set_peft_model_state_dict

            from ..lora import read_lora

            weights, _ = read_lora(path)
            result = set_peft_model_state_dict(self.model.unet, {k.removeprefix("base_model.model."): v
                                                                 for k, v in weights.items()})
            if [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]:
                raise UserError(f"Checkpoint {path} lacks LoRA weights this run trains (different targets?).")
            for p in self.params:
                p.data = p.data.float()
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path / UNET_NAME))
            unet = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items()
                    if k.startswith("model.diffusion_model.")}
            proj = {k.removeprefix("image_proj_model."): v for k, v in tensors.items() if k.startswith("image_proj_model.")}
            if self.strategy == "fsdp" and self.dist.distributed:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                full = {f"unet.{k}": v for k, v in unet.items()} | {f"image_proj.{k}": v for k, v in proj.items()}
                options = StateDictOptions(full_state_dict=True, strict=False)
                set_model_state_dict(self.module, full, options=options)
                set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=options)
            else:
                self.model.unet.load_state_dict(unet)
                if proj:
                    self.model.image_proj_model.load_state_dict(proj)
                self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        rng = state["rng"]
        if state.get("world") != self.dist.world_size:
            logger.warning("Checkpoint %s was written by %s process(es), this run has %d: the random draws will "
                           "differ from an uninterrupted run.", path, state.get("world"), self.dist.world_size)
        _set_rng_state(rng[min(self.dist.rank, len(rng) - 1)], self.device, self.generator)
        if self.dist.is_main:
            logger.info("Resumed from %s at step %d.", path, self.step)

    # -- logging and samples ----------------------------------------------------------------
    def _open_logs(self) -> None:
        self.writer = None
        self.csv_file = None
        if not self.dist.is_main:
            return
        log_dir = self.out / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        csv_path = log_dir / "metrics.csv"
        rows = []
        if csv_path.exists() and self.step > 0:  # keep what led up to the resumed step
            with csv_path.open(newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= self.step]
        self.csv_file = csv_path.open("w", newline="")
        self.csv = csv.writer(self.csv_file)
        self.csv.writerow(["step", "loss", "lr", "seconds"])
        self.csv.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=self.step + 1 if self.step else None)
        except ImportError:
            logger.warning("TensorBoard is not installed (pip install tensorboard); logging to CSV only.")

    def _log(self, loss: float, lr: float, elapsed: float) -> None:
        if not self.dist.is_main:
            return
        self.csv.writerow([self.step, f"{loss:.6g}", f"{lr:.6g}", f"{elapsed:.3f}"])
        self.csv_file.flush()
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)

    def _close_logs(self) -> None:
        if getattr(self, "csv_file", None) is not None:
            self.csv_file.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()

    def _sample(self) -> Path | None:
        """Render the fixed sample (image + prompt) with the model as trained so far (main process)."""
        cfg = self.cfg
        if self.strategy == "fsdp" and self.dist.distributed:
            if "fsdp-sample" not in self._warned:
                self._warned.add("fsdp-sample")
                logger.warning("Samples during training are not rendered under FSDP.")
            return None
        if not self.dist.is_main:
            return None
        from ..images import load_image
        from ..pipeline import DynamiCrafterImg2VideoPipeline

        if cfg.sample_image:
            image = load_image(cfg.sample_image)
            prompt = cfg.sample_prompt or ""
        else:
            clip = self.clip_dataset.clips[0]
            image = data_mod.first_frame(clip.path)
            prompt = clip.caption if cfg.sample_prompt is None else cfg.sample_prompt
        # Share the training model as it is (no cast): its float32 trained weights must stay float32.
        pipe = DynamiCrafterImg2VideoPipeline.from_model(self.model, self.device, torch.float32, cast=False,
                                                         offload="none")
        was_training = self.model.unet.training
        self.model.unet.eval()
        try:
            with self._autocast(), torch.no_grad():
                frames = pipe(image, prompt, num_inference_steps=cfg.sample_steps,
                              num_frames=cfg.sample_frames or self.frames, height=self.height, width=self.width,
                              generator=torch.Generator(self.device).manual_seed(cfg.seed))["videos"]
        finally:
            self.model.unet.train(was_training)
        path = self.out / "samples" / f"step_{self.step:06d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        pipe.save_video(frames, path, fps=8)
        return path

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- the loop -----------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        """Ctrl-C (or SIGTERM, as torchrun and schedulers send): save after this step and stop."""
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self.dist.is_main:
            logger.warning("Interrupted: saving a checkpoint after this step (Ctrl-C again to quit without saving).")

    def run(self) -> TrainResult:
        """Train to ``max_steps`` (or until Ctrl-C), saving checkpoints; returns what was done."""
        self._setup()
        cfg = self.cfg
        try:
            if cfg.resume:
                self._resume(find_checkpoint(self.out, cfg.resume))
            return self._loop()
        finally:
            self._close_logs()
            shutdown(self.dist)

    def _loop(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(self.step)
        effective = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        if self.dist.is_main:
            trained = sum(p.numel() for p in self.params)
            logger.info("Training %s of the %s model: %.2fM parameters, %d clips, effective batch %d "
                        "(%d per process x %d accumulation x %d process(es)), %s, %s.",
                        "a LoRA" if cfg.mode == "lora" else "the UNet", self.model_config.name, trained / 1e6,
                        len(self.dataset), effective, cfg.batch_size, cfg.grad_accum, self.dist.world_size,
                        self.precision, self.strategy if self.dist.distributed else "1 process")
        self._open_logs()
        previous = None
        if _main_thread():
            previous = (signal.signal(signal.SIGINT, self._on_sigint), signal.signal(signal.SIGTERM, self._on_sigint))
        bar = None
        if self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="Training", unit="step", dynamic_ncols=True)
        batches = self._batches()
        seen, found_usable = 0, False
        start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                step_start = time.perf_counter()
                losses = []
                micro = 0
                while micro < cfg.grad_accum:
                    batch = next(batches)
                    self.epoch, self.position = batch["epoch"], batch["position"]
                    if self.position >= self.samples_per_epoch:
                        self.epoch, self.position = self.epoch + 1, 0
                    for error in batch["errors"]:
                        self._warn_clip(error)
                    seen += batch["count"]
                    usable = 1.0 if "index" in batch else 0.0
                    negated_lowest, highest = self.dist.reduce([-usable, usable], self.device, "max")
                    lowest = -negated_lowest
                    found_usable = found_usable or highest > 0
                    if not found_usable and seen >= self.samples_per_epoch:
                        raise UserError(self._no_usable_clip(sorted(self._warned)))
                    if lowest == 0:
                        continue  # some process has no usable sample in this batch: all skip it
                    micro += 1
                    sync = micro == cfg.grad_accum or not self.dist.distributed or self.strategy == "fsdp"
                    with (nullcontext() if sync else self.ddp_module.no_sync()):
                        loss = self._micro_step(batch)
                        (loss / cfg.grad_accum).backward()
                    losses.append(loss.detach().float().item())
                self._sync_unsharded()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                step_loss = self.dist.reduce([sum(losses) / len(losses)], self.device)[0] / self.dist.world_size
                lr = self.scheduler.get_last_lr()[0]
                result.losses.append(step_loss)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                result.step_seconds.append(time.perf_counter() - step_start)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log(step_loss, lr, time.perf_counter() - start)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                stop = self.dist.reduce([1.0 if self._stop_requested else 0.0], self.device, "max")[0] > 0
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps or stop:
                    result.checkpoint = self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    sample = self._sample()
                    if sample is not None:
                        logger.info("Sample at step %d: %s", self.step, sample)
                if stop:
                    result.interrupted = True
                    break
        except KeyboardInterrupt:
            result.interrupted = True
            logger.warning("Stopped at step %d without saving.", self.step)
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous[0])
                signal.signal(signal.SIGTERM, previous[1])
        result.step = self.step
        result.skipped_clips = len([w for w in self._warned if w != "fsdp-sample"])
        if result.skipped_clips and self.dist.is_main:
            logger.warning("%d clip(s) could not be used and were skipped.", result.skipped_clips)
        return result

    def _micro_step(self, batch: dict[str, Any]) -> torch.Tensor:
        first = batch["video"] if "video" in batch else batch["latent_mean"]
        b = first.shape[0]
        down = self.model_config.latent_downscale
        shape = (b, self.model_config.vae.embed_dim, self.frames, self.height // down, self.width // down)
        draws = draw(self.model, shape, uncond_prob=self.cfg.uncond_prob, rand_cond_frame=self.rand_cond_frame,
                     generator=self.generator)
        with self._autocast():
            encoded, fs = self._encode(batch, draws)
            return self.ddp_module(encoded, fs, draws.timesteps.to(self.device), draws.noise.to(self.device),
                                   draws.cond_frame.to(self.device), draws.drop_text, draws.drop_image, self.null)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, model: DynamiCrafter | None = None) -> TrainResult:
    """Run a fine-tuning job (see :class:`TrainConfig`); ``model`` overrides loading one from a checkpoint."""
    return Trainer(cfg, model).run()
