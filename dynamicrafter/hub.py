"""Locate DynamiCrafter checkpoints on disk, downloading them from the Hugging Face Hub when missing.

Downloads go through :func:`huggingface_hub.hf_hub_download` (its progress bar, retries and
resumption of a dropped transfer). ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` / ``HF_HUB_CACHE``
and ``HF_HUB_OFFLINE`` are read when :func:`ensure_checkpoint` runs, not when huggingface_hub
was imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    FileMetadataError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .configs import PRESETS, resolve_resolution

logger = logging.getLogger(__name__)

REPOS: dict[str, str] = {name: str(config.repo_id) for name, config in PRESETS.items()}
FILENAME = "model.ckpt"
# Every release stores the same 2.6e9 float32 parameters (UNet, VAE, OpenCLIP text and image towers).
CHECKPOINT_GB = 10.4
DEFAULT_ENDPOINT = "https://huggingface.co"


class CheckpointError(RuntimeError):
    """A checkpoint is missing and could not be downloaded."""


def default_checkpoint_path(name: str, root: str | Path = "checkpoints") -> Path:
    """Where the original code keeps a model: ``root/dynamicrafter_{name}_v1/model.ckpt``
    (``root/tooncrafter_512_interp_v1/model.ckpt`` for ToonCrafter).

    Args:
        name: '256', '512', '1024', '512_interp', 'tooncrafter' or an alias such as '320_512'.
        root: the checkpoints folder.
    """
    name = resolve_resolution(name)
    return Path(root) / (PRESETS[name].checkpoint_dir or f"dynamicrafter_{name}_v1") / FILENAME


def ensure_checkpoint(name: str, path: str | Path | None = None) -> Path:
    """Return the checkpoint of model `name`, downloading it from the Hub if the file is missing.

    Args:
        name: '256', '512', '1024', '512_interp', 'tooncrafter' or an alias such as '320_512'.
        path: where the checkpoint lives or is downloaded to; default
            :func:`default_checkpoint_path`. Nothing is written there until the download is complete.
    Raises:
        CheckpointError: the file is missing and offline mode is on, or the download failed.
    """
    name = resolve_resolution(name)
    target = Path(path) if path is not None else default_checkpoint_path(name)
    if target.is_file():
        return target
    if _env_flag("HF_HUB_OFFLINE"):
        raise CheckpointError(_offline_message(target))
    repo_id = REPOS[name]
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    logger.info("Downloading %s for the %s model from %s to %s (about %.1f GB)",
                FILENAME, name, repo_id, target, CHECKPOINT_GB)
    # A private folder next to the target: huggingface_hub keeps its .cache/ bookkeeping there,
    # and the finished file is renamed into place, so `target` is never half-written.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".download", dir=target.parent))
    except OSError as error:
        raise CheckpointError(f"Cannot write to {target.parent} ({error.strerror or error}); "
                              "pass --checkpoint with a writable location.") from error
    try:
        downloaded = hf_hub_download(
            repo_id, FILENAME, local_dir=staging, endpoint=endpoint,
            token=os.environ.get("HF_TOKEN") or None, cache_dir=_hub_cache_dir(),
        )
        os.replace(downloaded, target)
    except (OSError, httpx2.HTTPError) as error:
        raise CheckpointError(_explain(error, repo_id, endpoint, target)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _env_flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str | None:
    """The Hub cache named by the environment now; a file already cached there is copied, not downloaded."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _offline_message(target: Path) -> str:
    return f"Checkpoint {target} is missing and HF_HUB_OFFLINE is set; download it or pass --checkpoint."


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error followed by its causes (huggingface_hub wraps the informative one)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _explain(error: BaseException, repo_id: str, endpoint: str, target: Path) -> str:
    """One sentence telling the user why `target` could not be downloaded and what to do."""
    for cause in _chain(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return _offline_message(target)
        if isinstance(cause, RepositoryNotFoundError):
            return (f"Repository {repo_id} was not found on {endpoint}; check HF_ENDPOINT, or set HF_TOKEN "
                    "if the repository is private or gated.")
        if isinstance(cause, (RemoteEntryNotFoundError, RevisionNotFoundError)):
            return f"{FILENAME} was not found in {repo_id} on {endpoint}; check HF_ENDPOINT."
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            if status in (401, 403):
                return (f"{endpoint} refused access to {repo_id} (HTTP {status}); set HF_TOKEN to a token "
                        "that can read it.")
            return f"Downloading {FILENAME} from {repo_id} failed with HTTP {status} from {endpoint}; try again later."
        if isinstance(cause, httpx2.HTTPError):
            return (f"Could not reach {endpoint} to download {FILENAME} from {repo_id} ({type(cause).__name__}); "
                    "check your connection or HF_ENDPOINT, or download it yourself and pass --checkpoint.")
        if isinstance(cause, FileMetadataError):
            return f"{endpoint} does not answer like a Hugging Face Hub; check HF_ENDPOINT."
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"Could not download {FILENAME} from {repo_id} to {target}: {reason.rstrip('.')}."
