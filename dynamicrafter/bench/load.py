"""Benchmark: loading a full-size checkpoint (seconds, peak resident memory), and converting one.

``python -m dynamicrafter.bench.load --resolution 512 --file-dtype float16 --load-dtype float16 bfloat16
--folder /tmp/bench-load``

Writes the model's checkpoint with random weights in the release layout (``.safetensors``,
streamed tensor by tensor; the schedule buffers are the real ones so that the loader accepts
it), the same without the CLIP towers plus an OpenCLIP file in open_clip's layout (float32, as
the Hub serves it), then measures each case in a fresh process: seconds for
:func:`~dynamicrafter.checkpoints.load_model` (the VAE in the dtype the pipeline gives it), the
growth of the peak resident set (``VmHWM``) after loading and after reading every weight once,
and the seconds and peak of ``dynamicrafter convert``. The page cache keeps the files' pages
between cases unless ``--cold`` drops them first (``posix_fadvise``, these files only). The files
are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoints import CLIP_TOWERS, RENAMES, write_safetensors
from ..configs import ModelConfig, model_config
from ..diffusion.schedule import checkpoint_buffers
from ..errors import UserError
from ..frontend import Parser
from ..runtime import DTYPES
from . import run_tool

_MEASURE = r"""
import json, sys, time, torch
from dynamicrafter.checkpoints import load_model
from dynamicrafter.configs import get_config, load_config
from dynamicrafter.models.dynamicrafter import DynamiCrafter
from dynamicrafter.runtime import vae_dtype_for

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

model_name, path, dtype_name, clip = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None
config = load_config(model_name) if model_name.endswith(".yaml") else get_config(model_name)
dtype = getattr(torch, dtype_name)
with torch.device("meta"):  # warm-up: imports, tokenizer, open_clip registry
    DynamiCrafter(config)
before = peak_kb()
start = time.perf_counter()
model = load_model(config, path, dtype=dtype, vae_dtype=vae_dtype_for(dtype), clip_checkpoint=clip)
loaded = time.perf_counter()
after_load = peak_kb()
with torch.no_grad():
    total = sum(float(t.sum(dtype=torch.float32)) for t in model.state_dict().values())
touched = time.perf_counter()
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"load_s": loaded - start, "touch_s": touched - loaded, "weights_bytes": weights,
                  "growth_after_load_bytes": (after_load - before) * 1024,
                  "growth_after_touch_bytes": (peak_kb() - before) * 1024, "finite": total == total}))
"""

_CONVERT = r"""
import json, sys, time
from dynamicrafter.convert import main

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

before = peak_kb()
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "convert_s": time.perf_counter() - start, "growth_bytes": (peak_kb() - before) * 1024}))
"""


def write_random_checkpoint(config: ModelConfig, path: Path, dtype: torch.dtype, without_clip: bool = False,
                            seed: int = 0) -> int:
    """The model's checkpoint with N(0, 0.02) weights under the release key names; returns its size in bytes."""
    from ..models.dynamicrafter import DynamiCrafter

    with torch.device("meta"):
        own = DynamiCrafter(config).state_dict()
    release = {v: k for k, v in RENAMES.items()}
    shapes = {}
    for key, value in own.items():
        if without_clip and key.startswith(CLIP_TOWERS):
            continue
        if config.fs_kind == "frame_stride":  # the released 256 file's name for the frame-stride embedding
            for ours, theirs in release.items():
                if key.startswith(ours):
                    key = theirs + key[len(ours):]
        shapes[key] = tuple(value.shape)
    buffers = checkpoint_buffers(config.diffusion)
    layout = [(k, torch.float32, tuple(v.shape)) for k, v in buffers.items()]
    layout += [(k, dtype, shape) for k, shape in shapes.items()]
    gen = torch.Generator().manual_seed(seed)

    def tensor(key: str) -> torch.Tensor:
        if key in buffers:
            return buffers[key]
        return torch.empty(shapes[key], dtype=dtype).normal_(0.0, 0.02, generator=gen)

    return write_safetensors(path, layout, tensor)


