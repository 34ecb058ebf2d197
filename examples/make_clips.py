"""Make the example training clips in examples/clips/ (synthetic moving shapes, with captions).

    python examples/make_clips.py [output_folder]

Each clip is 128x128 at 8 frames per second; one per container the trainer reads
(.mp4 H.264, .webm VP9, .gif written with Pillow, .mov). They are made here, so they carry no licence of others.
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np

SIZE = 128
CLIPS = [
    # name, container/codec, frames, caption, drawing
    ("red_ball", "mp4", "libx264", 32, "a red ball rolling from left to right on a grey floor"),
    ("blue_square", "webm", "libvpx-vp9", 24, "a blue square sliding down over a yellow background"),
    ("green_ring", "gif", "gif", 20, "a green ring growing in the middle of a dark picture"),
    ("white_bar", "mov", "libx264", 24, "a white bar sweeping across a purple background"),
]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def frame(name: str, i: int, n: int) -> np.ndarray:
    """One RGB frame (uint8, SIZE x SIZE) of a clip."""
    y, x = _grid()
    p = i / max(1, n - 1)
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    if name == "red_ball":
        img[:] = (110, 110, 110)
        cx, cy = 16 + p * (SIZE - 32), SIZE * 0.6
        inside = (x - cx) ** 2 + (y - cy) ** 2 < 14 ** 2
        img[inside] = (220, 30, 30)
    elif name == "blue_square":
        img[:] = (230, 200, 40)
        top = 8 + p * (SIZE - 48)
        inside = (abs(x - SIZE / 2) < 20) & (y >= top) & (y < top + 40)
        img[inside] = (30, 60, 210)
    elif name == "green_ring":
        img[:] = (20, 20, 35)
        r = np.sqrt((x - SIZE / 2) ** 2 + (y - SIZE / 2) ** 2)
        radius = 10 + p * 40
        img[abs(r - radius) < 5] = (40, 200, 80)
    else:  # white_bar
        img[:] = (90, 40, 120)
        left = p * (SIZE - 16)
        img[(x >= left) & (x < left + 16)] = (245, 245, 245)
    return img.clip(0, 255).astype(np.uint8)


def write(path: Path, codec: str, frames: int, name: str) -> None:
    if codec == "gif":  # Pillow writes flat colours into a small palette GIF
        from PIL import Image

        images = [Image.fromarray(frame(name, i, frames)) for i in range(frames)]
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
        return
    options = {"crf": "30"} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8, options=options)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(name, i, frames), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).parent / "clips"
    out.mkdir(parents=True, exist_ok=True)
    for name, ext, codec, frames, caption in CLIPS:
        write(out / f"{name}.{ext}", codec, frames, name)
        (out / f"{name}.txt").write_text(caption + "\n")
    print(f"Wrote {len(CLIPS)} clips to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
