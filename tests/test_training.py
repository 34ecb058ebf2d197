"""Fine-tuning on the tiny model: data, the loop, checkpoints and resume, LoRA in the pipeline, the CLI.

Runs are tiny (64x64, 2 frames, a few steps, one process unless stated) and use the example clips
in ``examples/clips`` (synthetic, made by ``examples/make_clips.py``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamicrafter.checkpoints import load_model
from dynamicrafter.configs import load_config
from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline
from dynamicrafter.training import data as D
from dynamicrafter.training.cli import main as train_main
from dynamicrafter.training.config import TrainConfig
from dynamicrafter.training.model import lr_factor
from dynamicrafter.training.objective import diffusion_loss
from dynamicrafter.training.trainer import train

from .conftest import DATA

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "examples" / "clips"
TINY = dict(model_config=str(DATA / "tiny256.yaml"), checkpoint=str(DATA / "tiny256.ckpt"), frames=2, height=64,
            width=64, num_workers=0, device="cpu", precision="fp32")


def tiny_config(data: Path | str, out: Path, **changes) -> TrainConfig:
    return TrainConfig(data=str(data), output_dir=str(out), **{**TINY, **changes})


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one_clip")
    for name in ("red_ball.mp4", "red_ball.txt"):
        shutil.copy(CLIPS / name, folder / name)
    return folder


# ------------------------------------------------------------------------------------ data
def test_folder_clips_and_captions():
    clips = D.find_clips(CLIPS)
    assert [c.path.suffix for c in clips] == [".webm", ".gif", ".mp4", ".mov"]
    assert clips[2].caption == "a red ball rolling from left to right on a grey floor"
    for clip in clips:  # every container decodes to [3, T, H, W] in [-1, 1] at the asked size
        video, stride, rate = D.read_clip(clip.path, 4, 64, 128, 1, 3, random.Random(0))
        assert video.shape == (3, 4, 64, 128) and -1 <= video.min() and video.max() <= 1
        assert 1 <= stride <= 3 and rate > 0


def test_csv_layouts(tmp_path):
    (tmp_path / "videos" / "p1").mkdir(parents=True)
    (tmp_path / "webvid.csv").write_text("videoid,name,page_dir\n12,a cat,p1\n")
    (tmp_path / "plain.csv").write_text("path,caption\nclips/a.mov,a dog\n")
    (tmp_path / "bad.csv").write_text("file,text\nx,y\n")
    [clip] = D.find_clips(tmp_path / "webvid.csv", video_root=tmp_path / "videos")
    assert clip.path == tmp_path / "videos" / "p1" / "12.mp4" and clip.caption == "a cat"
    [clip] = D.find_clips(tmp_path / "plain.csv")
    assert clip.path == tmp_path / "clips" / "a.mov" and clip.caption == "a dog"
    with pytest.raises(ValueError, match="needs the columns videoid,name"):
        D.find_clips(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="No video clips"):
        D.find_clips(tmp_path / "videos")
    with pytest.raises(ValueError, match="does not exist"):
        D.find_clips(tmp_path / "nowhere")


def test_frame_sampling_like_the_original():
    rng = random.Random(0)
    indices, stride = D.choose_frames(100, 16, 6, 6, rng)
    assert stride == 6 and indices[1] - indices[0] == 6 and indices[-1] < 100
    indices, stride = D.choose_frames(40, 16, 6, 6, rng)  # too short for stride 6: 40 // 16
    assert stride == 2 and indices == list(range(indices[0], indices[0] + 32, 2))
    with pytest.raises(D.ClipError, match="fewer than the 16"):
        D.choose_frames(10, 16, 1, 6, rng)
    assert D.fs_value("frame_stride", 3, 30.0) == 3 and D.fs_value("fps", 3, 30.0) == 10


def test_stream_sampler_is_resumable():
    full = D.StreamSampler(5, seed=1, rank=1, world=2)
    items = [x for _, x in zip(range(9), full)]
    assert [i[3] for i in items[:3]] == [1, 2, 3] and items[3][2] == 1  # 3 per rank per epoch
    resumed = D.StreamSampler(5, seed=1, rank=1, world=2, epoch=1, position=1)
    assert [x for _, x in zip(range(5), resumed)] == items[4:]


def test_config_errors_are_one_sentence():
    with pytest.raises(ValueError, match="max_steps must be a whole number"):
        TrainConfig(data="x", max_steps=0)
    with pytest.raises(ValueError, match="train_image_proj is for full"):
        TrainConfig(data="x", train_image_proj=True)
    with pytest.raises(ValueError, match="frame_stride_max"):
        TrainConfig(data="x", frame_stride_min=4, frame_stride_max=2)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="needs bitsandbytes: pip install bitsandbytes"):
            TrainConfig(data="x", optimizer="adamw8bit")
    cfg = TrainConfig(data="x", lr_warmup_steps=2, max_steps=6, lr_schedule="linear")
    assert [round(lr_factor(s, cfg), 3) for s in range(6)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25]


# ------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """LoRA, 4 steps on the four example clips, checkpoints at 2 and 4, a sample at 4."""
    out = tmp_path_factory.mktemp("run_a")
    cfg = tiny_config(CLIPS, out, max_steps=4, save_every=2, learning_rate=1e-3, sample_every=4, sample_steps=2)
    return out, train(cfg)


def test_run_writes_checkpoints_logs_and_samples(run_a):
    out, result = run_a
    assert result.step == 4 and len(result.losses) == 4 and not result.interrupted
    assert result.checkpoint == out / "checkpoint-000004"
    for step in ("000002", "000004"):
        folder = out / f"checkpoint-{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                            "training_state.pt"]
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint-000004" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert "base_model.model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert meta["dynamicrafter_size"] == "256x256" and meta["lora_rank"] == "64"
    adapter = json.loads((out / "checkpoint-000004" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 64
    assert not list(out.glob(".checkpoint-*"))  # nothing half-written left
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in rows] == pytest.approx(result.losses, rel=1e-5)
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert (out / "samples" / "step_000004.mp4").stat().st_size > 0


def test_resume_reproduces_the_loss_curve(run_a, tmp_path):
    out, result = run_a
    cfg = tiny_config(CLIPS, tmp_path, max_steps=4, save_every=2, learning_rate=1e-3,
                      resume=str(out / "checkpoint-000002"))
    resumed = train(cfg)
    assert resumed.step == 4
    assert resumed.losses == pytest.approx(result.losses[2:], rel=1e-6, abs=1e-7)
    from safetensors.torch import load_file

    a = load_file(str(out / "checkpoint-000004" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "checkpoint-000004" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.fixture(scope="module")
def pipe():
    return DynamiCrafterImg2VideoPipeline("256", device="cpu", checkpoint=DATA / "tiny256.ckpt",
                                          config=DATA / "tiny256.yaml", dtype="float32")


def _video(pipe, gradient_png) -> torch.Tensor:
    return pipe(gradient_png, "a red ball", num_inference_steps=2, num_frames=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="latent")["videos"]


def test_lora_in_the_pipeline(run_a, pipe, gradient_png):
    out, _ = run_a
    base = _video(pipe, gradient_png)
    pipe.load_lora_weights(out / "checkpoint-000004")
    try:
        adapted = _video(pipe, gradient_png)
        assert (adapted - base).abs().max() > 1e-4  # the LoRA changes the output
        pipe.load_lora_weights(out / "checkpoint-000004" / "adapter_model.safetensors", scale=0.0)
        assert torch.equal(_video(pipe, gradient_png), base)  # scale 0: the base output
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(_video(pipe, gradient_png), base)  # unloaded: exactly the base model
    assert not any("lora" in n for n, _ in pipe.model.unet.named_parameters())


def test_forty_steps_on_one_clip_halve_the_loss(one_clip, tmp_path):
    """The CPU target: full fine-tuning of the tiny model, 40 steps on one clip (cached latents)."""
    config = load_config(DATA / "tiny256.yaml")
    model = load_model(config, DATA / "tiny256.ckpt")
    video, _, _ = D.read_clip(D.find_clips(one_clip)[0].path, 2, 64, 64, 1, 1, random.Random(0))
    gen = torch.Generator().manual_seed(0)
    timesteps, noise = torch.linspace(0, 999, 8).long(), torch.randn(8, 4, 2, 8, 8, generator=gen)
    none = torch.zeros(8, dtype=torch.bool)
    caption = (one_clip / "red_ball.txt").read_text().strip()

    @torch.no_grad()
    def fixed_loss() -> float:
        torch.manual_seed(0)
        return diffusion_loss(model, video[None].expand(8, -1, -1, -1, -1), [caption] * 8, 1, timesteps=timesteps,
                              noise=noise, cond_frame=torch.zeros(8, dtype=torch.long), drop_text=none,
                              drop_image=none).item()

    before = fixed_loss()
    cfg = tiny_config(one_clip, tmp_path, mode="full", learning_rate=5e-3, max_steps=40, save_every=40,
                      cache_latents=True, unet_dropout=0.0, gradient_checkpointing=False)
    result = train(cfg, model)
    model.eval()
    after = fixed_loss()
    assert result.step == 40 and (tmp_path / "checkpoint-000040" / "unet.safetensors").is_file()
    assert list((tmp_path / "cache").glob("*.safetensors"))
    assert after <= 0.5 * before, (before, after)


def test_ctrl_c_saves_and_stops(one_clip, tmp_path, monkeypatch):
    from dynamicrafter.training.metrics import Metrics

    log = Metrics.log

    def log_then_ctrl_c(self, *args):  # a real SIGINT to this process, after the first step
        log(self, *args)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Metrics, "log", log_then_ctrl_c)
    result = train(tiny_config(one_clip, tmp_path, max_steps=10, gradient_checkpointing=False))
    assert result.interrupted and result.step == 1
    assert result.checkpoint == tmp_path / "checkpoint-000001" and (result.checkpoint / "training_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_unusable_clips_are_skipped_once_and_counted(tmp_path, caplog):
    from PIL import Image

    shutil.copy(CLIPS / "red_ball.mp4", tmp_path / "good.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "short.gif", save_all=True, append_images=frames[1:], duration=100)
    cfg = tiny_config(tmp_path, tmp_path / "out", frames=3, max_steps=3, gradient_checkpointing=False)
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert result.step == 3 and result.skipped_clips == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping clip")]
    assert len(skipped) == 2 and any("broken.mp4" in m and "cannot be read" in m for m in skipped)
    assert any("short.gif" in m and "2 frame(s), fewer than the 3" in m for m in skipped)


def test_no_usable_clip_is_one_error(tmp_path, caplog):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "broken2.webm").write_bytes(b"\x01" * 100)
    code = train_main([str(tmp_path), *_flags(tmp_path / "out", max_steps=2)])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [errors[0]] and errors[0].startswith("None of the 2 clips in")


def _flags(out: Path, **changes) -> list[str]:
    values = {**TINY, "output_dir": str(out), **changes}
    flags = []
    for key, value in values.items():
        if value is None:  # not given
            continue
        flags += [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
    return flags


def test_cli_errors(tmp_path, caplog, capsys):
    assert train_main([str(tmp_path / "missing"), "--device", "cpu", "--output_dir", str(tmp_path / "out")]) == 1
    assert "does not exist" in caplog.records[-1].getMessage()
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start
    assert train_main([str(CLIPS), "--max_steps", "0"]) == 1
    assert "max_steps must be a whole number" in caplog.records[-1].getMessage()
    assert train_main([str(CLIPS), "--mode", "half"]) == 2
    assert train_main([str(CLIPS), *_flags(tmp_path, height=100)]) == 1
    assert "multiple of 64" in caplog.records[-1].getMessage()
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    assert exc.value.code == 0 and "--cache_latents" in capsys.readouterr().out


def test_torchrun_two_processes(one_clip, tmp_path):
    """Data-parallel on the CPU (gloo): two processes, the effective batch reported, one checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dynamicrafter.training.cli", str(one_clip),
               *_flags(tmp_path, max_steps=2, gradient_checkpointing=False, lora_rank=4)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "effective batch 2 (1 per process x 1 accumulation x 2 process(es))" in done.stderr
    assert (tmp_path / "checkpoint-000002" / "adapter_model.safetensors").is_file()
    state = torch.load(tmp_path / "checkpoint-000002" / "training_state.pt", weights_only=True)
    assert state["world"] == 2 and len(state["rng"]) == 2


