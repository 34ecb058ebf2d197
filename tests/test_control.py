"""ControlNets and ToonCrafter's sketch encoder: parity with the reference code, loading, frames, the call."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynamicrafter.checkpoints import CheckpointMismatchError
from dynamicrafter.control import Control, controlled, load_controlnet
from dynamicrafter.errors import UserError

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, relative_error
from .control_weights import seeded_state

REF = load_file(str(DATA / "controlnet.safetensors"))
LAYOUT = json.loads((DATA / "controlnet.json").read_text())
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


# ------------------------------------------------------------------ the pipeline call
@pytest.fixture(scope="module")
def pipe(tiny512):
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    return DynamiCrafterImg2VideoPipeline.from_model(tiny512.model, device="cpu", dtype=torch.float32, cast=False)


def _sketch(value: int = 0):
    from PIL import Image

    pixels = torch.full((64, 64), 255, dtype=torch.uint8)
    pixels[20:44, 30 + value:34 + value] = 0  # a dark line on white
    return Image.fromarray(pixels.numpy()).convert("RGB")


def _call(pipe, image, prompt="a line", **kwargs):
    return pipe(image, prompt, num_inference_steps=2, num_frames=4, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(5), return_dict=False, **kwargs)


def test_scale_zero_is_no_control_and_frames_without_sketch(pipe, files, gradient_png):
    pipe.unload_controlnets()
    plain = _call(pipe, gradient_png)
    assert pipe.load_controlnet(files["sketch"]) == 1
    try:
        sketches = [_sketch(i) for i in range(4)]
        assert torch.equal(_call(pipe, gradient_png, control_images=sketches, control_scale=0.0), plain)
        assert torch.equal(_call(pipe, gradient_png), plain)  # loaded but no control images: no control
        steered = _call(pipe, gradient_png, control_images=sketches)
        assert relative_error(steered, plain) > 1e-3
        # one image for all frames is the same as that image for each frame
        one = _call(pipe, gradient_png, control_images=sketches[0])
        assert torch.equal(one, _call(pipe, gradient_png, control_images=[sketches[0]] * 4))
        # key frames only: the others get no residuals
        keys = _call(pipe, gradient_png, control_images={0: sketches[0], -1: sketches[3]})
        assert relative_error(keys, plain) > 1e-4 and relative_error(keys, steered) > 1e-4
        # the second of two steps only
        late = _call(pipe, gradient_png, control_images=sketches, control_start=0.5)
        assert relative_error(late, plain) > 1e-4 and relative_error(late, steered) > 1e-4
        # with the leakage-free start the steps are other timesteps; scale 0 is still no control
        # prompts over time: the controlled frames read their own rows of the per-frame context
        timed = {0: "a line", 3: "a dot"}
        assert torch.equal(_call(pipe, gradient_png, prompt=timed, control_images=sketches, control_scale=0.0),
                           _call(pipe, gradient_png, prompt=timed))
        later = _call(pipe, gradient_png, start_step=600)
        assert torch.equal(_call(pipe, gradient_png, control_images=sketches, control_scale=0.0, start_step=600), later)
        assert relative_error(_call(pipe, gradient_png, control_images=sketches, start_step=600), later) > 1e-3
    finally:
        pipe.unload_controlnets()


def test_two_controls_add_their_residuals(files, tiny512):
    sketch = load_controlnet(files["sketch"], tiny512.config.unet)
    rgb = load_controlnet(files["diffusers"], tiny512.config.unet)
    hint1 = REF["sketch_u8"][0].transpose(0, 1).float() / 255
    hint3 = REF["rgb_u8"][0].transpose(0, 1).float() / 255
    a, b = Control(sketch, hint1, [0, 1, 2, 3], 4, 0.5), Control(rgb, hint3[1:3], [1, 2], 4, 0.7)
    seen = []
    unet = lambda x, t, c, fs, residuals=None: seen.append(residuals) or x[:, :4]  # noqa: E731
    fn = controlled(unet, [a, b], lambda t: 0, total=1)
    fn(torch.cat([REF["x_noisy"], REF["concat"]], 1), REF["t"], REF["context"], REF["fs"])
    ra, rb = (c.residuals(REF["x_noisy"], REF["t"], REF["context"]) for c in (a, b))
    assert all(torch.equal(s, x + y) for s, x, y in zip(seen[0], ra, rb))
    assert rb[0][[0, 3]].abs().max() == 0 and rb[0][[1, 2]].abs().max() > 0  # frames without an image: zeros


# ------------------------------------------------------------------ what users see for wrong input
def _save(state, path):
    torch.save(state, path)
    return path


def test_wrong_files(files, tiny512, tmp_path):
    from dynamicrafter.checkpoints import load_model
    from dynamicrafter.models.controlnet import ControlNet, ControlNetConfig

    unet = tiny512.config.unet
    with torch.device("meta"):
        sd15 = ControlNet(ControlNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_head_channels=16,
                                           context_dim=768))
    sd15 = _save(seeded_state({k: tuple(v.shape) for k, v in sd15.state_dict().items()}, 0), tmp_path / "sd15.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_controlnet(sd15, unet)
    assert str(err.value) == (f"{sd15} is a ControlNet for Stable Diffusion 1.x (cross-attention width 768); this "
                              "model's UNet needs one made for Stable Diffusion 2.1 (width 16).")
    with pytest.raises(CheckpointMismatchError) as err:
        load_controlnet(tiny512.checkpoint, unet)
    assert str(err.value) == (f"{tiny512.checkpoint} is a DynamiCrafter model checkpoint, not a ControlNet; give it "
                              "as the model's checkpoint and a ControlNet or sketch encoder as the control.")
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(tiny512.config, files["sketch"])
    assert str(err.value) == (f"{files['sketch']} is a ControlNet or sketch encoder, not a model checkpoint; give it "
                              "as the control (load_controlnet, --control) and the model's checkpoint as the model.")
    state = torch.load(files["sketch"], weights_only=True)
    del state["zero_convs.3.0.bias"]
    broken = _save(state, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_controlnet(broken, unet)
    assert str(err.value) == f"{broken} does not match a ControlNet: missing zero_convs.3.0.bias."


def test_control_image_counts(pipe, files, gradient_png):
    with pytest.raises(UserError) as err:
        _call(pipe, gradient_png, control_images=[_sketch()])
    assert str(err.value) == ("control_images needs a ControlNet or sketch encoder: load one first "
                              "(pipe.load_controlnet(path), --control).")
    pipe.load_controlnet(files["sketch"])
    try:
        with pytest.raises(UserError) as err:
            _call(pipe, gradient_png, control_images=[_sketch()] * 3)
        assert str(err.value) == ("control_images has 3 images, but the video has 4 frames: give one image per "
                                  "frame, one for all frames, or a dict {frame: image}.")
        with pytest.raises(UserError) as err:
            _call(pipe, gradient_png, control_images={4: _sketch()})
        assert str(err.value) == "control_images has an image for frame 4; the video's frames are 0 to 3."
        with pytest.raises(UserError) as err:
            _call(pipe, gradient_png, control_images=_sketch(), control_start=0.5, control_end=0.5)
        assert str(err.value) == "control_start must be below control_end, got 0.5 and 0.5."
    finally:
        pipe.unload_controlnets()


def test_sketch_guided_chain_matches_the_reference(pipe, files, gradient_png, monkeypatch):
    """A whole DDIM chain (5 steps, eta 1, guidance 7.5 rescaled 0.7, 16 frames) with the sketch encoder at 0.6,
    against ToonCrafter-with-sketch-guidance's sampler and apply_model (tinytoon's UNet is tiny512's)."""
    from dynamicrafter.diffusion.guidance import GuidanceBranches

    from .conftest import replay_noise

    ref = load_file(str(DATA / "controlnet_chain.safetensors"))
    pipe.load_controlnet(files["sketch"])
    try:
        sketches = [PIL_from(ref["sketch_u8"][0, 0, f]) for f in range(16)]
        request = pipe.check_inputs(gradient_png, "", num_inference_steps=5, num_frames=16, height=64, width=64,
                                    guidance_scale=7.5, guidance_rescale=0.7, eta=1.0, frame_stride=10,
                                    timestep_spacing="uniform_trailing", window_size=16, control_images=sketches)
        branches = GuidanceBranches(ref["context"], ref["concat"], ref["fs"], ref["uncond_context"])
        replay_noise(monkeypatch, ref["step_noise"])
        latents = pipe.denoise(request, branches, ref["x_T"])
    finally:
        pipe.unload_controlnets()
    assert relative_error(latents, ref["latents"]) < CHAIN_TOL


