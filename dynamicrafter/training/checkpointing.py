"""Checkpoints of a run: the output folder, saving, finding ``latest``, reading, resuming.

A checkpoint is a folder ``checkpoint-<step>`` in the output folder: the trained weights (a
LoRA as ``adapter_model.safetensors`` + ``adapter_config.json``, or the UNet as
``unet.safetensors``) and ``training_state.pt`` (optimizer, schedule, random states, stream
position and the run's settings). It is written into a hidden temporary folder that is renamed
into place once complete, so a checkpoint folder is whole or absent; the temporary folders of a
killed save are removed when the next run starts and are never taken for ``latest``.

Runs are never destroyed: a new run refuses an output folder that holds one (unless
``--overwrite``), a failed save leaves the earlier checkpoints as they were, and a checkpoint
of non-finite weights is never written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from ..files import write_atomically
from ..lora import lora_state_dict, save_lora
from .config import DEFAULT_LR, TrainConfig, flag
from .distributed import Dist
from .model import set_hyperparameters

if TYPE_CHECKING:
    from .trainer import TrainState

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
UNET_NAME = "unet.safetensors"
METRICS = Path("logs") / "metrics.csv"
_FINAL = re.compile(r"checkpoint-(\d{6,})")
_UNFINISHED = re.compile(r"\.(checkpoint-\d{6,})\.(tmp|old)\d+")

#: Settings a run cannot change when it continues: the saved weights or optimizer state would not fit.
FIXED = ("mode", "resolution", "lora_rank", "lora_alpha", "lora_targets", "train_image_proj", "optimizer")
#: Settings the saved run keeps, with the reason.
SAVED_WINS = {"seed": "the data order and the random draws continue from it"}
#: Settings about this invocation only, never compared with the saved run's.
THIS_RUN = ("output_dir", "resume", "overwrite", "device", "threads")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:06d}"


def _step_of(folder: Path) -> int | None:
    match = _FINAL.fullmatch(folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None


def list_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoint folders in ``out``, oldest step first."""
    if not out.is_dir():
        return []
    found = [(step, p) for p in out.iterdir() if (step := _step_of(p)) is not None and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds (part of) a training run: checkpoint folders or a metrics log."""
    return (out / METRICS).exists() or (out.is_dir() and any(_step_of(p) is not None for p in out.iterdir()))


def find_checkpoint(out: Path, resume: str) -> Path:
    """The checkpoint folder ``resume`` names (``latest``: the newest in ``out``)."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise UserError(f"There is no checkpoint in {out} to resume from.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise UserError(f"{resume} is not a training checkpoint (no {STATE_NAME} in it).")
    return path


def _reason(exc: BaseException) -> str:
    """An exception's message cut to its first sentence (the OS's words for an OSError), to quote in ours."""
    text = " ".join((exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).split())
    first = re.split(r"(?<=\w)\.\s", text)[0].rstrip(".")
    return (first if len(first) <= 200 else first[:199] + "…") or type(exc).__name__


def _remove(path: Path) -> None:
    try:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot remove {path} ({_reason(exc)}).") from None


def _clean_unfinished(out: Path) -> None:
    """Remove the temporary folders of killed saves; put back a checkpoint a killed save had moved aside."""
    for path in out.iterdir():
        match = _UNFINISHED.fullmatch(path.name)
        if not match:
            continue
        final = out / match.group(1)
        if match.group(2) == "old" and not final.exists() and (path / STATE_NAME).is_file():
            path.rename(final)
            logger.warning("Restored %s, which a killed save had moved aside.", final)
        else:
            _remove(path)
            logger.info("Removed %s, left by a save that did not finish.", path)


def check_output_dir(cfg: TrainConfig, dist: Dist) -> Path | None:
    """Refuse an output folder that holds a run this one would replace; returns the checkpoint to resume from.

    A folder with a run is only used to continue it (``--resume``) or to start over
    (``--overwrite``, see :func:`make_output_dir`). What killed saves left is tidied first (main
    process), so that ``latest`` is the newest complete checkpoint. Nothing else is written.
    """
    out = Path(cfg.output_dir)
    existing = holds_run(out)
    if existing and not cfg.overwrite and cfg.resume is None:
        raise UserError(f"{out} already holds a training run; continue it with --resume latest, or start over "
                         f"with --overwrite (which deletes its checkpoints, logs and samples).")
    _on_main(dist, out, lambda: _clean_unfinished(out) if out.is_dir() else None)
    resume_from = find_checkpoint(out, cfg.resume) if cfg.resume else None
    if existing and resume_from is not None and out.resolve() not in resume_from.resolve().parents:
        raise UserError(f"{out} already holds a training run, not the one {resume_from} belongs to; resume into "
                         f"that run's folder or an empty --output_dir.")
    return resume_from


def make_output_dir(cfg: TrainConfig, dist: Dist) -> None:
    """Create the output folder (main process); with ``--overwrite`` remove the run it holds first."""
    out = Path(cfg.output_dir)

    def make() -> None:
        if cfg.overwrite and holds_run(out):
            old = [p for p in out.iterdir() if _step_of(p) is not None]
            for path in [*old, out / "logs", out / "samples"]:
                _remove(path)
            logger.warning("--overwrite: removed the earlier run in %s (%d checkpoint(s), logs/, samples/).",
                           out, len(old))
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise UserError(f"The output folder {out} is not writable.")

    _on_main(dist, out, make)


def _on_main(dist: Dist, out: Path, work: Any) -> None:
    """Run ``work`` on the main process; its error, one sentence, stops every process."""
    error = None
    if dist.is_main:
        try:
            work()
        except UserError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"Cannot prepare the output folder {out} ({_reason(exc)})."
    dist.check_all(error)


# ---------------------------------------------------------------------------------------- save
def rng_state(device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state(), "draws": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["draws"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _state_dicts(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trained weights (full tensors on the CPU) and the optimizer state, gathered under FSDP."""
    run = state.run
    if run.strategy == "fsdp" and run.dist.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(state.module, options=options)
        optim = get_optimizer_state_dict(state.module, state.optimizer, options=options)
        return weights, optim
    return state.module.state_dict(), state.optimizer.state_dict()


def _unet_tensors(weights: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The loss module's weights under the released checkpoints' key names (float32, CPU)."""
    prefixes = {"unet.": "model.diffusion_model.", "image_proj.": "image_proj_model."}
    tensors = {}
    for key, value in weights.items():
        for ours, theirs in prefixes.items():
            if key.startswith(ours) and (ours == "unet." or cfg.train_image_proj):
                tensors[theirs + key[len(ours):]] = value.detach().to("cpu", torch.float32).contiguous()
    return tensors


def _check_safetensors(path: Path, name: str) -> None:
    """Raise OSError unless ``path`` is as long as its header says (a short write caught before the rename)."""
    try:
        with path.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        complete = path.stat().st_size == 8 + size + end
    except (ValueError, KeyError, TypeError, struct.error):
        complete = False
    if not complete:
        raise OSError(f"{name} was not written completely")


def _check_zip(path: Path, name: str) -> None:
    """Raise OSError unless ``path`` ends with a zip directory, as a complete ``torch.save`` file does."""
    try:
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile:
        raise OSError(f"{name} was not written completely") from None


def _torch_save(obj: Any, path: Path, name: str) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError:  # torch reports a failed write (a full disk) as a RuntimeError
        raise OSError(f"writing {name} failed; is the disk full?") from None


def _all_finite(state: TrainState) -> bool:
    """Whether every trained value is finite, on every process (FSDP: each checks its shards)."""
    local = [(p.to_local() if hasattr(p, "to_local") else p).detach().isfinite().all() for p in state.params]
    bad = 0.0 if not local or bool(torch.stack(local).all()) else 1.0
    return state.run.dist.reduce([bad], state.run.device, "max")[0] == 0


def save_checkpoint(state: TrainState) -> Path:
    """Write ``checkpoint-<step>`` (a temporary folder renamed into place); every process calls it.

    Weights with NaN or infinite values are not saved (one sentence instead); a write that fails
    (a full disk, a read-only folder) removes its temporary folder, leaves the earlier
    checkpoints as they were and stops the run with one sentence on every process.
    """
    run, cfg = state.run, state.run.cfg
    if not _all_finite(state):
        raise UserError(f"The trained weights became NaN or infinite at step {state.step}: training diverged "
                         f"(try a lower --learning_rate), and no checkpoint was written for that step.")
    final = checkpoint_dir(run.out, state.step)
    rngs = run.dist.gather_objects(rng_state(run.device, state.generator))
    weights, optim = _state_dicts(state) if cfg.mode == "full" else ({}, state.optimizer.state_dict())
    error = None
    if run.dist.is_main:
        doc = {"step": state.step, "epoch": state.epoch, "position": state.position, "world": run.dist.world_size,
               "optimizer": optim, "scheduler": state.scheduler.state_dict(), "rng": rngs, "config": saved_config(cfg)}
        tmp = run.out / f".{final.name}.tmp{os.getpid()}"
        try:
            _write_checkpoint(state, tmp, weights, doc)
            _put_in_place(tmp, final)
        except OSError as exc:
            error = f"Could not write checkpoint {final} ({_reason(exc)}); the earlier checkpoints are intact."
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    run.dist.check_all(error)
    return final


def _write_checkpoint(state: TrainState, tmp: Path, weights: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    run, cfg = state.run, state.run.cfg
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extra = {"step": str(state.step), "base_checkpoint": str(cfg.checkpoint or "released")}
    if cfg.mode == "lora":
        save_lora(tmp, lora_state_dict(state.model.unet), state.lora_config, run.model_config, extra)
    else:
        from safetensors.torch import save_file

        tensors = _unet_tensors(weights, cfg)
        write_atomically(tmp / UNET_NAME, lambda p: save_file(tensors, str(p), metadata={"step": str(state.step)}),
                         verify=lambda p: _check_safetensors(p, UNET_NAME))
    write_atomically(tmp / STATE_NAME, lambda p: _torch_save(doc, p, STATE_NAME), verify=lambda p: _check_zip(p, STATE_NAME))


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder to ``final``; one there already is moved aside first and then removed."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def saved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as ``training_state.pt`` keeps them (tuples as lists: plain data for ``weights_only``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}


# -------------------------------------------------------------------------------------- resume
def read_state(path: Path) -> dict[str, Any]:
    """``training_state.pt`` of a checkpoint folder; one sentence naming the file when it cannot be read."""
    file = path / STATE_NAME
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types; all mean "not a readable state"
        raise UserError(f"{file} cannot be read, it is truncated or corrupt ({_reason(exc)}); resume from "
                         f"another checkpoint.") from None
    keys = ("step", "epoch", "position", "optimizer", "scheduler", "rng")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise UserError(f"{file} is not a training state written by this trainer (it lacks "
                         f"{', '.join(k for k in keys if not isinstance(state, dict) or k not in state)}).")
    return state


def _shown(value: Any) -> str:
    if value is None:
        return "the default"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _with(name: str, value: Any) -> str:
    return f"without {flag(name)}" if value is None else f"with {flag(name)} {_shown(value)}"


def reconcile(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> TrainConfig:
    """This run's settings against the saved run's, each difference decided and said in one log line.

    Settings this run leaves unset take the saved run's values; a different :data:`FIXED`
    setting is refused; :data:`SAVED_WINS` keep the saved value; any other new value applies
    (the learning rate, betas and weight decay are put in the restored optimizer by :func:`restore`).
    """
    adopted, kept, changed = {}, {}, []
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in THIS_RUN or name not in saved:
            continue
        old, new = saved[name], getattr(cfg, name)
        old = tuple(old) if isinstance(old, list) else old
        if old == new:
            continue
        if new is None:
            adopted[name] = old
        elif name in FIXED:
            raise UserError(f"{path} was trained {_with(name, old)}, not {'with ' if old is None else ''}{_shown(new)}: "
                             f"resume {_with(name, old)}, or start a new run in another --output_dir.")
        elif name in SAVED_WINS:
            kept[name] = old
            logger.warning("%s %s of the saved run is kept, not %s: %s.", name, _shown(old), _shown(new), SAVED_WINS[name])
        elif name != "learning_rate":  # said below, as the rates in force
            changed.append(name)
    merged = cfg.replace(**adopted, **kept)
    if adopted:
        logger.info("From the saved run: %s.", ", ".join(f"{k} {_shown(v)}" for k, v in adopted.items()))
    saved_lr = saved.get("learning_rate") or DEFAULT_LR.get(saved.get("mode"), merged.lr)
    if merged.lr != saved_lr:
        logger.info("learning rate %g (was %g in the saved run)", merged.lr, saved_lr)
    for name in changed:
        logger.info("%s %s (was %s in the saved run)", name, _shown(getattr(merged, name)), _shown(saved[name]))
    return merged


def restore(state: TrainState, path: Path, saved: dict[str, Any]) -> None:
    """Load a checkpoint's weights, optimizer, schedule, stream position and random states into ``state``."""
    run, cfg = state.run, state.run.cfg
    if cfg.mode == "lora":
        _load_lora(state, path)
    else:
        _load_unet(state, path, saved)
    file = path / STATE_NAME
    try:
        if not (cfg.mode == "full" and run.strategy == "fsdp" and run.dist.distributed):
            state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.step, state.epoch, state.position = int(saved["step"]), int(saved["epoch"]), int(saved["position"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"{file} does not fit this run's optimizer ({_reason(exc)}).") from None
    set_hyperparameters(state.optimizer, state.scheduler, cfg, state.step)
    rng = saved["rng"]
    if saved.get("world") != run.dist.world_size:
        logger.warning("Checkpoint %s was written by %s process(es), this run has %d: the random draws will "
                       "differ from an uninterrupted run.", path, saved.get("world"), run.dist.world_size)
    set_rng_state(rng[min(run.dist.rank, len(rng) - 1)], run.device, state.generator)
    later = [p.name for p in list_checkpoints(run.out) if (_step_of(p) or 0) > state.step]
    if later and run.dist.is_main:
        logger.warning("Resuming at step %d: the later checkpoints in %s (%s) are replaced as the run reaches "
                       "their steps.", state.step, run.out, ", ".join(later))
    if run.dist.is_main:
        logger.info("Resumed from %s at step %d.", path, state.step)


def _load_lora(state: TrainState, path: Path) -> None:
    from peft import set_peft_model_state_dict

    from ..lora import WEIGHTS_NAME, read_lora

    weights, _ = read_lora(path)  # one sentence naming the file when it is unreadable
    try:
        result = set_peft_model_state_dict(state.model.unet, {k.removeprefix("base_model.model."): v
                                                              for k, v in weights.items()})
    except RuntimeError as exc:  # shapes that do not fit
        raise UserError(f"{path / WEIGHTS_NAME} does not fit this model ({_reason(exc)}).") from None
    if [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]:
        raise UserError(f"Checkpoint {path} lacks LoRA weights this run trains (different targets?).")
    for p in state.params:
        p.data = p.data.float()


def _load_unet(state: TrainState, path: Path, saved: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run, file = state.run, path / UNET_NAME
    if not file.is_file():
        raise UserError(f"Checkpoint {path} has no {UNET_NAME} (is it a LoRA checkpoint?).")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file} cannot be read, it is truncated or corrupt ({_reason(exc)}).") from None
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items()
            if k.startswith("model.diffusion_model.")}
    proj = {k.removeprefix("image_proj_model."): v for k, v in tensors.items() if k.startswith("image_proj_model.")}
    try:
        if run.strategy == "fsdp" and run.dist.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = {f"unet.{k}": v for k, v in unet.items()} | {f"image_proj.{k}": v for k, v in proj.items()}
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(state.module, full, options=options)
            set_optimizer_state_dict(state.module, state.optimizer, saved["optimizer"], options=options)
        else:
            state.model.unet.load_state_dict(unet)
            if proj:
                state.model.image_proj_model.load_state_dict(proj)
    except RuntimeError as exc:  # missing, unexpected or misshapen keys
        raise UserError(f"{file} does not fit this model ({_reason(exc)}).") from None
