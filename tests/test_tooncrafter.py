"""ToonCrafter: the dual-reference decoder and whole interpolation chains against its own code.

``tests/data/tinytoon.*`` were recorded by running ToonCrafter's code on tiny random weights
(see ``tests/data/README.md``). The tiny checkpoint, in ToonCrafter's release format, is
assembled here from ``tiny512.ckpt`` (UNet, CLIP towers, resampler, schedule) and
``tinytoon.vae.safetensors`` (its ``first_stage_model``), exactly as it was for the recording.
Tolerances: relative L2 error < 1e-4 per module call, < 1e-3 per sampling chain.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dynamicrafter import DynamiCrafterImg2VideoPipeline
from dynamicrafter.checkpoints import load_model, read_state_dict
from dynamicrafter.configs import PRESETS, get_config, load_config, resolve_resolution
from dynamicrafter.diffusion.schedule import checkpoint_buffers
from dynamicrafter.hub import REPOS, default_checkpoint_path, ensure_checkpoint
from dynamicrafter.models.dynamicrafter import DynamiCrafter
from dynamicrafter.models.vae_dualref import AutoencoderKLDualRef, _frames, splice_frames

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, relative_error, replay_noise

PROMPT = "a tiny robot dancing in the rain"
CLIP_PREFIXES = ("cond_stage_model.", "embedder.")


@dataclass(frozen=True)
class Toon:
    checkpoint: Path
    config: object
    model: DynamiCrafter
    vectors: dict[str, torch.Tensor]
    runs: dict


def assemble_checkpoint(path: Path) -> Path:
    """``tinytoon.ckpt`` in ToonCrafter's release format: ``torch.save({"state_dict": ...})``."""
    base = torch.load(DATA / "tiny512.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    state = {k: v for k, v in base.items() if not k.startswith("first_stage_model.")}
    state.update(load_file(DATA / "tinytoon.vae.safetensors"))
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def toon(tmp_path_factory) -> Toon:
    checkpoint = assemble_checkpoint(tmp_path_factory.mktemp("tinytoon") / "tinytoon.ckpt")
    config = load_config(DATA / "tinytoon.yaml")
    runs = json.loads((DATA / "manifest.json").read_text())["tinytoon"]["runs"]
    return Toon(checkpoint, config, load_model(config, checkpoint), load_file(DATA / "tinytoon.vectors.safetensors"), runs)


@pytest.fixture(scope="module")
def pipe(toon) -> DynamiCrafterImg2VideoPipeline:
    return DynamiCrafterImg2VideoPipeline("tooncrafter", device="cpu", checkpoint=toon.checkpoint,
                                          config=DATA / "tinytoon.yaml", dtype="float32")


def as_image(tensor: torch.Tensor) -> Image.Image:
    """A recorded ``[1, 3, H, W]`` image in [-1, 1] on 8-bit levels as the exact PIL image."""
    return Image.fromarray(((tensor[0] + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------


def test_tiny_config_is_read_as_tooncrafter(toon):
    assert toon.config.vae.dual_reference and toon.config.interp
    assert isinstance(toon.model.vae, AutoencoderKLDualRef) and toon.model.dual_reference


@torch.no_grad()
@pytest.mark.parametrize("key", ["vae.latent_start", "vae.latent_end", "vae.ref.2", "vae.ref.3"])
def test_key_frame_states_match_reference(toon, key):
    v = toon.vectors
    first, last, reference = toon.model.encode_key_frames(v["image.start"], v["image.end"])
    # the latents as ToonCrafter's get_latent_z_with_hidden_states gives them: scaled posterior means
    ours = {"vae.latent_start": first, "vae.latent_end": last, "vae.ref.2": reference[2], "vae.ref.3": reference[3]}[key]
    assert len(reference) == len(toon.config.vae.ch_mult) + 1
    err = relative_error(ours, v[key])
    assert err < MODULE_TOL, f"{key}: relative error {err:.3g}"


@torch.no_grad()
def test_dual_reference_decode_matches_reference(toon):
    """One window of 4 frames (the tiny UNet's temporal_length), as ToonCrafter's decode_first_stage."""
    v = toon.vectors
    _, _, reference = toon.model.encode_key_frames(v["image.start"], v["image.end"])
    z = v["vae.decode4.input"] / toon.config.diffusion.scale_factor
    frames = toon.model.vae.decode(_frames(z), reference, num_frames=4)  # [4, 3, H, W]
    err = relative_error(frames.unsqueeze(0).transpose(1, 2), v["vae.decode4.output"])
    assert err < MODULE_TOL, f"vae.decode4.output: relative error {err:.3g}"


@torch.no_grad()
@pytest.mark.parametrize("run", ["interp", "interp_eta0"])
def test_two_pass_decoding_matches_reference(toon, run):
    """The whole decoding of the recorded latents: windows, and the second pass for the middle frames."""
    v = toon.vectors
    _, _, reference = toon.model.encode_key_frames(v["image.start"], v["image.end"])
    video = toon.model.decode_video(v[f"{run}.latents"], reference)
    err = relative_error(video, v[f"{run}.video"])
    assert err < MODULE_TOL, f"{run}.video from {run}.latents: relative error {err:.3g}"


@torch.no_grad()
def test_post_quant_conv_is_not_applied(toon):
    """ToonCrafter's inference decodes without post_quant_conv: its weights must not matter."""
    v = toon.vectors
    _, _, reference = toon.model.encode_key_frames(v["image.start"], v["image.end"])
    vae = toon.model.vae
    before = toon.model.decode_video(v["interp_eta0.latents"], reference)
    saved = vae.post_quant_conv.weight.clone()
    try:
        vae.post_quant_conv.weight.mul_(3.0)
        after = toon.model.decode_video(v["interp_eta0.latents"], reference)
    finally:
        vae.post_quant_conv.weight.copy_(saved)
    assert torch.equal(before, after)


def test_splice_frames():
    keep, target, source = splice_frames(16)
    assert keep == [0, *range(2, 14), 15]
    assert (target, source) == (slice(7, 9), slice(6, 8))
    assert [keep[i] for i in range(16)[source]] == [7, 8]  # the same latents, decoded in a 14-frame window
    assert splice_frames(4) == ([0, 3], slice(1, 3), slice(0, 2))
    with pytest.raises(ValueError, match="at least 4 frames, got 3"):
        splice_frames(3)


@torch.no_grad()
def test_batch_decodes_each_video_on_its_own(toon):
    v = toon.vectors
    starts = torch.cat([v["image.start"], v["image.end"]])
    _, _, reference = toon.model.encode_key_frames(starts, starts.flip(0))
    latents = torch.stack([v["interp.latents"][0], v["interp.latents"][0].flip(1)])
    batch = toon.model.decode_video(latents, reference)
    for i in range(2):
        single = toon.model.decode_video(latents[i:i + 1], [r[i:i + 1] for r in reference])
        assert relative_error(batch[i:i + 1], single) < 1e-6


# --------------------------------------------------------------------------------------------
# Whole chains through the public pipeline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["interp", "interp_eta0"])
def test_interpolation_chain_matches_reference(toon, pipe, monkeypatch, run):
    v, settings = toon.vectors, toon.runs[run]
    args = dict(num_inference_steps=settings["ddim_steps"], guidance_scale=settings["guidance_scale"],
                eta=settings["ddim_eta"], frame_stride=settings["frame_stride"], num_frames=settings["frames"],
                height=64, width=64, latents=v[f"{run}.x_T"],
                window_size=settings["frames"])  # the original never windows (the tiny model is trained on 4)
    assert pipe.config.diffusion.timestep_spacing == settings["timestep_spacing"]
    assert pipe.config.diffusion.guidance_rescale == settings["guidance_rescale"]
    errors = {}
    for output_type, key in (("latent", f"{run}.latents"), ("pt", f"{run}.video")):
        if settings["ddim_eta"] > 0:
            replay_noise(monkeypatch, v[f"{run}.step_noise"])
        out = pipe(as_image(v["image.start"]), settings["prompt"], end_image=as_image(v["image.end"]),
                   output_type=output_type, **args)["videos"]
        ref = v[key] if output_type == "latent" else ((v[key].transpose(1, 2) + 1) / 2).clamp(0, 1)
        errors[key] = relative_error(out, ref)
    assert all(e < CHAIN_TOL for e in errors.values()), f"relative errors {errors}"


def test_decode_needs_the_key_frames(pipe, toon):
    with pytest.raises(ValueError, match="needs the key frames' encoder features"):
        pipe.decode(toon.vectors["interp.latents"])
    latents = toon.vectors["interp.latents"][:, :, :3]
    with pytest.raises(ValueError, match=r"^The latents' frame count must be at least 4 for ToonCrafter's decoder, "
                                         r"got 3\.$"):
        pipe.decode(latents, reference=[torch.zeros(1)])


def test_too_few_frames_is_one_value_error(pipe, toon):
    image = as_image(toon.vectors["image.start"])
    with pytest.raises(ValueError, match=r"^num_frames must be at least 4 for ToonCrafter's decoder, got 3\.$"):
        pipe(image, "x", end_image=image, num_frames=3, num_inference_steps=1, height=64, width=64)


# --------------------------------------------------------------------------------------------
# The preset, the released layout, the download, the pruned half-precision layout
# --------------------------------------------------------------------------------------------


def test_preset():
    config = get_config("tooncrafter")
    assert resolve_resolution("toon") == resolve_resolution("tooncrafter_512_interp") == "tooncrafter"
    assert (config.height, config.width, config.fs_kind, config.default_fs) == (320, 512, "fps", 10)
    assert config.interp and config.vae.dual_reference and config.vae.reference_attention_levels == (2, 3)
    assert config.diffusion.parameterization == "v" and config.diffusion.timestep_spacing == "uniform_trailing"
    assert config.diffusion.guidance_rescale == 0.7 and config.diffusion.use_dynamic_rescale
    assert config.unet == dataclasses.replace(PRESETS["512_interp"].unet, default_fs=10)  # the 512-interp UNet
    assert REPOS["tooncrafter"] == "Doubiiu/ToonCrafter"
    assert default_checkpoint_path("tooncrafter") == Path("checkpoints/tooncrafter_512_interp_v1/model.ckpt")


def test_preset_keys_match_release():
    """The released model.ckpt: the 512 model's keys with ToonCrafter's decoder (its config built in its code)."""
    with torch.device("meta"):
        model = DynamiCrafter(PRESETS["tooncrafter"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ours.update({k: list(v.shape) for k, v in checkpoint_buffers(PRESETS["tooncrafter"].diffusion).items()})
    released = {k: v for k, v in json.loads((DATA / "keys_512.json").read_text()).items()
                if not k.startswith("first_stage_model.decoder.")}
    released.update(json.loads((DATA / "keys_tooncrafter_decoder.json").read_text()))
    missing, unexpected = sorted(set(released) - set(ours)), sorted(set(ours) - set(released))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], released[k]) for k in ours if ours[k] != released[k]}
    assert not wrong, f"shapes (ours, released) differ: {dict(list(wrong.items())[:10])}"


def test_checkpoint_is_downloaded_from_tooncrafter(hub, hf_env):  # noqa: F811
    hub.files = {("Doubiiu/ToonCrafter", "model.ckpt"): b"toon weights"}
    target = default_checkpoint_path("tooncrafter", hf_env)
    assert ensure_checkpoint("toon", target) == target
    assert target.read_bytes() == b"toon weights"
    assert target.parent.name == "tooncrafter_512_interp_v1"


@torch.no_grad()
def test_pruned_half_precision_layout(toon, tmp_path):
    """The community ``tooncrafter_512_interp-pruned-fp16.safetensors`` layout: float16 safetensors
    without the CLIP towers. Its UNet/VAE/resampler tensors read into the model and decode the same."""
    state = read_state_dict(toon.checkpoint)
    pruned = {k: v.half() for k, v in state.items() if not k.startswith(CLIP_PREFIXES)}
    path = tmp_path / "tinytoon-pruned-fp16.safetensors"
    save_file(pruned, path)
    read = read_state_dict(path)
    assert set(read) == set(state) - {k for k in state if k.startswith(CLIP_PREFIXES)}
    with torch.device("meta"):
        model = DynamiCrafter(toon.config)
    own = model.state_dict()
    assert {k for k in own if not k.startswith(CLIP_PREFIXES)} <= set(read)
    model.load_state_dict({k: read[k].float() for k in own if not k.startswith(CLIP_PREFIXES)}, strict=False,
                          assign=True)
    v = toon.vectors
    _, _, reference = model.encode_key_frames(v["image.start"], v["image.end"])
    video = model.decode_video(v["interp.latents"], reference)
    assert relative_error(video, v["interp.video"]) < MODULE_TOL  # the tiny weights are float16 values
