"""The frame-count sweep (``python -m dynamicrafter.bench.frames``): one point, the sweep's processes and its table."""

from __future__ import annotations

import json
import logging
import subprocess

from dynamicrafter.bench import frames

from .conftest import DATA

TINY = ["--config", str(DATA / "tiny256.yaml"), "--device", "cpu", "--dtype", "float32", "--height", "64",
        "--width", "64", "--window_size", "4", "--window_stride", "2"]


def test_a_point_on_the_tiny_model(capsys):
    """One point in this process: 6 frames in the windows 0-3 and 2-5, a step and a decode measured."""
    assert frames.main([*TINY, "--steps", "1", "--threads", "1", "--point", "6"]) == 0
    point = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (point["frames"], point["windows"], point["window_size"], point["window_stride"]) == (6, True, 4, 2)
    assert (point["temporal_windows"], point["guidance"], point["dtype"], point["threads"]) == (2, "batched", "float32", 1)
    assert (point["height"], point["width"]) == (64, 64) and point["decode_chunk_frames"] > 0
    assert len(point["step_wall_s"]) == len(point["step_cpu_s"]) == 1 and point["cpu_s_per_step"] > 0
    assert point["step_peak_above_weights_bytes"] >= 0 and point["decode_peak_above_start_bytes"] >= 0
    assert point["peak_bytes"] >= point["weights_bytes"] > 0 and point["decode_s"] > 0
    assert len(point["loadavg_before"]) == len(point["loadavg_after"]) == 3


def test_the_sweep_runs_each_point_apart_interleaved(monkeypatch, tmp_path, capsys):
    """Both settings of a frame count together, alternating which goes first; a line per point; the table."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        count, windowed = int(command[command.index("--point") + 1]), "--no-windows" not in command
        cpu = count * (1.5 if windowed else 1.0)
        point = {"frames": count, "windows": windowed, "temporal_windows": 3, "window_size": 4, "window_stride": 2,
                 "s_per_step": 2 * cpu, "cpu_s_per_step": cpu, "step_peak_above_weights_bytes": count * 10 ** 8,
                 "loadavg_before": [1.0, 1, 1], "loadavg_after": [2.0, 1, 1]}
        return subprocess.CompletedProcess(command, 0, "INFO: ...\n" + json.dumps(point) + "\n")

    monkeypatch.setattr(frames.subprocess, "run", run)
    out = tmp_path / "points.jsonl"
    assert frames.main([*TINY, "--frames", "4", "8", "12", "--steps", "3", "--out", str(out)]) == 0
    order = [(c[c.index("--point") + 1], "--no-windows" not in c) for c in commands]
    assert order == [("4", False), ("8", False), ("8", True), ("12", True), ("12", False)]
    assert all(c[c.index("--steps") + 1] == "3" and c[c.index("--window_size") + 1] == "4" for c in commands)
    assert [("--no-decode" in c) for c in commands] == [windowed for _, windowed in order]  # the VAE: once per count
    assert [json.loads(line)["frames"] for line in out.read_text().splitlines()] == [4, 8, 8, 12, 12]
    table = capsys.readouterr().out.splitlines()
    assert table[4] == ("| 8 | yes (3 of 4, stride 2) | 24 | 12 | +50% | +50% | 0.80 GB |  |  | 1.0 / 2.0 |")
    assert table[3].startswith("| 8 | no | 16 | 8 | +0% |  |")
    assert frames.main([*TINY, "--table", str(out), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["points"]) == 5


def test_bad_arguments_exit_with_one_line(caplog, tmp_path):
    for argv, message in (
            (["--frames", "16", "0"], "--frames: each must be between 1 and 128, got 0."),
            (["--window_size", "8", "--window_stride", "9"], "--window_stride must be at most --window_size (8), "
             "got 9: windows further apart would leave frames without temporal attention."),
            (["--steps", "0"], "--steps must be at least 1."),
            (["--random-weights", "--checkpoint", "model.ckpt"], "--random-weights and --checkpoint exclude each other."),
            (["--table", str(tmp_path / "none.jsonl")], f"--table: {tmp_path / 'none.jsonl'} is not a file of points.")):
        caplog.clear()
        assert frames.main(argv) == 2
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [message]