def write_random_open_clip(config: ModelConfig, path: Path, seed: int = 1) -> int:
    """An ``open_clip.CLIP`` state dict of the config's architecture, random float32 weights, open_clip's layout."""
    from ..models.encoders import build_clip

    with torch.device("meta"):
        state = build_clip(config.clip).state_dict()
    gen = torch.Generator().manual_seed(seed)
    layout = [(k, torch.float32, tuple(v.shape)) for k, v in state.items()]
    return write_safetensors(path, layout, lambda k: torch.empty(state[k].shape).normal_(0.0, 0.02, generator=gen))


def _drop_cache(*paths: Path) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _run(case: str, script: str, *args: str) -> dict:
    """Run one case's ``script`` in a fresh process; its report, the last line it prints."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        raise UserError(f"The case {case!r} failed in its own process (exit {result.returncode}); "
                        "the end of its error output is above.")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
    config = model_config(args.resolution, args.config)
    model_name = str(args.config) if args.config else args.resolution
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    file_dtype = DTYPES[args.file_dtype]
    full = folder / f"dynamicrafter_{config.name}_{args.file_dtype}.safetensors"
    pruned = folder / f"dynamicrafter_{config.name}_{args.file_dtype}_pruned.safetensors"
    clip = folder / "open_clip_model.safetensors"
    converted = folder / "converted.safetensors"
    results = []
    try:
        sizes = {"full": write_random_checkpoint(config, full, file_dtype)}
        if args.pruned:
            sizes["pruned"] = write_random_checkpoint(config, pruned, file_dtype, without_clip=True)
            sizes["clip"] = write_random_open_clip(config, clip)
        cases = [("full", full, "", dtype) for dtype in args.load_dtype]
        if args.pruned:
            cases += [("pruned + OpenCLIP file", pruned, str(clip), dtype) for dtype in args.load_dtype]
        for name, path, clip_arg, dtype in cases:
            if args.cold:
                _drop_cache(path, *([clip] if clip_arg else []))
            report = _run(name, _MEASURE, model_name, str(path), dtype, clip_arg)
            results.append({"case": name, "file_bytes": sizes["full" if not clip_arg else "pruned"],
                            "file_dtype": args.file_dtype, "load_dtype": dtype, "cold": args.cold, **report})
            print(json.dumps(results[-1]), flush=True)
        for dtype, without in ((args.convert_dtype, True),):
            if args.cold:
                _drop_cache(full)
            argv = [str(full), str(converted), "--dtype", dtype, "--overwrite"] + (["--without-clip"] if without else [])
            report = _run("convert", _CONVERT, *argv)
            results.append({"case": "convert" + (" --without-clip" if without else ""), "file_dtype": args.file_dtype,
                            "output_dtype": dtype, "output_bytes": converted.stat().st_size, "cold": args.cold,
                            **report})
            print(json.dumps(results[-1]), flush=True)
    finally:
        if not args.keep:
            for path in (full, pruned, clip, converted):
                path.unlink(missing_ok=True)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m dynamicrafter.bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", default="512", choices=["256", "512", "1024", "512_interp"])
    parser.add_argument("--config", help="a model config YAML instead of a preset (e.g. the tiny test models)")
    parser.add_argument("--file-dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--load-dtype", nargs="+", default=["float16", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--convert-dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--pruned", action="store_true", help="also a file without the towers plus an OpenCLIP file")
    parser.add_argument("--cold", action="store_true", help="drop the files' pages from the page cache before each case")
    parser.add_argument("--folder", default="bench-load", help="where the checkpoint files are written")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; one JSON line per case on standard output. Returns the exit status."""
    return run_tool(argv, build_parser, _benchmark)


def _benchmark(args: argparse.Namespace) -> None:
    run(args)


if __name__ == "__main__":
    sys.exit(main())