def PIL_from(grey: torch.Tensor):
    """A recorded hint (already grey and inverted) as the line art a user gives: inverted back, RGB."""
    from PIL import Image

    return Image.fromarray((255 - grey).numpy()).convert("RGB")


# ------------------------------------------------------------------ the command line
def test_command_line_with_a_sketch_folder(files, tmp_path, caplog):
    from dynamicrafter import cli

    from .conftest import make_image, read_video, tiny_args

    image = make_image(tmp_path / "in" / "cat.png")
    sketches = tmp_path / "sketches" / "cat"
    sketches.mkdir(parents=True)
    _sketch(0).save(sketches / "0.png")
    _sketch(8).save(sketches / "3.png")
    out = tmp_path / "out"
    argv = ["512", *tiny_args("tiny512"), "--image_path", str(image), "--output_dir", str(out), "--device", "cpu",
            "--control", str(files["sketch"]), "--control_dir", str(sketches.parent), "--control_scale", "0.8"]
    assert cli.main(argv) == 0
    assert read_video(out / "cat.mp4")[1] == 4
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["control"] == [str(files["sketch"])] and record["control_images"] == [str(sketches)]
    assert record["settings"]["control_scale"] == 0.8
    caplog.clear()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([*argv[:-4], "--control_dir", str(empty), "--overwrite"]) == 1
    assert caplog.records[-1].getMessage() == (
        f"No control images for cat.png in {empty}: give {empty / 'cat'}/ (one image per frame, "
        "or files named by frame number), cat.mp4 (a line-art video) or cat.png (every frame).")
    caplog.clear()
    assert cli.main(argv[:-4]) == 2
    assert "Give one --control_dir per --control (got 1 --control and 0 --control_dir)." in caplog.text


