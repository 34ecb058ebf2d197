"""Config objects check themselves; the YAML reader accepts the released configs and refuses the rest.

The released configs' parameters are rebuilt here as dicts (DynamiCrafter's
``configs/inference_{256,512,1024}_v1.0.yaml``, the 512 one also serving the interpolation model,
and ToonCrafter's ``configs/inference_512_v1.0.yaml``), so every released parameter set is read.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from dynamicrafter.configs import (
    PRESETS,
    DiffusionConfig,
    ModelConfig,
    ResamplerConfig,
    UNetConfig,
    VAEConfig,
    load_config,
)


def released_512() -> dict:
    """The parameter structure of DynamiCrafter's configs/inference_512_v1.0.yaml."""
    unet = dict(in_channels=8, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], dropout=0.1, num_head_channels=64, transformer_depth=1, context_dim=1024,
                use_linear=True, use_checkpoint=True, temporal_conv=True, temporal_attention=True,
                temporal_selfatt_only=True, use_relative_position=False, use_causal_attention=False,
                temporal_length=16, addition_attention=True, image_cross_attention=True, default_fs=24,
                fs_condition=True)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    params = dict(
        rescale_betas_zero_snr=True, parameterization="v", linear_start=0.00085, linear_end=0.012,
        num_timesteps_cond=1, timesteps=1000, first_stage_key="video", cond_stage_key="caption",
        cond_stage_trainable=False, conditioning_key="hybrid", image_size=[40, 64], channels=4, scale_by_std=False,
        scale_factor=0.18215, use_ema=False, uncond_type="empty_seq", use_dynamic_rescale=True, base_scale=0.7,
        fps_condition_type="fps", perframe_ae=True,
        unet_config=dict(target="lvdm.modules.networks.openaimodel3d.UNetModel", params=unet),
        first_stage_config=dict(target="lvdm.models.autoencoder.AutoencoderKL",
                                params=dict(embed_dim=4, monitor="val/rec_loss", ddconfig=ddconfig,
                                            lossconfig=dict(target="torch.nn.Identity"))),
        cond_stage_config=dict(target="lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder",
                               params=dict(freeze=True, layer="penultimate")),
        img_cond_stage_config=dict(target="lvdm.modules.encoders.condition.FrozenOpenCLIPImageEmbedderV2",
                                   params=dict(freeze=True)),
        image_proj_stage_config=dict(target="lvdm.modules.encoders.resampler.Resampler",
                                     params=dict(dim=1024, depth=4, dim_head=64, heads=12, num_queries=16,
                                                 embedding_dim=1280, output_dim=1024, ff_mult=4, video_length=16)),
    )
    return {"model": {"target": "lvdm.models.ddpm3d.LatentVisualDiffusion", "params": params}}


def released(name: str) -> dict:
    doc = released_512()
    p = doc["model"]["params"]
    if name == "256":
        for key in ("rescale_betas_zero_snr", "parameterization", "use_dynamic_rescale", "base_scale",
                    "fps_condition_type", "perframe_ae"):
            del p[key]
        p["image_size"] = [32, 32]
        p["unet_config"]["params"].update(image_cross_attention_scale_learnable=True, default_fs=3)
    elif name == "1024":
        p.update(image_size=[72, 128], base_scale=0.3)
        p["unet_config"]["params"]["default_fs"] = 10
    elif name == "tooncrafter":
        p["loop_video"] = True
        p["first_stage_config"]["target"] = "lvdm.models.autoencoder.AutoencoderKL_Dualref"
    return doc


