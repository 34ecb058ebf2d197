"""ControlNets and ToonCrafter's sketch encoder: parity with the reference code, loading, frames, the call."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynamicrafter.control import Control, controlled, load_controlnet

from .conftest import DATA, MODULE_TOL, relative_error
from .control_weights import seeded_state

REF = load_file(str(DATA / "control.safetensors"))
LAYOUT = json.loads((DATA / "control.json").read_text())
SEEDS = {"sketch": 8, "rgb": 10}  # tests/data/README.md: seed 7 + the control image's channels


def _state(kind: str, unet_config) -> dict[str, torch.Tensor]:
    """The recorded tiny ControlNet's weights (original layout, no prefix), drawn from their seed."""
    from dynamicrafter.models.controlnet import ControlNet, ControlNetConfig

    cfg = unet_config
    config = ControlNetConfig(hint_channels=1 if kind == "sketch" else 3, model_channels=cfg.model_channels,
                              channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                              attention=tuple(2 ** level in cfg.attention_resolutions
                                              for level in range(len(cfg.channel_mult))),
                              num_head_channels=cfg.num_head_channels,
                              context_dim=cfg.context_dim)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(config).state_dict().items()}
    state = seeded_state(shapes, SEEDS[kind])
    total = sum(float(v.double().sum()) for v in state.values())
    assert total == pytest.approx(float(REF[f"{kind}.weights_sum"]), rel=1e-6), "the seeded weights changed"
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny512):
    """The tiny ControlNets in each release layout."""
    root = tmp_path_factory.mktemp("controlnets")
    unet = tiny512.config.unet
    sketch, rgb = _state("sketch", unet), _state("rgb", unet)
    paths = {"sketch": root / "sketch_encoder.ckpt", "cldm": root / "control_sd21_tiny.pth",
             "safetensors": root / "sketch_encoder-fp16.safetensors",
             "diffusers": root / "diffusion_pytorch_model.safetensors"}
    torch.save(sketch, paths["sketch"])  # as released: a bare state dict
    torch.save({"state_dict": {f"control_model.{k}": v for k, v in rgb.items()}}, paths["cldm"])
    save_file({k: v.half() for k, v in sketch.items()}, str(paths["safetensors"]))
    to_original = LAYOUT["diffusers_to_original"]
    save_file({d: rgb[o].contiguous() for d, o in to_original.items()}, str(paths["diffusers"]))
    return paths


def _frames(v: torch.Tensor, n: int = 2) -> torch.Tensor:
    return v[:, :, :n].transpose(1, 2).flatten(0, 1)


@pytest.mark.parametrize("kind,layout,ref", [("sketch", "sketch", "sketch"), ("rgb", "cldm", "rgb"),
                                              ("rgb", "diffusers", "diffusers"), ("rgb", "diffusers", "rgb")])
def test_residuals_match_the_reference(files, tiny512, kind, layout, ref):
    net = load_controlnet(files[layout], tiny512.config.unet)
    hint = REF[f"{kind}_u8"].float() / 255
    ctx = REF["context"].repeat(2, 1, 1)
    outs = net(_frames(REF["x_noisy"]), _frames(hint), REF["t"].repeat(2), ctx)
    assert len(outs) == 13
    errors = [relative_error(o, REF[f"{ref}.residual.{i}"]) for i, o in enumerate(outs)]
    assert max(errors) < MODULE_TOL, errors


def test_controlled_unet_matches_the_reference(files, tiny512):
    """The tinytoon UNet (tiny512's weights) steered by the sketch encoder at 0.6, both guidance branches."""
    net = load_controlnet(files["sketch"], tiny512.config.unet)
    hints = REF["sketch_u8"][0].transpose(0, 1).float() / 255
    control = Control(net, hints, [0, 1, 2, 3], 4, scale=0.6)
    unet = tiny512.model.unet
    fn = controlled(unet, [control], lambda t: 0, total=1)
    x_in = torch.cat([REF["x_noisy"], REF["concat"]], dim=1)
    for branch, ctx in (("cond", REF["context"]), ("uncond", REF["uncond_context"])):
        out = fn(x_in, REF["t"], ctx, REF["fs"])
        assert relative_error(out, REF[f"unet.{branch}.controlled"]) < MODULE_TOL
        plain = unet(x_in, REF["t"], ctx, REF["fs"])
        assert relative_error(plain, REF[f"unet.{branch}.plain"]) < MODULE_TOL
        assert relative_error(out, plain) > 1e-2  # the control matters


def test_fp16_safetensors_copy_loads(files, tiny512):
    net = load_controlnet(files["safetensors"], tiny512.config.unet)
    assert net.config.hint_channels == 1 and next(net.parameters()).dtype == torch.float32
