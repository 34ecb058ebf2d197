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
