"""What a training run reads from the user: CSVs in other encodings, oversized clips (issue "the
house rebuilt", B7-B8), the command line's help and its process rank."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import shutil

import pytest

from dynamicrafter import images
from dynamicrafter.errors import UserError
from dynamicrafter.training import data as D
from dynamicrafter.training.cli import main as train_main
from dynamicrafter.training.config import TrainConfig

from .test_training import CLIPS, _flags


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------------------------- B7: CSVs
def test_a_csv_that_is_not_utf8_is_named(tmp_path, caplog):
    table = tmp_path / "clips.csv"
    table.write_bytes("path,caption\nred_ball.mp4,une balle rouge sur un sol gris, café\n".encode("latin-1"))
    message = f"{table} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in a spreadsheet)."
    with pytest.raises(UserError) as caught:
        D.find_clips(table)
    assert str(caught.value) == message
    assert train_main([str(table), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert errors(caplog) == [message]
    assert not (tmp_path / "out").exists()  # refused before anything is written

    spreadsheet = tmp_path / "excel.csv"  # UTF-8 with the byte-order mark spreadsheets write
    spreadsheet.write_bytes("path,caption\nred_ball.mp4,café\n".encode("utf-8-sig"))
    [clip] = D.find_clips(spreadsheet)
    assert clip.path == tmp_path / "red_ball.mp4" and clip.caption == "café"


# ------------------------------------------------------------------------ B8: pixel limit
def test_clips_over_the_image_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, caplog):
    assert D.MAX_IMAGE_PIXELS is images.MAX_IMAGE_PIXELS  # one limit for images and clip frames

    def no_decoding(*args):
        raise AssertionError("a clip over the limit was decoded")

    monkeypatch.setattr(D, "MAX_IMAGE_PIXELS", 100 * 100)  # the example clips are 128x128
    monkeypatch.setattr(D, "_decode", no_decoding)
    reason = "its frames are 128x128 pixels (0.0164 megapixels), over the limit of 0.01"
    with pytest.raises(D.ClipError) as caught:
        D.read_clip(CLIPS / "red_ball.mp4", 2, 64, 64, 1, 1, random.Random(0))
    assert str(caught.value) == reason
    with pytest.raises(D.ClipError, match=re.escape(reason)):
        D.first_frame(CLIPS / "green_ring.gif")

    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("red_ball.mp4", "red_ball.txt"):
        shutil.copy(CLIPS / name, folder / name)
    assert train_main([str(folder), *_flags(tmp_path / "out", max_steps=1)]) == 1
    assert errors(caplog) == [f"None of the 1 clips in {folder} can be used for training. "
                              f"The first: {folder / 'red_ball.mp4'}: {reason}."]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping clip")]
    assert skipped == [f"Skipping clip {folder / 'red_ball.mp4'}: {reason}"]  # warned once


# ------------------------------------------------------------------------ the command line
def test_help_comes_from_the_config_fields_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping (it splits "same-name")
    with pytest.raises(SystemExit) as done:
        train_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "%(default)" not in text
    for f in dataclasses.fields(TrainConfig):
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "base checkpoint (default: the released one, downloaded when missing) --" in text  # said once
    assert "LoRA rank (default: 64)" in text and "--overwrite, --no-overwrite" in text
    assert "(FSDP for full fine-tuning of 1024) (default: auto)" in text
    assert "torch.compile the UNet (default: off)" in text


def test_a_bad_rank_is_one_error(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("RANK", "first")
    assert train_main([str(CLIPS), "--output_dir", str(tmp_path), "--device", "cpu"]) == 1
    [error] = errors(caplog)
    assert "RANK" in error and "\n" not in error
