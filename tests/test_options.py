"""The option table: its torch-free names agree with the modules that implement them; the device check."""

from __future__ import annotations

import pytest

from dynamicrafter import options
from dynamicrafter.errors import UserError


def test_the_tables_names_are_the_implementations():
    """The names are spelled in options.py so that a command checks its flags without torch; these hold them true."""
    from dynamicrafter import lora, offload, quantization, runtime
    from dynamicrafter.configs import DUAL_REFERENCE_MIN_FRAMES
    from dynamicrafter.diffusion import sampling, schedule
    from dynamicrafter.models import vae_dualref
    from dynamicrafter.training import config

    assert options.SAMPLERS == tuple(sampling.SAMPLERS)
    assert options.SPACINGS == schedule.SPACINGS
    assert options.OFFLOAD_MODES == offload.OFFLOAD_MODES
    assert options.QUANTIZE_MODES == quantization.QUANTIZE_MODES
    assert options.COMPILE_MODES == runtime.COMPILE_MODES
    assert config.DEFAULT_TARGETS == lora.DEFAULT_TARGETS
    assert DUAL_REFERENCE_MIN_FRAMES == vae_dualref.MIN_FRAMES


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1", "mps", "mps:0"])
def test_device_names_a_command_accepts(name):
    options.check_device_name(name)


@pytest.mark.parametrize("name, message", [
    ("banana", "'banana' is not a torch device; use for example cuda:0, mps or cpu."),
    ("cuda:x", "'cuda:x' is not a torch device; use for example cuda:0, mps or cpu."),
    ("xpu:0", "Device type 'xpu' is not supported; use cuda, mps or cpu."),
])
def test_device_names_refused_without_torch(name, message):
    with pytest.raises(UserError) as info:
        options.check_device_name(name)
    assert str(info.value) == message
