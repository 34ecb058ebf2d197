"""Shared fixtures: the reference data in ``tests/data`` and the tiny models, loaded once per session.

The tiny checkpoints and the tensors in ``*.vectors.safetensors`` were produced by the original
DynamiCrafter code (see ``/work/shared/refvectors/README.md``). Tolerances are relative L2 errors
``||ours - ref|| / ||ref||``: ``MODULE_TOL`` for one module call, ``CHAIN_TOL`` for whole sampling
chains.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from .fake_hub import FakeHub, Handler

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TINY_NAMES = ("tiny256", "tiny512")
MODULE_TOL = 1e-4
CHAIN_TOL = 1e-3

# The tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
# spin-waiting made the suite ~5x slower (150 s instead of 30 s). Override with DYNAMICRAFTER_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("DYNAMICRAFTER_TEST_THREADS", "1")))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ours - ref|| / ||ref||`` in float64 (shapes must match exactly)."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    return ((ours - ref).norm() / ref.norm()).item()


@dataclass(frozen=True)
class TinyModel:
    """A tiny reference model: its config, the loaded model (float32, CPU), reference tensors and run settings.

    The model is shared by the whole session: tests must not modify it (load a private copy instead).
    """

    name: str
    config: object  # dynamicrafter.configs.ModelConfig
    model: object  # dynamicrafter.models.dynamicrafter.DynamiCrafter
    vectors: dict[str, torch.Tensor]
    manifest: dict

    @property
    def checkpoint(self) -> Path:
        return DATA / self.manifest["checkpoint"]


@functools.lru_cache(maxsize=None)
def _manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text())


@functools.lru_cache(maxsize=None)
def load_tiny(name: str) -> TinyModel:
    """Load a tiny model once per process (cached)."""
    from dynamicrafter.checkpoints import load_model
    from dynamicrafter.configs import load_config

    manifest = _manifest()[name]
    config = load_config(DATA / manifest["config"])
    model = load_model(config, DATA / manifest["checkpoint"])
    vectors = load_file(str(DATA / manifest["vectors"]))
    return TinyModel(name, config, model, vectors, manifest)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory with the reference checkpoints, configs and vectors."""
    return DATA


@pytest.fixture(scope="session")
def manifest() -> dict:
    """``tests/data/manifest.json``: the settings of each reference run."""
    return _manifest()


@pytest.fixture(scope="session", name="rel_err")
def rel_err_fixture() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The relative L2 error helper, ``rel_err(ours, ref) -> float``."""
    return relative_error


@pytest.fixture(scope="session")
def tiny() -> Callable[[str], TinyModel]:
    """``tiny("tiny256")`` / ``tiny("tiny512")``: the session's loaded tiny model and its reference data."""
    return load_tiny


@pytest.fixture(scope="session")
def tiny256() -> TinyModel:
    return load_tiny("tiny256")


@pytest.fixture(scope="session")
def tiny512() -> TinyModel:
    return load_tiny("tiny512")


@pytest.fixture(scope="session")
def gradient_png(tmp_path_factory) -> Path:
    """A 64x64 colour-gradient PNG to upload or animate."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                       np.full((64, 64), 128, np.uint8)], axis=-1)
    path = tmp_path_factory.mktemp("inputs") / "gradient.png"
    Image.fromarray(pixels).save(path)
    return path


def on_ci() -> bool:
    """Whether the tests run under CI (``CI=true``, as ``.ci/run`` and most CI services set)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_system_program(path: Path, package: str) -> Path:
    """``path`` if it exists; else skip the test naming the Debian package to install (fail under CI)."""
    if path.exists():
        return path
    message = f"needs {path} from Debian's {package!r} package (apt-get install -y {package}); .ci/run installs it"
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


# ------------------------------------------------------------------ tiny pipelines, images, videos


def tiny_pipeline(name: str, **options):
    """A fresh pipeline on the CPU around tiny model ``name`` (``tiny256`` or ``tiny512``), loaded from its files."""
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    res = "256" if name == "tiny256" else "512"
    return DynamiCrafterImg2VideoPipeline(res, device="cpu", checkpoint=DATA / f"{name}.ckpt",
                                          config=DATA / f"{name}.yaml", **options)


def tiny_args(name: str) -> list[str]:
    """Command-line options that run tiny model ``name`` fast: 2 steps, 4 frames of 64x64."""
    return ["--checkpoint", str(DATA / f"{name}.ckpt"), "--config", str(DATA / f"{name}.yaml"),
            "--num_inference_steps", "2", "--video_length", "4", "--height", "64", "--width", "64"]


def reference_image(vectors: dict, key: str = "image.input"):
    """A reference run's input image ``[1, 3, H, W]`` in [-1, 1] as the exact uint8 PIL image it was made from."""
    from PIL import Image

    pixels = ((vectors[key][0] + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def replay_noise(monkeypatch, step_noise: torch.Tensor) -> None:
    """Make the pipeline's noise draws return a reference run's per-step noise, in order."""
    import dynamicrafter.pipeline as pipeline_module

    draws = iter(step_noise)
    monkeypatch.setattr(pipeline_module, "_randn", lambda shape, generator, device: next(draws).to(device))


def make_image(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """Write a small RGB image (format from the extension) and return its path."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 80, 40)).save(path)
    return path


def read_video(path: Path) -> tuple[str, int, tuple[int, int], float]:
    """Codec, frame count, (height, width) and frame rate of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return stream.codec_context.name, len(frames), frames[0].shape[:2], float(stream.average_rate)


@pytest.fixture(scope="module")
def release_state() -> dict[str, torch.Tensor]:
    """tiny256.ckpt's ``state_dict`` exactly as stored (release key names and dtypes), once per test module."""
    return torch.load(DATA / "tiny256.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def config256():
    """The tiny 256 model's config (tests/data/tiny256.yaml)."""
    from dynamicrafter.configs import load_config

    return load_config(DATA / "tiny256.yaml")


# ------------------------------------------------------------------ a fake Hugging Face Hub


@pytest.fixture
def hf_env(tmp_path, monkeypatch) -> Path:
    """Hub environment variables pointing away from ~/.cache; returns the checkpoints root."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    for variable in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case it was set when huggingface_hub was imported
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retry back-off
    return tmp_path / "checkpoints"


@pytest.fixture
def hub(hf_env, monkeypatch) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake = FakeHub(url=f"http://127.0.0.1:{server.server_port}")
    server.hub = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url + "/")
    yield fake
    server.shutdown()
    server.server_close()
