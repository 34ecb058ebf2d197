"""The fine-tuning loop: LoRA or full fine-tuning of the UNet, on one GPU, a CPU or under torchrun.

:func:`train` is :func:`setup` (the output folder, the clips, the model, the optimizer and
schedule, a resumed checkpoint) followed by :func:`fit`, a loop to read top to bottom. One
optimizer step = ``grad_accum`` micro-batches of ``batch_size`` clips per process. Each
micro-batch: frozen encoders (or the latent cache), the step's random draws from the run's own
generator, :func:`~dynamicrafter.training.objective.loss_on_encoded` under bf16 autocast,
backward. Then a check that the loss is finite, gradient clipping, AdamW, the learning-rate
schedule, logging (:mod:`.metrics`), and every ``save_every`` steps a checkpoint
(:mod:`.checkpointing`) from which ``--resume`` continues exactly; samples (:mod:`.samples`)
every ``sample_every`` steps.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoints import load_model
from ..configs import ModelConfig, resolve_resolution
from ..errors import UserError
from ..models.dynamicrafter import DynamiCrafter
from ..runtime import use_cpu_threads
from . import checkpointing
from . import data as data_mod
from .config import TrainConfig
from .distributed import Dist, init, shutdown
from .metrics import Metrics
from .model import (
    LossModule,
    make_optimizer,
    make_scheduler,
    prepare_model,
    resolve_model_config,
    resolve_precision,
    sync_unsharded,
    wrap,
)
from .objective import EncodedBatch, NullConditioning, draw, encode_batch, null_conditioning, sample_posterior
from .samples import SampleInput, render_sample, sample_input

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did: optimizer steps reached, the loss of each step run here, the last checkpoint."""

    step: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    skipped_clips: int = 0
    interrupted: bool = False
    step_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains: its settings, processes and clip geometry."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model_config: ModelConfig
    frames: int
    height: int
    width: int
    rand_cond_frame: bool
    precision: str
    strategy: str

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


@dataclass
class TrainState:
    """The run, what it trains, and where it stands: what :func:`setup` builds and :func:`fit` advances."""

    run: Run
    model: DynamiCrafter
    module: LossModule  # the trained parts with the objective as forward
    wrapped: nn.Module  # ``module`` under DDP/FSDP (``module`` itself for one process)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator  # the step's random draws
    null: NullConditioning
    clips: data_mod.ClipDataset
    dataset: Dataset  # ``clips``, or their latent cache
    lora_config: Any = None
    unsharded: list[nn.Parameter] = field(default_factory=list)  # parameters FSDP leaves whole
    sample: SampleInput | None = None
    step: int = 0
    epoch: int = 0
    position: int = 0  # samples of ``epoch`` used by this process
    skipped: set[str] = field(default_factory=set)  # the unusable clips' errors, each warned once


# ------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, model: DynamiCrafter | None = None) -> TrainState:
    """Everything a run needs before its first step; ``model`` overrides loading one from a checkpoint.

    Cheap checks first (the output folder, a resumed checkpoint's state and settings, the clips),
    then the output folder is made and the model loaded: a mistake is reported before minutes of
    loading, and before ``--overwrite`` deletes anything.
    """
    dist, device = init(cfg.device)
    use_cpu_threads(cfg.threads, device)
    resume_from = checkpointing.check_output_dir(cfg, dist)
    saved = None
    if resume_from is not None:
        saved = checkpointing.read_state(resume_from)
        cfg = checkpointing.reconcile(cfg, saved.get("config", {}), resume_from)
    run = _plan(cfg, dist, device, model.config if model is not None else resolve_model_config(cfg))
    clips = data_mod.ClipDataset(data_mod.find_clips(cfg.data, cfg.video_root), run.frames, run.height, run.width,
                                 cfg.frame_stride_min, cfg.frame_stride_max, run.model_config.fs_kind)
    sample = sample_input(cfg, clips) if cfg.sample_every and dist.is_main else None
    checkpointing.make_output_dir(cfg, dist)

    model = _load_model(run, model)
    torch.manual_seed(cfg.seed + 7919 * dist.rank)  # dropout and anything else on the global RNG
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank)
    module, params, lora_config = prepare_model(model, cfg)
    null = null_conditioning(model, device)
    wrapped, unsharded = wrap(module, dist, device, run.strategy, run.precision)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    optimizer = make_optimizer(params, cfg)
    state = TrainState(run, model, module, wrapped, params, optimizer, make_scheduler(optimizer, cfg), generator, null,
                       clips, clips, lora_config, unsharded, sample)
    if cfg.cache_latents:
        state.dataset = _latent_cache(state)
    if resume_from is not None:
        checkpointing.restore(state, resume_from, saved)
    return state


