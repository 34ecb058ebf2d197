"""Tests for dynamicrafter.hub against a fake Hugging Face Hub served on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from dynamicrafter.hub import (
    ANALYTIC_INIT_REPO,
    CLIP_WEIGHTS,
    REPOS,
    CheckpointError,
    default_checkpoint_path,
    ensure_analytic_statistics,
    ensure_checkpoint,
    ensure_clip_weights,
)

from .conftest import ROOT
from .fake_hub import PAYLOAD, REPO


def test_repos_and_default_path():
    assert REPOS == {"256": "Doubiiu/DynamiCrafter", "512": "Doubiiu/DynamiCrafter_512",
                     "1024": "Doubiiu/DynamiCrafter_1024", "512_interp": "Doubiiu/DynamiCrafter_512_Interp",
                     "tooncrafter": "Doubiiu/ToonCrafter"}
    assert default_checkpoint_path("256") == Path("checkpoints/dynamicrafter_256_v1/model.ckpt")
    assert default_checkpoint_path("512_interp", "/w") == Path("/w/dynamicrafter_512_interp_v1/model.ckpt")


def test_download_lands_at_the_expected_path(hub, hf_env, caplog):
    target = default_checkpoint_path("256", hf_env)
    with caplog.at_level(logging.INFO, logger="dynamicrafter.hub"):
        assert ensure_checkpoint("256", target) == target
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.ckpt"]  # no staging or .cache left
    assert [(r["method"], r["path"]) for r in hub.requests] == [
        ("HEAD", f"/{REPO}/resolve/main/model.ckpt"), ("GET", f"/{REPO}/resolve/main/model.ckpt")]
    assert {r["authorization"] for r in hub.requests} == {"Bearer hf_fake_token"}
    assert caplog.messages == [f"Downloading model.ckpt for the 256 model from {REPO} to {target} (about 10.4 GB)"]


def test_custom_file_name_leaves_neighbours_alone(hub, tmp_path):
    neighbour = tmp_path / "weights" / "model.ckpt"
    neighbour.parent.mkdir()
    neighbour.write_bytes(b"another model")
    target = ensure_checkpoint("256_256", tmp_path / "weights" / "dc256.ckpt")
    assert target.read_bytes() == PAYLOAD
    assert neighbour.read_bytes() == b"another model"
    assert sorted(p.name for p in target.parent.iterdir()) == ["dc256.ckpt", "model.ckpt"]


@pytest.mark.parametrize("chunk_size, resumed_range", [
    (None, None),  # huggingface_hub's 10 MiB read chunks: a cut inside the first chunk restarts from 0
    (65536, "bytes=65536-"),  # otherwise it asks for the rest after the last whole chunk it wrote
])
def test_dropped_connection_is_resumed(hub, hf_env, monkeypatch, chunk_size, resumed_range):
    if chunk_size is not None:
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk_size)
    hub.cut_next_get_after = 100_000
    target = ensure_checkpoint("256", default_checkpoint_path("256", hf_env))
    assert target.read_bytes() == PAYLOAD
    assert [r["range"] for r in hub.requests if r["method"] == "GET"] == [None, resumed_range]


@pytest.mark.parametrize("files, message", [
    ({(REPO, "other.bin"): b"x"}, "model.ckpt was not found in {repo} on {url}; check HF_ENDPOINT."),
    ({}, "Repository {repo} was not found on {url}; check HF_ENDPOINT, or set HF_TOKEN if the repository is"
         " private or gated."),
])
def test_not_found(hub, hf_env, files, message):
    hub.files = files
    with pytest.raises(CheckpointError) as info:
        ensure_checkpoint("256", default_checkpoint_path("256", hf_env))
    assert str(info.value) == message.format(repo=REPO, url=hub.url)
    assert not hf_env.exists()  # the folders the download made are gone again


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_suggests_hf_token(hub, hf_env, status):
    hub.forced_status = status
    with pytest.raises(CheckpointError, match=rf"refused access to {REPO} \(HTTP {status}\); set HF_TOKEN"):
        ensure_checkpoint("256", default_checkpoint_path("256", hf_env))


def _refusing_url() -> str:
    with socket.socket() as sock:  # bound, then closed: a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_endpoint_stops_at_once(hf_env, monkeypatch):
    """Tried once before huggingface_hub's retries; the one line says what to do instead."""
    url = _refusing_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    target = default_checkpoint_path("256", hf_env)
    with pytest.raises(CheckpointError) as info:
        ensure_checkpoint("256", target)
    assert str(info.value) == (
        f"Could not reach {url} to download model.ckpt of the 256 model ({url[7:]} refused the connection); download "
        f"{url}/{REPO}/resolve/main/model.ckpt yourself and put it at {target} (or pass --checkpoint FILE), and set "
        "HF_HUB_OFFLINE=1 to stop trying the network.")
    assert not hf_env.exists()


