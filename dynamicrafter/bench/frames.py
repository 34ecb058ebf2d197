"""Benchmark: a guided UNet step and the VAE decode against the frame count, with and without FreeNoise windows.

``python -m dynamicrafter.bench.frames 256 --frames 16 32 64 128 --device cpu --random-weights --steps 2
--out frames.jsonl``: for each frame count, one process with the temporal attention in windows
(``--window_size``, default the model's trained length, 16; ``--window_stride``, default 4) and
one without (the whole sequence); a frame count up to the window size has no windows and is
measured once. The two runs of a frame count are interleaved, their order alternating, so a
change in the machine's load falls on both.

Each point is a fresh process (``--point FRAMES``, which the sweep runs itself), so its peak
memory is its own: it builds the model (random weights unless ``--checkpoint``), then times
``--steps`` guided steps (one UNet call on the batch of both guidance branches, as sampling
makes it; ``--sequential-guidance``: the two branches one after the other) on random inputs of
the model's size, then decodes a video of that many frames as the pipeline does, in chunks of
frames (only in the run without windows: they do not reach the VAE; ``--no-decode``: in none).
Each phase reports its wall time, the process's CPU time (what the figures on a shared CPU are
to be read by: wall time there includes waiting for the CPU) and its peak memory above what was
resident before it: on the CPU the process's resident high-water mark (``VmHWM``, reset between
phases through ``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated``. The
load average is recorded before and after each point.

Each point adds one JSON line to ``--out`` as it ends; the sweep then prints a markdown table
(:func:`markdown_table`) or one JSON object (``--json``). ``--table FILE`` prints the table of a file of
such lines, so a sweep can be run in parts. The table gives, per frame count and setting, the
seconds per step and their overhead over linear scaling from the smallest frame count
(``time(N) / (N / N0 * time(N0)) - 1``; FreeNoise reports under 20 % for its windows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..frontend import EXIT_USAGE, CliError, Parser, add_model_choice
from ..options import add_arguments
from . import add_random_weights, chosen_weights, run_tool

__all__ = ["build_parser", "main", "markdown_table", "measure_point", "sweep_order"]

#: The runtime options a sweep takes (the option table's flags).
FRAMES_OPTIONS = ("device", "dtype", "threads", "checkpoint", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m dynamicrafter.bench.frames", description=__doc__.splitlines()[0])
    add_model_choice(parser, "256")
    add_arguments(parser, ("window_size", "window_stride", "height", "width"))
    add_arguments(parser, FRAMES_OPTIONS)
    add_random_weights(parser)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128], metavar="N",
                        help="frame counts to measure, 1 to 128 (default: 16 32 64 128)")
    parser.add_argument("--steps", type=int, default=2, metavar="N",
                        help="guided steps timed per point; the first includes the kernels' set-up (default: 2)")
    parser.add_argument("--sequential-guidance", action="store_true", help="run the two guidance branches apart")
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the VAE decode of a video of each frame count (default: on)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="append each point's JSON line to this file")
    parser.add_argument("--table", type=Path, metavar="FILE", help="print the table of a file of points, run nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--point", type=int, metavar="FRAMES", help=argparse.SUPPRESS)
    parser.add_argument("--no-windows", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or one point of it); returns the exit status (2 with one line for bad arguments)."""
    return run_tool(argv, build_parser, _frames)


def sweep_order(frames: list[int], window: int) -> list[tuple[int, bool]]:
    """The points ``(frames, windows)`` in the order run: both settings of a frame count together, alternating
    which goes first; a frame count up to ``window`` once, without windows (it has none)."""
    order: list[tuple[int, bool]] = []
    for i, count in enumerate(frames):
        if count <= window:
            order.append((count, False))
        else:
            order.extend([(count, True), (count, False)] if i % 2 == 0 else [(count, False), (count, True)])
    return order


