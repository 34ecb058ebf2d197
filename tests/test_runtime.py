"""Device and precision choice, Apple's MPS included (mocked: no Mac runs these tests)."""

from __future__ import annotations

import pytest
import torch

from dynamicrafter import runtime


@pytest.fixture
def mac(monkeypatch):
    """A machine without CUDA whose MPS backend is available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "mps_available", lambda: True)


def test_auto_picks_mps_when_cuda_is_absent(mac):
    assert runtime.resolve_device(None) == torch.device("mps")
    assert runtime.resolve_device("auto") == torch.device("mps")
    assert runtime.resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_mps_precision_is_half_as_supported_with_a_float32_vae(mac, monkeypatch, bf16, expected):
    monkeypatch.setattr(runtime, "mps_has_bf16", lambda: bf16)
    dtype = runtime.resolve_dtype(None, torch.device("mps"))
    assert dtype == expected
    assert runtime.vae_dtype_for(dtype, torch.device("mps")) == torch.float32


def test_mps_requested_where_there_is_none(monkeypatch):
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    with pytest.raises(ValueError, match="needs Apple's Metal backend, which is not available here; use cpu."):
        runtime.resolve_device("mps")


def test_cpu_fallback_warns(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    assert runtime.resolve_device(None) == torch.device("cpu")
    assert "CUDA is not available; running on the CPU" in caplog.text


def test_unsupported_device_types(monkeypatch):
    with pytest.raises(ValueError, match="'banana' is not a torch device"):
        runtime.resolve_device("banana")
    with pytest.raises(ValueError, match="Device type 'xpu' is not supported; use cuda, mps or cpu."):
        runtime.resolve_device("xpu")


def fake_gpus(monkeypatch, count: int, current: int = 0) -> None:
    """Make this CPU-only process look like one with ``count`` CUDA devices, ``current`` selected."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_a_cuda_device_always_has_its_number(monkeypatch):
    """``--device cuda`` reached ``torch.cuda.set_device`` without a number, which refuses it (seen on an H100)."""
    fake_gpus(monkeypatch, 2, current=1)
    assert runtime.resolve_device("cuda") == torch.device("cuda:1")
    assert runtime.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="Device cuda:2 does not exist; this machine has 2 CUDA device"):
        runtime.resolve_device("cuda:2")


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    """Under torchrun, ``--device cuda`` (or none) is ``cuda:LOCAL_RANK``: the CLI and training share the rule."""
    from dynamicrafter.distributed import Ranks

    fake_gpus(monkeypatch, 4)
    third = Ranks(rank=6, world_size=8, local_rank=2)
    for choice in (None, "auto", "cuda"):
        assert third.device_for(choice) == torch.device("cuda:2")
    assert third.device_for("cuda:3") == torch.device("cuda:3") and third.device_for("cpu") == torch.device("cpu")
    assert Ranks().device_for("cuda") == torch.device("cuda:0")  # one process: the current GPU


# ----------------------------------------------------------------------------- CPU threads


@pytest.fixture
def two_cpus(monkeypatch):
    """A machine of 2 CPUs, both usable, PyTorch's default 2 threads; how busy other work keeps it is set by each test."""
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def busy(value):
        monkeypatch.setattr(runtime, "busy_cpus", lambda: value)

    return busy


@pytest.mark.parametrize("busy, threads, why", [
    (0.3, 2, "2 usable CPUs, 0.3 busy with other work"),
    (0.7, 1, "of 2 usable CPUs; other work keeps 0.7 busy"),
    (4.4, 1, "of 2 usable CPUs; other work keeps 4.4 busy"),  # never fewer than one
])
def test_threads_leave_out_the_busy_cpus(two_cpus, busy, threads, why):
    two_cpus(busy)
    assert runtime.choose_cpu_threads() == (threads, why)


def test_nothing_to_choose_measures_nothing(two_cpus, monkeypatch):
    monkeypatch.setattr(runtime, "busy_cpus", lambda: pytest.fail("measured"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1, or the tests' own setting
    assert runtime.choose_cpu_threads() == (1, "PyTorch's own limit: OMP_NUM_THREADS or torch.set_num_threads")
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
    assert runtime.choose_cpu_threads() == (1, "the one usable CPU")


def test_threads_as_asked_and_said(two_cpus, monkeypatch, caplog):
    two_cpus(2.0)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    with caplog.at_level("INFO", logger="dynamicrafter.runtime"):
        assert runtime.use_cpu_threads(8, torch.device("cuda:0")) == 8  # asked for: set on any device
        assert runtime.use_cpu_threads(None, "cpu") == 1
        assert runtime.use_cpu_threads(None, torch.device("cuda:0")) is None  # a GPU keeps PyTorch's default
    assert set_to == [8, 1]
    assert caplog.messages == [
        "Using 8 CPU threads (as --threads asks); --threads N changes it.",
        "Using 1 CPU thread (of 2 usable CPUs; other work keeps 2.0 busy); --threads N changes it."]


def test_busy_cpus_count_what_others_used_while_this_process_slept(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    samples = iter([
        "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 ...\n",
        "cpu  160 0 70 900 60 0 0 20 0 0\ncpu0 ...\n",  # 100 of 210 jiffies busy (steal included)
    ])
    real = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda name: stat if name == "/proc/stat" else real(name))
    monkeypatch.setattr(runtime.time, "sleep", lambda seconds: stat.write_text(next(samples)))
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    stat.write_text(next(samples))
    assert runtime.busy_cpus() == pytest.approx(2 * 100 / 210)


def test_usable_cpus_follow_a_containers_quota(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two threads may run, at most
    real = runtime.Path

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runtime, "Path", lambda name: quota if name == "/sys/fs/cgroup/cpu.max" else real(name))
    assert runtime.usable_cpus() == 2
    quota.write_text("max 100000\n")
    assert runtime.usable_cpus() == 8
