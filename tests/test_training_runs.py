"""Training runs are never destroyed: a second run, a resume with other settings, a diverging
run, unreadable checkpoints, failed and killed saves (issue "the house rebuilt", B1-B6).

One tiny LoRA run (2 steps, a checkpoint after each) is made once; each test works on a copy.
Exit codes and the one ``ERROR:`` line are checked through the command line.
"""

from __future__ import annotations

import csv
import errno
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from dynamicrafter.errors import UserError
from dynamicrafter.training import checkpointing
from dynamicrafter.training.cli import main as train_main
from dynamicrafter.training.config import TrainConfig
from dynamicrafter.training.distributed import Dist
from dynamicrafter.training.trainer import setup, train

from .test_training import CLIPS, _flags, tiny_config

RUN = dict(max_steps=2, save_every=1, learning_rate=1e-3, lora_rank=4, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base_run") / "run"
    result = train(tiny_config(CLIPS, out, **RUN))
    assert result.step == 2 and result.checkpoint == out / "checkpoint-000002"
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def infos(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno in (logging.INFO, logging.WARNING)]


def metric_rows(out: Path) -> list[dict[str, str]]:
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def cli(out: Path, *extra: str, **changes) -> int:
    return train_main([str(CLIPS), *_flags(out, **{**RUN, **changes}), *extra])


# ------------------------------------------------------------------------- B1: a second run
def test_a_second_run_into_a_run_is_refused_and_changes_nothing(base_run, tmp_path, caplog):
    out = copy_run(base_run, tmp_path)
    before = files(out)
    assert cli(out) == 1
    assert errors(caplog) == [f"{out} already holds a training run; continue it with --resume latest, or start over "
                              f"with --overwrite (which deletes its checkpoints, logs and samples)."]
    assert files(out) == before
    only_logs = tmp_path / "killed_before_its_first_checkpoint"
    (only_logs / "logs").mkdir(parents=True)
    (only_logs / "logs" / "metrics.csv").write_text("step,loss,lr,seconds\n1,0.5,0.001,1.0\n")
    assert cli(only_logs) == 1 and errors(caplog)[-1].startswith(f"{only_logs} already holds a training run; ")
    assert cli(out, "--resume", "latest", "--overwrite") == 1
    assert errors(caplog)[-1] == "--resume continues a run and --overwrite deletes one: give only one of them."
    assert cli(only_logs, "--resume", str(out / "checkpoint-000001")) == 1
    assert errors(caplog)[-1] == (f"{only_logs} already holds a training run, not the one {out / 'checkpoint-000001'} "
                                  f"belongs to; resume into that run's folder or an empty --output_dir.")
    assert files(out) == before


def test_overwrite_removes_the_old_run_first(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    (out / "samples").mkdir()
    (out / "samples" / "step_000002.mp4").write_bytes(b"an old sample")
    (out / "cache").mkdir()
    (out / "cache" / "kept.safetensors").write_bytes(b"cached latents are not the run's")
    assert cli(out, "--overwrite", max_steps=1) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cache", "checkpoint-000001", "logs"]
    assert [r["step"] for r in metric_rows(out)] == ["1"]
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # the old run's events are gone
    assert (out / "cache" / "kept.safetensors").is_file()


# ------------------------------------------------------------------- B2: resuming, settings
def test_resume_applies_a_new_learning_rate_and_says_what_differs(base_run, tmp_path, caplog):
    out = copy_run(base_run, tmp_path)
    caplog.set_level(logging.INFO)
    assert cli(out, "--resume", "latest", learning_rate=5e-3, max_steps=3, seed=5) == 0
    lines = infos(caplog)
    assert "learning rate 0.005 (was 0.001 in the saved run)" in lines
    assert "max_steps 3 (was 2 in the saved run)" in lines
    assert "seed 0 of the saved run is kept, not 5: the data order and the random draws continue from it." in lines
    assert [(r["step"], float(r["lr"])) for r in metric_rows(out)] == [("1", 1e-3), ("2", 1e-3), ("3", 5e-3)]
    saved = checkpointing.read_state(out / "checkpoint-000003")["config"]
    assert saved["learning_rate"] == 5e-3 and saved["seed"] == 0

    caplog.clear()  # not given: the saved run's learning rate goes on
    assert cli(out, "--resume", "latest", learning_rate=None, max_steps=4) == 0
    assert "From the saved run: learning_rate 0.005." in infos(caplog)
    assert float(metric_rows(out)[-1]["lr"]) == 5e-3 and not any(m.startswith("learning rate") for m in infos(caplog))


@pytest.mark.parametrize("flag, value, saved", [("lora_rank", 8, 4), ("mode", "full", "lora"),
                                                ("resolution", "512", "256")])
def test_resume_with_settings_that_cannot_continue_is_refused(base_run, caplog, flag, value, saved):
    before = files(base_run)
    assert cli(base_run, "--resume", "latest", **{flag: value}) == 1
    assert errors(caplog) == [f"{base_run / 'checkpoint-000002'} was trained with --{flag} {saved}, not {value}: resume "
                              f"with --{flag} {saved}, or start a new run in another --output_dir."]
    assert files(base_run) == before


# ---------------------------------------------------------------------- B3: non-finite values
@pytest.mark.parametrize("name, value", [("learning_rate", math.inf), ("learning_rate", math.nan),
                                         ("max_grad_norm", math.nan), ("weight_decay", math.inf),
                                         ("uncond_prob", math.inf), ("learning_rate", 1e39)])
def test_config_refuses_inf_where_it_refuses_nan(name, value):
    with pytest.raises(UserError) as caught:
        TrainConfig(data="x", **{name: value})
    assert str(caught.value) == f"{name} must be a finite number (float32's: at most 3.4e38), got {value}."
    with pytest.raises(UserError, match=r"adam_betas must be a finite number \(float32's: at most 3.4e38\), got 0.9 nan."):
        TrainConfig(data="x", adam_betas=(0.9, math.nan))


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, caplog):
    out = tmp_path / "run"
    assert cli(out, learning_rate=1e35, max_steps=3) == 1
    [error] = errors(caplog)
    assert error in {f"The loss is {v} at step 2: training diverged (try a lower --learning_rate), and nothing of that "
                     f"step was saved." for v in ("nan", "inf")}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "logs"]  # step 1 was still finite
    assert [r["step"] for r in metric_rows(out)] == ["1"]
    assert cli(tmp_path / "overflow", learning_rate=1e38) == 1
    assert errors(caplog)[-1] == "The optimizer's step 1 overflows float32 at learning rate 1e+38: try a lower --learning_rate."
    assert not list((tmp_path / "overflow").glob("checkpoint-*"))


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    state = setup(tiny_config(CLIPS, tmp_path / "run", **RUN))
    state.step = 1
    with torch.no_grad():
        state.params[0][0, 0] = math.nan
    with pytest.raises(UserError) as caught:
        checkpointing.save_checkpoint(state)
    assert str(caught.value) == ("The trained weights became NaN or infinite at step 1: training diverged (try a lower "
                                 "--learning_rate), and no checkpoint was written for that step.")
    assert list((tmp_path / "run").iterdir()) == []