@pytest.mark.parametrize("host, reason", [
    ("no-such-host.invalid", "its host no-such-host.invalid is unknown: no network or name service, or a wrong "
                             "HF_ENDPOINT"),
])
def test_unknown_host_stops_at_once(hf_env, monkeypatch, host, reason):
    """``.invalid`` never resolves (RFC 2606): no network is needed to find that out."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://{host}")
    with pytest.raises(CheckpointError, match=rf"^Could not reach http://{re.escape(host)} to download model\.ckpt "
                                               rf"of the 256 model \({re.escape(reason)}\); download "):
        ensure_checkpoint("256", default_checkpoint_path("256", hf_env))


def test_a_proxy_is_what_is_tried(hf_env, monkeypatch):
    """Through a proxy the client connects to the proxy: that is the connection tried first."""
    proxy = _refusing_url()
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example")
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(CheckpointError, match=rf"\({re.escape(proxy[7:])} refused the connection\)"):
        ensure_checkpoint("256", default_checkpoint_path("256", hf_env))


def test_unwritable_folder(hub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^Cannot write to {re.escape(str(blocker))} "):
        ensure_checkpoint("256", blocker / "model.ckpt")
    assert hub.requests == []


def test_offline_with_missing_file_makes_no_request(hub, hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = default_checkpoint_path("256", hf_env)
    with pytest.raises(CheckpointError) as info:
        ensure_checkpoint("256", target)
    assert str(info.value) == (f"Checkpoint {target} is missing and HF_HUB_OFFLINE is set; download "
                               f"{hub.url}/{REPO}/resolve/main/model.ckpt yourself and put it at {target} "
                               "(or pass --checkpoint FILE).")
    assert hub.requests == []
    assert not target.parent.exists()


def test_existing_file_is_returned_without_any_request(hub, hf_env):
    target = default_checkpoint_path("1024", hf_env)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"already here")
    assert ensure_checkpoint("1024", target) == target
    assert target.read_bytes() == b"already here"
    assert hub.requests == []


# ----------------------------------------------------------------------------- OpenCLIP weights (Hub cache)

CLIP_REPO = CLIP_WEIGHTS["ViT-H-14"][1]


@pytest.mark.parametrize("served", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_clip_weights_come_from_the_cache_once(hub, hf_env, served, caplog):
    hub.files = {(CLIP_REPO, served): PAYLOAD}
    with caplog.at_level(logging.INFO, logger="dynamicrafter.hub"):
        path = ensure_clip_weights("ViT-H-14")
    assert path.read_bytes() == PAYLOAD and path.name == served
    assert path.is_relative_to(hf_env.parent / "hf_home" / "hub" / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K")
    gets = [r["path"] for r in hub.requests if r["method"] == "GET"]
    assert gets == [f"/{CLIP_REPO}/resolve/main/{served}"]  # the safetensors name first, the .bin only without it
    assert caplog.messages == [f"Downloading the OpenCLIP ViT-H-14 laion2b_s32b_b79k weights from {CLIP_REPO} into "
                               "the Hugging Face cache (about 3.9 GB, once)"]
    hub.requests.clear()
    assert ensure_clip_weights("ViT-H-14") == path
    assert hub.requests == []
    assert not hf_env.exists()  # nothing under the checkpoints folder


def test_clip_weights_not_found(hub, hf_env):
    hub.files = {(CLIP_REPO, "README.md"): b"x"}
    with pytest.raises(CheckpointError) as info:
        ensure_clip_weights("ViT-H-14")
    assert str(info.value) == f"open_clip_pytorch_model.bin was not found in {CLIP_REPO} on {hub.url}; check HF_ENDPOINT."


def test_clip_weights_unreachable(hf_env, monkeypatch):
    url = _refusing_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(CheckpointError) as info:
        ensure_clip_weights("ViT-H-14")
    assert str(info.value) == (
        f"Could not reach {url} to download open_clip_model.safetensors from {CLIP_REPO} ({url[7:]} refused the "
        f"connection); download {url}/{CLIP_REPO}/resolve/main/open_clip_model.safetensors yourself and pass it as "
        "--clip_checkpoint FILE, and set HF_HUB_OFFLINE=1 to stop trying the network.")


@pytest.mark.parametrize("status", [401, 403])
def test_clip_weights_refused(hub, hf_env, status):
    hub.forced_status = status
    with pytest.raises(CheckpointError, match=rf"refused access to {CLIP_REPO} \(HTTP {status}\); set HF_TOKEN"):
        ensure_clip_weights("ViT-H-14")


def test_clip_weights_offline(hub, hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        ensure_clip_weights("ViT-H-14")
    assert str(info.value) == (f"The OpenCLIP ViT-H-14 laion2b_s32b_b79k weights ({CLIP_REPO}) are not in the Hugging "
                               f"Face cache and HF_HUB_OFFLINE is set; download {hub.url}/{CLIP_REPO}/resolve/main/"
                               "open_clip_model.safetensors yourself and pass it as --clip_checkpoint FILE.")
    assert hub.requests == []


_DOWNLOAD = """
import sys
from dynamicrafter.frontend import configure_logging
from dynamicrafter.hub import ensure_checkpoint

