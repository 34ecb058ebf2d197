"""Tests for dynamicrafter.video: MP4/GIF output, odd sizes, atomic writes."""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from dynamicrafter import video
from dynamicrafter.video import VideoWriteError, is_complete_video, save_video, to_uint8_frames


def moving_square(frames: int = 8, height: int = 64, width: int = 96) -> torch.Tensor:
    """A [T, 3, H, W] float video of a bright square sliding over a gradient (every frame differs)."""
    clip = torch.zeros(frames, 3, height, width)
    clip[:, 2] = torch.linspace(0, 1, width)
    for t in range(frames):
        clip[t, :, 10:30, 4 * t:4 * t + 20] = 1.0
    return clip


def probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        ctx = stream.codec_context
        return {"codec": ctx.name, "pix_fmt": ctx.pix_fmt, "frames": frames,
                "width": ctx.width, "height": ctx.height, "fps": stream.average_rate}


def test_mp4_is_h264_with_right_frames_size_and_fps(tmp_path):
    out = save_video(moving_square(), tmp_path / "nested" / "clip.mp4", fps=8)
    assert out == tmp_path / "nested" / "clip.mp4"
    info = probe(out)
    assert info == {"codec": "h264", "pix_fmt": "yuv420p", "frames": 8, "width": 96, "height": 64,
                    "fps": Fraction(8)}
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "not streamable: +faststart missing"
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4"]


def test_mp4_keeps_the_picture(tmp_path):
    clip = moving_square()
    out = save_video(clip, tmp_path / "clip.mp4")
    with av.open(str(out)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    expected = to_uint8_frames(clip)[0].astype(np.float32)
    assert np.abs(first - expected).mean() < 4.0


def test_gif_frame_count_and_loop(tmp_path):
    out = save_video(moving_square(frames=6).permute(0, 2, 3, 1).numpy(), tmp_path / "clip.gif", fps=10)
    with Image.open(out) as gif:
        assert gif.n_frames == 6
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 100
        assert gif.size == (96, 64)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_odd_size(tmp_path, suffix):
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 63, 65, 3), dtype=np.uint8)
    out = save_video(frames, tmp_path / f"odd{suffix}")
    if suffix == ".mp4":
        info = probe(out)
        assert (info["frames"], info["width"], info["height"]) == (4, 66, 64)
    else:
        with Image.open(out) as gif:
            assert (gif.n_frames, gif.size) == (4, (65, 63))


def test_float_frames_are_clamped():
    frames = np.array([-0.5, 0.5, 1.5], dtype=np.float32).reshape(1, 1, 1, 3).repeat(2, axis=0)
    assert to_uint8_frames(frames)[0, 0, 0].tolist() == [0, 128, 255]


def test_encoder_failure_leaves_no_file(tmp_path, monkeypatch):
    real_write_frames = imageio_ffmpeg.write_frames

    def crashing_write_frames(*args, **kwargs):
        inner = real_write_frames(*args, **kwargs)
        inner.send(None)
        for _ in range(2):
            inner.send((yield))
        inner.close()  # a real, partial MP4 is now on disk
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video.imageio_ffmpeg, "write_frames", crashing_write_frames)
    target = tmp_path / "clip.mp4"
    with pytest.raises(VideoWriteError, match=rf"^Cannot write {re.escape(str(target))} \(encoder crashed\)\.$"):
        save_video(moving_square(), target)
    assert list(tmp_path.iterdir()) == []


def test_a_silently_truncated_video_is_never_renamed_into_place(tmp_path, monkeypatch):
    """An encoder that stops early without an error (a killed ffmpeg) leaves a short file: it is caught."""
    real_write_frames = imageio_ffmpeg.write_frames

    def short_write_frames(*args, **kwargs):
        inner = real_write_frames(*args, **kwargs)
        inner.send(None)
        sent = 0
        try:
            while True:
                frame = yield
                if sent < 3:
                    inner.send(frame)
                    sent += 1
        finally:
            inner.close()

    monkeypatch.setattr(video.imageio_ffmpeg, "write_frames", short_write_frames)
    with pytest.raises(VideoWriteError, match=r"\(the written file holds 3 of 8 frames\)\.$"):
        save_video(moving_square(), tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_fails_the_write_and_leaves_nothing(tmp_path):
    """A write cut off by the file system (here RLIMIT_FSIZE, as a full disk) is an error, not a short video."""
    script = (f"import resource, sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
              "import numpy as np; from dynamicrafter.video import save_video, VideoWriteError\n"
              "frames = np.random.default_rng(0).integers(0, 256, (16, 128, 128, 3), dtype=np.uint8)\n"
              f"try:\n    save_video(frames, {str(tmp_path / 'clip.mp4')!r})\n"
              "except VideoWriteError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith(f"Cannot write {tmp_path / 'clip.mp4'} ("), (out.stdout, out.stderr[-500:])
    assert list(tmp_path.iterdir()) == []


def test_is_complete_video(tmp_path):
    full = save_video(moving_square(), tmp_path / "full.mp4")
    assert is_complete_video(full, 8) and not is_complete_video(full, 9)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    gif = save_video(moving_square(), tmp_path / "clip.gif")
    assert [is_complete_video(p, 8) for p in (cut, empty, tmp_path / "missing.mp4", gif)] == [False, False, False, True]


def test_existing_file_survives_a_failed_write(tmp_path, monkeypatch):
    target = tmp_path / "clip.gif"
    target.write_bytes(b"old")

    def crashing_save(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_video(moving_square(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.gif"]
    assert target.read_bytes() == b"old"


def test_unsupported_extension(tmp_path):
    with pytest.raises(ValueError, match=r"^Unsupported video extension '\.xyz'; use \.mp4 or \.gif\.$"):
        save_video(moving_square(), tmp_path / "clip.xyz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(8, 64, 96), (8, 4, 64, 96), (0, 3, 8, 8)])
def test_bad_shape(tmp_path, shape):
    with pytest.raises(ValueError, match="Expected one video shaped"):
        save_video(np.zeros(shape, dtype=np.float32), tmp_path / "clip.mp4")
