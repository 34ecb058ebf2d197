"""Locate DynamiCrafter checkpoints on disk, downloading them from the Hugging Face Hub when missing.

Downloads go through :func:`huggingface_hub.hf_hub_download` (its retries and resumption of a
dropped transfer), with a progress bar that shows the size, the speed and the time left even in
a log file. ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``
are read when :func:`ensure_checkpoint` or :func:`ensure_clip_weights` runs, not when
huggingface_hub was imported.

A download that cannot start says so at once and in one line: the Hub's host is tried once
before huggingface_hub's retries (which are for a connection that drops mid-download), so an
unknown host or a refused connection does not wait through them; the error names the file, its
URL and the exact place to put it by hand, and ``HF_HUB_OFFLINE=1``. The retries' warnings are
printed once, in the command's log format, and a failed download leaves no empty folder.

A model checkpoint lands where the original code keeps it (``checkpoints/..../model.ckpt``). The
OpenCLIP weights that complete a checkpoint without CLIP towers stay in the Hugging Face cache,
downloaded once and shared with every other program that uses that cache.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import shutil
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    FileMetadataError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from .configs import PRESETS, resolve_resolution
from .errors import UserError
from .files import missing_folders, remove_empty

logger = logging.getLogger(__name__)


def _http_client_errors() -> tuple[type[Exception], ...]:
    """The base error class of the HTTP client huggingface_hub uses: httpx2 (2.x) or httpx (1.x).

    Both are dependencies of the hub version that uses them, not of this package; whichever is
    installed is caught, so the 1.x line (which older ``transformers`` releases pin) works as well as 2.x.
    """
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


#: Network errors (no connection, timeouts, protocol errors) of the Hub's HTTP client.
HTTP_ERRORS = _http_client_errors()

REPOS: dict[str, str] = {name: str(config.repo_id) for name, config in PRESETS.items()}
FILENAME = "model.ckpt"
# Every release stores the same 2.6e9 float32 parameters (UNet, VAE, OpenCLIP text and image towers).
CHECKPOINT_GB = 10.4
DEFAULT_ENDPOINT = "https://huggingface.co"

#: The OpenCLIP weights the released models' CLIP towers come from, per architecture:
#: (open_clip pretrained tag, Hub repository), as in open_clip's pretrained table.
CLIP_WEIGHTS: dict[str, tuple[str, str]] = {
    "ViT-H-14": ("laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
}
#: open_clip's file names in such a repository, the safetensors one preferred (as open_clip does).
CLIP_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CLIP_GB = {"ViT-H-14": 3.9}  # 986e6 float32 parameters


#: The flag that gives the OpenCLIP weights instead of a download.
CLIP_FLAG = "--clip_checkpoint"
#: Seconds to wait for the Hub's host to accept a connection before a download starts.
CONNECT_TIMEOUT = 10.0


class CheckpointError(UserError):
    """A checkpoint is missing and could not be downloaded (a :class:`~dynamicrafter.errors.UserError`)."""


class DownloadBar(tqdm):
    """A download's progress bar: file name, bytes so far of the size, speed and time left.

    Shown even when standard error is not a terminal (huggingface_hub's own bar is not), then
    refreshed every 30 s so that a log file gets a line now and then, not one per chunk.
    :func:`_progress_bar` makes one per file, labelled with its name (:attr:`label`).
    """

    label: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)  # huggingface_hub's group name for its own bars
        if self.label:
            kwargs["desc"] = self.label
        if not sys.stderr.isatty():
            kwargs.setdefault("mininterval", 30.0)
        super().__init__(*args, **kwargs)


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
            :func:`default_checkpoint_path`. Nothing is written there until the download is complete,
            and a failed download leaves no folder it made.
    Raises:
        CheckpointError: the file is missing and offline mode is on, or the download failed.
    """
    name = resolve_resolution(name)
    target = Path(path) if path is not None else default_checkpoint_path(name)
    if target.is_file():
        return target
    repo_id = REPOS[name]
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    url = hf_hub_url(repo_id, FILENAME, endpoint=endpoint)
    if _env_flag("HF_HUB_OFFLINE"):
        raise CheckpointError(_offline_message(target, url))
    unreachable = _unreachable(endpoint)
    if unreachable:
        raise CheckpointError(f"Could not reach {endpoint} to download {FILENAME} of the {name} model "
                              f"({unreachable}); {_by_hand(url, target)}.")
    logger.info("Downloading %s for the %s model from %s to %s (about %.1f GB)",
                FILENAME, name, repo_id, target, CHECKPOINT_GB)
    # A private folder next to the target: huggingface_hub keeps its .cache/ bookkeeping there,
    # and the finished file is renamed into place, so `target` is never half-written.
    made = missing_folders(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".download", dir=target.parent))
    except OSError as error:
        raise CheckpointError(f"Cannot write to {target.parent} ({error.strerror or error}); "
                              "pass --checkpoint with a writable location.") from error
    done = False
    try:
        with _hub_logging():
            downloaded = hf_hub_download(repo_id, FILENAME, local_dir=staging, endpoint=endpoint,
                                         token=os.environ.get("HF_TOKEN") or None, cache_dir=_hub_cache_dir(),
                                         **_progress_bar(FILENAME))
        os.replace(downloaded, target)
        done = True
    except (OSError, *HTTP_ERRORS) as error:
        raise CheckpointError(_explain(error, repo_id, endpoint, FILENAME, url, target)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            remove_empty(made)
    return target


def ensure_clip_weights(arch: str = "ViT-H-14") -> Path:
    """The OpenCLIP weights of ``arch`` the released models were trained with, from the Hub cache.

    They complete a checkpoint that leaves out the CLIP towers. The file is downloaded once into
    the Hugging Face cache; later calls find it there without any request (also offline).

    Raises:
        CheckpointError: no weights are known for ``arch``, or they are not cached and cannot
            be downloaded (offline mode, network or access error).
    """
    if arch not in CLIP_WEIGHTS:
        raise CheckpointError(f"No OpenCLIP weights are known for the CLIP architecture {arch}; "
                              "pass --clip_checkpoint with them.")
    tag, repo_id = CLIP_WEIGHTS[arch]
    return _cached_hub_file(repo_id, CLIP_FILENAMES, f"The OpenCLIP {arch} {tag} weights", CLIP_FLAG,
                            f"the OpenCLIP {arch} {tag} weights from {repo_id} into the Hugging Face cache "
                            f"(about {CLIP_GB.get(arch, 0.0):.1f} GB, once)")


def _cached_hub_file(repo_id: str, filenames: tuple[str, ...], what: str, flag: str, downloading: str) -> Path:
    """A file of ``repo_id`` from the Hugging Face cache, downloaded there once if it is missing.

    ``filenames`` are tried in order (the next when the repository lacks one); ``what`` names the
    file in messages, ``flag`` is the option that gives it instead, ``downloading`` ends the log line.

    Raises:
        CheckpointError: not cached and cannot be downloaded (offline mode, network or access error).
    """
    cache_dir = _hub_cache_dir()
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    url = hf_hub_url(repo_id, filenames[0], endpoint=endpoint)
    if _env_flag("HF_HUB_OFFLINE"):
        raise CheckpointError(f"{what} ({repo_id}) are not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                              f"{_by_hand(url, None, flag, offline=False)}.")
    unreachable = _unreachable(endpoint)
    if unreachable:
        raise CheckpointError(f"Could not reach {endpoint} to download {filenames[0]} from {repo_id} "
                              f"({unreachable}); {_by_hand(url, None, flag)}.")
    logger.info("Downloading %s", downloading)
    for filename in filenames:
        try:
            with _hub_logging():
                return Path(hf_hub_download(repo_id, filename, endpoint=endpoint,
                                            token=os.environ.get("HF_TOKEN") or None, cache_dir=cache_dir,
                                            **_progress_bar(filename)))
        except (OSError, *HTTP_ERRORS) as error:
            if filename != filenames[-1] and any(isinstance(c, RemoteEntryNotFoundError) for c in _chain(error)):
                continue  # try the next name
            url = hf_hub_url(repo_id, filename, endpoint=endpoint)
            raise CheckpointError(_explain(error, repo_id, endpoint, filename, url, None, flag)) from error
    raise AssertionError("unreachable")


#: The CIL authors' Analytic-Init statistics (Zhao et al. 2024, ``thu-ml/cond-image-leakage``):
#: their Hub repository and its file per model, as their inference scripts name them.
ANALYTIC_INIT_REPO = "GraceZhao/DynamiCrafter-Analytic-Init"
ANALYTIC_INIT_FILES = {"512": "initial_noise_512.pt", "1024": "initial_noise_1024.pt"}
#: The flag that gives the statistics instead of a download.
ANALYTIC_INIT_FLAG = "--analytic_init_path"


def analytic_init_missing(model: str, names: tuple[str, str] = ("analytic_init", "analytic_init_path")) -> str | None:
    """Why ``analytic_init`` without a statistics file cannot be used for ``model`` (one sentence), else ``None``.

    ``names``: how the sentence calls the two options (the command line passes its flags).
    """
    if model in ANALYTIC_INIT_FILES:
        return None
    return (f"{names[0]} uses the CIL authors' statistics, published for the 512 and 1024 models; for the "
            f"{model} model give a statistics file with {names[1]}.")


def ensure_analytic_statistics(model: str) -> Path:
    """The CIL authors' Analytic-Init statistics of ``model`` ('512' or '1024'), from the Hub cache.

    Downloaded once into the Hugging Face cache (a few MB); later calls find it there without any
    request, also offline.

    Raises:
        CheckpointError: no statistics are published for ``model``, or they are not cached and
            cannot be downloaded (offline mode, network or access error).
    """
    missing = analytic_init_missing(model)
    if missing:
        raise CheckpointError(missing)
    filename = ANALYTIC_INIT_FILES[model]
    return _cached_hub_file(ANALYTIC_INIT_REPO, (filename,), f"The Analytic-Init statistics {filename}",
                            ANALYTIC_INIT_FLAG, f"the Analytic-Init statistics {filename} from {ANALYTIC_INIT_REPO} "
                            "into the Hugging Face cache (once)")

def _env_flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str | None:
    """The Hub cache named by the environment now; a file already cached there is copied, not downloaded."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _by_hand(url: str, target: Path | None, flag: str = "--checkpoint", offline: bool = True) -> str:
    """What to do instead of the download: fetch ``url`` yourself and put it at ``target`` (or pass ``flag``).

    ``offline`` adds that ``HF_HUB_OFFLINE=1`` stops the next run from trying the network.
    """
    where = (f"put it at {Path(os.path.abspath(target))} (or pass {flag} FILE)" if target is not None
             else f"pass it as {flag} FILE")
    then = ", and set HF_HUB_OFFLINE=1 to stop trying the network" if offline else ""
    return f"download {url} yourself and {where}{then}"


def _offline_message(target: Path, url: str) -> str:
    return f"Checkpoint {target} is missing and HF_HUB_OFFLINE is set; {_by_hand(url, target, offline=False)}."


def _unreachable(endpoint: str) -> str | None:
    """Why the host of ``endpoint`` (or the proxy in between) cannot be connected to at all, or ``None`` if it can.

    One attempt, of at most :data:`CONNECT_TIMEOUT` seconds: an unknown host or a refused
    connection will not change over huggingface_hub's retries (23 s of them), which are for a
    transfer that breaks off.
    """
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):  # the client connects to the proxy, not to the host
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or 80
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except socket.gaierror:
        return f"its host {host} is unknown: no network or name service, or a wrong HF_ENDPOINT"
    except ConnectionRefusedError:
        return f"{host}:{port} refused the connection"
    except TimeoutError:
        return f"{host}:{port} did not answer in {CONNECT_TIMEOUT:g} s"
    except OSError as error:
        return f"{host}:{port} cannot be reached: {error.strerror or error}"


def _progress_bar(filename: str) -> dict[str, Any]:
    """``hf_hub_download``'s keyword for a :class:`DownloadBar` of ``filename``, where the installed huggingface_hub has it."""
    if "tqdm_class" not in inspect.signature(hf_hub_download).parameters:
        return {}
    return {"tqdm_class": type("DownloadBar", (DownloadBar,), {"label": filename})}


@contextlib.contextmanager
def _hub_logging() -> Iterator[None]:
    """huggingface_hub's warnings (its retries) printed once, through the command's log handler when it has one.

    huggingface_hub gives its logger a handler of its own and lets records propagate too, so a
    command that configured logging printed each of them twice.
    """
    hub_logger = logging.getLogger("huggingface_hub")
    own = list(hub_logger.handlers)
    if logging.getLogger().handlers:
        for handler in own:
            hub_logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in own:
            if handler not in hub_logger.handlers:
                hub_logger.addHandler(handler)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error followed by its causes (huggingface_hub wraps the informative one)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _explain(error: BaseException, repo_id: str, endpoint: str, filename: str, url: str, target: Path | None,
             flag: str = "--checkpoint") -> str:
    """One sentence telling the user why `filename` could not be downloaded (to `target`) and what to do.

    Where fetching the file by hand would help (the network, the server), it says how (:func:`_by_hand`).
    """
    by_hand = _by_hand(url, target, flag)
    for cause in _chain(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return (_offline_message(target, url) if target is not None else
                    f"{filename} is missing and HF_HUB_OFFLINE is set; {_by_hand(url, None, flag, offline=False)}.")
        if isinstance(cause, RepositoryNotFoundError):
            return (f"Repository {repo_id} was not found on {endpoint}; check HF_ENDPOINT, or set HF_TOKEN "
                    "if the repository is private or gated.")
        if isinstance(cause, (RemoteEntryNotFoundError, RevisionNotFoundError)):
            return f"{filename} was not found in {repo_id} on {endpoint}; check HF_ENDPOINT."
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            if status in (401, 403):
                return (f"{endpoint} refused access to {repo_id} (HTTP {status}); set HF_TOKEN to a token "
                        "that can read it.")
            return f"Downloading {filename} from {repo_id} failed with HTTP {status} from {endpoint}; {by_hand}."
        if isinstance(cause, HTTP_ERRORS):
            return f"Could not reach {endpoint} to download {filename} from {repo_id} ({type(cause).__name__}); {by_hand}."
        if isinstance(cause, FileMetadataError):
            return f"{endpoint} does not answer like a Hugging Face Hub; check HF_ENDPOINT."
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    where = f" to {target}" if target is not None else ""
    return f"Could not download {filename} from {repo_id}{where} ({reason.rstrip('.')}); {by_hand}."
