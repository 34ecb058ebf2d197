"""``--cache_latents``: run the frozen encoders over every clip once and train from the results.

For each clip one frame window is drawn (seeded) and decoded; the cache keeps the VAE
posterior's mean and standard deviation of every frame in float32 (so each epoch still draws a
fresh posterior sample, as the original does), the caption's text tokens and the CLIP tokens of
every frame that can be the conditioning frame (bfloat16 for bf16 training, else float32).
One ``.safetensors`` file per clip, written atomically, named by a hash of the clip file and of
every setting that shapes it, so a later run with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..files import write_atomically
from ..models.dynamicrafter import DynamiCrafter
from .data import ClipDataset, sample_seed
from .objective import posterior_moments

logger = logging.getLogger(__name__)


def cache_key(dataset: ClipDataset, index: int, model_name: str, cond_frames: int, seed: int,
              dtype: torch.dtype = torch.bfloat16) -> str:
    path = dataset.clips[index].path
    try:
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    doc = json.dumps([str(path.resolve()), stamp, dataset.clips[index].caption, model_name, dataset.frames,
                      dataset.height, dataset.width, dataset.stride_min, dataset.stride_max, dataset.fs_kind,
                      cond_frames, seed, str(dtype)])
    return hashlib.sha1(doc.encode()).hexdigest()[:24]


@torch.no_grad()
def encode_clip(model: DynamiCrafter, video: torch.Tensor, caption: str, cond_frames: int,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Encoder outputs of one ``[3, T, H, W]`` clip: latent moments in float32, tokens in ``dtype``."""
    device = next(model.vae.parameters()).device
    video = video.to(device)[None]
    mean, std = posterior_moments(model, video)
    frames = video[0, :, :cond_frames].transpose(0, 1)  # [K, 3, H, W]
    dtype = next(model.embedder.parameters()).dtype
    clip_tokens = model.embedder(frames.to(dtype))
    return {"latent_mean": mean[0].cpu(), "latent_std": std[0].cpu(),
            "text": model.encode_text([caption])[0].to("cpu", dtype),
            "clip_tokens": clip_tokens.to("cpu", dtype)}


def build_cache(model: DynamiCrafter, dataset: ClipDataset, cache_dir: Path, cond_frames: int, seed: int,
                rank: int = 0, world: int = 1, progress: Callable[[Any], Any] = iter,
                dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Encode this rank's share of the clips (those not cached yet); returns every clip's file
    (``None`` for a clip that could not be used). Call :func:`finish` on every rank after it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path | None] = []
    todo = []
    for index in range(len(dataset)):
        file = cache_dir / f"{cache_key(dataset, index, model.config.name, cond_frames, seed, dtype)}.safetensors"
        files.append(file)
        if index % world == rank and not file.exists() and not file.with_suffix(".error").exists():
            todo.append(index)
    for index in progress(todo):
        item = dataset[(index, sample_seed(seed, -1, index), -1, 0)]
        file = files[index]
        if "error" in item:
            error = item["error"]
            write_atomically(file.with_suffix(".error"), lambda tmp, text=error: tmp.write_text(text))
            continue
        tensors = encode_clip(model, item["video"], item["caption"], cond_frames, dtype)
        tensors["fs"] = torch.tensor(item["fs"])
        write_atomically(file, lambda tmp, values=tensors: save_file(values, str(tmp)))
    return files


def finish(files: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The usable cache files and the errors of the unusable clips (after every rank has built its share)."""
    good, errors = [], []
    for file in files:
        if file.exists():
            good.append(file)
        elif file.with_suffix(".error").exists():
            errors.append(file.with_suffix(".error").read_text())
        else:
            errors.append(f"{file}: missing from the cache")
    return good, errors


class CachedDataset(Dataset):
    """Items from the cache: ``latent_mean``/``latent_std`` ``[4, T, h, w]``, ``text`` ``[77, D]``,
    ``clip_tokens`` ``[K, N, Dv]``, ``fs``. Indexed like :class:`ClipDataset`."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, int, int] | int) -> dict[str, Any]:
        index, _, epoch, position = key if isinstance(key, tuple) else (key, 0, 0, 0)
        item: dict[str, Any] = load_file(str(self.files[index]))
        item.update(fs=int(item["fs"]), index=index, epoch=epoch, position=position)
        return item
