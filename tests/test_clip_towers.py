"""Checkpoints without the CLIP towers (the community's "pruned" files), completed from OpenCLIP weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dynamicrafter import hub as hub_module
from dynamicrafter.checkpoints import CLIP_TOWERS, CheckpointMismatchError, load_model, open_clip_to_towers, read_clip_towers
from dynamicrafter.configs import get_config
from dynamicrafter.diffusion.schedule import checkpoint_buffers
from dynamicrafter.hub import CLIP_FILENAMES, CheckpointError
from dynamicrafter.models.dynamicrafter import DynamiCrafter
from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

from .conftest import DATA, load_tiny
from .fake_hub import COMMIT

TOWERS = CLIP_TOWERS
TINY_ARCH = "dc-tiny-clip"
TINY_REPO = "laion/tiny-clip-for-tests"


def open_clip_state(release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tiny256's towers as one open_clip state dict: the text side from the text tower, ``visual.*`` from the image tower."""
    text = {k[len("cond_stage_model.model."):]: v for k, v in release_state.items()
            if k.startswith("cond_stage_model.model.")}
    visual = {k[len("embedder.model."):]: v for k, v in release_state.items() if k.startswith("embedder.model.visual.")}
    return {**text, **visual}


@pytest.fixture(scope="module")
def files(tmp_path_factory, release_state, config256) -> dict[str, Path]:
    """The pruned tiny file (fp16 safetensors, no towers, no schedule) and a tiny OpenCLIP file in open_clip's layout."""
    folder = tmp_path_factory.mktemp("pruned")
    schedule = set(checkpoint_buffers(config256.diffusion))
    pruned = {k: v.half().contiguous() for k, v in release_state.items()
              if not k.startswith(TOWERS) and k not in schedule}
    save_file(pruned, str(folder / "tiny256_fp16_pruned.safetensors"))
    clip = open_clip_state(release_state)
    save_file({k: v.contiguous() for k, v in clip.items()}, str(folder / "open_clip_model.safetensors"))
    torch.save(clip, folder / "open_clip_pytorch_model.bin")
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.items()}, "epoch": 3}, folder / "training.pt")
    return {"pruned": folder / "tiny256_fp16_pruned.safetensors", "clip": folder / "open_clip_model.safetensors",
            "clip_bin": folder / "open_clip_pytorch_model.bin", "clip_training": folder / "training.pt"}


