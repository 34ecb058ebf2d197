"""What a ControlNet (or ToonCrafter's sketch encoder) adds to one guided sampling step.

``python -m dynamicrafter.bench.control [RESOLUTION] [--config YAML] [--video_length N] [--time]``

For the model's UNet and a ControlNet of the Stable Diffusion 2.1 layout made to fit it (the
sketch encoder's shape: one-channel control images), on one guided step (2 branches):

- weights: the ControlNet's parameters and bytes in ``--dtype``;
- FLOPs of the UNet call and of the ControlNets' calls (meta device, PyTorch's FLOP counter);
- activation memory: the peak bytes of live tensors during the step without and with the
  control, counted on the meta device with attention as a fused kernel (as
  :mod:`.memory` counts a training step), weights not included;
- with ``--time``: seconds per step on ``--device`` with random weights, without and with the
  control (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..configs import ModelConfig, model_config
from ..control import Control, unet_residual_channels
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.dynamicrafter import DynamiCrafter
from . import run_tool
from .memory import _fused_attention, _LiveBytes
from .timing import unet_inputs


def controlnet_for(config: ModelConfig, hint_channels: int = 1) -> ControlNetConfig:
    """The SD 2.1-layout ControlNet that fits ``config``'s UNet (the sketch encoder's shape for the released models)."""
    u = config.unet
    cn = ControlNetConfig(hint_channels=hint_channels, model_channels=u.model_channels,
                          channel_mult=tuple(u.channel_mult), num_res_blocks=u.num_res_blocks,
                          attention=tuple(2 ** level in u.attention_resolutions for level in range(len(u.channel_mult))),
                          num_head_channels=u.num_head_channels, context_dim=u.context_dim,
                          transformer_depth=u.transformer_depth)
    assert cn.residual_channels == unet_residual_channels(u)
    return cn


def _random(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (built on the meta device) with tame random weights on ``device``."""
    gen = torch.Generator(device=device).manual_seed(0)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if param.ndim >= 2:
                value.normal_(0.0, 0.02, generator=gen)
            else:
                value.fill_(1.0 if name == "weight" else 0.0)
            setattr(sub, name, torch.nn.Parameter(value, requires_grad=False))
    return module.eval()


def _step(unet: torch.nn.Module, control: Control | None, x: torch.Tensor, t: torch.Tensor,
          context: torch.Tensor) -> torch.Tensor:
    fs = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if control is None:
        return unet(x, t, context, fs)
    residuals = control.residuals(x[:, : unet.config.out_channels], t, context)  # what ``controlled`` adds
    return unet(x, t, context, fs, residuals=residuals)


def measure(config: ModelConfig, frames: int, device: torch.device, dtype: torch.dtype, timed: bool,
            repeats: int) -> dict:
    """The figures of the module's docstring for one guided step of ``frames`` frames."""
    cn_config = controlnet_for(config)
    down = config.latent_downscale
    result: dict = {"model": config.name, "frames": frames, "size": [config.height, config.width],
                    "dtype": str(dtype).replace("torch.", "")}
    with torch.device("meta"):
        unet = DynamiCrafter(config).unet.to(dtype)
        net = ControlNet(cn_config).to(dtype)
    params = sum(p.numel() for p in net.parameters())
    result["controlnet_parameters"] = params
    result["controlnet_weight_bytes"] = params * torch.finfo(dtype).bits // 8

    def inputs(dev: torch.device) -> tuple:
        x, t, context = unet_inputs(config, frames, 2, dev, dtype)
        hints = torch.zeros(frames, 1, config.height, config.width, device=dev, dtype=dtype)
        return x, t, context, hints

    with torch.no_grad():
        x, t, context, hints = inputs(torch.device("meta"))
        control = Control(net, hints, list(range(frames)), frames, 1.0)
        with FlopCounterMode(display=False) as plain:
            _step(unet, None, x, t, context)
        with FlopCounterMode(display=False) as both:
            _step(unet, control, x, t, context)
        result["unet_flops"] = plain.get_total_flops()
        result["controlnet_flops"] = both.get_total_flops() - plain.get_total_flops()
        for name, ctrl in (("activation_bytes_without", None), ("activation_bytes_with", control)):
            counter = _LiveBytes()
            with _fused_attention(), counter:
                _step(unet, ctrl, x, t, context)
            result[name] = counter.peak
    if timed:
        unet = _random(_meta_unet(config), device, dtype)
        net = _random(_meta_controlnet(cn_config), device, dtype)
        with torch.no_grad():
            x, t, context, hints = inputs(device)
            control = Control(net, hints, list(range(frames)), frames, 1.0)
            for name, ctrl in (("seconds_without", None), ("seconds_with", control)):
                times = []
                for _ in range(repeats + 1):  # the first is a warm-up
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    started = time.perf_counter()
                    _step(unet, ctrl, x, t, context)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - started)
                result[name] = statistics.median(times[1:])
        result["device"] = str(device)
        result["threads"] = torch.get_num_threads()
    result["latent"] = [frames, config.height // down, config.width // down]
    return result


def _meta_unet(config: ModelConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return DynamiCrafter(config).unet


def _meta_controlnet(config: ControlNetConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return ControlNet(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamicrafter.bench.control",
                                     description="What a ControlNet adds to one guided sampling step.")
    parser.add_argument("resolution", nargs="?", default="tooncrafter", help="model preset (default tooncrafter)")
    parser.add_argument("--config", help="model config YAML (e.g. tests/data/tinytoon.yaml)")
    parser.add_argument("--video_length", type=int, default=None, help="frames (default the model's 16 or trained length)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--time", action="store_true", help="also time a step with random weights on --device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default PyTorch's)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser


def _body(args: argparse.Namespace) -> int:
    import dataclasses

    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.resolution, args.config)
    if args.height or args.width:
        config = dataclasses.replace(config, height=args.height or config.height, width=args.width or config.width)
    frames = args.video_length or config.unet.temporal_length
    result = measure(config, frames, torch.device(args.device), getattr(torch, args.dtype), args.time, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(argv, build_parser, _body)


if __name__ == "__main__":
    raise SystemExit(main())
