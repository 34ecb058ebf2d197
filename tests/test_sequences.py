"""Chained segments and keyframe sequences (dynamicrafter/sequences.py): the join's arithmetic, the pieces a
sequence is made of, and the tiny interpolation model's videos (the first piece is the plain call, exactly)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamicrafter import cli
from dynamicrafter.errors import UserError
from dynamicrafter.request import SequenceRequest, joined_frames
from dynamicrafter.sequences import conditioning_frame, crossfade_weights, join_pieces, make_sequence

from .conftest import DATA, load_tiny, make_image, read_video, tiny_args

FAST = dict(num_inference_steps=2, num_frames=4, height=64, width=64)
INTERP = load_tiny("tiny512").config.replace(interp=True)


def numbered(start: int, frames: int) -> torch.Tensor:
    """A video ``[1, frames, 1]`` whose frame ``j`` holds ``start + j``: where each frame went is readable."""
    return torch.arange(start, start + frames, dtype=torch.float32).view(1, frames, 1)


def values(video: torch.Tensor) -> list[float]:
    return video.flatten().tolist()


def test_keyframe_join_keeps_each_shared_keyframe_once():
    # pieces 0-3, 10-13, 20-23: frame 3 and 10 are the same keyframe, so are 13 and 20
    pieces = [numbered(0, 4), numbered(10, 4), numbered(20, 4)]
    assert values(join_pieces(pieces, cut=1)) == [0, 1, 2, 3, 11, 12, 13, 21, 22, 23]
    assert values(join_pieces(pieces, cut=0)) == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    # kijai's window: cut // 2 frames before the next piece's first frame, the rest from the next piece
    assert values(join_pieces(pieces, cut=2)) == [0, 1, 2, 11, 12, 21, 22, 23]
    assert values(join_pieces(pieces, cut=3)) == [0, 1, 2, 12, 22, 23]


def test_loop_join_drops_the_repeat_of_the_first_frame_last():
    # k0 -> k1 -> k2 -> k0: the last piece ends on k0 again (its frame 23)
    pieces = [numbered(0, 4), numbered(10, 4), numbered(20, 4)]
    assert values(join_pieces(pieces, cut=1, loop=True)) == [0, 1, 2, 3, 11, 12, 13, 21, 22]
    assert values(join_pieces(pieces, cut=2, loop=True)) == [1, 2, 11, 12, 21, 22]
    assert values(join_pieces(pieces, cut=0, loop=True)) == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]


def test_segments_cross_fade_their_overlap_with_even_weights():
    assert crossfade_weights(3).tolist() == [0.25, 0.5, 0.75]
    before, after = torch.zeros(1, 5, 2), torch.ones(1, 6, 2)
    joined = join_pieces([before, after], overlap=3)
    assert joined[0, :, 0].tolist() == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert joined.shape == (1, 8, 2)
    assert values(join_pieces([numbered(0, 4), numbered(10, 4)], overlap=0)) == [0, 1, 2, 3, 10, 11, 12, 13]
    assert conditioning_frame(16) == 15  # segment i + 1 animates the last frame of segment i


@pytest.mark.parametrize(("frames", "pieces", "overlap", "cut", "loop"), [
    (4, 3, 0, 1, False), (4, 3, 0, 2, True), (16, 4, 4, 0, False), (16, 5, 0, 3, False), (7, 2, 6, 0, False)])
def test_frame_count_formula_is_what_the_join_gives(frames, pieces, overlap, cut, loop):
    joined = join_pieces([torch.zeros(1, frames, 1)] * pieces, overlap=overlap, cut=cut, loop=loop)
    assert joined.shape[1] == joined_frames(frames, pieces, overlap, cut, loop)


class FakePipe:
    """Records each piece's call and makes a video from the start image's value to the end image's (or 30 more)."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, prompt, negative_prompt, end_image=None, generator=None, num_frames=4, **options):
        start = float(np.asarray(image).mean())
        end = start + 30 if end_image is None else float(np.asarray(end_image).mean())
        self.calls.append((round(start), None if end_image is None else round(end), prompt, generator))
        return torch.linspace(start, end, num_frames).view(1, num_frames, 1, 1, 1).expand(1, num_frames, 3, 2, 2) / 255


def keys(*levels: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), level, dtype=np.uint8) for level in levels]