def write(tmp_path: Path, doc: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(("name", "preset"), [("256", "256"), ("512", "512"), ("1024", "1024"),
                                               ("512", "512_interp"), ("tooncrafter", "tooncrafter")])
def test_released_configs_are_read_as_the_presets(tmp_path, name, preset):
    config = load_config(write(tmp_path, released(name)))
    expected = PRESETS[preset]
    # what a YAML file cannot say: the preset's name, repository, folder, and the run scripts'
    # frame rate and interpolation use for the 512_interp model (whose YAML is the 512 one)
    same = config.replace(name=expected.name, repo_id=expected.repo_id, checkpoint_dir=expected.checkpoint_dir,
                          interp=expected.interp, unet=dataclasses.replace(config.unet, default_fs=expected.default_fs))
    assert same == expected
    assert config.vae.dual_reference == (preset == "tooncrafter")


def test_community_layout_with_relative_targets_and_no_text_section(tmp_path):
    """The pruned-checkpoint configs in the community use ``.lvdm...`` targets and may omit a tower's section."""
    doc = released("tooncrafter")
    p = doc["model"]["params"]
    del p["cond_stage_config"]
    for section in ("unet_config", "first_stage_config", "img_cond_stage_config", "image_proj_stage_config"):
        p[section]["target"] = "." + p[section]["target"]
    doc["model"]["target"] = "." + doc["model"]["target"]
    config = load_config(write(tmp_path, doc))
    assert config.vae.dual_reference and config.clip.arch == "ViT-H-14"


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value


UNET = "model.params.unet_config.params"
DDCONFIG = "model.params.first_stage_config.params.ddconfig"


@pytest.mark.parametrize(("base", "key", "value", "message"), [
    ("512", f"{UNET}.use_causal_attention", True, f"{UNET}.use_causal_attention is true, which this package does "
                                                  "not implement (only false is implemented)."),
    ("512", f"{UNET}.use_relative_position", True, f"{UNET}.use_relative_position is true"),
    ("512", f"{UNET}.temporal_selfatt_only", False, f"{UNET}.temporal_selfatt_only is false"),
    ("512", f"{UNET}.use_linear", False, f"{UNET}.use_linear is false"),
    ("512", f"{UNET}.model_channels", "320", f"{UNET}.model_channels is '320', which this package does not "
                                             "implement (an integer)."),
    ("512", "model.params.conditioning_key", "crossattn", "model.params.conditioning_key is 'crossattn'"),
    ("512", "model.params.uncond_type", "zero_embed", "model.params.uncond_type is 'zero_embed'"),
    ("512", "model.params.scale_by_std", True, "model.params.scale_by_std is true"),
    ("512", "model.params.use_ema", True, "model.params.use_ema is true"),
    ("512", "model.params.parameterization", "x0", "model.params.parameterization is 'x0'"),
    ("512", f"{DDCONFIG}.double_z", False, f"{DDCONFIG}.double_z is false"),
    ("512", "model.params.cond_stage_config.params.max_length", 128, "max_length is 128"),
    ("512", "model.params.img_cond_stage_config.params.arch", "ViT-L-14",
     "img_cond_stage_config.params.arch is 'ViT-L-14' but the text encoder's is 'ViT-H-14'"),
    ("512", "model.params.first_stage_config.target", "lvdm.models.autoencoder.VQModel",
     "model.params.first_stage_config.target is 'lvdm.models.autoencoder.VQModel', which this package does not "
     "implement (a class path ending in AutoencoderKL or AutoencoderKL_Dualref)."),
    ("512", f"{UNET}.use_scale_shift_norm", True, f"{UNET}.use_scale_shift_norm is not a setting this package "
                                                  "implements"),
    ("512", "model.base_learning_rate", 1e-5, "model.base_learning_rate is not a setting"),
    ("512", "lightning", {"trainer": {}}, "top-level key 'lightning' is not a setting"),
    ("tooncrafter", f"{DDCONFIG}.time_mode", "all", f"{DDCONFIG}.time_mode is 'all'"),
    ("tooncrafter", f"{DDCONFIG}.video_kernel_size", [3, 3, 3], f"{DDCONFIG}.video_kernel_size is [3, 3, 3]"),
    ("tooncrafter", f"{DDCONFIG}.merge_strategy", "fixed", f"{DDCONFIG}.merge_strategy is 'fixed'"),
    ("tooncrafter", "model.params.perframe_ae", False, "model.params.perframe_ae is false"),
    ("512", f"{UNET}.channel_mult", [], "UNetConfig.channel_mult must be a non-empty list of positive integers"),
    ("512", "model.params.channels", 8, "model.params.channels is 8 but the VAE's latents have 4 channels."),
])
def test_unimplemented_values_are_refused(tmp_path, base, key, value, message):
    doc = released(base)
    _set(doc, key, value)
    path = write(tmp_path, doc, "my_config.yaml")
    with pytest.raises(ValueError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_documented_values_that_change_nothing_are_accepted(tmp_path):
    doc = released("tooncrafter")
    p = doc["model"]["params"]
    p["unet_config"]["params"].update(dropout=0.0, use_checkpoint=False)
    p["first_stage_config"]["params"]["ddconfig"].update(attn_level=[2, 3], time_mode="conv-only",
                                                         merge_strategy="learned", video_kernel_size=[3, 1, 1],
                                                         alpha=0.0)
    p["cond_stage_config"]["params"].update(version="laion2b_s32b_b79k", device="cuda", max_length=77)
    plain = write(tmp_path, released("tooncrafter"), "plain.yaml")
    assert load_config(write(tmp_path, doc), name="t") == load_config(plain, name="t")


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="is not a readable YAML file"):
        load_config(bad)
    bad.write_text("just: text\n")
    with pytest.raises(ValueError, match="no 'model' mapping"):
        load_config(bad)
    doc = copy.deepcopy(released("512"))
    del doc["model"]["params"]["unet_config"]
    with pytest.raises(ValueError, match=r"model\.params\.unet_config is missing"):
        load_config(write(tmp_path, doc))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: UNetConfig(model_channels=0), "UNetConfig.model_channels must be a positive integer, got 0."),
    (lambda: UNetConfig(model_channels=96), "must be a multiple of num_head_channels (64) and of 32"),
    (lambda: VAEConfig(double_z=False), "VAEConfig.double_z must be true"),
    (lambda: VAEConfig(ch_mult=(2, 2), dual_reference=True), "needs ch_mult[0] == 1"),
    (lambda: DiffusionConfig(parameterization="x0"), "parameterization must be 'eps' or 'v'"),
    (lambda: DiffusionConfig(linear_start=0.02), "0 < linear_start < linear_end < 1"),
    (lambda: DiffusionConfig(guidance_rescale=1.5), "guidance_rescale must be in [0, 1]"),
    (lambda: ResamplerConfig(video_length=0), "ResamplerConfig.video_length must be a positive integer"),
    (lambda: ModelConfig(name="x", height=300, width=512), "height and width must be multiples of 64"),
    (lambda: ModelConfig(name="x", height=320, width=512, resampler=ResamplerConfig(output_dim=768)),
     "the resampler's output_dim (768) must equal the UNet's context_dim (1024)"),
    (lambda: ModelConfig(name="x", height=320, width=512, fs_kind="fpx"), "fs_kind must be 'frame_stride' or 'fps'"),
    (lambda: PRESETS["512"].replace(height=100), "height and width must be multiples of 64"),
])
def test_configs_validate_themselves(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_lists_become_tuples():
    config = UNetConfig(channel_mult=[1, 2], attention_resolutions=[2])
    assert config.channel_mult == (1, 2) and config.attention_resolutions == (2,)
    assert hash(config) == hash(UNetConfig(channel_mult=(1, 2), attention_resolutions=(2,)))