def test_benchmark_command_reports_step_time_and_memory(capsys):
    from dynamicrafter.bench import training as bench

    code = bench.main(["--config", str(DATA / "tiny256.yaml"), "--random-weights", "--frames", "2", "--height", "64",
                       "--width", "64", "--steps", "2", "--device", "cpu", "--precision", "fp32", "--lora_rank", "4",
                       "--no-gradient_checkpointing", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 2 and report["s_per_step"] > 0 and report["peak_mem_bytes"] > 0
    assert report["mode"] == "lora" and report["lora_rank"] == 4 and report["peak_mem"] == "process peak RSS"
    assert f"on cpu: {report['s_per_step']:.3f} s/step, peak " in bench.describe(report)


def test_memory_estimate_without_a_gpu(capsys):
    """``--estimate`` counts a step's live tensors on the meta device: no weights, no GPU, no values."""
    from dynamicrafter.bench import training as bench

    def estimate(*flags: str) -> dict:
        assert bench.main(["--config", str(DATA / "tiny256.yaml"), "--estimate", "--frames", "4", "--height", "64",
                           "--width", "64", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    lora = estimate("--lora_rank", "4")
    full = estimate("--mode", "full")
    assert lora["device_name"] == "meta" and lora["s_per_step"] is None and lora["precision"] == "bf16"
    assert lora["weights_bytes"] < lora["peak_mem_bytes"] < full["peak_mem_bytes"]
    # Full fine-tuning adds, beyond the weights, at least float32 gradients and AdamW's two moments.
    assert full["peak_mem_bytes"] - full["weights_bytes"] >= 12 * full["trained_values"]
    assert lora["trained_values"] < full["trained_values"]
    line = bench.describe(lora)  # what is printed without --json
    assert line.startswith("tiny256 64x64, 4 frames, batch 1, lora r4, bf16, checkpointing on on meta: peak ")
    assert line.endswith("GiB (estimated on the meta device (fused attention, no autocast; "
                         "see dynamicrafter.bench.memory))")