def _frames(args: argparse.Namespace) -> int:
    chosen_weights(args, "256")
    if args.steps < 1:
        raise CliError("--steps must be at least 1.", EXIT_USAGE)
    if args.table is not None:
        if not args.table.is_file():
            raise CliError(f"--table: {args.table} is not a file of points.", EXIT_USAGE)
        points = [json.loads(line) for line in args.table.read_text().splitlines() if line.startswith("{")]
        print(json.dumps({"points": points}) if args.json else markdown_table(points))
        return 0
    from ..configs import model_config
    from ..request import check_windows

    config = model_config(args.resolution, args.config)
    try:
        window, stride = check_windows(config, args.window_size, args.window_stride, ("--window_size", "--window_stride"))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    bad = [count for count in args.frames + ([args.point] if args.point is not None else []) if not 1 <= count <= 128]
    if bad:
        raise CliError(f"--frames: each must be between 1 and 128, got {bad[0]}.", EXIT_USAGE)
    if args.point is not None:
        result = measure_point(args, config, args.point, None if args.no_windows else window, stride)
        print(json.dumps(result))
        return 0
    points = []
    for count, windowed in sweep_order(args.frames, window):
        command = [sys.executable, "-m", "dynamicrafter.bench.frames", *_point_argv(args), "--point", str(count)]
        if not windowed:
            command.append("--no-windows")
        elif args.decode:
            command.append("--no-decode")  # the windows do not reach the VAE: its run without them decodes
        print(f"{count} frames, {'windows' if windowed else 'no windows'}: {' '.join(command[1:])}",
              file=sys.stderr, flush=True)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        point = json.loads(lines[-1]) if done.returncode == 0 and lines else {
            "frames": count, "windows": windowed, "error": f"exit status {done.returncode}"}
        points.append(point)
        if args.out is not None:
            with open(args.out, "a") as out:
                out.write(json.dumps(point) + "\n")
    print(json.dumps({"points": points}) if args.json else markdown_table(points))
    return 1 if any("error" in point for point in points) else 0


def _point_argv(args: argparse.Namespace) -> list[str]:
    """The sweep's own settings as flags for one point's process."""
    argv = ["--resolution", args.resolution, "--steps", str(args.steps), "--window_stride", str(args.window_stride)]
    for name in ("window_size", "height", "width", *FRAMES_OPTIONS):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name}", str(value)]
    if args.sequential_guidance:
        argv.append("--sequential-guidance")
    if not args.decode:
        argv.append("--no-decode")
    return argv


# ---------------------------------------------------------------------------------- one point


def _rss(field: str) -> int:
    """Bytes of ``VmRSS`` or ``VmHWM`` of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


class _Phase:
    """Wall time, CPU time and peak memory above the start of one phase of a point."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def __enter__(self) -> "_Phase":
        import torch

        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to what is resident now
            self.start_bytes = _rss("VmRSS")
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self) -> tuple[float, float]:
        """Wall and CPU seconds since the start or the last lap."""
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        lap = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return lap

    def peak(self) -> int:
        """The phase's peak bytes so far: resident (CPU) or allocated (CUDA)."""
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _rss("VmHWM")

    def peak_above_start(self) -> int:
        return self.peak() - self.start_bytes

    def __exit__(self, *exc: object) -> None:
        pass


