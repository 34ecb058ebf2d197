"""The run_pipeline command line, its shell wrapper and the API examples.

Most tests swap the pipeline for a recording fake; the ``real`` ones at the end run the actual
pipeline on the tiny test checkpoints and read the videos back with PyAV.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dynamicrafter import cli, pipeline
from dynamicrafter.__main__ import main as dynamicrafter_command
from dynamicrafter.configs import get_config, model_config
from dynamicrafter.errors import UserError
from dynamicrafter.hub import CheckpointError
from dynamicrafter.jobs import output_names
from dynamicrafter.video import save_video

from .conftest import DATA, ROOT, make_image, read_video, tiny_args

RUN_PIPELINE = ROOT / "scripts" / "run_pipeline.py"
RUN_SHELL = ROOT / "scripts" / "run_pipeline.sh"
EXAMPLES = ROOT / "scripts" / "pipeline_examples.py"
REFUSED_SIZE = (13, 13)  # the fake pipeline raises ValueError for images of this size


class FakePipeline:
    """Stands in for DynamiCrafterImg2VideoPipeline: records how it is built and called."""

    created: list[FakePipeline]

    def __init__(self, resolution="256", device=None, checkpoint=None, config=None, dtype=None, **options) -> None:
        self.init = dict(resolution=resolution, device=device, checkpoint=checkpoint, config=config, dtype=dtype,
                         **options)
        self.device = torch.device("cpu")
        self.config = get_config(resolution)
        self.checkpoint = checkpoint
        self.dtype = torch.float32
        self.quantize = options.get("quantize", "none")
        self.calls: list[dict] = []
        self.saved: list[tuple[Path, int]] = []
        self.frames_saved: list[int] = []
        self.created.append(self)

    def __call__(self, image, prompt="", **kwargs):
        if any(item.size == REFUSED_SIZE for item in image):
            raise UserError("The image is too small.")
        self.calls.append(dict(image=image, prompt=prompt, **kwargs))
        return {"videos": torch.rand(len(image), kwargs["num_frames"], 3, 8, 8)}

    def load_lora_weights(self, path, scale=1.0) -> None:
        self.lora = (path, scale)

    def save_video(self, videos, path, fps=8) -> None:
        assert videos.shape[0] == 1
        save_video(videos[0], path, fps=fps)  # a real (8x8) video: the CLI checks what is on disk
        self.saved.append((Path(path), fps))
        self.frames_saved.append(videos.shape[1])


@pytest.fixture
def fake(monkeypatch, caplog) -> list[FakePipeline]:
    """Make the CLI build FakePipelines; returns the list of those it built."""
    caplog.set_level(logging.INFO)

    class Recording(FakePipeline):
        created = []

    monkeypatch.setattr(pipeline, "DynamiCrafterImg2VideoPipeline", Recording)
    return Recording.created


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------- guide commands


def test_single_image_with_prompt_text(fake, tmp_path):
    image = make_image(tmp_path / "pour_bear.png")
    out = tmp_path / "results" / "single_test"
    code = cli.main(["256", "--image_path", str(image), "--prompt_text", "a person walking in a beautiful garden",
                     "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    (pipe,) = fake
    assert pipe.init == dict(resolution="256", device=torch.device("cpu"), checkpoint=None, config=None, dtype=None,
                             offload=None, compile=False, clip_checkpoint=None, quantize="none")
    (call,) = pipe.calls
    assert call["prompt"] == ["a person walking in a beautiful garden"]
    assert [item.size for item in call["image"]] == [(64, 64)]
    assert call["negative_prompt"] is None
    assert (call["num_inference_steps"], call["guidance_scale"], call["eta"], call["num_frames"]) == (50, 7.5, 1.0, 16)
    assert call["frame_stride"] is None and call["guidance_rescale"] is None and call["timestep_spacing"] is None
    assert [g.initial_seed() for g in call["generator"]] == [123]
    assert pipe.saved == [(out / "pour_bear.mp4", 8)]
    assert (out / "pour_bear.mp4").is_file()


def test_folder_with_same_name_txt_prompts(fake, tmp_path, caplog):
    folder = tmp_path / "my_images"
    make_image(folder / "image1.png")
    make_image(folder / "image2.jpg")
    (folder / "image1.txt").write_text("  waves crashing\n")
    (folder / "image2.txt").write_text("clouds drifting")
    out = tmp_path / "my_results"
    code = cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--num_inference_steps", "25",
                     "--device", "cpu"])
    assert code == 0
    (pipe,) = fake
    assert [call["prompt"] for call in pipe.calls] == [["waves crashing"], ["clouds drifting"]]
    assert all(call["num_inference_steps"] == 25 for call in pipe.calls)
    assert [path for path, _ in pipe.saved] == [out / "image1.mp4", out / "image2.mp4"]
    assert "2 done, 0 failed" in caplog.text
    assert str(out / "image2.mp4") in caplog.text


def test_folder_with_test_prompts_txt(fake, tmp_path, caplog):
    folder = tmp_path / "prompts"
    for name in ("c.png", "a.png", "b.PNG", "d.tif"):
        make_image(folder / name)
    (folder / "test_prompts.txt").write_text("prompt a\n\nprompt b\nprompt c\n")
    (folder / "c.txt").write_text("own prompt of c")
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]) == 0
    prompts = [call["prompt"][0] for call in fake[0].calls]
    assert prompts == ["prompt a", "prompt b", "own prompt of c", ""]
    assert any("test_prompts.txt has 3 prompts for 4 images" in message for message in warnings(caplog))
    assert any("d.tif" in message and "empty prompt" in message for message in warnings(caplog))


def test_test_prompts_txt_applies_to_a_single_image_of_that_folder(fake, tmp_path):
    folder = tmp_path / "prompts" / "1024"
    make_image(folder / "bear.png")
    make_image(folder / "pour_bear.png")
    (folder / "test_prompts.txt").write_text("a bear\na bear pouring tea\n")
    cli.main(["1024", "--image_path", str(folder / "pour_bear.png"), "--output_dir", str(tmp_path), "--device", "cpu"])
    assert fake[0].calls[0]["prompt"] == ["a bear pouring tea"]


def test_prompt_text_wins_over_prompt_files(fake, tmp_path):
    folder = tmp_path / "in"
    make_image(folder / "x.png")
    (folder / "x.txt").write_text("from the file")
    cli.main(["256", "--prompt_dir", str(folder), "--prompt_text", "from the flag", "--output_dir", str(tmp_path),
              "--device", "cpu"])
    assert fake[0].calls[0]["prompt"] == ["from the flag"]


def test_image_without_prompt_warns_and_uses_empty_prompt(fake, tmp_path, caplog):
    image = make_image(tmp_path / "lonely.bmp")
    assert cli.main(["256", "--image_path", str(image), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert fake[0].calls[0]["prompt"] == [""]
    assert any("lonely.bmp" in message for message in warnings(caplog))


@pytest.mark.parametrize("resolution, name", [("256", "256"), ("256_256", "256"), ("512", "512"), ("320_512", "512"),
                                              ("1024", "1024"), ("512_interp", "512_interp")])
def test_default_prompt_and_output_dirs(fake, tmp_path, monkeypatch, resolution, name):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "prompts" / name / "scene.png")
    assert cli.main([resolution, "--seed", "456", "--device", "cpu"]) == 0
    assert fake[0].init["resolution"] == name
    assert fake[0].saved == [(Path("results") / f"dynamicrafter_pipeline_{name}_seed456" / "scene.mp4", 8)]
    assert (tmp_path / "results" / f"dynamicrafter_pipeline_{name}_seed456" / "scene.mp4").is_file()


def test_batch_size_groups_images_into_one_call(fake, tmp_path):
    folder = tmp_path / "in"
    for index in range(5):
        make_image(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"prompt {index}")
    code = cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--batch_size", "2",
                     "--seed", "99", "--device", "cpu"])
    assert code == 0
    calls = fake[0].calls
    assert [call["prompt"] for call in calls] == [["prompt 0", "prompt 1"], ["prompt 2", "prompt 3"], ["prompt 4"]]
    assert [len(call["image"]) for call in calls] == [2, 2, 1]
    assert [[g.initial_seed() for g in call["generator"]] for call in calls] == [[99, 99], [99, 99], [99]]
    assert [path.name for path, _ in fake[0].saved] == [f"img{index}.mp4" for index in range(5)]


def test_every_flag_reaches_the_pipeline(fake, tmp_path, monkeypatch):
    image = make_image(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.yaml").write_text((DATA / "tiny512.yaml").read_text())  # read before any model work
    code = cli.main([
        "512", "--image_path", str(image), "--prompt_text", "p", "--output_dir", str(tmp_path / "o"),
        "--seed", "5", "--device", "cpu", "--num_inference_steps", "3", "--guidance_scale", "2.5", "--eta", "0",
        "--video_length", "4", "--frame_stride", "7", "--negative_prompt", "blurry", "--fps", "12",
        "--checkpoint", "ck.ckpt", "--config", "model.yaml", "--dtype", "bfloat16", "--guidance_rescale", "0.3",
        "--timestep_spacing", "uniform_trailing", "--offload", "model", "--compile", "--clip_checkpoint", "clip.bin",
        "--sampler", "unipc", "--cfg_img", "2.5", "--height", "128", "--width", "192", "--quantize", "fp8_weights",
    ])
    assert code == 0
    (pipe,) = fake
    assert pipe.init == dict(resolution="512", device=torch.device("cpu"), checkpoint="ck.ckpt",
                             config="model.yaml", dtype="bfloat16", offload="model", compile=True,
                             quantize="fp8_weights", clip_checkpoint="clip.bin")
    (call,) = pipe.calls
    expected = dict(num_inference_steps=3, guidance_scale=2.5, eta=0.0, num_frames=4, frame_stride=7,
                    negative_prompt=["blurry"], guidance_rescale=0.3, timestep_spacing="uniform_trailing",
                    sampler="unipc", image_guidance_scale=2.5, height=128, width=192)
    assert {key: call[key] for key in expected} == expected
    assert [g.initial_seed() for g in call["generator"]] == [5]
    assert pipe.saved == [(tmp_path / "o" / "a.mp4", 12)]


def test_default_device_is_cuda0_when_available(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli.main(["256", "--image_path", str(make_image(tmp_path / "a.png")), "--output_dir", str(tmp_path)])
    assert fake[0].init["device"] == torch.device("cuda:0")


def test_default_device_falls_back_to_cpu_with_a_warning(fake, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli.main(["256", "--image_path", str(make_image(tmp_path / "a.png")), "--output_dir", str(tmp_path)])
    assert fake[0].init["device"] == torch.device("cpu")
    assert any("CUDA is not available" in message for message in warnings(caplog))


# ----------------------------------------------------------------------------- naming and failures


def test_same_stem_inputs_never_overwrite_each_other(fake, tmp_path):
    folder = tmp_path / "in"
    for name in ("a.png", "a.jpg", "a_png.png", "b.png"):
        make_image(folder / name)
    out = tmp_path / "out"
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--device", "cpu"]) == 0
    names = [path.name for path, _ in fake[0].saved]
    assert names == ["a.mp4", "a_png.mp4", "a_png_png.mp4", "b.mp4"]
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(names)


def test_output_names_ignore_case_when_comparing():
    names = output_names([("A", ".png"), ("a", ".png"), ("a", ".PNG")])
    assert names == ["A", "a_png", "a_PNG_2"]


@pytest.mark.parametrize("batch_size", ["1", "4"])
def test_bad_images_are_skipped_and_counted(fake, tmp_path, caplog, batch_size):
    folder = tmp_path / "in"
    make_image(folder / "good1.png")
    (folder / "broken.png").write_bytes(b"not an image")
    make_image(folder / "refused.png", REFUSED_SIZE)
    make_image(folder / "good2.png")
    out = tmp_path / "out"
    code = cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--prompt_text", "p",
                     "--batch_size", batch_size, "--device", "cpu"])
    assert code == 1
    assert sorted(p.name for p in out.glob("*.mp4")) == ["good1.mp4", "good2.mp4"]
    assert "2 done, 2 failed, 0 skipped" in caplog.text
    assert any("broken.png" in message for message in warnings(caplog))
    assert any("refused.png" in message and "too small" in message for message in warnings(caplog))


# ----------------------------------------------------------------------------- interpolation, loops, samples, resuming


def interp_folder(root: Path, names: tuple[str, ...] = ("a_01", "a_02", "b_01", "b_02")) -> Path:
    folder = root / "pairs"
    for name in names:
        make_image(folder / f"{name}.png")
    (folder / "test_prompts.txt").write_text("first pair\nsecond pair\nthird pair\n")
    return folder


def test_interp_makes_one_video_per_pair(fake, tmp_path):
    folder = interp_folder(tmp_path)
    (folder / "b_01.txt").write_text("own prompt of b")
    out = tmp_path / "out"
    assert cli.main(["512_interp", "--interp", "--prompt_dir", str(folder), "--output_dir", str(out),
                     "--device", "cpu"]) == 0
    calls = fake[0].calls
    assert [call["prompt"] for call in calls] == [["first pair"], ["own prompt of b"]]
    assert all(len(call["end_image"]) == 1 for call in calls)
    assert [[g.initial_seed() for g in call["generator"]] for call in calls] == [[12306], [12306]]
    assert [path.name for path, _ in fake[0].saved] == ["a_01.mp4", "b_01.mp4"]
    assert fake[0].frames_saved == [16, 16]


def test_odd_image_out_fails_alone(fake, tmp_path, caplog):
    folder = interp_folder(tmp_path, ("a_01", "a_02", "c_01"))
    out = tmp_path / "out"
    assert cli.main(["512_interp", "--interp", "--prompt_dir", str(folder), "--output_dir", str(out),
                     "--device", "cpu"]) == 1
    assert [path.name for path, _ in fake[0].saved] == ["a_01.mp4"]
    assert any("c_01.png has no partner image" in m for m in warnings(caplog))
    assert "1 done, 1 failed, 0 skipped" in caplog.text


def test_loop_drops_the_repeated_last_frame(fake, tmp_path):
    folder = tmp_path / "loops"
    make_image(folder / "waves.png")
    out = tmp_path / "out"
    assert cli.main(["512_interp", "--loop", "--prompt_dir", str(folder), "--output_dir", str(out), "--device",
                     "cpu", "--video_length", "8"]) == 0
    (call,) = fake[0].calls
    assert call["end_image"][0] is not None and call["num_frames"] == 8
    assert [g.initial_seed() for g in call["generator"]] == [234]
    assert fake[0].frames_saved == [7]
    from dynamicrafter.manifest import read_records

    assert read_records(out / "manifest.jsonl")[0]["frames"] == 7  # what the file holds, not --video_length


@pytest.mark.parametrize("argv, message", [
    (["512_interp", "--loop", "--video_length", "2"],
     "--video_length must be at least 3 for a loop (two frames remain once the repeated last one is dropped), got 2."),
    (["512_interp", "--interp", "--video_length", "1"],
     "--video_length must be at least 2 for interpolation (a start and an end frame), got 1."),
    (["tooncrafter", "--interp", "--video_length", "3"], "--video_length must be at least 4 for ToonCrafter's decoder, got 3."),
])
def test_too_few_frames_are_refused_before_the_model_loads(argv, message, fake, tmp_path, caplog):
    out = tmp_path / "out"
    assert cli.main([*argv, "--image_path", str(make_image(tmp_path / "a.png")), "--output_dir", str(out)]) == 2
    assert errors(caplog) == [message]
    assert not fake and not out.exists()


def test_a_failed_load_leaves_no_empty_output_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    out = tmp_path / "results" / "new"
    assert cli.main(["256", "--image_path", str(make_image(tmp_path / "a.png")), "--output_dir", str(out),
                     "--device", "cpu"]) == 1
    assert "HF_HUB_OFFLINE is set" in errors(caplog)[0]
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--interp", "--loop"])
def test_interp_and_loop_need_an_interpolation_model(fake, tmp_path, caplog, flag):
    assert cli.main(["512", flag, "--image_path", str(make_image(tmp_path / "a.png"))]) == 2
    assert errors(caplog) == [f"{flag} needs an interpolation model (512_interp or tooncrafter), not 512."]
    assert not fake


def test_interp_runs_with_the_plain_512_config_as_the_original_does(fake, tmp_path):
    """The original runs its interpolation checkpoint with inference_512_v1.0.yaml, which has no interp_mode."""
    assert "interp_mode" not in (DATA / "tiny512.yaml").read_text()
    out = tmp_path / "out"
    assert cli.main(["512_interp", "--interp", "--config", str(DATA / "tiny512.yaml"), "--prompt_dir",
                     str(interp_folder(tmp_path)), "--output_dir", str(out), "--device", "cpu"]) == 0
    assert fake[0].init["config"] == str(DATA / "tiny512.yaml") and fake[0].saved
    assert model_config("512_interp", DATA / "tiny512.yaml").interp
    assert not model_config("512", DATA / "tiny512.yaml").interp


def test_application_defaults_follow_the_original(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    interp_folder(tmp_path / "prompts").rename(tmp_path / "prompts" / "512_interp")
    assert cli.main(["512_interp", "--interp", "--device", "cpu"]) == 0
    assert fake[0].saved[0][0] == Path("results/dynamicrafter_pipeline_512_interp_seed12306/a_01.mp4")


def test_samples_per_image_get_their_own_seeds_and_names(fake, tmp_path):
    folder = tmp_path / "in"
    for name in ("x", "y"):
        make_image(folder / f"{name}.png")
    out = tmp_path / "out"
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--n_samples", "2",
                     "--batch_size", "3", "--seed", "10", "--device", "cpu"]) == 0
    calls = fake[0].calls
    assert [[g.initial_seed() for g in call["generator"]] for call in calls] == [[10, 11, 10], [11]]
    assert [path.name for path, _ in fake[0].saved] == ["x_sample0.mp4", "x_sample1.mp4", "y_sample0.mp4",
                                                        "y_sample1.mp4"]


def test_leakage_free_start_reaches_the_pipeline_and_the_manifest(fake, tmp_path):
    from dynamicrafter.manifest import read_records

    folder, out, stats = tmp_path / "in", tmp_path / "out", tmp_path / "initial_noise_512.pt"
    make_image(folder / "p.png")
    stats.write_bytes(b"read by the pipeline")
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--device", "cpu",
                     "--start_step", "940", "--analytic_init", "--analytic_init_path", str(stats)]) == 0
    call = fake[0].calls[0]
    assert (call["start_step"], call["analytic_init"], call["analytic_init_path"]) == (940, True, str(stats))
    (record,) = read_records(out / "manifest.jsonl")
    settings = record["settings"]
    assert (settings["start_step"], settings["analytic_init"], settings["analytic_init_path"]) == (940, True, str(stats))


def test_manifest_and_resume(fake, tmp_path, caplog):
    from dynamicrafter.manifest import read_records

    folder = tmp_path / "in"
    for name in ("p", "q", "r"):
        make_image(folder / f"{name}.png")
    out = tmp_path / "out"
    argv = ["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--prompt_text", "go", "--device", "cpu"]
    assert cli.main(argv) == 0
    records = read_records(out / "manifest.jsonl")
    assert [r["video"] for r in records] == ["p.mp4", "q.mp4", "r.mp4"]
    first = records[0]
    assert (first["prompt"], first["seed"], first["model"], first["rank"]) == ("go", 123, "256", 0)
    assert first["settings"]["num_inference_steps"] == 50 and first["image"].endswith("p.png")
    assert (first["quantize"], first["lora"], first["lora_scale"], first["dtype"]) == ("none", None, None, "float32")
    # the values used, the model's where the command line left them to it (this was "frame_stride": null)
    assert {name: first["settings"][name] for name in ("frame_stride", "guidance_rescale", "timestep_spacing",
                                                       "height", "width", "image_guidance_scale")} == {
        "frame_stride": 3, "guidance_rescale": 0.0, "timestep_spacing": "uniform", "height": 256, "width": 256,
        "image_guidance_scale": None}
    assert fake[0].calls[0]["frame_stride"] is None  # the pipeline still gets what was given
    (out / "q.mp4").unlink()  # as if the run had been interrupted before q
    caplog.clear()
    assert cli.main(argv) == 0
    assert [path.name for path, _ in fake[1].saved] == ["q.mp4"]
    assert "1 done, 0 failed, 2 skipped" in caplog.text
    caplog.clear()
    assert cli.main(argv) == 0
    assert len(fake) == 2  # nothing left to do: the model is not even loaded
    assert "0 done, 0 failed, 3 skipped" in caplog.text
    assert cli.main([*argv, "--overwrite"]) == 0
    assert len(fake[2].saved) == 3 and len(read_records(out / "manifest.jsonl")) == 7


def test_a_failed_video_write_is_a_failed_item_with_nothing_left(fake, tmp_path, monkeypatch, caplog):
    """An encoder cut off part-way (a full disk, a file size limit) fails that video: no file, no manifest line."""
    from dynamicrafter import video
    from dynamicrafter.manifest import read_records

    real_write_frames = video.imageio_ffmpeg.write_frames

    def cut_off_after_one_frame(path, *args, **kwargs):
        inner = real_write_frames(path, *args, **kwargs)
        inner.send(None)
        sent = 0
        try:
            while True:
                frame = yield
                if sent < 1 or "/.q." not in str(path):  # only q's video is cut off
                    inner.send(frame)
                    sent += 1
        finally:
            inner.close()

    monkeypatch.setattr(video.imageio_ffmpeg, "write_frames", cut_off_after_one_frame)
    folder, out = tmp_path / "in", tmp_path / "out"
    for name in ("p", "q"):
        make_image(folder / f"{name}.png")
    argv = ["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--video_length", "3", "--device", "cpu"]
    assert cli.main(argv) == 1
    assert "1 done, 1 failed, 0 skipped" in caplog.text
    assert any(w.startswith(f"Skipping {folder / 'q.png'}: Cannot write {out / 'q.mp4'} (the written file holds "
                            "1 of 3 frames)") for w in warnings(caplog)), warnings(caplog)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "p.mp4"]
    assert [r["video"] for r in read_records(out / "manifest.jsonl")] == ["p.mp4"]


def test_an_incomplete_video_is_made_again_not_skipped(fake, tmp_path, caplog):
    folder, out = tmp_path / "in", tmp_path / "out"
    for name in ("p", "q", "r"):
        make_image(folder / f"{name}.png")
    argv = ["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--video_length", "3", "--device", "cpu"]
    assert cli.main(argv) == 0
    (out / "p.mp4").write_bytes(b"")  # a zero-byte file left by a crash
    whole = (out / "q.mp4").read_bytes()
    (out / "q.mp4").write_bytes(whole[: len(whole) // 2])  # a truncated one
    caplog.clear()
    assert cli.main(argv) == 0
    assert [path.name for path, _ in fake[1].saved] == ["p.mp4", "q.mp4"]
    assert "2 done, 0 failed, 1 skipped" in caplog.text
    assert f"Making {out / 'q.mp4'} again: it is not a complete video of 3 frames." in warnings(caplog)
    caplog.clear()
    assert cli.main([*argv, "--video_length", "4"]) == 0  # a different length is not "already made" either
    assert "3 done, 0 failed, 0 skipped" in caplog.text


def test_a_cut_off_manifest_line_is_kept_and_the_next_record_starts_a_fresh_line(fake, tmp_path, caplog):
    from dynamicrafter.manifest import read_records

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"video": "old.mp4"}\n{"video": "cut', encoding="utf-8")
    image = make_image(tmp_path / "a.png")
    assert cli.main(["256", "--image_path", str(image), "--output_dir", str(out), "--device", "cpu"]) == 0
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ['{"video": "old.mp4"}', '{"video": "cut'] and len(lines) == 3
    caplog.clear()
    assert [r["video"] for r in read_records(out / "manifest.jsonl")] == ["old.mp4", "a.mp4"]
    assert warnings(caplog) == [f"Skipping line 2 of {out / 'manifest.jsonl'}: not a whole record."]


def test_ranks_share_the_jobs(fake, tmp_path, monkeypatch):
    """Under torchrun each rank takes every WORLD_SIZE-th job, with the seed that job always has."""
    folder = tmp_path / "in"
    for name in ("a", "b", "c"):
        make_image(folder / f"{name}.png")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(cli.distributed, "init", lambda ranks: None)
    monkeypatch.setattr(cli.distributed, "sum_counts", lambda counts, ranks: list(counts))
    monkeypatch.setattr(cli.distributed, "shutdown", lambda ranks: None)
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                     "--n_samples", "2"]) == 0
    assert [path.name for path, _ in fake[0].saved] == ["a_sample1.mp4", "b_sample1.mp4", "c_sample1.mp4"]
    assert all([g.initial_seed() for g in call["generator"]] == [124] for call in fake[0].calls)


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("argv, code, fragment", [
    (["999"], 2, "unknown resolution '999'; choose one of 256, 512, 1024, 512_interp"),
    ([], 2, "Give the model as the first argument or --resolution (256, 512, 1024, 512_interp, tooncrafter)"),
    (["256", "--resolution", "512"], 2, "The model is given twice, as 256 and --resolution 512; give it once."),
    (["256", "--num_inference_steps", "0"], 2, "--num_inference_steps: must be between 1 and 1000, got 0"),
    (["256", "--video_length", "0"], 2, "--video_length: must be between 1 and 128, got 0"),
    (["256", "--frames", "1000000000"], 2, "--video_length: must be between 1 and 128, got 1000000000"),
    (["256", "--window_stride", "0"], 2, "--window_stride: must be between 1 and 128, got 0"),
    (["256", "--window_size", "0"], 2, "--window_size: must be between 1 and 128, got 0"),
    (["256", "--video_length", "32", "--window_stride", "20"], 2,
     "--window_stride must be at most --window_size (16), got 20: windows further apart would leave frames "
     "without temporal attention."),
    (["256", "--start_step", "0"], 2, "--start_step: must be between 1 and 1000, got 0"),
    (["256", "--start_step", "20"], 2, "--num_inference_steps (50) can be at most --start_step (20): the sampler "
                                       "visits that many distinct timesteps below it."),
    (["256", "--analytic_init_path", "{tmp}/missing.pt"], 2, "missing.pt does not exist"),
    (["256", "--analytic_init"], 2, "--analytic_init uses the CIL authors' statistics, published for the 512 and "
                                    "1024 models; for the 256 model give a statistics file with --analytic_init_path."),
    (["256", "--batch_size", "0"], 2, "--batch_size: must be between 1 and 256, got 0"),
    (["256", "--fps", "0"], 2, "--fps: must be between 1 and 120, got 0"),
    (["256", "--frame_stride", "-5"], 2, "--frame_stride: must be between 1 and 100, got -5"),
    (["256", "--guidance_scale", "-1"], 2, "--guidance_scale: must be between 0 and 100, got -1"),
    (["256", "--guidance_scale", "inf"], 2, "--guidance_scale: must be a finite number, got inf"),
    (["256", "--eta", "-0.1"], 2, "--eta: must be between 0 and 1, got -0.1"),
    (["256", "--eta", "nan"], 2, "--eta: must be a finite number, got nan"),
    (["256", "--guidance_rescale", "-1"], 2, "--guidance_rescale: must be between 0 and 1, got -1"),
    (["256", "--seed", "-1"], 2, "--seed: must be between 0 and"),
    (["256", "--num_inference_steps", "ten"], 2, "expected an integer, got 'ten'"),
    (["256", "--dtype", "int8"], 2, "--dtype: invalid choice"),
    (["256", "--timestep_spacing", "leading"], 2, "--timestep_spacing: invalid choice"),
    (["256", "--device", "banana"], 2, "'banana' is not a torch device"),
    (["256", "--device", "cpu", "--quantize", "fp8"], 2, "needs a CUDA GPU of compute capability 8.9 or newer"),
    (["256", "--quantize", "int8"], 2, "--quantize: invalid choice"),
    (["256", "--prompt_dir", "{tmp}/missing"], 1, "missing does not exist"),
    (["256", "--prompt_dir", "{tmp}/empty"], 1, "No images"),
    (["256", "--image_path", "{tmp}/missing.png"], 1, "missing.png does not exist"),
])
def test_user_errors_are_one_sentence(fake, tmp_path, caplog, argv, code, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == code
    (message,) = errors(caplog)
    assert fragment in message
    assert "\n" not in message and message.endswith(".")
    assert not fake


def test_unwritable_output_folder_fails_before_the_model_loads(fake, tmp_path, caplog):
    """Checked up front: before, the model loaded, every video was made, then each write failed."""
    target = Path("/sys")  # exists, and not even root may create files there
    try:
        tempfile.NamedTemporaryFile(dir=target).close()
    except OSError:
        pass
    else:
        pytest.skip("no folder that cannot be written on this machine")
    code = cli.main(["256", "--image_path", str(make_image(tmp_path / "a.png")), "--output_dir", str(target),
                     "--device", "cpu"])
    assert code == 1
    (message,) = errors(caplog)
    assert message.startswith("Cannot write to output folder /sys (") and "\n" not in message
    assert not fake


def test_folder_given_as_image_path(fake, tmp_path, caplog):
    assert cli.main(["256", "--image_path", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 1
    assert errors(caplog) == [f"Image {tmp_path} is a folder; pass it as --prompt_dir."]


def test_looping_link_in_a_prompt_folder_is_reported(fake, tmp_path, caplog):
    folder = tmp_path / "in"
    make_image(folder / "good.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    out = tmp_path / "out"
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--device", "cpu"]) == 1
    assert any("loop.png" in m and "cannot be read" in m for m in warnings(caplog))
    assert "1 done, 1 failed, 0 skipped" in caplog.text


def test_webp_and_tiff_are_found_in_folders(fake, tmp_path):
    folder = tmp_path / "in"
    for name in ("a.webp", "b.tif", "c.tiff", "d.gif"):
        make_image(folder / name)
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert [path.name for path, _ in fake[0].saved] == ["a.mp4", "b.mp4", "c.mp4"]


def test_exif_rotated_photo_reaches_the_pipeline_upright(fake, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (80, 40)).save(path, exif=exif)
    assert cli.main(["256", "--image_path", str(path), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert fake[0].calls[0]["image"][0].size == (40, 80)


@pytest.mark.parametrize("variable", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_a_bad_torchrun_variable_is_one_sentence(fake, tmp_path, monkeypatch, caplog, variable):
    monkeypatch.setenv(variable, "abc")
    assert cli.main(["256", "--image_path", str(make_image(tmp_path / "a.png")), "--device", "cpu"]) == 1
    assert errors(caplog) == [f"{variable}='abc' is not a whole number; torchrun sets these, so unset them when not "
                              "running under torchrun."]
    assert not fake


def test_cuda_device_without_cuda_is_a_user_error(fake, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["256", "--device", "cuda:1", "--image_path", str(make_image(tmp_path / "a.png"))]) == 2
    assert errors(caplog) == ["--device: Device cuda:1 needs CUDA, which is not available here; use cpu."]


@pytest.mark.parametrize("error", [UserError("Config file nope.yaml does not exist."),
                                   CheckpointError("Cannot download model.ckpt; check your connection.")])
def test_pipeline_construction_errors_exit_1(fake, tmp_path, monkeypatch, caplog, error):
    def refuse(self, **kwargs):
        raise error

    monkeypatch.setattr(pipeline.DynamiCrafterImg2VideoPipeline, "__init__", refuse)
    image = make_image(tmp_path / "a.png")
    assert cli.main(["256", "--image_path", str(image), "--output_dir", str(tmp_path), "--device", "cpu"]) == 1
    assert errors(caplog) == [str(error)]


def run_script(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """Run a script (a .py with this Python, anything else directly) and capture its output.

    One CPU thread, as in the test process (conftest.py): the tiny models gain nothing from more, and
    on a busy machine PyTorch's default made test_real_pipeline_examples take 122 s (7 s with one thread).
    """
    command = [sys.executable, *args] if args[0].endswith(".py") else list(args)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.parametrize("args, code", [
    (["999"], 2),
    (["256", "--prompt_dir", "{tmp}/missing", "--device", "cpu"], 1),
    (["256", "--num_inference_steps", "0"], 2),
])
def test_run_pipeline_py_errors_have_no_traceback(tmp_path, args, code):
    result = run_script(str(RUN_PIPELINE), *[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("ERROR: ")


def test_guide_import_path_exports_the_pipeline():
    code = ("from scripts.gradio.dynamicrafter_pipeline import DynamiCrafterImg2VideoPipeline as P; "
            "from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline as Q; assert P is Q")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- run_pipeline.sh


@pytest.mark.parametrize("args", [[], ["999"], ["256_256"], ["256", "seed"]])
def test_shell_script_prints_usage_for_bad_arguments(args):
    result = run_script(str(RUN_SHELL), *args)
    assert result.returncode == 1
    assert "Usage:" in result.stderr and "Traceback" not in result.stderr


def test_shell_script_help():
    result = run_script(str(RUN_SHELL), "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage:")


def test_shell_script_launches_torchrun_for_several_gpus(tmp_path):
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/sh\necho "$@"\n')
    recorder.chmod(0o755)
    result = run_script(str(RUN_SHELL), "512", "7", "--gpus", "4", "--fps", "4", cwd=tmp_path, PYTHON=str(recorder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("-m torch.distributed.run --standalone --nproc_per_node=4 "
                                     "scripts/run_pipeline.py 512 --seed 7 --fps 4")
    bad = run_script(str(RUN_SHELL), "512", "--gpus", "zero", cwd=tmp_path, PYTHON=str(recorder))
    assert bad.returncode == 1 and "--gpus needs a positive whole number." in bad.stderr


@pytest.mark.parametrize("args, forwarded", [
    (["interp"], "512_interp --seed 12306 --interp --prompt_dir prompts/512_interp/ --output_dir "
                 "results/dynamicrafter_512_interp_seed12306"),
    (["loop", "5", "cuda:1", "--fps", "4"], "512_interp --seed 5 --device cuda:1 --loop --prompt_dir "
                                            "prompts/512_loop/ --output_dir results/dynamicrafter_512_loop_seed5"),
])
def test_application_script_uses_the_originals_settings(tmp_path, args, forwarded):
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/sh\necho "$@"\n')
    recorder.chmod(0o755)
    result = run_script(str(ROOT / "scripts" / "run_application.sh"), *args, cwd=tmp_path, PYTHON=str(recorder))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"scripts/run_pipeline.py {forwarded} ")
    assert ("--height 320 --width 512 --video_length 16 --frame_stride 5 --num_inference_steps 50 "
            "--guidance_scale 7.5 --eta 1.0 --timestep_spacing uniform_trailing --guidance_rescale 0.7") in line
    assert line.endswith("--fps 4") == ("--fps" in args)


@pytest.mark.parametrize("args, forwarded", [
    (["256"], "scripts/run_pipeline.py 256 --seed 123"),
    (["256", "42"], "scripts/run_pipeline.py 256 --seed 42"),
    (["1024", "456", "cuda:1"], "scripts/run_pipeline.py 1024 --seed 456 --device cuda:1"),
    (["512", "7", "cpu", "--fps", "4", "--prompt_text", "a b"],
     "scripts/run_pipeline.py 512 --seed 7 --device cpu --fps 4 --prompt_text a b"),
    (["512_interp", "--fps", "4"], "scripts/run_pipeline.py 512_interp --seed 123 --fps 4"),
])
def test_shell_script_forwards_arguments_from_the_repo_root(tmp_path, args, forwarded):
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/sh\necho "$(pwd)"\necho "$@"\n')
    recorder.chmod(0o755)
    result = run_script(str(RUN_SHELL), *args, cwd=tmp_path, PYTHON=str(recorder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(ROOT), forwarded]


# ----------------------------------------------------------------------------- real pipeline, tiny model


TINY_SIZE = (64, 64)


def test_real_run_pipeline_py_writes_an_h264_video(tmp_path):
    image = make_image(tmp_path / "input.png")
    out = tmp_path / "out"
    result = run_script(str(RUN_PIPELINE), "256", *tiny_args("tiny256"), "--device", "cpu", "--image_path", str(image),
                        "--prompt_text", "x", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert read_video(out / "input.mp4") == ("h264", 4, TINY_SIZE, 8.0)
    assert "1 done, 0 failed" in result.stderr


def test_real_run_pipeline_sh_animates_a_folder(tmp_path):
    folder = tmp_path / "prompts"
    make_image(folder / "one.png")
    (folder / "one.txt").write_text("a tiny robot dancing in the rain")
    out = tmp_path / "out"
    result = run_script(str(RUN_SHELL), "256", "123", "cpu", *tiny_args("tiny256"), "--prompt_dir", str(folder),
                        "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert read_video(out / "one.mp4") == ("h264", 4, TINY_SIZE, 8.0)


def test_real_bad_config_path_ends_in_one_error_line(tmp_path):
    image = make_image(tmp_path / "a.png")
    args = tiny_args("tiny256")
    args[args.index("--config") + 1] = str(tmp_path / "missing.yaml")
    result = run_script(str(RUN_PIPELINE), "256", *args, "--device", "cpu", "--image_path", str(image),
                        "--output_dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ERROR: ") and "missing.yaml" in result.stderr


def test_real_malformed_lora_ends_in_one_error_line(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_bytes(b"\xff\xfe not json")
    save_file({"base_model.model.out.2.lora_A.weight": torch.zeros(4, 8),
               "base_model.model.out.2.lora_B.weight": torch.zeros(8, 4)}, str(lora / "adapter_model.safetensors"))
    result = run_script(str(RUN_PIPELINE), "256", *tiny_args("tiny256"), "--device", "cpu", "--image_path",
                        str(make_image(tmp_path / "a.png")), "--output_dir", str(tmp_path / "out"), "--lora", str(lora))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR: LoRA config {lora / 'adapter_config.json'} "
                                                             "is not UTF-8 text")


def test_real_pipeline_examples(tmp_path):
    result = run_script(str(EXAMPLES), "--checkpoint", str(DATA / "tiny256.ckpt"), "--config",
                        str(DATA / "tiny256.yaml"), "--device", "cpu", "--steps", "2", "--height", "64",
                        "--width", "64", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(["basic.mp4", "negative_prompt.mp4", "custom_settings.mp4", "batch_0.mp4",
                              "batch_1.mp4", "video.mp4", "video.gif"])
    assert read_video(tmp_path / "basic.mp4")[:3] == ("h264", 4, (64, 64))
    assert "output_type='latent'" in result.stderr


def test_real_guide_single_image_command(tmp_path):
    """The guide's single-image example, word for word, plus the tiny model's options."""
    out = tmp_path / "single_test"
    result = run_script(str(RUN_PIPELINE), "256", "--image_path", "prompts/1024/pour_bear.png", "--prompt_text",
                        "a person walking in a beautiful garden", "--output_dir", str(out), "--device", "cpu",
                        *tiny_args("tiny256"))
    assert result.returncode == 0, result.stderr
    assert read_video(out / "pour_bear.mp4") == ("h264", 4, TINY_SIZE, 8.0)


def test_real_torchrun_gives_the_single_process_videos(tmp_path):
    """Two CPU ranks (gloo) make byte-identical videos to one process, one manifest line each; a re-run skips all."""
    folder = tmp_path / "in"
    for index, name in enumerate(("a", "b", "c")):
        make_image(folder / f"{name}.png", (64 + 16 * index, 64))
    common = [*tiny_args("tiny256"), "--device", "cpu", "--dtype", "float32", "--prompt_dir", str(folder),
              "--prompt_text", "x"]
    single = run_script(str(RUN_PIPELINE), "256", *common, "--output_dir", str(tmp_path / "one"), OMP_NUM_THREADS="1")
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    multi = subprocess.run([*launcher, str(RUN_PIPELINE), "256", *common, "--output_dir", str(tmp_path / "two")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert multi.returncode == 0, multi.stderr
    assert "3 done, 0 failed, 0 skipped" in multi.stderr
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    from dynamicrafter.manifest import read_records

    records = read_records(tmp_path / "two" / "manifest.jsonl")
    assert sorted((r["video"], r["rank"]) for r in records) == [("a.mp4", 0), ("b.mp4", 1), ("c.mp4", 0)]
    again = subprocess.run([*launcher, str(RUN_PIPELINE), "256", *common, "--output_dir", str(tmp_path / "two")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and "0 done, 0 failed, 3 skipped" in again.stderr


def test_every_flag_is_documented():
    documented = (ROOT / "docs" / "cli.md").read_text()
    flags = [flag for action in cli.build_parser()._actions for flag in action.option_strings
             if flag not in ("-h", "--help") and action.help != argparse.SUPPRESS]  # not the hidden old spellings
    missing = [flag for flag in flags if f"`{flag}" not in documented]
    assert not missing, f"flags missing from docs/cli.md: {missing}"


def test_threads_flag_sets_the_cpu_threads(fake, tmp_path, caplog, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    image = make_image(tmp_path / "a.png")
    assert cli.main(["256", "--image_path", str(image), "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                     "--threads", "3"]) == 0
    assert "Using 3 CPU threads (as --threads asks); --threads N changes it." in caplog.messages
    assert set_to == [3]


def test_lora_flags_load_the_lora(fake, tmp_path):
    image = make_image(tmp_path / "a.png")
    assert cli.main(["256", "--image_path", str(image), "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                     "--lora", "style_lora", "--lora_scale", "0.5"]) == 0
    assert fake[0].lora == ("style_lora", 0.5)


def test_train_and_convert_are_dynamicrafter_commands(capsys):
    with pytest.raises(SystemExit) as info:
        dynamicrafter_command(["train", "--help"])
    assert info.value.code == 0 and "Fine-tune a DynamiCrafter model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dynamicrafter_command(["convert", "--help"])
    assert "safetensors" in capsys.readouterr().out


def test_tooncrafter_takes_interp_pairs(fake, tmp_path):
    folder = interp_folder(tmp_path, ("k_01", "k_02"))
    assert cli.main(["tooncrafter", "--interp", "--prompt_dir", str(folder), "--output_dir", str(tmp_path / "o"),
                     "--device", "cpu"]) == 0
    (call,) = fake[0].calls
    assert call["prompt"] == ["first pair"] and len(call["end_image"]) == 1
    assert [path.name for path, _ in fake[0].saved] == ["k_01.mp4"]


def test_mask_goes_to_every_image_and_into_the_manifest(fake, tmp_path):
    from dynamicrafter.manifest import read_records

    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 0).save(mask)
    out = tmp_path / "out"
    assert cli.main(["256", "--image_path", str(make_image(tmp_path / "a.png")), "--mask", str(mask),
                     "--augmentation_level", "0.05", "--output_dir", str(out), "--device", "cpu"]) == 0
    (call,) = fake[0].calls
    assert call["mask"].mode == "L" and call["mask"].size == (32, 32) and call["augmentation_level"] == 0.05
    (record,) = read_records(out / "manifest.jsonl")
    assert record["mask"] == str(mask) and record["settings"]["augmentation_level"] == 0.05


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--mask", "missing.png"], 1, "--mask missing.png does not exist."),
    (["--image_embed_ratio", "0.5"], 2,
     "--image_embed_ratio mixes the start and end images' embeddings; use it with --interp or --loop."),
    (["--loop", "--mask", "m.png"], 2,
     "--mask holds parts of the video to the one input image; it cannot be used with --loop."),
])
def test_mask_and_embedding_mix_are_checked_before_the_model_loads(fake, tmp_path, caplog, args, code, message):
    image = make_image(tmp_path / "a.png")
    assert cli.main(["512_interp", "--image_path", str(image), "--output_dir", str(tmp_path / "out"), *args]) == code
    assert errors(caplog) == [message]


# ----------------------------------------------------------------------------- several prompts over time
def test_timed_prompts_in_prompt_files_reach_the_pipeline_and_the_manifest(fake, tmp_path, caplog):
    from dynamicrafter.manifest import read_records

    folder = tmp_path / "in"
    for name in ("a", "b", "c"):
        make_image(folder / f"{name}.png")
    (folder / "test_prompts.txt").write_text("0: a cat sits | 12: a cat jumps\nratio 16:9 | wide\nplain\n")
    (folder / "c.txt").write_text("0: a | 16: b")  # past the last of 16 frames
    out = tmp_path / "out"
    assert cli.main(["256", "--prompt_dir", str(folder), "--output_dir", str(out), "--device", "cpu"]) == 1
    assert [call["prompt"] for call in fake[0].calls] == [[{0: "a cat sits", 12: "a cat jumps"}], ["ratio 16:9 | wide"]]
    assert warnings(caplog)[-1] == (f"Skipping {folder / 'c.png'}: "
                                    "Prompt schedule frame 16 is outside the video's frames 0 to 15")
    records = read_records(out / "manifest.jsonl")
    assert [(r["prompt"], r["prompt_schedule"]) for r in records] == [
        ("0: a cat sits | 12: a cat jumps", {"0": "a cat sits", "12": "a cat jumps"}), ("ratio 16:9 | wide", None)]


def test_a_bad_timed_prompt_text_is_refused_before_the_model_loads(fake, tmp_path, caplog):
    image = make_image(tmp_path / "a.png")
    assert cli.main(["256", "--image_path", str(image), "--prompt_text", "0: sits | jumps", "--device", "cpu"]) == 2
    assert errors(caplog) == ["--prompt_text: Part 'jumps' of the timed prompt '0: sits | jumps' is not "
                              "'<frame>: <prompt>'; write e.g. '0: a cat sits | 48: a cat jumps'."]
    assert not fake
