"""The request (dynamicrafter/request.py): every bad input is one sentence before any model work; the rules
every front end shares (modes, frame floors, loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamicrafter.configs import get_config
from dynamicrafter.errors import UserError
from dynamicrafter.request import check_frames, check_mode, close_loop, frame_floor

from .conftest import tiny_pipeline

FAST = dict(num_inference_steps=2, num_frames=3, height=64, width=64)
IMAGE = np.full((64, 64, 3), 90, dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("tiny256", dtype="float32")


@pytest.fixture
def no_model_work(pipe, monkeypatch):
    """Fail the test if an encoder, the UNet or the VAE runs."""
    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the inputs were checked")

    for name in ("encode_text", "encode_image_tokens", "encode_latents", "decode_latents"):
        monkeypatch.setattr(pipe.model, name, forbidden)
    monkeypatch.setattr(pipe, "_unet_forward", forbidden)


#: The one table of input errors: what is given (on top of a good call) and the whole sentence said.
BAD_INPUTS = [
    (dict(latents=torch.full((1, 4, 3, 8, 8), float("nan"))), "latents hold NaN or infinite values."),
    (dict(latents=torch.full((1, 4, 3, 8, 8), float("inf"))), "latents hold NaN or infinite values."),
    (dict(latents=np.zeros((1, 4, 3, 8, 8), dtype=np.float32)), "latents must be a torch.Tensor, got ndarray."),
    (dict(latents=torch.zeros((1, 4, 3, 8, 8), dtype=torch.long)),
     "latents must be a floating-point tensor, got torch.int64."),
    (dict(latents=torch.zeros(1, 4, 3, 4, 4)), "latents must have shape [1, 4, 3, 8, 8], got [1, 4, 3, 4, 4]."),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan."),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf."),
    (dict(guidance_scale="7.5"), "guidance_scale must be a number, got str '7.5'."),
    (dict(guidance_scale=-2.0), "guidance_scale must be between 0 and 100, got -2."),
    (dict(image_guidance_scale=-1.0), "image_guidance_scale must be between 0 and 100, got -1."),
    (dict(image_guidance_scale="2"), "image_guidance_scale must be a number, got str '2'."),
    (dict(eta=float("nan")), "eta must be a finite number, got nan."),
    (dict(eta=2.0), "eta must be between 0 and 1, got 2."),
    (dict(eta=-1.0), "eta must be between 0 and 1, got -1."),
    (dict(num_frames=10**9), "num_frames must be between 1 and 128, got 1000000000."),
    (dict(num_frames=0), "num_frames must be between 1 and 128, got 0."),
    (dict(num_frames=True), "num_frames must be a whole number, got bool True."),
    (dict(num_frames=3.5), "num_frames must be a whole number, got 3.5."),
    (dict(num_inference_steps=0), "num_inference_steps must be between 1 and 1000, got 0."),
    (dict(frame_stride=-5), "frame_stride must be between 1 and 100, got -5."),
    (dict(height=4096), "height must be between 64 and 2048, got 4096."),
    (dict(height=100), "height must be a multiple of 64 pixels, got 100."),
    (dict(width=0), "width must be between 64 and 2048, got 0."),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt must be between 1 and 64, got 0."),
    (dict(timestep_spacing="quad"), "Unknown timestep_spacing 'quad'; choose one of: uniform, uniform_trailing."),
    (dict(sampler="euler"), "Unknown sampler 'euler'; choose one of: ddim, dpmpp_2m, unipc."),
    (dict(output_type="gif"), "Unknown output_type 'gif'; choose one of: pt, np, latent."),
    (dict(generator=123), "generator must be a torch.Generator or a list of them, got int; for a seed use "
                          "torch.Generator().manual_seed(seed)."),
    (dict(generator=[torch.Generator()] * 2), "Got 2 generators for 1 video(s); give one per video "
                                              "(images x num_videos_per_prompt) or a single generator."),
    (dict(image=[], prompt=[]), "No image given; pass an image or a non-empty list of images."),
    (dict(image=None), "image is required."),
    (dict(image="does/not/exist.png"), "Image does/not/exist.png does not exist."),
    (dict(prompt=5), "prompt must be a string (or a list of strings), got int."),
    (dict(prompt=["a", "b"]), "Got 1 image(s) but 2 prompt(s); give one prompt per image."),
    (dict(negative_prompt=["a", "b"]), "Got 1 image(s) but 2 negative_prompt(s); give one negative_prompt per image."),
    (dict(end_image=IMAGE), "end_image needs an interpolation model (512_interp or tooncrafter), not tiny256."),
    (dict(callback=3), "callback must be callable, got int."),
    (dict(callback_on_step_end=3), "callback_on_step_end must be a function (pipe, step, t, tensors) -> dict or None."),
    (dict(callback_on_step_end_tensor_inputs=["noise"]),
     "callback_on_step_end_tensor_inputs must be a list drawn from latents, denoised; got ['noise']."),
    (dict(num_frames=129), "num_frames must be between 1 and 128, got 129."),
    (dict(window_stride=0), "window_stride must be between 1 and 128, got 0."),
    (dict(window_size=0), "window_size must be between 1 and 128, got 0."),
    (dict(window_size=2.5), "window_size must be a whole number, got 2.5."),
    (dict(window_stride=5), "window_stride must be at most window_size (4), got 5: windows further apart would "
                            "leave frames without temporal attention."),
    (dict(window_size=8, window_stride=12), "window_stride must be at most window_size (8), got 12: windows further "
                                            "apart would leave frames without temporal attention."),
    (dict(noise_rescheduling="yes"), "noise_rescheduling must be True or False, got str 'yes'."),
    (dict(noise_rescheduling=1), "noise_rescheduling must be True or False, got int 1."),
    (dict(augmentation_level=1.5), "augmentation_level must be between 0 and 1, got 1.5."),
    (dict(augmentation_level=-0.1), "augmentation_level must be between 0 and 1, got -0.1."),
    (dict(image_embed_ratio=2.0), "image_embed_ratio must be between 0 and 1, got 2."),
    (dict(image_embed_ratio=0.5), "image_embed_ratio mixes the start and end images' embeddings; it needs an "
                                  "end_image (an interpolation model), or leave it at 1."),
    (dict(mask=np.zeros((64, 32), np.uint8)), "The mask is 32x64 pixels but the image is 64x64; give a mask of "
                                              "the image's size or aspect ratio."),
    (dict(mask=np.zeros((64, 64, 2), np.uint8)),
     "The mask array must be HxW (greyscale), HxWx3 or HxWx4, got shape (64, 64, 2)."),
    (dict(mask=np.zeros((64, 64), np.int64)), "The mask array must be uint8, uint16 or float in [0, 1], got int64."),
    (dict(mask="does/not/exist.png"), "Mask does/not/exist.png does not exist."),
    (dict(mask=[IMAGE, IMAGE]), "Got 1 image(s) but 2 mask(s); give one mask per image."),
    (dict(prompt={}), "The prompt schedule is empty; give at least one frame and its prompt, "
                      "e.g. {0: 'a cat sits', 48: 'a cat jumps'}."),
    (dict(prompt={0: "a", 3: "b"}), "Prompt schedule frame 3 is outside the video's frames 0 to 2."),
    (dict(prompt={-1: "a", 2: "b"}), "Prompt schedule frame -1 is outside the video's frames 0 to 2."),
    (dict(prompt={"0": "a", 2: "b"}), "Prompt schedule frames must be integers, got '0'."),
    (dict(prompt={0.5: "a"}), "Prompt schedule frames must be integers, got 0.5."),
    (dict(prompt={True: "a"}), "Prompt schedule frames must be integers, got True."),
    (dict(prompt={0: "a", 2: None}), "The prompt of schedule frame 2 must be a string, got NoneType."),
    (dict(prompt=[{0: "a", 2: 5}]), "The prompt of schedule frame 2 must be a string, got int."),
    (dict(segments=0), "segments must be between 1 and 64, got 0."),
    (dict(segments=2.0), "segments must be a whole number, got 2.0."),
    (dict(segments=2, overlap=3), "overlap must be less than num_frames (3), got 3: each segment needs frames of "
                                  "its own."),
    (dict(overlap=-1), "overlap must be between 0 and 127, got -1."),
    (dict(segments=3, prompt=["a", "b"], overlap=1), "Got 3 segments but 2 prompts; give one prompt per segment or a single "
                                          "prompt."),
    (dict(segments=2, negative_prompt=["a", "b", "c"]),
     "Got 2 segments but 3 negative_prompts; give one negative_prompt per segment or a single negative_prompt."),
    (dict(segments=2, image=[IMAGE, IMAGE]), "segments make one video from one image, got 2 images; call once per "
                                             "image."),
    (dict(segments=2, num_videos_per_prompt=2), "segments and keyframes make one video per call; "
                                                "num_videos_per_prompt must be 1, got 2."),
    (dict(segments=2, latents=torch.zeros(1, 4, 3, 8, 8)), "latents cannot be given with segments or keyframes: "
                                                            "each piece draws its own noise from the generator."),
    (dict(segments=2, output_type="latent"), "output_type 'latent' is not available with segments or keyframes: "
                                             "the pieces are joined as frames."),
    (dict(segments=2, generator=[torch.Generator()] * 2), "Got 2 generators for 1 video; segments and keyframes "
                                                          "make one video, from a single generator."),
    (dict(image=None, keyframes=[IMAGE, IMAGE]),
     "keyframes needs an interpolation model (512_interp or tooncrafter), not tiny256."),
    (dict(segments=2, keyframes=[IMAGE, IMAGE]), "segments and keyframes cannot be combined; keyframes already make "
                                                 "one interpolation per pair of keyframes."),
    (dict(loop=True), "loop closes a keyframe sequence; give keyframes=[...] (for a looping video of one image pass "
                      "end_image=image)."),
    (dict(loop="yes"), "loop must be True or False, got str 'yes'."),
    (dict(cut_near_keyframes=6), "cut_near_keyframes must be between 0 and 5, got 6."),
    (dict(segments=2, prompt={0: "a", 2: "b"}), "A prompt schedule ({frame: prompt}) times the frames of one call; "
                                                "with segments or keyframes give one prompt per segment instead."),
    (dict(start_step=0), "start_step must be between 1 and 1000, got 0."),
    (dict(start_step=1001), "start_step must be between 1 and 1000, got 1001."),
    (dict(start_step=2.5), "start_step must be a whole number, got 2.5."),
    (dict(start_step=1), "num_inference_steps (2) can be at most start_step (1): the sampler visits that many "
                         "distinct timesteps below it."),
    (dict(analytic_init_path="does/not/exist.pt"), "analytic_init_path does/not/exist.pt does not exist."),
    (dict(analytic_init="does/not/exist.pt"), "analytic_init_path does/not/exist.pt does not exist."),
    (dict(analytic_init="a.pt", analytic_init_path="b.pt"), "Give the Analytic-Init statistics file once: "
                                                          "analytic_init=True with analytic_init_path=FILE, or "
                                                          "analytic_init=FILE."),
    (dict(analytic_init=1), "analytic_init must be True or False, got int 1."),
    (dict(analytic_init=True), "analytic_init uses the CIL authors' statistics, published for the 512 and 1024 "
                               "models; for the tiny256 model give a statistics file with analytic_init_path."),
    (dict(control_scale=3.0), "control_scale must be between 0 and 2, got 3."),
    (dict(control_scale="0.6"), "control_scale must be a number, got str '0.6'."),
    (dict(control_scale=[0.5, float("nan")]), "control_scale must be a finite number, got nan."),
    (dict(control_start=0.5, control_end=0.25), "control_start must be below control_end, got 0.5 and 0.25."),
    (dict(control_end=1.5), "control_end must be between 0 and 1, got 1.5."),
    (dict(control_images=IMAGE), "control_images needs a ControlNet or sketch encoder: load one first "
                                 "(pipe.load_controlnet(path), --control)."),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_input_is_one_sentence_before_any_model_work(pipe, no_model_work, kwargs, message):
    args = dict(image=IMAGE, prompt="x", **FAST)
    args.update(kwargs)
    with pytest.raises(UserError) as info:
        pipe(**args)
    assert str(info.value) == message


def test_an_image_that_is_not_an_image_is_one_sentence(pipe, no_model_work, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"^Image .*broken.png is not an image file"):
        pipe(bad, "x", **FAST)
    with pytest.raises(UserError, match=r"^The image array must be HxW, HxWx3 or HxWx4"):
        pipe(np.zeros((4, 4, 2)), "x", **FAST)


def test_none_prompt_is_the_empty_prompt(pipe, monkeypatch):
    seen = []
    encode = pipe.model.encode_text
    monkeypatch.setattr(pipe.model, "encode_text", lambda prompts: seen.append(list(prompts)) or encode(prompts))
    pipe(IMAGE, None, num_inference_steps=1, num_frames=1, height=64, width=64, guidance_scale=1.0,
         output_type="latent")
    assert seen == [[""]]


@pytest.mark.parametrize(("name", "mode", "decoded", "least"), [
    ("256", "single", True, 1), ("512_interp", "interp", True, 2), ("512_interp", "loop", True, 3),
    ("tooncrafter", "single", True, 4), ("tooncrafter", "loop", True, 4), ("tooncrafter", "interp", False, 2),
])
def test_frame_floor_per_mode_and_model(name, mode, decoded, least):
    config = get_config(name)
    assert frame_floor(config, mode, decoded)[0] == least
    assert check_frames(config, least, mode, decoded=decoded) == least
    with pytest.raises(UserError, match=rf"^num_frames must be at least {least} for .*, got {least - 1}\.$"):
        check_frames(config, least - 1, mode, decoded=decoded)


def test_interp_and_loop_need_an_interpolation_model():
    check_mode(get_config("512_interp"), "loop")
    with pytest.raises(UserError, match=r"^--loop needs an interpolation model \(512_interp or tooncrafter\), "
                                        r"not 512\.$"):
        check_mode(get_config("512"), "loop", "--loop")


def test_a_loop_drops_its_repeated_last_frame():
    videos = torch.arange(2 * 5).view(2, 5)
    assert close_loop(videos).tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]


def test_check_inputs_names_an_unknown_argument_and_returns_the_request(pipe, no_model_work):
    with pytest.raises(UserError) as info:
        pipe.check_inputs(IMAGE, "x", num_frame=3)
    assert str(info.value) == "Unknown argument(s): num_frame."
    request = pipe.check_inputs(IMAGE, "x", num_frames=3)
    assert (request.num_frames, request.frame_stride, request.latent_shape) == (3, 3, (1, 4, 3, 32, 32))
