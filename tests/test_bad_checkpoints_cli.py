"""A malformed checkpoint is one error line from the command line and the app, never a traceback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dynamicrafter import cli

from .conftest import DATA

KEY = "model.diffusion_model.out.2.weight"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _bad_file(kind: str, folder: Path) -> tuple[Path, str]:
    """A malformed checkpoint of ``kind`` and a fragment its error line must contain."""
    state = torch.load(DATA / "tiny256.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    if kind == "integer":
        path = folder / "int.safetensors"
        save_file({k: (v.to(torch.int64) if k == KEY else v).contiguous() for k, v in state.items()}, str(path))
        return path, f"stores {KEY} as torch.int64 where the tiny256 model needs floating-point weights"
    if kind == "shape":
        path = folder / "shape.ckpt"
        torch.save({"state_dict": dict(state, **{KEY: state[KEY][:, :16].clone()})}, path)
        return path, "shapes differ for model.diffusion_model.out.2.weight (4, 16, 3, 3) vs (4, 32, 3, 3)"
    if kind == "code":
        path = folder / "evil.ckpt"
        torch.save({"payload": _RunsCode()}, path)
        return path, "was refused: loading it would call"
    if kind == "folder":
        path = folder / "dynamicrafter_256_v1"
        path.mkdir()
        return path, "is a folder, not a file; it holds no checkpoint file"
    if kind == "lora":
        path = folder / "adapter_model.safetensors"
        save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, str(path))
        return path, "is a LoRA adapter"
    raise KeyError(kind)


KINDS = ["integer", "shape", "code", "folder", "lora"]


@pytest.mark.parametrize("kind", KINDS)
def test_cli(kind, tmp_path, caplog) -> None:
    path, fragment = _bad_file(kind, tmp_path)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 80, 40)).save(image)
    argv = ["256", "--checkpoint", str(path), "--config", str(DATA / "tiny256.yaml"), "--device", "cpu",
            "--image_path", str(image), "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "1",
            "--video_length", "2"]
    assert cli.main(argv) == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert fragment in message and str(path) in message, message
    assert "\n" not in message and message.endswith(".")
    assert not (tmp_path / "out" / "a.mp4").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_app(kind, tmp_path, caplog) -> None:
    pytest.importorskip("gradio")
    from dynamicrafter.app import main

    path, fragment = _bad_file(kind, tmp_path)
    argv = ["--res", "256", "--checkpoint", str(path), "--config", str(DATA / "tiny256.yaml"), "--device", "cpu"]
    assert main(argv) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert fragment in message and str(path) in message and "\n" not in message, message