# ---------------------------------------------------------------- B4: unreadable checkpoints
def test_a_truncated_or_foreign_training_state_is_one_sentence(base_run, tmp_path, caplog):
    out = copy_run(base_run, tmp_path)
    state_file = out / "checkpoint-000002" / "training_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:500])
    assert cli(out, "--resume", "latest") == 1
    [error] = errors(caplog)
    assert error.startswith(f"{state_file} cannot be read, it is truncated or corrupt (")
    assert error.endswith("); resume from another checkpoint.") and "\n" not in error
    torch.save({"step": 2}, state_file)
    assert cli(out, "--resume", "latest") == 1
    assert errors(caplog)[-1] == (f"{state_file} is not a training state written by this trainer (it lacks epoch, "
                                  f"position, optimizer, scheduler, rng).")


def test_a_corrupt_adapter_is_one_sentence(base_run, tmp_path, caplog):
    out = copy_run(base_run, tmp_path)
    adapter = out / "checkpoint-000002" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:300])
    assert cli(out, "--resume", "latest", max_steps=3) == 1
    [error] = errors(caplog)
    assert error.startswith(f"{adapter} is not a readable LoRA file (") and "\n" not in error


def test_a_corrupt_unet_file_is_one_sentence(tmp_path, caplog):
    out = tmp_path / "full"
    assert cli(out, mode="full", max_steps=1, learning_rate=1e-5) == 0
    unet = out / "checkpoint-000001" / "unet.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    assert cli(out, "--resume", "latest", mode="full", max_steps=2, learning_rate=1e-5) == 1
    [error] = errors(caplog)
    assert error.startswith(f"{unet} cannot be read, it is truncated or corrupt (") and error.endswith(").")


