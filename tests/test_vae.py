"""The autoencoder against vectors recorded from the original DynamiCrafter code."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dynamicrafter.configs import VAEConfig, load_config
from dynamicrafter.models.vae import AutoencoderKL

from .conftest import DATA
from .conftest import relative_error as rel_err

PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215
TOLERANCE = 1e-4


def load_tiny_vae(name: str) -> AutoencoderKL:
    sd = torch.load(DATA / f"{name}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd = {k[len(PREFIX):]: v.float() for k, v in sd.items() if k.startswith(PREFIX)}
    vae = AutoencoderKL(load_config(DATA / f"{name}.yaml").vae)
    vae.load_state_dict(sd, strict=True)
    return vae.eval()


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
@torch.no_grad()
def test_matches_reference(name: str) -> None:
    vae = load_tiny_vae(name)
    ref = load_file(DATA / f"{name}.vectors.safetensors")

    mean, logvar = vae.encode(ref["image.input"])
    b, c, t, h, w = ref["vae.decode_input"].shape
    z = ref["vae.decode_input"].permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w) / SCALE_FACTOR
    frames = vae.decode(z)
    video = frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)

    errors = {
        "posterior_mean": rel_err(mean, ref["vae.posterior_mean"]),
        "posterior_logvar": rel_err(logvar, ref["vae.posterior_logvar"]),
        "decode_output": rel_err(video, ref["vae.decode_output"]),
    }
    assert all(e < TOLERANCE for e in errors.values()), f"{name}: relative errors {errors}"


def test_full_size_keys_match_release() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    released = json.loads((DATA / "keys_256.json").read_text())
    released = {k[len(PREFIX):]: v for k, v in released.items() if k.startswith(PREFIX)}
    assert ours.keys() == released.keys(), (
        f"missing {sorted(released.keys() - ours.keys())}, unexpected {sorted(ours.keys() - released.keys())}"
    )
    wrong = {k: (ours[k], released[k]) for k in ours if ours[k] != released[k]}
    assert not wrong, f"shape mismatches (ours, released): {wrong}"
