"""Reading checkpoints: formats, dtypes, strictness, safety and memory."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dynamicrafter.checkpoints import CheckpointMismatchError, load_model, read_state_dict
from dynamicrafter.configs import load_config
from dynamicrafter.diffusion.schedule import checkpoint_buffers

from .conftest import DATA, MODULE_TOL, load_tiny, relative_error

CKPT256 = DATA / "tiny256.ckpt"
CKPT512 = DATA / "tiny512.ckpt"
UNET_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def schedule_keys(config256) -> set[str]:
    return set(checkpoint_buffers(config256.diffusion))


@torch.no_grad()
def unet_out(model) -> torch.Tensor:
    v = load_tiny("tiny256").vectors
    return model.unet(v["unet.x"], v["unet.t"], v["unet.context"], v["unet.fs"])


@pytest.fixture(scope="module")
def ours_f32() -> torch.Tensor:
    """unet.out of the session's float32 tiny256 model (loaded from the release .ckpt)."""
    return unet_out(load_tiny("tiny256").model)


def _save_release(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"state_dict": state}, path)
    return path


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_release_ckpt_loads(release_state, schedule_keys, ours_f32) -> None:
    # The file really is in the release layout: framestride_embed, float16 weights, float32 buffers.
    assert any(k.startswith(UNET_PREFIX + "framestride_embed.") for k in release_state)
    assert not any(k.startswith(UNET_PREFIX + "fps_embedding.") for k in release_state)
    weight_dtypes = {v.dtype for k, v in release_state.items() if k not in schedule_keys}
    assert weight_dtypes == {torch.float16}
    assert {release_state[k].dtype for k in schedule_keys} == {torch.float32}

    state = read_state_dict(CKPT256)
    assert any(k.startswith(UNET_PREFIX + "fps_embedding.") for k in state)
    assert not any("framestride_embed" in k for k in state)
    assert len(state) == len(release_state)

    model = load_tiny("tiny256").model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    err = relative_error(ours_f32, load_tiny("tiny256").vectors["unet.out"])
    assert err < MODULE_TOL, f"unet.out relative error {err:.3e}"