# ---------------------------------------------------------------------- B5: a failed save
def test_a_failed_save_is_one_sentence_and_keeps_the_earlier_checkpoints(base_run, tmp_path, caplog, monkeypatch):
    out = copy_run(base_run, tmp_path)
    before = files(out)
    save = torch.save

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert cli(out, "--resume", "latest", max_steps=3) == 1
    assert errors(caplog) == [f"Could not write checkpoint {out / 'checkpoint-000003'} (No space left on device); the "
                              f"earlier checkpoints are intact."]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "checkpoint-000002", "logs"]  # no temporary
    assert {k: v for k, v in files(out).items() if k.startswith("checkpoint")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoint")}

    def torch_disk_full(*args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_disk_full)  # saving step 2 again: the one there stays
    assert cli(out, "--resume", str(out / "checkpoint-000001")) == 1
    assert errors(caplog)[-1] == (f"Could not write checkpoint {out / 'checkpoint-000002'} (writing training_state.pt "
                                  f"failed; is the disk full?); the earlier checkpoints are intact.")
    step_2 = {k.split("/", 1)[1]: v for k, v in before.items() if k.startswith("checkpoint-000002/")}
    assert files(out / "checkpoint-000002") == step_2

    def short_write(obj, path):  # a full disk some writers do not report: caught by the check before the rename
        save(obj, path)
        Path(path).write_bytes(Path(path).read_bytes()[:-100])

    monkeypatch.setattr(torch, "save", short_write)
    assert cli(out, "--resume", str(out / "checkpoint-000001")) == 1
    assert errors(caplog)[-1] == (f"Could not write checkpoint {out / 'checkpoint-000002'} (training_state.pt was not "
                                  f"written completely); the earlier checkpoints are intact.")
    assert files(out / "checkpoint-000002") == step_2 and not list(out.glob(".*"))


# ----------------------------------------------------------------------- B6: a killed save
def test_what_a_killed_save_left_is_never_latest_and_is_tidied(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    for leftover in (".checkpoint-000009.tmp4242", "checkpoint-000007.old99"):  # ours, and the earlier trainer's
        shutil.copytree(out / "checkpoint-000001", out / leftover)
    (out / "checkpoint-000008").mkdir()  # no training state in it
    assert checkpointing.find_checkpoint(out, "latest") == out / "checkpoint-000002"
    (out / "checkpoint-000002").rename(out / ".checkpoint-000002.old77")  # killed between the renames of a re-save
    cfg = tiny_config(CLIPS, out, resume="latest")
    assert checkpointing.check_output_dir(cfg, Dist()) == out / "checkpoint-000002"  # put back
    assert not list(out.glob(".checkpoint-*"))