def test_keyframes_interpolate_each_pair_and_loop_back_to_k0():
    fake, generator = FakePipe(), torch.Generator()
    sequence = SequenceRequest.build(
        INTERP, image=None, keyframes=keys(0, 30, 60), prompt=["a", "b", "c"], negative_prompt=None,
        end_image=None, segments=1, overlap=None, cut_near_keyframes=1, loop=True, num_frames=4,
        num_videos_per_prompt=1, latents=None, output_type="pt", generator=generator)
    video = make_sequence(fake, sequence, "pt", {"num_frames": 4})
    assert [call[:3] for call in fake.calls] == [(0, 30, "a"), (30, 60, "b"), (60, 0, "c")]
    assert all(call[3] is generator for call in fake.calls)  # one generator, drawn from in order
    levels = (video[0, :, 0, 0, 0] * 255).round().tolist()
    assert levels == [0, 10, 20, 30, 40, 50, 60, 40, 20]  # starts on k0, closes back towards it; no repeats
    assert video.shape[1] == joined_frames(4, 3, cut=1, loop=True) == sequence.frames


@pytest.mark.parametrize(("overlap", "second"), [(1, 130), (2, 130), (0, 130)])
def test_segments_animate_the_last_frame_of_the_segment_before(overlap, second):
    fake = FakePipe()
    sequence = SequenceRequest.build(
        INTERP, image=keys(100)[0], keyframes=None, prompt=["a", "b"], negative_prompt="n",
        end_image=None, segments=2, overlap=overlap, cut_near_keyframes=1, loop=False, num_frames=4,
        num_videos_per_prompt=1, latents=None, output_type="pt", generator=None)
    make_sequence(fake, sequence, "pt", {"num_frames": 4})
    assert [call[:3] for call in fake.calls] == [(100, None, "a"), (second, None, "b")]


@pytest.fixture(scope="module")
def tiny512_interp():
    from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

    return DynamiCrafterImg2VideoPipeline("512_interp", device="cpu", checkpoint=DATA / "tiny512.ckpt",
                                          config=INTERP, dtype="float32")


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_first_segment_is_the_plain_call_and_a_seed_gives_the_same_video(tiny512_interp):
    pipe, image = tiny512_interp, np.full((64, 64, 3), 120, dtype=np.uint8)
    plain = pipe(image, "a", generator=seeded(), **FAST)["videos"]
    chained = pipe(image, ["a", "b"], segments=2, overlap=2, generator=seeded(), **FAST)["videos"]
    assert chained.shape == (1, 6, 3, 64, 64)
    assert torch.equal(chained[:, :2], plain[:, :2])  # before the overlap: segment 0 exactly
    again = pipe(image, ["a", "b"], segments=2, overlap=2, generator=seeded(), output_type="np", **FAST)["videos"]
    assert again.shape == (1, 6, 64, 64, 3) and np.array_equal(again, chained.permute(0, 1, 3, 4, 2).numpy())


def test_keyframes_make_one_video_whose_first_interpolation_is_the_plain_call(tiny512_interp):
    pipe = tiny512_interp
    k0, k1, k2 = (np.full((64, 64, 3), level, dtype=np.uint8) for level in (20, 120, 220))
    plain = pipe(k0, "x", end_image=k1, generator=seeded(), **FAST)["videos"]
    video = pipe(keyframes=[k0, k1, k2], prompt="x", generator=seeded(), **FAST)["videos"]
    assert video.shape == (1, 7, 3, 64, 64)  # 2 x 4 frames, k1 once
    assert torch.equal(video[:, :4], plain)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(keyframes=[np.zeros((64, 64, 3), np.uint8)]),
     "keyframes needs at least 2 images (a start and an end keyframe), got 1."),
    (dict(keyframes=[np.zeros((64, 64, 3), np.uint8), np.zeros((48, 64, 3), np.uint8)]),
     "Keyframe 2 is 64x48 but keyframe 1 is 64x64; give keyframes of one size."),
    (dict(keyframes=keys(0, 1, 2), prompt=["a", "b", "c"]),
     "Got 2 interpolations but 3 prompts; give one prompt per interpolation or a single prompt."),
    (dict(keyframes=keys(0, 1), cut_near_keyframes=4),
     "cut_near_keyframes must be less than num_frames (4), got 4: every interpolation must keep frames of its own."),
    (dict(keyframes=keys(0, 1), image=keys(0)[0]), "Give either keyframes or image (and end_image), not both."),
    (dict(segments=2, end_image=keys(0)[0], image=keys(0)[0]),
     "end_image cannot be combined with segments; for several key images give keyframes=[...]."),
])
def test_bad_sequences_are_one_sentence(tiny512_interp, kwargs, message):
    with pytest.raises(UserError) as info:
        tiny512_interp(**kwargs, **FAST)
    assert str(info.value) == message