def test_the_test_files_are_what_they_claim(files, release_state, config256) -> None:
    from safetensors import safe_open

    with safe_open(str(files["pruned"]), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    assert keys and not any(k.startswith(TOWERS) for k in keys)
    assert not keys & set(checkpoint_buffers(config256.diffusion))
    # The CLIP file is open_clip's own layout: an open_clip.CLIP loads it strictly.
    clip = open_clip.CLIP(**config256.clip.model_cfg)
    state = torch.load(files["clip_bin"], map_location="cpu", weights_only=True)
    clip.load_state_dict(state, strict=True)


def _outputs(model: DynamiCrafter) -> dict[str, torch.Tensor]:
    v = load_tiny("tiny256").vectors
    with torch.no_grad():
        return {"text": model.encode_text(["a tiny robot dancing in the rain", ""]),
                "image_tokens": model.encode_image_tokens(v["image.input"]),
                "unet": model.unet(v["unet.x"], v["unet.t"], v["unet.context"], v["unet.fs"]),
                "latents": model.encode_latents(v["image.input"])}


@pytest.fixture(scope="module")
def full_outputs() -> dict[str, torch.Tensor]:
    return _outputs(load_tiny("tiny256").model)


@pytest.mark.parametrize("clip_file", ["clip", "clip_bin", "clip_training"])
def test_pruned_plus_open_clip_gives_the_full_outputs(clip_file, files, config256, full_outputs) -> None:
    model = load_model(config256, files["pruned"], clip_checkpoint=files[clip_file])
    ours = _outputs(model)
    for name, value in full_outputs.items():
        assert torch.equal(ours[name], value), name
    full = load_tiny("tiny256").model.state_dict()
    loaded = model.state_dict()
    # Every weight equals the full checkpoint's, except the image tower's unused text-side copies
    # (token embedding, final norm, ...), which the tiny release file holds with other random values.
    unused = {k for k in full if k.startswith("embedder.model.") and not k.startswith("embedder.model.visual.")}
    assert unused == {f"embedder.model.{k}" for k in ("positional_embedding", "text_projection", "logit_scale",
                                                      "token_embedding.weight", "ln_final.weight", "ln_final.bias")}
    assert all(torch.equal(loaded[k], full[k]) for k in full if k not in unused)
    assert all(torch.equal(loaded[k], loaded["cond_stage_model.model." + k[len("embedder.model."):]]) for k in unused)


def test_pipeline_video_is_identical(files, gradient_png) -> None:
    def video(**kwargs) -> torch.Tensor:
        pipe = DynamiCrafterImg2VideoPipeline("256", device="cpu", config=DATA / "tiny256.yaml", dtype="float32",
                                              **kwargs)
        return pipe(gradient_png, "a tiny robot", num_inference_steps=2, num_frames=4, height=64, width=64,
                    generator=torch.Generator().manual_seed(0))["videos"]

    full = video(checkpoint=DATA / "tiny256.ckpt")
    pruned = video(checkpoint=files["pruned"], clip_checkpoint=files["clip"])
    assert torch.equal(pruned, full)


def test_clip_checkpoint_can_be_a_dynamicrafter_checkpoint(files, config256, full_outputs) -> None:
    model = load_model(config256, files["pruned"], clip_checkpoint=DATA / "tiny256.ckpt")
    assert all(torch.equal(_outputs(model)[k], v) for k, v in full_outputs.items())


def test_clip_checkpoint_is_ignored_with_a_warning_when_the_towers_are_there(config256, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dynamicrafter.checkpoints"):
        load_model(config256, DATA / "tiny256.ckpt", clip_checkpoint="/nonexistent/clip.safetensors")
    assert any("has its own CLIP towers" in m for m in caplog.messages)


def test_open_clip_vit_h_maps_onto_the_released_tower_keys() -> None:
    """open_clip's ViT-H-14 state dict, cut like the released files, gives exactly their tower keys and shapes."""
    with torch.device("meta"):
        clip = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    towers = {k: list(v.shape) for k, v in open_clip_to_towers(clip.state_dict()).items()}
    released = json.loads((DATA / "keys_256.json").read_text())
    assert towers == {k: v for k, v in released.items() if k.startswith(TOWERS)}
    with torch.device("meta"):
        model = DynamiCrafter(get_config("512"))
    assert set(towers) == {k for k in model.state_dict() if k.startswith(TOWERS)}


def test_clip_weights_are_those_of_open_clips_table() -> None:
    tag, repo = hub_module.CLIP_WEIGHTS["ViT-H-14"]
    assert tag == "laion2b_s32b_b79k"
    assert open_clip.get_pretrained_cfg("ViT-H-14", tag)["hf_hub"].rstrip("/") == repo
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    assert CLIP_FILENAMES == (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)


# ----------------------------------------------------------------------------- downloaded once


def test_missing_towers_are_downloaded_once_into_the_cache(hub, hf_env, files, config256, full_outputs,  # noqa: F811
                                                           monkeypatch, caplog) -> None:
    monkeypatch.setitem(hub_module.CLIP_WEIGHTS, TINY_ARCH, ("tiny", TINY_REPO))
    hub.files = {(TINY_REPO, "open_clip_model.safetensors"): files["clip"].read_bytes()}
    with caplog.at_level(logging.INFO):
        model = load_model(config256, files["pruned"])
    assert all(torch.equal(_outputs(model)[k], v) for k, v in full_outputs.items())
    assert [(r["method"], r["path"]) for r in hub.requests] == [
        ("HEAD", f"/{TINY_REPO}/resolve/main/open_clip_model.safetensors"),
        ("GET", f"/{TINY_REPO}/resolve/main/open_clip_model.safetensors")]
    assert {r["authorization"] for r in hub.requests} == {"Bearer hf_fake_token"}
    cached = list((hf_env.parent / "hf_home" / "hub").rglob("open_clip_model.safetensors"))
    assert [p.parent.name for p in cached] == [COMMIT]
    assert any("has no CLIP towers" in m and f"{TINY_ARCH} tiny" in m for m in caplog.messages)

    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the second load needs no network at all
    load_model(config256, files["pruned"])
    assert hub.requests == []


def test_offline_without_cached_clip_weights(hub, hf_env, files, config256, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setitem(hub_module.CLIP_WEIGHTS, TINY_ARCH, ("tiny", TINY_REPO))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        load_model(config256, files["pruned"])
    assert str(info.value) == (f"The OpenCLIP {TINY_ARCH} tiny weights ({TINY_REPO}) are not in the Hugging Face cache "
                               f"and HF_HUB_OFFLINE is set; download {hub.url}/{TINY_REPO}/resolve/main/"
                               "open_clip_model.safetensors yourself and pass it as --clip_checkpoint FILE.")
    assert hub.requests == []


def test_unknown_clip_architecture(files, config256, caplog) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(CheckpointError, match=f"^No OpenCLIP weights are known for the CLIP architecture {TINY_ARCH}; "
                                              "pass --clip_checkpoint with them.$"):
        load_model(config256, files["pruned"])
    assert not any("OpenCLIP" in message for message in caplog.messages)  # was "the OpenCLIP dc-tiny-clip ? weights"


# ----------------------------------------------------------------------------- what still fails, in one sentence


def test_missing_unet_key_is_named(tmp_path, files, config256) -> None:
    from safetensors.torch import load_file

    state = load_file(str(files["pruned"]))
    key = "model.diffusion_model.out.2.weight"
    del state[key]
    path = tmp_path / "broken_pruned.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config256, path, clip_checkpoint=files["clip"])
    assert str(info.value) == (f"{path} is missing 1 of the tiny256 model's tensors ({key}); the file is incomplete "
                               "or for another model: download or convert it again, or check the config.")


def test_clip_file_of_another_architecture(tmp_path, files, config256) -> None:
    cfg = dict(config256.clip.model_cfg, text_cfg=dict(config256.clip.model_cfg["text_cfg"], width=32))
    other = open_clip.CLIP(**cfg).state_dict()
    path = tmp_path / "other_clip.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config256, files["pruned"], clip_checkpoint=path)
    message = str(info.value)
    assert message.startswith(f"{path} does not match the tiny256 model: shapes differ for ") and "\n" not in message


def test_clip_file_missing_a_tensor(tmp_path, files, release_state, config256) -> None:
    state = open_clip_state(release_state)
    del state["visual.ln_post.weight"]
    path = tmp_path / "incomplete_clip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config256, files["pruned"], clip_checkpoint=path)
    assert str(info.value) == (f"{path} lacks 1 of the CLIP towers' tensors (embedder.model.visual.ln_post.weight); "
                               f"give the OpenCLIP {TINY_ARCH} weights the model was trained with.")


@pytest.mark.parametrize("kind", ["missing", "not_clip"])
def test_bad_clip_checkpoint(kind, tmp_path, files, config256) -> None:
    if kind == "missing":
        path, expected = tmp_path / "nope.safetensors", f"CLIP checkpoint {tmp_path / 'nope.safetensors'} does not exist."
    else:
        path = tmp_path / "vae_only.safetensors"
        save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(path))
        expected = (f"{path} is not an OpenCLIP model: it lacks the text (transformer.*) or vision (visual.*) tower; "
                    "give the OpenCLIP ViT-H-14 laion2b_s32b_b79k weights (open_clip_model.safetensors).")
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config256, files["pruned"], clip_checkpoint=path)
    assert str(info.value) == expected
    with pytest.raises(CheckpointMismatchError):
        read_clip_towers(path)
