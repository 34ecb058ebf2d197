"""What a generation costs: random-weight models, the UNet's FLOPs, the timed pipeline calls, the original's step.

The measuring half of ``python -m dynamicrafter.bench`` (:mod:`.generation` is the command: its
flags are checked before this module, and torch, are imported).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..configs import ModelConfig, model_config
from ..errors import UserError
from ..models import fused_norm
from ..models.dynamicrafter import DynamiCrafter
from ..offload import offload_mode
from ..pipeline import DynamiCrafterImg2VideoPipeline
from ..quantization import quantize_mode, weight_bytes
from ..request import check_windows
from ..runtime import compile_cache_dir, resolve_device, resolve_dtype, use_cpu_threads
from .generation import FUSED_NORM_SETTINGS, REFERENCE_UNET, check_reference_checkout
from .profiling import profile_call


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DynamiCrafter:
    """The full model with random weights made directly on ``device`` in ``dtype``.

    Matrices get N(0, 0.02), biases 0 and norm scales 1: random, but numerically tame.
    """
    with torch.device("meta"):
        model = DynamiCrafter(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if param.ndim >= 2 or name in ("class_embedding", "positional_embedding"):
                value.normal_(0.0, 0.02, generator=gen)
            elif name == "weight":
                value.fill_(1.0)
            else:
                value.zero_()
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    return model.eval()


def unet_inputs(config: ModelConfig, frames: int, batch: int = 2, device: torch.device | str = "meta",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random UNet inputs of one guided call: ``x`` ``[batch, C, frames, h, w]``, timesteps ``[batch]``,
    context ``[batch, 77 + image tokens, D]``."""
    down = config.latent_downscale
    tokens = config.unet.text_context_len + config.resampler.num_queries * (config.resampler.video_length or 1)
    gen = None if str(device) == "meta" else torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, config.unet.in_channels, frames, config.height // down, config.width // down,
                    generator=gen, device=device, dtype=dtype)
    context = torch.randn(batch, tokens, config.unet.context_dim, generator=gen, device=device, dtype=dtype)
    return x, torch.full((batch,), 999, dtype=torch.long, device=device), context


def unet_flops(config: ModelConfig, frames: int, batch: int = 2) -> int:
    """FLOPs of one UNet call (``batch`` = 2: the conditional and unconditional branch)."""
    with torch.device("meta"):
        unet = DynamiCrafter(config).unet
        with FlopCounterMode(display=False) as counter:
            unet(*unet_inputs(config, frames, batch))
    return counter.get_total_flops()


