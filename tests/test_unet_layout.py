"""The UNet's memory layouts: channels-last or contiguous activations, channels-last weights.

Only the speed may depend on the layout: every variant must give the reference's values, and
the weights keep their names and shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dynamicrafter.models.attention import frames_to_time_major, time_major_to_frames
from dynamicrafter.models.unet import TemporalConvBlock

from .conftest import MODULE_TOL, load_tiny, relative_error


def _unet_out(unet: torch.nn.Module, name: str) -> torch.Tensor:
    v = load_tiny(name).vectors
    with torch.no_grad():
        return unet(v["unet.x"], v["unet.t"], v["unet.context"], v["unet.fs"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_both_activation_layouts_match_the_reference(channels_last):
    unet = copy.deepcopy(load_tiny("tiny256").model.unet)
    unet.channels_last = channels_last
    out = _unet_out(unet, "tiny256")
    assert relative_error(out, load_tiny("tiny256").vectors["unet.out"]) < MODULE_TOL


def test_channels_last_weights_keep_values_names_and_shapes():
    unet = copy.deepcopy(load_tiny("tiny256").model.unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.channels_last_weights()
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    conv = unet.input_blocks[1][0].temopral_conv.conv1[-1]
    assert conv.weight.shape == before["input_blocks.1.0.temopral_conv.conv1.2.weight"].shape
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    out = _unet_out(unet, "tiny256")
    assert relative_error(out, load_tiny("tiny256").vectors["unet.out"]) < MODULE_TOL


def test_temporal_conv_block_equals_its_3d_convolutions():
    """The 3x1 2-D convolutions over [B, C, T, H*W] compute what the checkpoint's Conv3d layers do."""
    torch.manual_seed(0)
    block = TemporalConvBlock(32).eval()
    x = torch.randn(2, 32, 5, 3, 4)
    with torch.no_grad():
        expected = x
        for stage in (block.conv1, block.conv2, block.conv3, block.conv4):
            expected = stage(expected)  # GroupNorm, SiLU, (slot), Conv3d
        expected = x + expected
        frames = x.transpose(1, 2).reshape(10, 32, 3, 4)
        for layout in (torch.contiguous_format, torch.channels_last):
            y = frames_to_time_major(frames.contiguous(memory_format=layout), 5)
            out = time_major_to_frames(block(y), 3, 4).view(2, 5, 32, 3, 4).transpose(1, 2)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