def _plan(cfg: TrainConfig, dist: Dist, device: torch.device, mc: ModelConfig) -> Run:
    """The run's fixed settings, the defaults the model gives resolved and checked."""
    height, width = cfg.height or mc.height, cfg.width or mc.width
    for label, value in (("height", height), ("width", width)):
        if value % mc.size_multiple:
            raise UserError(f"{label} must be a multiple of {mc.size_multiple} pixels for this model, got {value}.")
    precision = resolve_precision(cfg, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("This GPU has no bfloat16; use --dtype float32.")
    strategy = cfg.strategy
    if strategy == "auto":
        large = mc.height * mc.width >= 576 * 1024
        strategy = "fsdp" if cfg.mode == "full" and large and dist.distributed else "ddp"
    rand_cond_frame = (not mc.interp) if cfg.rand_cond_frame is None else cfg.rand_cond_frame
    return Run(cfg, dist, device, mc, cfg.frames or mc.unet.temporal_length, height, width, rand_cond_frame,
               precision, strategy)


def _load_model(run: Run, given: DynamiCrafter | None) -> DynamiCrafter:
    """The base model on the run's device: frozen parts in the training precision."""
    cfg = run.cfg
    frozen_dtype = torch.bfloat16 if run.precision == "bf16" else torch.float32
    if given is not None:
        model = given.to(run.device)
    else:
        checkpoint = cfg.checkpoint
        if checkpoint is None:
            from ..hub import ensure_checkpoint

            checkpoint = ensure_checkpoint(resolve_resolution(cfg.resolution))
        elif not Path(checkpoint).is_file():
            raise UserError(f"Checkpoint {checkpoint} does not exist.")
        model = load_model(run.model_config, checkpoint, dtype=frozen_dtype, device=run.device,
                           clip_checkpoint=cfg.clip_checkpoint)
    model.to(run.device)
    if given is None or frozen_dtype != torch.float32:
        for part in (model.vae, model.cond_stage_model, model.embedder, model.image_proj_model):
            part.to(frozen_dtype)
        if cfg.mode == "lora":
            model.unet.to(frozen_dtype)
    return model


def _latent_cache(state: TrainState) -> Dataset:
    """Encode every clip once (``--cache_latents``); the cached clips to train from."""
    from tqdm.auto import tqdm

    from . import latent_cache

    run, cfg = state.run, state.run.cfg
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run.out / "cache"
    cond_frames = run.frames if run.rand_cond_frame else 1
    progress = (lambda xs: tqdm(xs, desc="Caching latents", leave=False)) if run.dist.is_main else iter
    dtype = torch.bfloat16 if run.precision == "bf16" else torch.float32
    files = latent_cache.build_cache(state.model, state.clips, cache_dir, cond_frames, cfg.seed, run.dist.rank,
                                     run.dist.world_size, progress, dtype)
    run.dist.barrier()
    good, errors = latent_cache.finish(files)
    for error in errors:
        _skip_clip(state, error)
    if not good:
        raise UserError(_no_usable_clip(state))
    logger.info("Latent cache: %d clips in %s.", len(good), cache_dir)
    return latent_cache.CachedDataset(good)


# --------------------------------------------------------------------------------------- fit
def fit(state: TrainState) -> TrainResult:
    """Train from ``state.step`` to ``max_steps`` (or until Ctrl-C), logging and saving; returns what was done."""
    run, cfg, dist = state.run, state.run.cfg, state.run.dist
    result = TrainResult(state.step)
    _describe(state)
    metrics = Metrics(run.out / "logs", state.step, enabled=dist.is_main)
    bar = _progress_bar(state) if dist.is_main else None
    batches = _usable_batches(state)
    start = time.perf_counter()
    stop = StopRequest(announce=dist.is_main)
    try:
        while state.step < cfg.max_steps:
            step_start = time.perf_counter()
            loss = _accumulate_gradients(state, batches)
            if not math.isfinite(loss):
                raise UserError(f"The loss is {loss} at step {state.step + 1}: training diverged (try a lower "
                                 f"--learning_rate), and nothing of that step was saved.")
            _optimizer_step(state)
            state.step += 1
            lr = state.scheduler.get_last_lr()[0]
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            result.losses.append(loss)
            result.step_seconds.append(time.perf_counter() - step_start)

            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                metrics.log(state.step, loss, lr, time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            stopping = dist.reduce([1.0 if stop.requested else 0.0], run.device, "max")[0] > 0
            if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stopping:
                result.checkpoint = checkpointing.save_checkpoint(state)
            if cfg.sample_every and state.step % cfg.sample_every == 0:
                _sample(state)
            if stopping:
                result.interrupted = True
                break
    except KeyboardInterrupt:  # a second Ctrl-C
        result.interrupted = True
        logger.warning("Stopped at step %d without saving.", state.step)
    finally:
        if bar is not None:
            bar.close()
        stop.release()
        metrics.close()
    result.step = state.step
    result.skipped_clips = len(state.skipped)
    if result.skipped_clips and dist.is_main:
        logger.warning("%d clip(s) could not be used and were skipped.", result.skipped_clips)
    return result


def train(cfg: TrainConfig, model: DynamiCrafter | None = None) -> TrainResult:
    """Run a fine-tuning job (see :class:`TrainConfig`); ``model`` overrides loading one from a checkpoint."""
    dist, _ = init(cfg.device)  # setup joins the same process group again (a no-op)
    try:
        return fit(setup(cfg, model))
    finally:
        shutdown(dist)


# -------------------------------------------------------------------------------- the steps
def _accumulate_gradients(state: TrainState, batches: Iterator[dict[str, Any]]) -> float:
    """Forward and backward of ``grad_accum`` micro-batches; the step's loss, averaged over every process."""
    run, cfg = state.run, state.run.cfg
    losses: list[float] = []
    while len(losses) < cfg.grad_accum:
        batch = next(batches)
        last = len(losses) + 1 == cfg.grad_accum
        sync = last or not run.dist.distributed or run.strategy == "fsdp"
        with nullcontext() if sync else state.wrapped.no_sync():
            loss = _micro_step(state, batch)
            (loss / cfg.grad_accum).backward()
        losses.append(loss.detach().float().item())
    return run.dist.reduce([sum(losses) / len(losses)], run.device)[0] / run.dist.world_size


def _optimizer_step(state: TrainState) -> None:
    """Clip the gradients, step AdamW and the schedule, clear the gradients."""
    cfg = state.run.cfg
    sync_unsharded(state.unsharded)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(state.params, cfg.max_grad_norm)
    try:
        state.optimizer.step()
    except RuntimeError as exc:  # AdamW's step size (lr / bias correction) beyond float32
        if "overflow" not in str(exc):
            raise
        raise UserError(f"The optimizer's step {state.step + 1} overflows float32 at learning rate "
                         f"{state.scheduler.get_last_lr()[0]:g}: try a lower --learning_rate.") from None
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)


def _micro_step(state: TrainState, batch: dict[str, Any]) -> torch.Tensor:
    run = state.run
    first = batch["video"] if "video" in batch else batch["latent_mean"]
    down = run.model_config.latent_downscale
    shape = (first.shape[0], run.model_config.vae.embed_dim, run.frames, run.height // down, run.width // down)
    draws = draw(state.model, shape, uncond_prob=run.cfg.uncond_prob, rand_cond_frame=run.rand_cond_frame,
                 generator=state.generator)
    device = run.device
    with run.autocast():
        encoded, fs = _encode(state, batch, draws)
        return state.wrapped(encoded, fs, draws.timesteps.to(device), draws.noise.to(device),
                             draws.cond_frame.to(device), draws.drop_text, draws.drop_image, state.null)


def _encode(state: TrainState, batch: dict[str, Any], draws: Any) -> tuple[EncodedBatch, torch.Tensor]:
    device = state.run.device
    if "video" in batch:
        videos = batch["video"].to(device, non_blocking=True)
        encoded = encode_batch(state.model, videos, batch["caption"], draws.cond_frame, generator=state.generator)
    else:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = sample_posterior(state.model, mean, std, state.generator)
        tokens = batch["clip_tokens"].to(device)
        index = draws.cond_frame.clamp(max=tokens.shape[1] - 1).to(device)
        clip_tokens = tokens[torch.arange(tokens.shape[0], device=device), index].float()
        encoded = EncodedBatch(latents, batch["text"].to(device).float(), clip_tokens)
    return encoded, batch["fs"].to(device)


def _usable_batches(state: TrainState) -> Iterator[dict[str, Any]]:
    """Batches every process can use, without end, from where the run stands (``state.epoch``, ``.position``).

    An unusable clip is warned about once; a batch that some process cannot use is skipped by all;
    a whole epoch without a usable clip stops the run with one sentence.
    """
    run, cfg = state.run, state.run.cfg
    sampler = data_mod.StreamSampler(len(state.dataset), cfg.seed, run.dist.rank, run.dist.world_size, state.epoch,
                                     state.position)
    loader = DataLoader(state.dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=data_mod.collate, pin_memory=run.device.type == "cuda",
                        prefetch_factor=2 if cfg.num_workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG alone
    seen, found_usable = 0, False
    for batch in loader:
        state.epoch, state.position = batch["epoch"], batch["position"]
        if state.position >= sampler.per_rank:
            state.epoch, state.position = state.epoch + 1, 0
        for error in batch["errors"]:
            _skip_clip(state, error)
        seen += batch["count"]
        usable = 1.0 if "index" in batch else 0.0
        negated_lowest, highest = run.dist.reduce([-usable, usable], run.device, "max")
        found_usable = found_usable or highest > 0
        if not found_usable and seen >= sampler.per_rank:
            raise UserError(_no_usable_clip(state))
        if -negated_lowest > 0:
            yield batch


def _skip_clip(state: TrainState, error: str) -> None:
    if error not in state.skipped:
        state.skipped.add(error)
        logger.warning("Skipping clip %s", error)


def _no_usable_clip(state: TrainState) -> str:
    errors = sorted(state.skipped)
    first = f" The first: {errors[0]}." if errors else ""
    return f"None of the {len(state.clips)} clips in {state.run.cfg.data} can be used for training.{first}"


def _sample(state: TrainState) -> None:
    """A sample video on the main process (not under FSDP); an error stops every process."""
    run = state.run
    if run.strategy == "fsdp" and run.dist.distributed:
        return
    error = None
    if run.dist.is_main:
        try:
            path = render_sample(state, state.sample)
            logger.info("Sample at step %d: %s", state.step, path)
        except UserError as exc:
            error = str(exc)
    run.dist.check_all(error)


# ------------------------------------------------------------------------------ around the loop
def _describe(state: TrainState) -> None:
    run, cfg = state.run, state.run.cfg
    if not run.dist.is_main:
        return
    trained = sum(p.numel() for p in state.params)
    logger.info("Training %s of the %s model: %.2fM parameters, %d clips, effective batch %d "
                "(%d per process x %d accumulation x %d process(es)), %s, %s.",
                "a LoRA" if cfg.mode == "lora" else "the UNet", run.model_config.name, trained / 1e6,
                len(state.dataset), cfg.batch_size * cfg.grad_accum * run.dist.world_size, cfg.batch_size,
                cfg.grad_accum, run.dist.world_size, run.precision, run.strategy if run.dist.distributed else "1 process")
    if cfg.sample_every and run.strategy == "fsdp" and run.dist.distributed:
        logger.warning("Samples during training are not rendered under FSDP.")


def _progress_bar(state: TrainState) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=state.run.cfg.max_steps, initial=state.step, desc="Training", unit="step", dynamic_ncols=True)


class StopRequest:
    """Ctrl-C (or SIGTERM, as torchrun and schedulers send) asks the loop to save after this step and stop;
    a second Ctrl-C stops at once. Installed from the main thread only (signals go there)."""

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.announce = announce
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = (signal.signal(signal.SIGINT, self._handle), signal.signal(signal.SIGTERM, self._handle))

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.announce:
            logger.warning("Interrupted: saving a checkpoint after this step (Ctrl-C again to quit without saving).")

    def release(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous[0])
            signal.signal(signal.SIGTERM, self.previous[1])
            self.previous = None
