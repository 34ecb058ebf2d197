"""The web app's endpoints, called through gradio_client, with the tiny 256 model on CPU."""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Iterator

import av
import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from safetensors.torch import save_file

from dynamicrafter.configs import load_config
from dynamicrafter.page import build_demo
from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

from .conftest import DATA

UPLOAD_LIMIT_MB = 0.05  # small, so that the size check can be tried with a 256x256 noise PNG
FAST = dict(num_inference_steps=2, num_frames=4, guidance_scale=7.5, eta=1.0, frame_stride=3)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(demo: gr.Blocks) -> Iterator[Client]:
    """Launch ``demo`` in this process on a free local port and connect a client to it."""
    demo.queue(max_size=4, default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                quiet=True, ssr_mode=False)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # the client reads it when built
            yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def decode(path: str) -> tuple[str, list[np.ndarray]]:
    """The codec name and RGB frames of a video file."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


@pytest.fixture(scope="module")
def pipeline() -> DynamiCrafterImg2VideoPipeline:
    return DynamiCrafterImg2VideoPipeline("256", device="cpu", checkpoint=DATA / "tiny256.ckpt",
                                          config=DATA / "tiny256.yaml")


@pytest.fixture(scope="module")
def demo(pipeline) -> gr.Blocks:
    return build_demo(pipeline, max_upload_mb=UPLOAD_LIMIT_MB)


@pytest.fixture(scope="module")
def client(demo) -> Iterator[Client]:
    with serve(demo) as connected:
        yield connected


@pytest.fixture
def seen(pipeline, monkeypatch) -> dict:
    """The keyword arguments of the pipeline's latest call; the real call still runs."""
    kwargs_seen: dict = {}
    call = type(pipeline).__call__

    def spy(pipe, *args, **kwargs):
        kwargs_seen.update(kwargs)
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", spy)
    return kwargs_seen


def test_generate_returns_playable_mp4(client, pipeline, gradient_png):
    video, seed, timing = client.predict(
        image=handle_file(str(gradient_png)), prompt="a tiny robot dancing in the rain",
        negative_prompt="", seed=42, random_seed=False, api_name="/generate", **FAST)
    assert seed == 42
    assert timing.startswith("Generated 4 frames in ") and timing.endswith(" s")
    codec, frames = decode(video)
    assert codec == "h264"
    assert len(frames) == 4
    assert frames[0].shape == (pipeline.config.height, pipeline.config.width, 3)


def test_random_seed_is_reported(client, gradient_png):
    _, seed, _ = client.predict(image=handle_file(str(gradient_png)), prompt="", seed=0, random_seed=True,
                                api_name="/generate", **{**FAST, "num_frames": 2})
    assert isinstance(seed, int) and 0 <= seed < 2**32


def test_missing_image_gives_one_sentence(client):
    with pytest.raises(Exception) as info:
        client.predict(image=None, prompt="no picture", api_name="/generate", **FAST)
    assert str(info.value) == "Please upload the input image."


def test_non_image_upload_is_refused(client, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(text)), prompt="", api_name="/generate", **FAST)
    assert str(info.value) == "The input image is not an image file (PNG, JPEG, WebP, BMP or TIFF)."


def test_too_large_upload_is_refused(client, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(tmp_path / "noise.png")), prompt="", api_name="/generate",
                       **FAST)
    assert str(info.value) == "The input image is larger than the 0.05 MB upload limit."


def test_out_of_range_value_is_refused(client, gradient_png):
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                       **{**FAST, "num_inference_steps": 500})
    assert str(info.value) == "Sampling steps must be between 1 and 100, got 500."


def test_no_interpolation_tab_for_a_non_interp_model(client, demo, pipeline):
    assert not pipeline.config.interp
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/generate" in endpoints
    assert "/interpolate" not in endpoints
    components = demo.get_config_file()["components"]
    labels = {c.get("props", {}).get("label") for c in components}
    assert "Input image" in labels
    assert not {"Start image", "End image", "Interpolation / looping"} & labels
    assert not {"tabs", "tabitem"} & {c["type"] for c in components}


