"""Tests for dynamicrafter.hub against a fake Hugging Face Hub served on 127.0.0.1."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

from dynamicrafter.hub import (
    CLIP_WEIGHTS,
    REPOS,
    CheckpointError,
    default_checkpoint_path,
    ensure_checkpoint,
    ensure_clip_weights,
)

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
    assert list(hf_env.rglob("*")) == [hf_env / "dynamicrafter_256_v1"]


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_suggests_hf_token(hub, hf_env, status):
    hub.forced_status = status
    with pytest.raises(CheckpointError, match=rf"refused access to {REPO} \(HTTP {status}\); set HF_TOKEN"):
        ensure_checkpoint("256", default_checkpoint_path("256", hf_env))


def test_unreachable_endpoint(hf_env, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(CheckpointError, match=rf"^Could not reach {re.escape(url)} to download model.ckpt"):
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
    assert str(info.value) == (f"Checkpoint {target} is missing and HF_HUB_OFFLINE is set; "
                               "download it or pass --checkpoint.")
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(CheckpointError) as info:
        ensure_clip_weights("ViT-H-14")
    message = str(info.value)
    assert message.startswith(f"Could not reach {url} to download open_clip_model.safetensors from {CLIP_REPO} (")
    assert message.endswith("download it yourself and pass --clip_checkpoint.") and "\n" not in message


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
                               "Face cache and HF_HUB_OFFLINE is set; download them or pass --clip_checkpoint.")
    assert hub.requests == []