configure_logging()
ensure_checkpoint("256", sys.argv[1])
"""


def test_a_retried_download_says_each_retry_once_and_shows_its_progress(hub, tmp_path):
    """A busy server (HTTP 503 twice: huggingface_hub's first metadata request is not retried, its second is):
    the command's log has each retry's line once, in its format, and the bar gives the size and the speed (also
    in a log file, where huggingface_hub's own bar is off)."""
    hub.unavailable = 2
    target = tmp_path / "weights" / "model.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", _DOWNLOAD, str(target)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == PAYLOAD
    lines = [line for line in re.split(r"[\r\n]+", done.stderr) if line.strip()]
    retries = [line for line in lines if "503" in line or "Retrying" in line]
    assert retries == [f"WARNING: HTTP Error 503 thrown while requesting HEAD {hub.url}/{REPO}/resolve/main/model.ckpt",
                       "WARNING: Retrying in 1s [Retry 1/5]."]
    bar = [line for line in lines if line.startswith("model.ckpt:")]
    assert bar and "307k/307k" in bar[-1] and "B/s" in bar[-1], lines


# ----------------------------------------------------------------------------- Analytic-Init statistics (Hub cache)


def test_analytic_init_statistics_come_from_the_cache_once(hub, hf_env, caplog):
    hub.files = {(ANALYTIC_INIT_REPO, "initial_noise_512.pt"): PAYLOAD}
    with caplog.at_level(logging.INFO, logger="dynamicrafter.hub"):
        path = ensure_analytic_statistics("512")
    assert path.read_bytes() == PAYLOAD and path.name == "initial_noise_512.pt"
    assert [r["path"] for r in hub.requests if r["method"] == "GET"] == [
        f"/{ANALYTIC_INIT_REPO}/resolve/main/initial_noise_512.pt"]
    assert caplog.messages == [f"Downloading the Analytic-Init statistics initial_noise_512.pt from "
                               f"{ANALYTIC_INIT_REPO} into the Hugging Face cache (once)"]
    hub.requests.clear()
    assert ensure_analytic_statistics("512") == path
    assert hub.requests == []


def test_analytic_init_statistics_exist_only_for_512_and_1024(hub):
    with pytest.raises(CheckpointError) as info:
        ensure_analytic_statistics("256")
    assert str(info.value) == ("analytic_init uses the CIL authors' statistics, published for the 512 and 1024 "
                               "models; for the 256 model give a statistics file with analytic_init_path.")
    assert hub.requests == []