def test_examples_come_from_the_prompts_folder(demo):
    folder = Path(__file__).parents[1] / "prompts" / "256"  # the tiny config falls back to 256
    expected = sorted(p.name for p in folder.glob("*.png") if p.with_suffix(".txt").is_file())
    assert expected, "prompts/256 should ship example images with .txt prompts"
    (dataset,) = [c for c in demo.get_config_file()["components"] if c["type"] == "dataset"]
    assert len(dataset["props"]["samples"]) == len(expected)


def test_interpolation_model_gets_the_looping_tab(gradient_png):
    config = load_config(DATA / "tiny256.yaml").replace(interp=True)  # the tiny model as an interp model
    pipe = DynamiCrafterImg2VideoPipeline("256", device="cpu", checkpoint=DATA / "tiny256.ckpt",
                                          config=config)
    demo = build_demo(pipe)
    labels = {c.get("props", {}).get("label") for c in demo.get_config_file()["components"]}
    assert {"Interpolation / looping", "Start image", "End image"} <= labels
    with serve(demo) as client:
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert "/interpolate" in endpoints and "/generate" not in endpoints
        with pytest.raises(Exception) as info:
            client.predict(start_image=handle_file(str(gradient_png)), end_image=None, loop=False,
                           prompt="", api_name="/interpolate", **FAST)
        assert str(info.value) == "Please upload the end image."
        with pytest.raises(Exception) as info:  # the embedding mix, checked like every control
            client.predict(start_image=handle_file(str(gradient_png)), end_image=handle_file(str(gradient_png)),
                           loop=False, prompt="", image_embed_ratio=2, api_name="/interpolate", **FAST)
        assert str(info.value) == "Start/end image embedding mix must be between 0 and 1, got 2."
        with pytest.raises(Exception) as info:  # the command line's rule: a 2-frame loop would be 1 frame
            client.predict(start_image=handle_file(str(gradient_png)), end_image=None, loop=True, prompt="",
                           api_name="/interpolate", **{**FAST, "num_frames": 2})
        assert str(info.value) == ("Number of frames must be at least 3 for a loop (two frames remain once the "
                                   "repeated last one is dropped), got 2.")
        video, _, timing = client.predict(start_image=handle_file(str(gradient_png)), end_image=None,
                                          loop=True, prompt="", api_name="/interpolate", **FAST)
        keyframes = [handle_file(str(gradient_png))] * 3  # the keyframes tab: one video through them, looping
        keyed_video, _, keyed = client.predict(keyframes=keyframes, loop=True, prompt="p",
                                               api_name="/keyframes", **{**FAST, "num_frames": 2})
        with pytest.raises(Exception) as info:
            client.predict(keyframes=keyframes[:1], loop=False, prompt="", api_name="/keyframes", **FAST)
        assert str(info.value) == "keyframes needs at least 2 images (a start and an end keyframe), got 1."
    assert timing.startswith("Generated 3 frames in ")  # the repeated first frame is dropped
    assert len(decode(video)[1]) == 3
    assert keyed.startswith("Generated 3 frames in ") and len(decode(keyed_video)[1]) == 3  # 3 x 2 - 3 x 1


def test_listens_on_localhost_unless_told_otherwise():
    from dynamicrafter.app import _parser

    args = _parser().parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


@pytest.mark.parametrize("flags, message", [
    (["--keep-minutes", "nan"], "--keep-minutes: must be a finite number, got nan."),
    (["--keep-minutes", "0"], "--keep-minutes: must be between 1 and 10080, got 0."),
    (["--port", "70000"], "--port: must be between 1 and 65535, got 70000."),
    (["--queue-size", "0"], "--queue-size: must be between 1 and 10000, got 0."),
])
def test_server_flags_are_checked_before_the_model_loads(flags, message, caplog):
    """--keep-minutes nan used to end in a traceback after the model had loaded."""
    from dynamicrafter.app import main

    assert main(flags) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [message]


