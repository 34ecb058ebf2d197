"""The full DynamiCrafter model against tensors recorded from the original implementation.

Every tensor of ``tiny256.vectors.safetensors`` and ``tiny512.vectors.safetensors`` is recomputed
through the public model API (``encode_text``, ``embedder``, ``image_proj_model``,
``encode_image_tokens``, ``vae`` / ``encode_latents`` / ``decode_latents``, ``unet``, and the DDIM
sampler with classifier-free guidance), each as its own test id ``<model>-<tensor>``.
Tolerances: relative L2 error < 1e-4 for one module call, < 1e-3 for sampling chains.
"""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch

from dynamicrafter.checkpoints import RENAMES, load_model
from dynamicrafter.configs import PRESETS, get_config
from dynamicrafter.diffusion.ddim import DDIMSampler, guided
from dynamicrafter.diffusion.schedule import checkpoint_buffers
from dynamicrafter.models.dynamicrafter import DynamiCrafter

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, TINY_NAMES, TinyModel, load_tiny, relative_error

# --------------------------------------------------------------------------------------------
# Single module calls
# --------------------------------------------------------------------------------------------


def _text_emb(tm: TinyModel) -> torch.Tensor:
    return tm.model.encode_text(list(tm.manifest["prompts"]))


def _clip_tokens(tm: TinyModel) -> torch.Tensor:
    return tm.model.embedder(tm.vectors["image.input"])


def _big_clip_tokens(tm: TinyModel) -> torch.Tensor:
    # 320x512 input: downscaled to 224x224, so the reference's antialiasing matters.
    return tm.model.embedder(tm.vectors["image.big_input"])


def _proj(tm: TinyModel) -> torch.Tensor:
    return tm.model.image_proj_model(tm.vectors["image.clip_tokens"])


def _proj_from_image(tm: TinyModel) -> torch.Tensor:
    return tm.model.encode_image_tokens(tm.vectors["image.input"])


def _posterior_mean(tm: TinyModel) -> torch.Tensor:
    return tm.model.vae.encode(tm.vectors["image.input"])[0]


def _posterior_mean_scaled(tm: TinyModel) -> torch.Tensor:
    # encode_latents returns the posterior mean times the scale factor.
    return tm.model.encode_latents(tm.vectors["image.input"]) / tm.config.diffusion.scale_factor


def _posterior_logvar(tm: TinyModel) -> torch.Tensor:
    return tm.model.vae.encode(tm.vectors["image.input"])[1]


def _decode_frames(tm: TinyModel, latents: torch.Tensor) -> torch.Tensor:
    """``[1, 4, T, h, w]`` diffusion-scale latents -> ``[1, 3, T, H, W]`` through ``decode_latents``."""
    assert latents.shape[0] == 1
    frames = tm.model.decode_latents(latents[0].transpose(0, 1))  # [T, 3, H, W]
    return frames.transpose(0, 1)[None]


def _decode_output(tm: TinyModel) -> torch.Tensor:
    return _decode_frames(tm, tm.vectors["vae.decode_input"])


def _unet(tm: TinyModel, frames: int | None = None, with_fs: bool = True) -> torch.Tensor:
    v = tm.vectors
    x = v["unet.x"] if frames is None else v["unet.x"][:, :, :frames]
    return tm.model.unet(x, v["unet.t"], v["unet.context"], v["unet.fs"] if with_fs else None)


