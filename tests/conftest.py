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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"
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