def measure_point(args: argparse.Namespace, config: Any, frames: int, window: int | None, stride: int) -> dict:
    """One point: the model built, ``args.steps`` guided steps and a decode of ``frames`` frames measured.

    ``window``: the temporal attention in windows of that many frames ``stride`` apart; ``None``: none.
    """
    import dataclasses

    import torch

    from ..models.attention import temporal_windows, use_temporal_windows
    from ..pipeline import DynamiCrafterImg2VideoPipeline
    from ..runtime import resolve_device, resolve_dtype, use_cpu_threads
    from .timing import _cpu_name, random_model, unet_inputs

    load_before = os.getloadavg()
    device = resolve_device(args.device)
    threads = use_cpu_threads(args.threads, device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    if args.checkpoint:
        pipe = DynamiCrafterImg2VideoPipeline(args.resolution, device, args.checkpoint, config=config, dtype=dtype,
                                              offload="none")
    else:
        pipe = DynamiCrafterImg2VideoPipeline.from_model(random_model(config, device, dtype), device, dtype,
                                                         offload="none")
    load_s = time.perf_counter() - start
    weights = (torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss("VmRSS"))
    peaks = [torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")]  # the build's
    config = dataclasses.replace(pipe.config, height=args.height or pipe.config.height,
                                 width=args.width or pipe.config.width)
    branches = 2
    x, t, context = unet_inputs(config, frames, branches, device, dtype)
    calls = [(x[i:i + 1], t[i:i + 1], context[i:i + 1]) for i in range(branches)] if args.sequential_guidance \
        else [(x, t, context)]
    step_wall, step_cpu = [], []
    with torch.no_grad(), use_temporal_windows(pipe.model.unet, window, stride), _Phase(device) as phase:
        for _ in range(args.steps):
            for call in calls:
                pipe._unet_forward(*call)
            wall, cpu = phase.lap()
            step_wall.append(wall)
            step_cpu.append(cpu)
        step_peak = phase.peak_above_start()
        peaks.append(phase.peak())
    del x, context, calls
    result = {
        "resolution": config.name, "height": config.height, "width": config.width, "frames": frames,
        "windows": window is not None and frames > window, "window_size": window, "window_stride": stride,
        "temporal_windows": len(temporal_windows(frames, window, stride)) if window else 1,
        "guidance": "sequential" if args.sequential_guidance else "batched", "guidance_branches": branches,
        "dtype": str(dtype).split(".")[-1], "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": threads if threads is not None else torch.get_num_threads(), "torch": torch.__version__,
        "load_s": load_s, "weights_bytes": weights,
        "step_wall_s": step_wall, "step_cpu_s": step_cpu,
        # the last step: the first one also sets up the kernels of each shape
        "s_per_step": step_wall[-1], "cpu_s_per_step": step_cpu[-1], "step_peak_above_weights_bytes": step_peak,
    }
    if args.decode:
        latents = torch.randn(1, 4, frames, config.height // config.latent_downscale,
                              config.width // config.latent_downscale, generator=torch.Generator().manual_seed(0))
        with _Phase(device) as phase:
            pipe.decode(latents.to(device))
            result["decode_s"], result["decode_cpu_s"] = phase.lap()
            result["decode_peak_above_start_bytes"] = phase.peak_above_start()
            peaks.append(phase.peak())
        result["decode_chunk_frames"] = pipe.decode_chunk_size
    result["peak_bytes"] = max(peaks)  # of the whole process: the build, the steps, the decode
    result["loadavg_before"], result["loadavg_after"] = list(load_before), list(os.getloadavg())
    return result


# ---------------------------------------------------------------------------------- the table


def markdown_table(points: list[dict]) -> str:
    """The points as a markdown table: per frame count, without and with windows, step and decode figures.

    Overheads over linear scaling are from the first run of the smallest frame count, by CPU time:
    ``cpu(N) / (N / N0 * cpu(N0)) - 1``; windows are compared with the first run without them of the
    same frame count and guidance.
    """
    good = [p for p in points if "error" not in p]
    lines = ["| frames | windows | s / step, wall | s / step, CPU | over linear (CPU) | windows over none (CPU) | "
             "step peak above weights | decode s, wall / CPU | decode peak | load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if not good:
        return "\n".join(lines + [f"| {p['frames']} | {p.get('windows')} | {p['error']} |" for p in points])
    base = min(good, key=lambda p: (p["frames"], p["windows"]))
    plain = {(p["frames"], p.get("guidance")): p for p in reversed(good) if not p["windows"]}
    for p in sorted(points, key=lambda p: (p["frames"], p.get("windows", False))):
        if "error" in p:
            lines.append(f"| {p['frames']} | {'yes' if p['windows'] else 'no'} | {p['error']} | | | | | | | |")
            continue
        linear = p["cpu_s_per_step"] / (p["frames"] / base["frames"] * base["cpu_s_per_step"]) - 1
        other = plain.get((p["frames"], p.get("guidance")))
        versus = f"{p['cpu_s_per_step'] / other['cpu_s_per_step'] - 1:+.0%}" if p["windows"] and other else ""
        what = f"yes ({p['temporal_windows']} of {p['window_size']}, stride {p['window_stride']})" if p["windows"] \
            else "no"
        if p.get("guidance") == "sequential":
            what += ", sequential guidance"
        decode = (f"{p['decode_s']:.3g} / {p['decode_cpu_s']:.3g}", _gb(p["decode_peak_above_start_bytes"])) \
            if "decode_s" in p else ("", "")
        load = f"{p['loadavg_before'][0]:.1f} / {p['loadavg_after'][0]:.1f}"
        lines.append(f"| {p['frames']} | {what} | {p['s_per_step']:.3g} | {p['cpu_s_per_step']:.3g} | "
                     f"{linear:+.0%} | {versus} | {_gb(p['step_peak_above_weights_bytes'])} | {decode[0]} | "
                     f"{decode[1]} | {load} |")
    return "\n".join(lines)


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


if __name__ == "__main__":
    sys.exit(main())