MODULE_CASES: dict[str, tuple[str, Callable[[TinyModel], torch.Tensor]]] = {
    # test id suffix: (reference key, how we compute it)
    "text.emb": ("text.emb", _text_emb),
    "image.clip_tokens": ("image.clip_tokens", _clip_tokens),
    "image.big_clip_tokens": ("image.big_clip_tokens", _big_clip_tokens),
    "image.proj": ("image.proj", _proj),
    "image.proj[encode_image_tokens]": ("image.proj", _proj_from_image),
    "vae.posterior_mean": ("vae.posterior_mean", _posterior_mean),
    "vae.posterior_mean[encode_latents]": ("vae.posterior_mean", _posterior_mean_scaled),
    "vae.posterior_logvar": ("vae.posterior_logvar", _posterior_logvar),
    "vae.decode_output": ("vae.decode_output", _decode_output),
    "unet.out": ("unet.out", _unet),
    "unet.out_default_fs": ("unet.out_default_fs", lambda tm: _unet(tm, with_fs=False)),
    "unet.out_3frames": ("unet.out_3frames", lambda tm: _unet(tm, frames=3)),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
@pytest.mark.parametrize("name", TINY_NAMES)
@torch.no_grad()
def test_module_matches_reference(name: str, case: str, record_property) -> None:
    tm = load_tiny(name)
    ref_key, compute = MODULE_CASES[case]
    ours = compute(tm)
    ref = tm.vectors[ref_key]
    assert ours.dtype == torch.float32
    err = relative_error(ours, ref)
    record_property("rel_err", err)
    assert err < MODULE_TOL, f"{name} {case}: relative L2 error {err:.3e} >= {MODULE_TOL:g}"


def test_reference_variants_are_distinguishable() -> None:
    """The default-fs and 3-frame references really differ from unet.out, so their tests check something."""
    for name in TINY_NAMES:
        v = load_tiny(name).vectors
        assert int(v["unet.fs"]) != load_tiny(name).config.default_fs
        assert relative_error(v["unet.out_default_fs"], v["unet.out"]) > 10 * MODULE_TOL
        assert relative_error(v["unet.out_3frames"], v["unet.out"][:, :, :3]) > 10 * MODULE_TOL


# --------------------------------------------------------------------------------------------
# Sampling chains: image-to-video with guidance, deterministic DDIM, interpolation
# --------------------------------------------------------------------------------------------

_CHAINS: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


@torch.no_grad()
def _sample(tm: TinyModel, x_T: torch.Tensor, eta: float, rescale: float, concat: torch.Tensor,
            step_noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM with classifier-free guidance as the reference inference runs it; returns (latents, timesteps)."""
    m, man = tm.model, tm.manifest
    image = tm.vectors["image.input"]
    cond = torch.cat([m.encode_text([man["prompts"][0]]), m.encode_image_tokens(image)], 1)
    uncond = torch.cat([m.encode_text([""]), m.encode_image_tokens(torch.zeros_like(image))], 1)
    context = torch.cat([cond, uncond])
    fs = torch.tensor([man["frame_stride"]] * 2)
    seen: list[int] = []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        xx = torch.cat([torch.cat([x, concat], 1)] * 2)
        out_c, out_u = m.unet(xx, t.repeat(2), context, fs).chunk(2)
        return guided(out_c, out_u, man["guidance_scale"], rescale)

    sampler = DDIMSampler(m.schedule, tm.config.diffusion.parameterization)
    noise = None if step_noise is None else (lambda i: step_noise[i])
    latents = sampler.sample(denoise, x_T, man["ddim_steps"], eta, man["timestep_spacing"], noise_sampler=noise)
    return latents, torch.tensor(seen[::-1])  # ascending, like the reference's table


@torch.no_grad()
def chain(name: str, run: str) -> dict[str, torch.Tensor]:
    """Outputs of one reference run (cached: the i2v latents and video share one chain)."""
    if (name, run) in _CHAINS:
        return _CHAINS[name, run]
    tm = load_tiny(name)
    v, man, m = tm.vectors, tm.manifest, tm.model
    image = v["image.input"]
    frames = man["frames"]
    first = m.encode_latents(image)  # [1, 4, h, w]
    repeated = first[:, :, None].repeat(1, 1, frames, 1, 1)
    if run == "i2v":
        lat, ts = _sample(tm, v["i2v.x_T"], man["ddim_eta"], man["guidance_rescale"], repeated, v["i2v.step_noise"])
        result = {"i2v.latents": lat, "i2v.timesteps": ts, "i2v.video": _decode_frames(tm, lat)}
    elif run == "i2v_eta0":
        settings = man["eta0_run"]
        lat, _ = _sample(tm, v["i2v_eta0.x_T"], settings["ddim_eta"], settings["guidance_rescale"], repeated, None)
        result = {"i2v_eta0.latents": lat}
    elif run == "interp":
        concat = torch.zeros_like(repeated)
        concat[:, :, 0] = first
        concat[:, :, -1] = m.encode_latents(v["interp.image_end"])
        lat, _ = _sample(tm, v["interp.x_T"], man["ddim_eta"], man["guidance_rescale"], concat, v["interp.step_noise"])
        result = {"interp.latents": lat}
    else:
        raise KeyError(run)
    _CHAINS[name, run] = result
    return result


CHAIN_CASES = [
    pytest.param(name, run, key, id=f"{name}-{key}")
    for name in TINY_NAMES
    for run, key in [("i2v", "i2v.latents"), ("i2v", "i2v.video"), ("i2v_eta0", "i2v_eta0.latents")]
    + ([("interp", "interp.latents")] if name == "tiny512" else [])
]


@pytest.mark.parametrize(("name", "run", "key"), CHAIN_CASES)
def test_chain_matches_reference(name: str, run: str, key: str, record_property) -> None:
    ours, ref = chain(name, run)[key], load_tiny(name).vectors[key]
    err = relative_error(ours, ref)
    record_property("rel_err", err)
    assert err < CHAIN_TOL, f"{name} {key}: relative L2 error {err:.3e} >= {CHAIN_TOL:g}"


@pytest.mark.parametrize("name", TINY_NAMES)
def test_chain_timesteps(name: str) -> None:
    tm = load_tiny(name)
    ours = chain(name, "i2v")["i2v.timesteps"]
    ref = tm.vectors["i2v.timesteps"]
    assert ours.tolist() == ref.tolist(), f"{name}: timesteps {ours.tolist()} != reference {ref.tolist()}"
    sampler = DDIMSampler(tm.model.schedule, tm.config.diffusion.parameterization)
    table = sampler.tables(tm.manifest["ddim_steps"], tm.manifest["timestep_spacing"], 1.0)["timesteps"]
    assert table.tolist() == ref.tolist()


# --------------------------------------------------------------------------------------------
# The parity tests can fail: a small change to one weight is detected
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_NAMES)
@torch.no_grad()
def test_parity_is_sensitive_to_one_weight(name: str, record_property) -> None:
    tm = load_tiny(name)
    model = load_model(tm.config, tm.checkpoint)  # a private copy: the session's model stays untouched
    before = relative_error(_unet(TinyModel(name, tm.config, model, tm.vectors, tm.manifest)), tm.vectors["unet.out"])
    assert before < MODULE_TOL

    weight = model.unet.out[2].weight  # the last conv; typical |w| ~ 0.05
    weight[0, 0, 0, 0] += 0.01
    after = relative_error(_unet(TinyModel(name, tm.config, model, tm.vectors, tm.manifest)), tm.vectors["unet.out"])
    record_property("rel_err_before", before)
    record_property("rel_err_after", after)
    assert after > 10 * MODULE_TOL, (
        f"{name}: perturbing one UNet weight by 0.01 moved unet.out's error only from {before:.2e} to {after:.2e}")


# --------------------------------------------------------------------------------------------
# Full-size presets: exactly the released checkpoints' keys and shapes
# --------------------------------------------------------------------------------------------


def _released_keys(resolution: str) -> dict[str, list[int]]:
    raw = json.loads((DATA / f"keys_{resolution}.json").read_text())
    renamed = {}
    for key, shape in raw.items():
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = list(shape)
    assert len(renamed) == len(raw), "the rename must not merge keys"
    return renamed


@pytest.mark.parametrize("preset", ["256", "512", "1024", "512_interp"])
def test_preset_keys_match_release(preset: str) -> None:
    config = get_config(preset)
    assert config is PRESETS[preset]
    with torch.device("meta"):
        model = DynamiCrafter(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    buffers = {k: list(v.shape) for k, v in checkpoint_buffers(config.diffusion).items()}
    assert not set(ours) & set(buffers), "schedule buffers must not be module state"
    ours.update(buffers)

    released = _released_keys(preset.split("_")[0])
    missing = sorted(set(released) - set(ours))
    unexpected = sorted(set(ours) - set(released))
    assert not missing and not unexpected, f"{preset}: missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], released[k]) for k in ours if ours[k] != released[k]}
    assert not wrong, f"{preset}: shapes (ours, released) differ: {dict(list(wrong.items())[:10])}"