def test_convert_makes_a_half_precision_copy(files, tiny512, tmp_path):
    from dynamicrafter.convert import main

    target = tmp_path / "sketch_encoder-fp16.safetensors"
    assert main([str(files["sketch"]), str(target)]) == 0
    stored = load_file(str(target))
    assert set(stored) == set(torch.load(files["sketch"], weights_only=True))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert load_controlnet(target, tiny512.config.unet).config.hint_channels == 1


# ------------------------------------------------------------------ the app
def test_app_takes_sketches_per_key_frame_or_a_video(pipe, files, tmp_path, gradient_png):
    import inspect

    import gradio as gr
    import numpy as np

    from dynamicrafter.page import _VideoMaker, build_demo
    from dynamicrafter.video import save_video

    pipe.load_controlnet(files["sketch"])
    try:
        demo = build_demo(pipe)
        generate = next(f.fn for f in demo.fns.values() if f.api_name == "generate")
        assert list(inspect.signature(generate).parameters)[-7:-1] == [
            "random_seed", "mask", "control_files_0", "control_scale", "control_start", "control_end"]
        maker = _VideoMaker(pipe, 20)
        for frame in (0, 3):
            _sketch(frame).save(tmp_path / f"{frame}.png")
        values = {"control_files_0": [{"path": str(tmp_path / "0.png")}, {"path": str(tmp_path / "3.png")}],
                  "control_scale": 0.8, "control_start": 0.0, "control_end": 1.0}
        assert maker.control_kwargs(values) == {"control_images": {0: tmp_path / "0.png", 3: tmp_path / "3.png"},
                                                "control_scale": 0.8, "control_start": 0.0, "control_end": 1.0}
        assert values == {}
        video = save_video(np.stack([np.asarray(_sketch(i)) for i in range(4)]), tmp_path / "lines.mp4", fps=8)
        frames = maker.control_kwargs({"control_files_0": [{"path": str(video)}]})["control_images"]
        assert len(frames) == 4 and frames[0].size == (64, 64)
        assert maker.control_kwargs({"control_files_0": None, "control_scale": 0.6}) == {}  # no upload: no control
        calls = []

        class Recorder:  # the page's side only: what reaches the pipeline (the call itself is tested above)
            config, device, controlnets = pipe.config, pipe.device, pipe.controlnets
            save_video = staticmethod(pipe.save_video)

            def __call__(self, image, **kwargs):
                calls.append(kwargs)
                return {"videos": torch.zeros(1, 4, 3, 64, 64)}

        maker.pipeline = Recorder()
        _, _, timing = maker.generate({"path": str(gradient_png)}, "a line", False, gr.Progress(),
                                      num_inference_steps=2, frame_stride=10, num_frames=4, seed=1,
                                      negative_prompt="", guidance_scale=7.5, image_guidance_scale=0, sampler="ddim",
                                      eta=1.0, fps=8, window_size=4, window_stride=4, augmentation_level=0.0,
                                      start_step=1000, analytic_init=False, analytic_init_path="",
                                      control_files_0=[{"path": str(tmp_path / "0.png")}], control_scale=0.6,
                                      control_start=0.0, control_end=1.0)
        assert timing.startswith("Generated 4 frames")
        assert calls[0]["control_images"] == tmp_path / "0.png" and calls[0]["control_scale"] == 0.6
    finally:
        pipe.unload_controlnets()