def _resave(kind: str, state: dict[str, torch.Tensor], schedule_keys: set[str], tmp_path: Path) -> Path:
    """The release weights re-saved in another format; schedule buffers stay float32 as in the release."""
    if kind == "bare.pt":
        path = tmp_path / "bare.pt"
        torch.save(dict(state), path)
        return path
    if kind == "legacy.ckpt":  # torch's pre-1.6 (non-zip) serialization: cannot be memory-mapped
        path = tmp_path / "legacy.ckpt"
        torch.save({"state_dict": dict(state)}, path, _use_new_zipfile_serialization=False)
        return path
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: (v if k in schedule_keys else v.to(dtype)).contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["bare.pt", "legacy.ckpt", "f32", "f16"])
def test_resaved_formats_give_the_same_output(kind, release_state, schedule_keys, config256, ours_f32,
                                              tmp_path, record_property) -> None:
    # The weights are exactly representable in float16, so every one of these is the same model.
    path = _resave(kind, release_state, schedule_keys, tmp_path)
    model = load_model(config256, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out = unet_out(model)
    err_ours = relative_error(out, ours_f32)
    err_ref = relative_error(out, load_tiny("tiny256").vectors["unet.out"])
    record_property("rel_err_to_ckpt_load", err_ours)
    record_property("rel_err_to_reference", err_ref)
    assert err_ours < 1e-6, f"{kind}: differs from the .ckpt load by {err_ours:.3e}"
    assert err_ref < MODULE_TOL, f"{kind}: relative error to the reference {err_ref:.3e}"


def test_bf16_safetensors(release_state, schedule_keys, config256, ours_f32, tmp_path, record_property) -> None:
    path = _resave("bf16", release_state, schedule_keys, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice(UNET_PREFIX + "out.2.weight").get_dtype() == "BF16"

    # Upcast on load (the default dtype): float32 parameters holding bf16-rounded values.
    model = load_model(config256, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    err32 = relative_error(unet_out(model), ours_f32)
    del model

    # Kept in bfloat16.
    model = load_model(config256, path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.unet.out[2].weight.dtype == torch.bfloat16
    out = unet_out(model)
    assert out.dtype == torch.float32  # the UNet returns the input's dtype
    err16 = relative_error(out, ours_f32)
    record_property("rel_err_bf16_weights_f32_compute", err32)
    record_property("rel_err_bf16_weights_bf16_compute", err16)

    # Measured: ~1e-2 (bf16 weights, f32 compute) and ~2e-2 (bf16 compute); far from 0 so it is not a no-op.
    assert 1e-5 < err32 < 5e-2, f"bf16 weights, float32 compute: relative error {err32:.3e}"
    assert 1e-5 < err16 < 1e-1, f"bf16 weights and compute: relative error {err16:.3e}"


def test_vae_dtype(config256) -> None:
    model = load_model(config256, CKPT256, dtype=torch.float32, vae_dtype=torch.bfloat16)
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in model.embedder.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fully_cast_half_safetensors_loads(dtype, release_state, config256, ours_f32, tmp_path) -> None:
    """The natural conversion ``{k: v.to(dtype)}`` also casts the schedule buffers to half precision.

    Such a file holds the right schedule, only rounded; it must load, not be refused as the wrong config.
    """
    path = tmp_path / "all_half.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in release_state.items()}, str(path))
    model = load_model(config256, path)
    err = relative_error(unet_out(model), ours_f32)
    assert err < 5e-2, f"{dtype}: relative error {err:.3e}"


def test_checkpoint_without_schedule_buffers_loads(release_state, schedule_keys, config256, ours_f32,
                                                   tmp_path) -> None:
    path = tmp_path / "weights_only.safetensors"
    save_file({k: v.contiguous() for k, v in release_state.items() if k not in schedule_keys}, str(path))
    assert relative_error(unet_out(load_model(config256, path)), ours_f32) < 1e-6


# --------------------------------------------------------------------------------------------
# Strictness
# --------------------------------------------------------------------------------------------


def _mismatch(config, path: Path) -> str:
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config, path)
    message = str(info.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    return message


def test_missing_key(release_state, config256, tmp_path) -> None:
    key = UNET_PREFIX + "out.2.bias"
    state = {k: v for k, v in release_state.items() if k != key}
    message = _mismatch(config256, _save_release(state, tmp_path / "missing.ckpt"))
    assert "missing" in message and key in message, message


def test_missing_renamed_key_is_named(release_state, config256, tmp_path) -> None:
    key = UNET_PREFIX + "framestride_embed.0.weight"
    state = {k: v for k, v in release_state.items() if k != key}
    message = _mismatch(config256, _save_release(state, tmp_path / "missing_fs.ckpt"))
    assert "missing" in message and "fps_embedding.0.weight" in message, message


def test_unexpected_key(release_state, config256, tmp_path) -> None:
    key = UNET_PREFIX + "extra_block.weight"
    state = dict(release_state, **{key: torch.zeros(3)})
    message = _mismatch(config256, _save_release(state, tmp_path / "extra.ckpt"))
    assert "unexpected" in message and key in message, message


def test_wrong_shape(release_state, config256, tmp_path) -> None:
    key = UNET_PREFIX + "out.2.weight"  # (4, 32, 3, 3)
    state = dict(release_state, **{key: release_state[key][:, :16].clone()})
    message = _mismatch(config256, _save_release(state, tmp_path / "shape.ckpt"))
    assert key in message and "(4, 16, 3, 3)" in message and "(4, 32, 3, 3)" in message, message


@pytest.mark.parametrize("buffer", ["betas", "alphas_cumprod", "posterior_variance"])
def test_tampered_schedule(buffer, release_state, config256, tmp_path) -> None:
    state = dict(release_state, **{buffer: release_state[buffer] * 1.1})
    message = _mismatch(config256, _save_release(state, tmp_path / "schedule.ckpt"))
    assert "schedule" in message and buffer in message, message


def test_wrong_config_for_checkpoint(config256) -> None:
    message = _mismatch(config256, CKPT512)
    assert "schedule" in message and "right config" in message, message
    message = _mismatch(load_config(DATA / "tiny512.yaml"), CKPT256)
    assert "schedule" in message, message


def test_wrong_config_same_schedule(config256, tmp_path) -> None:
    """tiny512's weights (schedule stripped) in the tiny256 model: its learnable image-attention scales are missing."""
    state = torch.load(CKPT512, map_location="cpu", weights_only=True)["state_dict"]
    buffers = checkpoint_buffers(load_config(DATA / "tiny512.yaml").diffusion)
    path = _save_release({k: v for k, v in state.items() if k not in buffers}, tmp_path / "t512_noschedule.ckpt")
    message = _mismatch(config256, path)
    assert "missing" in message and "tiny256" in message, message


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------


def test_nonexistent_path(config256, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt") as info:
        load_model(config256, tmp_path / "nope.ckpt")
    assert isinstance(info.value, ValueError)  # a user error like every other checkpoint error
    assert str(info.value) == f"Checkpoint {tmp_path / 'nope.ckpt'} does not exist."


@pytest.mark.parametrize("inside", [[], ["model.ckpt", "notes.txt"]], ids=["empty", "with-model.ckpt"])
def test_directory_is_called_a_folder(inside, config256, tmp_path) -> None:
    folder = tmp_path / "dynamicrafter_256_v1"
    folder.mkdir()
    for name in inside:
        (folder / name).write_bytes(b"x")
    hint = "give the file inside it (model.ckpt)" if inside else "it holds no checkpoint file"
    expected = f"Checkpoint {folder} is a folder, not a file; {hint}."
    for load in (lambda: load_model(config256, folder), lambda: read_state_dict(folder)):
        with pytest.raises(CheckpointMismatchError) as info:
            load()
        assert str(info.value) == expected


def _garbage(kind: str, tmp_path: Path) -> Path:
    if kind == "random.ckpt":
        data = bytes((i * 7919 + 13) % 256 for i in range(4096))
    elif kind == "text.pt":
        data = b"this is not a checkpoint\n" * 100
    elif kind == "empty.ckpt":
        data = b""
    elif kind == "truncated.ckpt":
        data = CKPT256.read_bytes()[: CKPT256.stat().st_size // 2]
    elif kind == "random.safetensors":
        data = bytes((i * 7919 + 13) % 256 for i in range(4096))
    elif kind == "truncated.safetensors":
        full = tmp_path / "full.safetensors"
        save_file({"a": torch.zeros(1000)}, str(full))
        data = full.read_bytes()[:-100]
    else:
        raise KeyError(kind)
    path = tmp_path / kind
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["random.ckpt", "text.pt", "empty.ckpt", "truncated.ckpt",
                                  "random.safetensors", "truncated.safetensors"])
def test_garbage_file(kind, config256, tmp_path) -> None:
    path = _garbage(kind, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="not a readable checkpoint") as info:
        load_model(config256, path)
    assert str(info.value).startswith(f"{path} is not a readable checkpoint (") and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Wrong dtypes and wrong kinds of file: one sentence saying what the file is and what to do
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("key", [UNET_PREFIX + "out.2.weight", "cond_stage_model.model.ln_final.weight"])
def test_integer_tensor_where_a_float_is_expected(fmt, key, release_state, config256, tmp_path) -> None:
    state = dict(release_state, **{key: release_state[key].to(torch.int64)})
    path = tmp_path / f"int.{fmt}"
    if fmt == "ckpt":
        _save_release(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config256, path)
    assert str(info.value) == (f"{path} stores {key} as torch.int64 where the tiny256 model needs floating-point "
                               "weights; the file is damaged or not a model checkpoint.")


def test_integer_schedule_buffer(release_state, config256, tmp_path) -> None:
    path = _save_release(dict(release_state, betas=release_state["betas"].to(torch.int32)), tmp_path / "b.ckpt")
    assert _mismatch(config256, path) == f"{path} stores the schedule buffer betas as torch.int32; the file is damaged."


def _lora_state(style: str) -> dict[str, torch.Tensor]:
    a, b = torch.zeros(4, 32), torch.zeros(32, 4)
    if style == "peft":
        base = "base_model.model.model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
        return {f"{base}.lora_A.weight": a, f"{base}.lora_B.weight": b}
    if style == "kohya":
        base = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
        return {f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b, f"{base}.alpha": torch.tensor(4.0)}
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"  # diffusers attention processors
    return {f"{base}.to_q_lora.down.weight": a, f"{base}.to_q_lora.up.weight": b}


@pytest.mark.parametrize("style", ["peft", "kohya", "diffusers"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_lora_adapter(style, fmt, config256, tmp_path) -> None:
    state = _lora_state(style)
    path = tmp_path / f"adapter_model.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    message = _mismatch(config256, path)
    assert message == (f"{path} is a LoRA adapter ({len(state)} tensors such as {sorted(state)[0]}), not a model "
                       "checkpoint; give the full model's checkpoint instead.")


def test_model_with_unmerged_peft_layers(release_state, config256, tmp_path) -> None:
    key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    state = {k: v for k, v in release_state.items() if not k.startswith(key + ".")}
    state.update({f"{key}.base_layer.weight": release_state[key + ".weight"],
                  f"{key}.lora_A.default.weight": torch.zeros(4, 32), f"{key}.lora_B.default.weight": torch.zeros(32, 4)})
    path = _save_release(state, tmp_path / "peft_model.ckpt")
    assert _mismatch(config256, path) == (
        f"{path} holds a model with unmerged LoRA layers (peft keys such as {key}.lora_A.default.weight); merge them "
        "(peft's merge_and_unload) and save the merged model's state dict.")


def _optimizer_state() -> dict:
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.ones(3)
    optimizer.step()
    return optimizer.state_dict()


def test_optimizer_state(config256, tmp_path) -> None:
    path = tmp_path / "optimizer.pt"
    torch.save(_optimizer_state(), path)
    assert _mismatch(config256, path) == (f"{path} is an optimizer state (state, param_groups) saved during training, "
                                          "not model weights; give the model's checkpoint instead.")


def test_training_state_without_model(config256, tmp_path) -> None:
    path = tmp_path / "trainer_state.pt"
    torch.save({"optimizer": _optimizer_state(), "step": 1000, "lr_scheduler": {"last_epoch": 3}}, path)
    assert _mismatch(config256, path) == (f"{path} is a training state (lr_scheduler, optimizer, step) without a "
                                          "model state dict under 'state_dict'; give the model's checkpoint instead.")


def test_lightning_checkpoint_with_optimizer_states_loads(release_state, config256, tmp_path, ours_f32) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": release_state, "optimizer_states": [_optimizer_state()], "global_step": 7}, path)
    assert relative_error(unet_out(load_model(config256, path)), ours_f32) == 0.0


def test_deepspeed_layout_loads(release_state, config256, tmp_path, ours_f32) -> None:
    """The original trainer's DeepSpeed files: {"module": {"_forward_module.<key>": ...}}."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {f"_forward_module.{k}": v for k, v in release_state.items()}}, path)
    assert relative_error(unet_out(load_model(config256, path)), ours_f32) == 0.0


def _tinytoon_state() -> dict[str, torch.Tensor]:
    """tinytoon in ToonCrafter's release layout: tiny512 with ToonCrafter's VAE (as tests/test_tooncrafter.py builds it)."""
    from safetensors.torch import load_file

    state = torch.load(CKPT512, map_location="cpu", weights_only=True)["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    return {**state, **load_file(DATA / "tinytoon.vae.safetensors")}


def test_tooncrafter_checkpoint_for_a_dynamicrafter_model(tmp_path) -> None:
    """ToonCrafter's VAE decoder (AutoencoderKL_Dualref) has reference attention blocks the others lack."""
    path = _save_release(_tinytoon_state(), tmp_path / "tooncrafter_512_interp.ckpt")
    assert _mismatch(load_config(DATA / "tiny512.yaml"), path) == (
        f"{path} is a ToonCrafter checkpoint (its VAE decoder is ToonCrafter's), not one for the tiny512 model; "
        "load it with the tooncrafter model.")


def test_dynamicrafter_checkpoint_for_the_tooncrafter_model() -> None:
    assert _mismatch(load_config(DATA / "tinytoon.yaml"), CKPT512) == (
        f"{CKPT512} is a DynamiCrafter checkpoint without ToonCrafter's VAE decoder; load it with the 256, 512, "
        "1024 or 512_interp model, not the ToonCrafter one.")


def test_pruned_tooncrafter_with_open_clip_weights(tmp_path) -> None:
    """The community's pruned ToonCrafter layout (float16, no towers) plus the towers in open_clip's layout."""
    state = _tinytoon_state()
    towers = ("cond_stage_model.", "embedder.")
    pruned = tmp_path / "tinytoon-pruned-fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in state.items() if not k.startswith(towers)}, str(pruned))
    clip = {k[len("cond_stage_model.model."):]: v for k, v in state.items() if k.startswith("cond_stage_model.model.")}
    clip.update({k[len("embedder.model."):]: v for k, v in state.items() if k.startswith("embedder.model.visual.")})
    clip_path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.items()}, str(clip_path))
    config = load_config(DATA / "tinytoon.yaml")
    full = load_model(config, _save_release(state, tmp_path / "tinytoon.ckpt")).state_dict()
    loaded = load_model(config, pruned, clip_checkpoint=clip_path).state_dict()
    used = [k for k in full if not (k.startswith("embedder.model.") and not k.startswith("embedder.model.visual."))]
    assert all(torch.equal(loaded[k], full[k]) for k in used)


def test_open_clip_model_given_as_checkpoint(release_state, config256, tmp_path) -> None:
    state = {k[len("cond_stage_model.model."):]: v for k, v in release_state.items()
             if k.startswith("cond_stage_model.model.")}
    state.update({k[len("embedder.model."):]: v for k, v in release_state.items() if k.startswith("embedder.model.visual.")})
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert _mismatch(config256, path) == (f"{path} is an OpenCLIP model (the CLIP towers only), not a DynamiCrafter "
                                          "checkpoint; pass it as clip_checkpoint (--clip_checkpoint) and give the "
                                          "model's checkpoint.")


def test_vae_only_file(config256, tmp_path) -> None:
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4), "encoder.conv_in.weight": torch.zeros(4, 4)}, str(path))
    assert _mismatch(config256, path) == (f"{path} is not a DynamiCrafter checkpoint: it has no UNet weights "
                                          "(model.diffusion_model.*) among its 2 tensors, such as decoder.conv_in.weight.")


def test_image_model_checkpoint(release_state, config256, tmp_path) -> None:
    """A Stable Diffusion checkpoint shares the UNet's key names but has no temporal layers."""
    state = {k: v for k, v in release_state.items() if ".temopral_conv." not in k and "temporal" not in k}
    path = _save_release(state, tmp_path / "v2-1_512-ema-pruned.ckpt")
    assert _mismatch(config256, path) == (f"{path} is an image diffusion (Stable Diffusion) checkpoint: its UNet has "
                                          "no temporal layers; give a DynamiCrafter checkpoint.")


def test_schedule_buffers_may_be_left_out(release_state, schedule_keys, config256, tmp_path, ours_f32) -> None:
    path = _save_release({k: v for k, v in release_state.items() if k not in schedule_keys}, tmp_path / "nosched.ckpt")
    assert relative_error(unet_out(load_model(config256, path)), ours_f32) == 0.0


@pytest.mark.parametrize("content", [{"state_dict": {"a": 1}}, [torch.zeros(2)], torch.zeros(2), {"a": "b"}],
                         ids=["int-values", "list", "tensor", "str-values"])
def test_pickle_without_tensor_state_dict(content, config256, tmp_path) -> None:
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointMismatchError, match="no state dict of tensors"):
        load_model(config256, path)


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(legacy, release_state, config256, tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(release_state), "payload": _RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    # Accept the package's own error or the refusal of the weights-only unpickler; never run the code.
    with pytest.raises((CheckpointMismatchError, pickle.UnpicklingError)):
        load_model(config256, path)
    with pytest.raises((CheckpointMismatchError, pickle.UnpicklingError)):
        read_state_dict(path)
    assert not marker.exists(), "loading the checkpoint executed code"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_gives_package_error(legacy, release_state, config256, tmp_path) -> None:
    """Stricter: a refused pickle is one sentence naming the call it would make, without PyTorch's advice."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"payload": _RunsCode(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(config256, path)
    assert not marker.exists()
    assert str(info.value) == (f"{path} was refused: loading it would call {os.system.__module__}.system, and "
                               "checkpoints are only read without running code; use a .safetensors copy, or re-save "
                               "its state dict from a copy you trust.")


# --------------------------------------------------------------------------------------------
# Memory: nothing left on the meta device, no second copy of the weights
# --------------------------------------------------------------------------------------------


def _assert_materialized(model) -> None:
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not on_meta, f"left on the meta device: {on_meta[:10]}"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_nothing_left_on_meta(config256) -> None:
    _assert_materialized(load_tiny("tiny256").model)
    _assert_materialized(load_tiny("tiny512").model)


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory, release_state) -> dict[str, Path]:
    """float32 copies of tiny256: release-layout .ckpt and .safetensors."""
    folder = tmp_path_factory.mktemp("f32")
    state = {k: v.float().contiguous() for k, v in release_state.items()}
    torch.save({"state_dict": state}, folder / "tiny256_f32.ckpt")
    save_file(state, str(folder / "tiny256_f32.safetensors"))
    return {"ckpt": folder / "tiny256_f32.ckpt", "safetensors": folder / "tiny256_f32.safetensors"}


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_float32_load_shares_the_mapped_file(fmt, f32_files, config256) -> None:
    """Loading float32 as float32: every tensor stays inside the file's memory mapping (no copy)."""
    path = f32_files[fmt].resolve()
    model = load_model(config256, path)
    _assert_materialized(model)
    ranges = _file_mappings(path)
    assert ranges, f"{path} is not memory-mapped"
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    outside = [n for n, t in tensors.items() if not any(a <= t.data_ptr() < b for a, b in ranges)]
    assert not outside, f"{len(outside)} of {len(tensors)} tensors were copied out of the mapping: {outside[:5]}"


_RSS_SCRIPT = r"""
import gc, json, resource, sys, torch
from dynamicrafter.checkpoints import load_model
from dynamicrafter.configs import load_config
from dynamicrafter.models.dynamicrafter import DynamiCrafter


def peak_kb():
    # VmHWM belongs to this process's address space. ru_maxrss is not usable here: Linux carries it
    # over from the forking parent (pytest, ~800 MB) across exec, which hides this process's growth.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


config = load_config(sys.argv[1])
with torch.device("meta"):  # warm up: tokenizer, open_clip registry, lazy imports
    DynamiCrafter(config)
gc.collect()
before = peak_kb()
model = load_model(config, sys.argv[2])
after = peak_kb()
print(json.dumps({"growth_kb": after - before, "before_kb": before, "after_kb": after,
                  "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak_growth(path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(DATA / "tiny256.yaml"), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "release-fp16"])
def test_peak_memory_while_loading(fmt, f32_files, release_state, record_property) -> None:
    """Peak RSS growth while loading, in a fresh process.

    Measured: float32 .ckpt ~4 MiB, float32 .safetensors ~31 MiB (its pages are read, but stay the
    file's: see test_float32_load_shares_the_mapped_file), the float16 release .ckpt ~42 MiB
    (it must be converted: one float32 copy; the mapped float16 pages are released as each tensor
    is converted, which took it down from ~56 MiB). The full-size 256 model measures 1.00x its
    weights in float32 and 1.02x when a float32 file is loaded as bfloat16 (docs/benchmarks.md).
    """
    tensor_bytes = sum(v.numel() * 4 for v in release_state.values())  # as float32
    path = CKPT256 if fmt == "release-fp16" else f32_files[fmt]
    numbers = _peak_growth(path)
    growth = numbers["growth_kb"] * 1024
    limit = 1.3 * tensor_bytes + 30 * 2**20
    record_property("peak_rss_growth_mib", round(growth / 2**20, 2))
    record_property("rss_numbers", numbers)
    record_property("tensor_mib", round(tensor_bytes / 2**20, 2))
    record_property("limit_mib", round(limit / 2**20, 2))
    assert growth < limit, (
        f"{fmt}: peak RSS grew {growth / 2**20:.1f} MiB while loading {tensor_bytes / 2**20:.1f} MiB of tensors "
        f"(limit {limit / 2**20:.1f} MiB)")
    if fmt == "release-fp16":
        # The measurement does see allocations: converting to float32 makes one full copy.
        assert growth > 0.8 * tensor_bytes, f"growth {growth / 2**20:.1f} MiB: the measurement saw no copy"
