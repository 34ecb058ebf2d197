"""What every command shares: the help of ``dynamicrafter``, one vocabulary, answers before loading, one log format."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamicrafter import __main__ as dispatcher
from dynamicrafter import app, cli
from dynamicrafter.bench import generation as bench
from dynamicrafter.bench import training as training_bench
from dynamicrafter.frontend import chosen_model, configure_logging
from dynamicrafter.training import cli as train

from .conftest import DATA, ROOT, make_image

#: Every command that loads a model, with the positional arguments it needs besides the model.
MODEL_COMMANDS = {"run_pipeline.py": (cli.build_parser, []), "app": (app._parser, []), "bench": (bench.build_parser, []),
                  "train": (train.build_parser, ["clips"]), "bench.training": (training_bench.build_parser, [])}
#: The field a flag sets where a command's name for it differs (train's fields are TrainConfig's).
DEST = {"train": {"config": "model_config", "num_frames": "frames", "dtype": "precision"},
        "bench.training": {"dtype": "precision"}}
HEAVY = ("torch", "open_clip", "gradio")
#: Runs the dynamicrafter command, then says on its last line which heavy modules it imported.
CHILD = ("import atexit, sys\n"
         f"atexit.register(lambda: print('imported:', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
         "from dynamicrafter.__main__ import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def test_dynamicrafter_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        dispatcher.main(["--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:9] == [
        "usage: dynamicrafter [RESOLUTION] [options]     make videos (the options below)",
        "       dynamicrafter COMMAND [options]          COMMAND: app, bench, convert, train",
        "",
        "Animate images with a DynamiCrafter model (docs/cli.md), or run one of its commands:",
        "  app      serve the browser demo for one model (Gradio)",
        "  bench    time a guided step and a video; memory and TFLOP/s",
        "  convert  write any DynamiCrafter checkpoint as one .safetensors file",
        "  train    fine-tune a model on your own clips (LoRA or full)",
        "dynamicrafter COMMAND --help shows a command's options.",
    ]
    assert "  --video_length N, --num_frames N, --frames N" in lines  # then the options of making videos


@pytest.mark.parametrize("command", [name for name in dispatcher.COMMANDS])
def test_each_command_has_its_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        dispatcher.main([command, "--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def _parse(command: str, flags: list[str]) -> dict:
    build, positional = MODEL_COMMANDS[command]
    args = build().parse_args([*flags, *positional])
    values = vars(args)
    return {name: values[DEST.get(command, {}).get(name, name)] for name in
            ("config", "checkpoint", "clip_checkpoint", "device", "dtype", "threads", "num_frames", "height", "width")
            if DEST.get(command, {}).get(name, name) in values} | {"model": chosen_model(args, "default")}


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_every_model_command_takes_the_same_names(command):
    model = ["--config", "m.yaml", "--checkpoint", "m.ckpt", "--clip_checkpoint", "clip.bin", "--device", "cpu",
             "--dtype", "float32", "--threads", "3"]
    expected = {"model": "512", "config": "m.yaml", "checkpoint": "m.ckpt", "clip_checkpoint": "clip.bin",
                "device": "cpu", "dtype": "fp32" if command in DEST else "float32", "threads": 3}
    if command == "app":  # the page sets the sampling options; the app takes only the model's
        generation = []
    else:
        generation = ["--video_length", "8", "--height", "128", "--width", "256"]
        expected |= {"num_frames": 8, "height": 128, "width": 256}
    assert _parse(command, ["512", *model, *generation]) == expected
    assert _parse(command, ["--resolution", "320_512", *model, *generation]) == expected
    if command != "run_pipeline.py":
        assert _parse(command, model)["model"] == "default"  # the command's own default model
    with pytest.raises(ValueError, match=r"^The model is given twice, as 256 and --resolution 512; give it once\.$"):
        _parse(command, ["256", "--resolution", "512"])


@pytest.mark.parametrize("command, old, field, value", [
    ("app", ["--res", "1024"], "model", "1024"),
    ("bench", ["--res", "1024"], "model", "1024"),
    ("train", ["--model_config", "m.yaml"], "config", "m.yaml"),
    ("train", ["--precision", "bf16"], "dtype", "bf16"),
    ("train", ["--frames", "4"], "num_frames", 4),
    ("bench.training", ["--precision", "fp32"], "dtype", "fp32"),
    ("bench.training", ["--frames", "4"], "num_frames", 4),
])
def test_old_spellings_still_work_hidden_from_help(command, old, field, value):
    assert _parse(command, old)[field] == value
    build, _ = MODEL_COMMANDS[command]
    shown = build().format_help()
    if old[0] not in ("--frames",):  # an alias of the option table, shown as every command shows it
        assert f"{old[0]} " not in shown and f"{old[0]}\n" not in shown


def test_the_training_benchmark_takes_trains_max_steps():
    assert training_bench.build_parser().parse_args(["--max_steps", "3"]).max_steps == 3
    assert training_bench.build_parser().parse_args(["--steps", "3"]).max_steps == 3  # the earlier spelling


@pytest.mark.parametrize("command", [*MODEL_COMMANDS, "convert"])
def test_no_help_line_says_its_default_twice(command):
    from dynamicrafter import convert

    build = convert.build_parser if command == "convert" else MODEL_COMMANDS[command][0]
    for action in build()._actions:
        assert (action.help or "").count("(default") <= 1, action.help


# ------------------------------------------------------------------ answers before loading


def _child(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float, list[str], list[str]]:
    """Run ``dynamicrafter ARGS`` in a fresh process: the result, its seconds, its log lines and the heavy modules
    it imported."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    seconds = time.perf_counter() - started
    *lines, imported = done.stderr.strip().splitlines()
    assert imported.startswith("imported: "), done.stderr
    return done, seconds, [line for line in lines if line], eval(imported.removeprefix("imported: "))