# ------------------------------------------------------------------ other models
def test_tooncrafter_interpolation_with_key_frame_sketches(files, tmp_path, gradient_png):
    """ToonCrafter (tinytoon: its dual-reference decoder) between two key frames, sketches on both ends."""
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    from .test_tooncrafter import assemble_checkpoint

    pipe = DynamiCrafterImg2VideoPipeline("tooncrafter", device="cpu", dtype="float32",
                                          checkpoint=assemble_checkpoint(tmp_path / "tinytoon.ckpt"),
                                          config=DATA / "tinytoon.yaml")
    pipe.load_controlnet(files["safetensors"])  # the float16 copy
    kwargs = dict(end_image=gradient_png, num_inference_steps=2, num_frames=4, height=64, width=64,
                  return_dict=False)
    plain = pipe(gradient_png, "", generator=torch.Generator().manual_seed(3), **kwargs)
    steered = pipe(gradient_png, "", generator=torch.Generator().manual_seed(3),
                   control_images={0: _sketch(0), 3: _sketch(9)}, **kwargs)
    assert steered.shape == plain.shape == (1, 4, 3, 64, 64)
    assert relative_error(steered, plain) > 1e-4


def test_a_controlnet_on_the_256_model(files, tiny256, gradient_png):
    """The three-channel ControlNet (diffusers layout) steers the 256 model too (same tiny UNet shape)."""
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    pipe = DynamiCrafterImg2VideoPipeline.from_model(tiny256.model, device="cpu", dtype=torch.float32, cast=False)
    pipe.load_controlnet(files["diffusers"])
    plain = _call(pipe, gradient_png)
    steered = _call(pipe, gradient_png, control_images=gradient_png, control_scale=[1.0])
    assert relative_error(steered, plain) > 1e-3