def test_a_malformed_lora_stops_start_up_with_one_line(tmp_path, caplog):
    from dynamicrafter.app import main

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("[1, 2]", encoding="utf-8")
    save_file({"base_model.model.out.2.lora_A.weight": torch.zeros(4, 8),
               "base_model.model.out.2.lora_B.weight": torch.zeros(8, 4)}, str(lora / "adapter_model.safetensors"))
    assert main(["--res", "256", "--device", "cpu", "--checkpoint", str(DATA / "tiny256.ckpt"), "--config",
                 str(DATA / "tiny256.yaml"), "--lora", str(lora)]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(f"LoRA config {lora / 'adapter_config.json'} holds a list, not a JSON object")


def test_missing_checkpoint_is_one_error_line(tmp_path, monkeypatch, caplog):
    from dynamicrafter.app import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no checkpoints/ folder here
    assert main(["--res", "256", "--device", "cpu"]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "HF_HUB_OFFLINE is set" in error and "\n" not in error


def test_url_only_payload_is_one_sentence(client):
    """A file payload with only a URL (nothing uploaded) used to crash the handler."""
    payload = {"path": None, "url": "http://127.0.0.1:9/cat.png", "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(Exception) as info:
        client.predict(image=payload, prompt="", api_name="/generate", **FAST)
    assert str(info.value) == "Please upload the input image as a file."


def test_each_video_is_kept_once_and_aged_out(pipeline, gradient_png, tmp_path, monkeypatch):
    """Written straight into Gradio's cache (not a private folder plus Gradio's copy), and deleted after an hour."""
    cache = tmp_path / "server-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    demo = build_demo(pipeline)
    with serve(demo) as client:
        downloaded, _, _ = client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                                          **{**FAST, "num_frames": 2})
        on_server = [p for p in cache.rglob("*.mp4") if p != Path(downloaded)]  # the client saves its own copy
        assert len(on_server) == 1 and on_server[0].read_bytes() == Path(downloaded).read_bytes()
    assert demo.delete_cache == (600, 3600)


def test_sampler_and_two_scale_guidance_from_the_page(client, gradient_png):
    video, _, _ = client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                                 **{**FAST, "num_frames": 2, "sampler": "unipc", "image_guidance_scale": 2.0})
    assert len(decode(video)[1]) == 2
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                       **{**FAST, "sampler": "euler"})
    assert str(info.value) == "Unknown sampler 'euler'; choose one of: ddim, dpmpp_2m, unipc."


def test_window_controls_are_hidden_up_to_the_trained_length_and_reach_the_pipeline(client, seen, demo, pipeline,
                                                                                       gradient_png):
    components = demo.get_config_file()["components"]
    (row,) = [c for c in components if c.get("props", {}).get("elem_id") == "windows"]
    assert row["props"]["visible"] is False
    labels = {c.get("props", {}).get("label") for c in components}
    assert {"Window size (frames)", "Window stride (frames)"} <= labels
    _, _, timing = client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                                  **{**FAST, "num_frames": 6, "window_size": 4, "window_stride": 2})
    assert timing.startswith("Generated 6 frames in ")
    assert (seen["window_size"], seen["window_stride"]) == (4, 2)
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                       **{**FAST, "num_frames": 6, "window_size": 4, "window_stride": 5})
    assert str(info.value) == ("window_stride must be at most window_size (4), got 5: windows further apart would "
                               "leave frames without temporal attention.")


def test_timed_prompts_from_the_page(client, seen, pipeline, gradient_png):
    _, _, timing = client.predict(image=handle_file(str(gradient_png)), prompt="0: a cat sits | 3: a cat jumps",
                                  api_name="/generate", **FAST)
    assert timing.startswith("Generated 4 frames in ") and seen["prompt"] == {0: "a cat sits", 3: "a cat jumps"}
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="0: a cat sits | 4: a cat jumps",
                       api_name="/generate", **FAST)
    assert str(info.value) == "Prompt schedule frame 4 is outside the video's frames 0 to 3."