def _complete_video(path: Path, frames: int) -> None:
    import numpy as np

    from dynamicrafter.video import save_video

    save_video(np.zeros((frames, 16, 16, 3), np.uint8), path)


@pytest.mark.parametrize("case", ["usage error", "app usage error", "bench usage error", "train usage error",
                                  "existing convert output", "all skipped"])
def test_answers_before_torch_open_clip_or_gradio(case, tmp_path, record_property):
    """Each answers without importing torch, OpenCLIP or Gradio (about 0.2 s on a quiet 2-CPU machine, against
    12 s when torch was imported first); the limit asserted is loose, for busy machines."""
    image = make_image(tmp_path / "a.png")
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    _complete_video(tmp_path / "videos" / "a.mp4", 4)
    argv, code, last = {
        "usage error": (["256", "--video_length", "many"], 2, "ERROR: --video_length: expected an integer, got 'many'."),
        "app usage error": (["app", "--port", "0"], 2, "ERROR: --port: must be between 1 and 65535, got 0."),
        "bench usage error": (["bench", "--height", "63"], 2, "ERROR: --height: must be between 64 and 2048, got 63."),
        "train usage error": (["train", "clips", "--dtype", "float16"], 2,
                              "ERROR: --dtype: invalid choice: 'float16' (choose auto, bfloat16 or float32; "
                              "training has no float16)."),
        "existing convert output": (["convert", str(DATA / "tiny256.ckpt"), "out.safetensors"], 1,
                                    "ERROR: out.safetensors already exists; pass --overwrite to replace it."),
        "all skipped": (["256", "--image_path", str(image), "--output_dir", "videos", "--video_length", "4",
                         "--checkpoint", "missing.ckpt", "--device", "cuda:7"], 0, "INFO: 0 done, 0 failed, 1 skipped"),
    }[case]
    done, seconds, lines, imported = _child(argv, tmp_path)
    record_property("seconds", round(seconds, 2))
    assert (done.returncode, lines[-1:], imported) == (code, [last], [])
    assert seconds < 10
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"


def test_an_incomplete_video_is_made_again(tmp_path, monkeypatch, caplog):
    """What counts as made is checked, not assumed: a video of other length is not skipped (here: the model loads)."""
    image = make_image(tmp_path / "a.png")
    _complete_video(tmp_path / "videos" / "a.mp4", 3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.INFO)
    assert cli.main(["256", "--image_path", str(image), "--output_dir", "videos", "--video_length", "4",
                     "--device", "cpu"]) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert "Making videos/a.mp4 again: it is not a complete video of 4 frames." in messages
    assert messages[-1].startswith("Checkpoint checkpoints/dynamicrafter_256_v1/model.ckpt is missing and "
                                   "HF_HUB_OFFLINE is set; download ")


# ------------------------------------------------------------------ a download that explains itself


def test_a_refused_download_stops_at_once_with_what_to_do(tmp_path, record_property):
    """Against a port nobody listens on: no retries, no repeated line, no empty folder; the last line says it all."""
    import socket

    with socket.socket() as sock:  # bound, then closed: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    image = make_image(tmp_path / "a.png")
    run = tmp_path / "run"
    run.mkdir()
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    done, seconds, lines, _ = _child(["256", "--image_path", str(image), "--device", "cpu"], run, **env)
    record_property("seconds", round(seconds, 2))
    target = run / "checkpoints" / "dynamicrafter_256_v1" / "model.ckpt"
    assert done.returncode == 1
    assert lines[-1] == (
        f"ERROR: Could not reach {url} to download model.ckpt of the 256 model ({url[7:]} refused the connection); "
        f"download {url}/Doubiiu/DynamiCrafter/resolve/main/model.ckpt yourself and put it at {target} "
        "(or pass --checkpoint FILE), and set HF_HUB_OFFLINE=1 to stop trying the network.")
    assert not any("Retrying" in line for line in lines) and len(set(lines)) == len(lines)
    assert list(run.iterdir()) == []  # no empty checkpoints/ nor results/ folder left behind


# ------------------------------------------------------------------ one log format, no known noise


def test_torchaos_enum_warnings_are_dropped_and_others_kept(caplog):
    import enum

    configure_logging()
    torchao_enum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common")
    other_enum = enum.Enum("Colour", "RED", module="someone.else")
    pytree = logging.getLogger("torch.utils._pytree")
    message = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
               "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")
    with caplog.at_level(logging.WARNING):
        pytree.warning(message, torchao_enum)
        pytree.warning(message, other_enum)
    assert [r.args[0] for r in caplog.records if r.name == "torch.utils._pytree"] == [other_enum]
    configure_logging()  # a second command in the process adds no second filter
    assert len(pytree.filters) == 1


def test_every_command_logs_in_one_format():
    """configure_logging takes no format: no command can choose another one (the app had its own)."""
    import inspect

    assert not inspect.signature(configure_logging).parameters