def test_keyframe_files_of_different_sizes_are_named(tiny512_interp, tmp_path):
    files = [make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png"), make_image(tmp_path / "c.png", (80, 64))]
    with pytest.raises(UserError) as info:
        tiny512_interp(keyframes=files, **FAST)
    assert str(info.value) == "Keyframe 3 (c.png) is 80x64 but keyframe 1 is 64x64; give keyframes of one size."


# ----------------------------------------------------------------------------- the command line


def interp_args() -> list[str]:
    """The tiny model as 512_interp on the command line: 2 steps, 4 frames of 64x64, on the CPU."""
    return ["512_interp", *tiny_args("tiny512"), "--device", "cpu", "--dtype", "float32"]


def manifest_lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_cli_keyframes_loop_is_one_video_of_the_joined_frame_count(tmp_path):
    keys_ = [make_image(tmp_path / f"k{i}.png") for i in range(2)]
    out = tmp_path / "out"
    assert cli.main([*interp_args(), "--keyframes", *map(str, keys_), "--loop", "--prompt_text", "p",
                     "--output_dir", str(out)]) == 0
    assert read_video(out / "k0.mp4")[1] == joined_frames(4, 2, cut=1, loop=True) == 6
    (line,) = manifest_lines(out)
    assert line["keyframes"] == list(map(str, keys_)) and line["loop"] is True and line["frames"] == 6
    assert line["prompts"] == ["p"] and line["settings"]["cut_near_keyframes"] == 1
    assert cli.main([*interp_args(), "--keyframes", *map(str, keys_), "--loop", "--output_dir", str(out)]) == 0
    assert len(manifest_lines(out)) == 1  # complete at the expected frame count: skipped


def test_cli_segments_take_one_prompt_line_each(tmp_path):
    image = make_image(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("walks\n\nruns\n")
    out = tmp_path / "out"
    assert cli.main([*interp_args(), "--image_path", str(image), "--segments", "2", "--overlap", "1",
                     "--output_dir", str(out)]) == 0
    assert read_video(out / "cat.mp4")[1] == 7  # 2 x 4 - 1
    (line,) = manifest_lines(out)
    assert line["prompts"] == ["walks", "runs"] and line["prompt"] == "walks"
    assert {k: line["settings"][k] for k in ("segments", "overlap")} == {"segments": 2, "overlap": 1}


def test_cli_sequence_makes_one_video_of_the_sorted_folder(tmp_path):
    folder = tmp_path / "walk"
    for name in ("b.png", "a.png"):
        make_image(folder / name)
    (folder / "test_prompts.txt").write_text("first\n")
    out = tmp_path / "out"
    assert cli.main([*interp_args(), "--prompt_dir", str(folder), "--interp", "--sequence",
                     "--output_dir", str(out)]) == 0
    (line,) = manifest_lines(out)
    assert line["video"] == "walk.mp4" and [Path(k).name for k in line["keyframes"]] == ["a.png", "b.png"]
    assert line["prompts"] == ["first"] and read_video(out / "walk.mp4")[1] == 4


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--keyframes", "{a}"], 2, "--keyframes needs at least 2 images (a start and an end keyframe), got 1."),
    (["--keyframes", "{a}", "{big}"], 1, "Keyframe 2 (big.png) is 80x64 but keyframe 1 is 64x64; give keyframes of "
                                         "one size."),
    (["--image_path", "{a}", "--segments", "2", "--overlap", "4"], 2,
     "--overlap must be less than --video_length (4), got 4: each segment needs frames of its own."),
    (["--prompt_dir", "{folder}", "--interp", "--segments", "2"], 2,
     "--segments chains videos of one image; it cannot be combined with --interp (keyframes already make one "
     "interpolation per pair)."),
    (["--prompt_dir", "{folder}", "--sequence"], 2,
     "--sequence makes one video through every image of the folder; give it with --interp or --loop."),
    (["--keyframes", "{a}", "{a}", "--cut_near_keyframes", "4"], 2,
     "--cut_near_keyframes must be less than --video_length (4), got 4: every interpolation must keep frames of "
     "its own."),
])
def test_cli_bad_sequences_are_one_line_before_the_model_loads(tmp_path, caplog, argv, code, message):
    a, big = make_image(tmp_path / "in" / "a.png"), make_image(tmp_path / "big.png", (80, 64))
    argv = [arg.format(a=a, big=big, folder=tmp_path / "in") for arg in argv]
    assert cli.main([*interp_args(), *argv, "--output_dir", str(tmp_path / "out")]) == code
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [message]


def test_cli_segments_zero_is_a_usage_error(tmp_path, caplog):
    assert cli.main([*interp_args(), "--segments", "0"]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "--segments: must be between 1 and 64, got 0."]