def test_leakage_free_start_controls_reach_the_pipeline(client, seen, demo, pipeline, gradient_png):
    components = demo.get_config_file()["components"]
    (step,) = [c for c in components if c.get("props", {}).get("elem_id") == "start-step"]
    assert (step["props"]["value"], step["props"]["maximum"]) == (1000, 1000)
    client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                   **{**FAST, "start_step": 600})
    assert (seen["start_step"], seen["analytic_init"], seen["analytic_init_path"]) == (600, False, None)
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                       **{**FAST, "analytic_init": True, "analytic_init_path": "/no/such/initial_noise_512.pt"})
    assert str(info.value) == "analytic_init_path /no/such/initial_noise_512.pt does not exist."


class _FakeDemo:
    """Stands in for the page's Blocks: records how it is launched; serves until its first look."""

    local_url, share_url = "http://127.0.0.1:7860/", None

    def __init__(self) -> None:
        self.launched: dict = {}
        self.closed = False

    def queue(self, **options):
        return self

    def launch(self, **options):
        self.launched = options

    @property
    def is_running(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def test_the_app_logs_as_the_command_line_and_its_hint_names_share(monkeypatch, caplog):
    """Gradio's own start-up lines (its "set share=True in launch()" hint) give way to one line of the app's log."""
    from dynamicrafter import app, page

    demo = _FakeDemo()
    monkeypatch.setattr(app.frontend, "build_pipeline", lambda args, resolution, device: object())
    monkeypatch.setattr(page, "build_demo", lambda pipeline, **options: demo)
    caplog.set_level(logging.INFO)
    assert app.main(["256", "--device", "cpu"]) == 0
    assert (demo.launched["quiet"], demo.launched["share"], demo.closed) == (True, False, True)
    assert caplog.messages[-1] == ("Serving on http://127.0.0.1:7860/; Ctrl-C stops it. For a public link, start the app "
                                   "with --share.")


def test_motion_mask_upload_and_augmentation_reach_the_pipeline(client, seen, pipeline, gradient_png, tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    _, _, timing = client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                                  mask={"background": handle_file(str(tmp_path / "mask.png")), "layers": [],
                                        "composite": None},
                                  **{**FAST, "num_frames": 2, "augmentation_level": 0.05})
    assert timing.startswith("Generated 2 frames in ")
    assert seen["mask"].mode == "L" and np.array_equal(np.asarray(seen["mask"]), mask)
    assert seen["augmentation_level"] == 0.05
    layer = np.zeros((32, 32, 4), np.uint8)  # a drawing on a canvas of another size: stretched to the image
    layer[:, 16:] = (255, 255, 255, 200)  # brushed: the right half moves
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                   mask={"background": handle_file(str(gradient_png)), "layers": [handle_file(str(tmp_path / "layer.png"))],
                         "composite": None}, **{**FAST, "num_frames": 1, "num_inference_steps": 1})
    assert np.array_equal(np.asarray(seen["mask"]), mask)
    Image.fromarray(mask[:, :16]).save(tmp_path / "narrow.png")
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="", api_name="/generate",
                       mask={"background": handle_file(str(tmp_path / "narrow.png")), "layers": [],
                             "composite": None}, **FAST)
    assert str(info.value) == ("The mask is 16x64 pixels but the image is 64x64; give a mask of the image's size "
                               "or aspect ratio.")


def test_chained_segments_from_the_page_take_one_prompt_line_each(client, pipeline, gradient_png, monkeypatch):
    seen = []
    call = type(pipeline).__call__

    def spy(pipe, *args, **kwargs):
        seen.append(kwargs.get("prompt", args[1] if len(args) > 1 else None))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", spy)
    _, _, timing = client.predict(image=handle_file(str(gradient_png)), prompt="walks\nruns", api_name="/generate",
                                  **{**FAST, "num_frames": 2, "segments": 2, "overlap": 1})
    assert timing.startswith("Generated 3 frames in ")  # 2 x 2 - 1
    assert seen == [["walks", "runs"], "walks", "runs"]  # the sequence call, then each segment's
    with pytest.raises(Exception) as info:
        client.predict(image=handle_file(str(gradient_png)), prompt="a\nb\nc", api_name="/generate",
                       **{**FAST, "segments": 2, "overlap": 1})
    assert str(info.value) == "Got 2 segments but 3 prompts; give one prompt per segment or a single prompt."