def profile_unet(pipe: DynamiCrafterImg2VideoPipeline, frames: int, batch: int, config: ModelConfig | None = None) -> dict:
    """:func:`~dynamicrafter.bench.profiling.profile_call` of one UNet call as the sampler makes it (after a warm-up).

    ``config`` gives the video size (default: the pipeline's model's).
    """
    x, t, context = unet_inputs(config or pipe.config, frames, batch, pipe.device, pipe.dtype)
    with torch.no_grad(), pipe._on_device(pipe.model.unet):
        pipe._unet_forward(x, t, context)  # warm-up
        return profile_call(lambda: pipe._unet_forward(x, t, context), pipe.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Measured TFLOP/s of a large square matmul in ``dtype`` on ``device``."""
    size = size or (8192 if device.type == "cuda" else 4096)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def reference_unet(unet: nn.Module, directory: str | Path, device: torch.device) -> nn.Module:
    """The original implementation's ``UNetModel`` with ``unet``'s config and weights, float32, on ``device``.

    Imported from the checkout at ``directory`` (its ``lvdm`` package needs ``einops`` and, through
    its ``utils`` package, ``opencv-python``). The keys of our UNet are the original's module names.
    """
    root = check_reference_checkout(directory).resolve()
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("lvdm.modules.networks.openaimodel3d")
    except Exception as exc:  # research code: any failure to import is reported in one line
        raise UserError(f"--compare-reference: the original's UNet in {directory} cannot be imported "
                         f"({type(exc).__name__}: {exc}); install what it needs (einops, opencv-python).") from None
    finally:
        sys.path.remove(str(root))
    if Path(module.__file__).resolve() != root / REFERENCE_UNET:
        raise UserError(f"--compare-reference: a module 'lvdm' from {Path(module.__file__).parents[2]} "
                         f"is already imported; run the benchmark in a fresh process.")
    c = unet.config
    options = dict(in_channels=c.in_channels, out_channels=c.out_channels, model_channels=c.model_channels,
                   attention_resolutions=list(c.attention_resolutions), num_res_blocks=c.num_res_blocks,
                   channel_mult=list(c.channel_mult), num_head_channels=c.num_head_channels,
                   transformer_depth=c.transformer_depth, context_dim=c.context_dim, use_linear=True,
                   temporal_conv=c.temporal_conv, temporal_attention=c.temporal_attention,
                   temporal_selfatt_only=True, use_relative_position=False, use_causal_attention=False,
                   temporal_length=c.temporal_length, addition_attention=c.addition_attention,
                   image_cross_attention=c.image_cross_attention,
                   image_cross_attention_scale_learnable=c.image_cross_attention_scale_learnable,
                   default_fs=c.default_fs, fs_condition=c.fs_condition)
    with torch.device("meta"):
        original = module.UNetModel(**options)
    weights = {name: value.to(device, torch.float32) for name, value in unet.state_dict().items()}
    original.load_state_dict(weights, strict=True, assign=True)
    return original.eval()


def reference_step_seconds(original: nn.Module, config: ModelConfig, frames: int, branches: int,
                           guidance_scale: float, steps: int, device: torch.device) -> float:
    """Median seconds of the original's guided step, as its sampler runs it.

    One batch-1 UNet call per guidance branch (conditional, then unconditional context: two for
    classifier-free guidance) and the guidance mix, in float32 under ``torch.cuda.amp.autocast()``
    (float16) on CUDA, plain float32 elsewhere; one warm-up step, then ``steps - 1`` timed ones,
    like ours.
    """
    x, _, contexts = unet_inputs(config, frames, branches, device)
    x, contexts = x[:1], contexts[:, None]
    fs = torch.full((1,), config.unet.default_fs, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    @torch.no_grad()
    def step(t: int) -> torch.Tensor:
        timesteps = torch.full((1,), t, dtype=torch.long, device=device)
        with autocast:
            outs = [original(x, timesteps, context=context, fs=fs) for context in contexts]
        return outs[0] if branches == 1 else outs[-1] + guidance_scale * (outs[0] - outs[-1])

    step(999)
    times = []
    for i in range(max(1, steps - 1)):
        _sync(device)
        start = time.perf_counter()
        step(979 - 20 * i)
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA max allocated, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantize_and_compare(pipe: DynamiCrafterImg2VideoPipeline, image: np.ndarray, mode: str, steps: int,
                         **call: object) -> dict:
    """Quantize ``pipe``'s UNet in place (``mode``) and measure what it changes on the same noise.

    The latents ``[B, 4, T, h, w]`` are sampled before and after with ``steps`` steps, the call's
    settings and a generator seeded 0 each time. Returns the layers quantized, the UNet's weight
    bytes before and after and the relative L2 difference of the latents (float64).
    """
    def latents() -> torch.Tensor:
        settings = {**call, "generator": torch.Generator(pipe.device).manual_seed(0)}
        return pipe(image, "a benchmark", num_inference_steps=steps, output_type="latent", **settings)["videos"]

    before = weight_bytes(pipe.model.unet)
    reference = latents().double()
    layers = pipe.quantize_unet(mode)
    difference = (latents().double() - reference).norm() / reference.norm()
    return {"quantized_layers": layers, "unquantized_unet_weight_bytes": before,
            "quantized_latent_rel_diff": difference.item()}


def video_seconds(pipe: DynamiCrafterImg2VideoPipeline, image: np.ndarray, steps: int, **call: object) -> float:
    """Seconds of one whole pipeline call (a video of ``steps`` steps), the device synchronised."""
    _sync(pipe.device)
    start = time.perf_counter()
    pipe(image, "a benchmark", num_inference_steps=steps, **call)
    _sync(pipe.device)
    return time.perf_counter() - start


def first_compiled_video(pipe: DynamiCrafterImg2VideoPipeline, image: np.ndarray, mode: str, steps: int,
                         **call: object) -> dict:
    """Time an eager video, then compile ``pipe``'s UNet in ``mode`` and time its first video (compilation included)
    and a second one, all three timed alike.

    The ratios to the eager video are the targets of issue 20: the first compiled video within 2x,
    and within 1.2x in a second process whose kernels come from the on-disk cache; the second
    compiled video below 1x. ``compile_cache_files`` counts the files in Inductor's cache before
    compiling: 0 means a cold cache.
    """
    eager = video_seconds(pipe, image, steps, **call)
    pipe.compile_unet(mode)
    cache = compile_cache_dir()
    files = sum(1 for path in cache.rglob("*") if path.is_file()) if cache.is_dir() else 0
    before = _compilations()
    first = video_seconds(pipe, image, steps, **call)
    graphs = _compilations()
    second = video_seconds(pipe, image, steps, **call)
    return {"compiled_after_eager": mode, "compile_cache_dir": str(cache), "compile_cache_files": files,
            "eager_video_s": eager, "first_compiled_video_s": first, "first_compiled_graphs": graphs - before,
            "second_compiled_video_s": second, "second_video_recompilations": _compilations() - graphs,
            "first_compiled_over_eager": first / eager, "second_compiled_over_eager": second / eager}


def run(args: argparse.Namespace) -> dict:
    if args.compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.compile_cache).expanduser().resolve())
    config = model_config(args.resolution, args.config)
    device = resolve_device(args.device)
    use_cpu_threads(args.threads, device)
    dtype = resolve_dtype(args.dtype, device)  # "auto" picks per device
    quantize = quantize_mode(args.quantize, device, dtype)  # before the model is built
    options = dict(offload=args.offload, compile=args.compile_mode or args.compile,
                   sequential_guidance=args.sequential_guidance)
    if args.checkpoint:
        pipe = DynamiCrafterImg2VideoPipeline(args.resolution, device, args.checkpoint, config=config, dtype=dtype,
                                              clip_checkpoint=args.clip_checkpoint, **options)
    else:
        home = device if offload_mode(args.offload, device) == "none" else torch.device("cpu")
        pipe = DynamiCrafterImg2VideoPipeline.from_model(random_model(config, home, dtype), device, dtype, **options)
    if args.lora:
        pipe.load_lora_weights(args.lora, scale=args.lora_scale)
    pipe.model.unet.fused_norm = FUSED_NORM_SETTINGS[args.fused_norm]
    # what is timed is what is counted: the model at the size of the calls
    config = dataclasses.replace(pipe.config, height=args.height or pipe.config.height,
                                 width=args.width or pipe.config.width)
    image = np.random.default_rng(0).integers(0, 255, (config.height, config.width, 3), dtype=np.uint8)
    if args.channels_last != "auto":
        pipe.model.unet.channels_last = args.channels_last == "on"
        if args.channels_last == "on":
            pipe.model.unet.channels_last_weights()
    settings = dict(num_frames=args.num_frames, height=config.height, width=config.width,
                    guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
                    sampler=args.sampler, eta=args.eta, frame_stride=args.frame_stride,
                    guidance_rescale=args.guidance_rescale, timestep_spacing=args.timestep_spacing,
                    window_size=args.window_size, window_stride=args.window_stride,
                    noise_rescheduling=args.noise_rescheduling)
    quantized = {}
    if quantize != "none":
        quantized = quantize_and_compare(pipe, image, quantize, args.num_inference_steps, **settings)
    call = dict(settings, generator=torch.Generator(device).manual_seed(0))

    before = _compilations()
    warmup_seconds = video_seconds(pipe, image, 1, **call)  # warm-up: kernels, allocator, compile
    compilations = _compilations()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    last = [0.0]

    def on_step(step: int, total: int) -> None:
        _sync(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    _sync(device)
    start = last[0] = time.perf_counter()
    pipe(image, "a benchmark", num_inference_steps=args.num_inference_steps, callback=on_step, **call)
    _sync(device)
    s_per_video = time.perf_counter() - start
    # The first step also carries the conditioning (encoders, VAE encode): leave it out when we can.
    steady = step_times[1:] or step_times
    s_per_step = float(np.median(steady))
    branches = 1 if args.guidance_scale == 1 else 2 + (args.image_guidance_scale not in (None, 1.0))
    flops = unet_flops(config, args.num_frames, batch=branches)
    tflops = flops / s_per_step / 1e12
    reference = matmul_tflops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result = {
        "resolution": config.name, "height": config.height, "width": config.width, "frames": args.num_frames,
        "steps": args.num_inference_steps,
        "window_size": check_windows(config, args.window_size, args.window_stride)[0], "window_stride": args.window_stride,
        "dtype": str(dtype).split(".")[-1], "sampler": args.sampler, "guidance_branches": branches,
        "offload": pipe.offload, "compile": pipe.compile_mode, "quantize": pipe.quantize,
        "fused_norm": args.fused_norm, "fused_norm_used": fused_norm_used(pipe, device),
        "device": device.type, "device_name": name,
        "warmup_s": warmup_seconds, "compiled_graphs": compilations - before,
        "recompilations": _compilations() - compilations,
        "s_per_step": s_per_step, "s_per_video": s_per_video, "peak_mem_bytes": peak_memory(device),
        "unet_tflop_per_step": flops / 1e12, "tflops": tflops, "matmul_tflops": reference,
        "matmul_share": tflops / reference, "channels_last": pipe.model.unet.use_channels_last(device),
        "unet_weight_bytes": weight_bytes(pipe.model.unet), **quantized,
    }
    if args.first_compiled_video:
        result.update(first_compiled_video(pipe, image, args.first_compiled_video, args.num_inference_steps, **call))
    if args.profile:
        result["profile"] = profile_unet(pipe, args.num_frames, branches, config)
    if args.compare_reference:
        original = reference_unet(pipe.model.unet, args.compare_reference, device)
        del pipe  # our weights are no longer needed: the original has its own float32 copy
        seconds = reference_step_seconds(original, config, args.num_frames, branches, args.guidance_scale,
                                         args.num_inference_steps, device)
        result.update({
            "reference_dtype": "float32, autocast float16" if device.type == "cuda" else "float32",
            "reference_s_per_step": seconds, "reference_tflops": flops / seconds / 1e12,
            "speedup_over_reference": seconds / s_per_step,
        })
    return result


def fused_norm_used(pipe: DynamiCrafterImg2VideoPipeline, device: torch.device) -> bool:
    """Whether the UNet's norms ran as the fused kernel: switched on for ``device``, eager, Triton present.

    Under ``torch.compile`` the kernel steps aside (Inductor fuses the ops itself), and off
    CUDA it does not apply, whatever the switch says.
    """
    return (pipe.model.unet.use_fused_norm(device) and device.type == "cuda" and not pipe.compile_mode
            and fused_norm.triton_available())


def _compilations() -> int:
    """Frames ``torch.compile`` has compiled so far in this process (0 when it was never used)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "CPU"
