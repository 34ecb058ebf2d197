"""How fast each sampler approaches the converged result: distance to 1000-step DDIM against steps.

    python -m dynamicrafter.bench.convergence --data tests/data --out docs/sampler-convergence.png

runs the image-to-video pipeline on the tiny reference models (``--data``: the folder with their
checkpoints, configs, reference vectors and ``manifest.json``, ``tests/data`` in a checkout of the
repository; random weights, so this measures the solvers, not video quality) with eta 0, a fixed
starting noise, the reference image and prompt and classifier-free guidance 7.5 (each model's
guidance rescale), for every sampler and step count, and reports the relative L2 distance of the
sampled latents to those of DDIM with 1000 steps. It prints a Markdown table and, with ``--out``, draws it
(needs matplotlib: ``pip install "dynamicrafter[plot]"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..diffusion.sampling import SAMPLERS
from ..errors import UserError
from ..files import write_atomically
from ..frontend import EXIT_USAGE, CliError, Parser
from . import run_tool

#: Where the tiny models are in a checkout of the repository (named in the messages, never read by default).
CHECKOUT_DATA = "tests/data"
STEPS = (5, 10, 15, 20, 30, 50)
#: (tiny model, timestep spacing): the 256 model's own spacing and the trailing one, the 512 model's own.
RUNS = (("tiny256", "uniform"), ("tiny256", "uniform_trailing"), ("tiny512", "uniform_trailing"))


def _pipeline(name: str, data: Path):
    from functools import partial

    from .. import pipeline as pipeline_module
    from ..pipeline import DynamiCrafterImg2VideoPipeline

    pipeline_module.tqdm = partial(pipeline_module.tqdm, disable=True)  # hundreds of runs: no progress bars

    checkpoint, config = data / f"{name}.ckpt", data / f"{name}.yaml"
    if not checkpoint.is_file() or not config.is_file():
        raise UserError(f"{data} lacks {name}.ckpt or {name}.yaml; give --data the folder with the tiny models "
                        f"({CHECKOUT_DATA} in a checkout of the repository).")
    return DynamiCrafterImg2VideoPipeline("256" if name == "tiny256" else "512", device="cpu", checkpoint=checkpoint,
                                          config=config, dtype="float32")


def measure(data: Path, steps: tuple[int, ...] = STEPS, runs: tuple[tuple[str, str], ...] = RUNS, frames: int = 2,
            reference_steps: int = 1000, log=print) -> dict:
    """``{"model/spacing": {"sampler": [distance at each step count]}}`` plus the settings.

    ``data`` is the folder with the tiny models (``tests/data`` in a checkout of the repository).
    """
    from safetensors.torch import load_file

    if not (data / "manifest.json").is_file():
        raise UserError(f"{data} has no manifest.json; give --data the folder with the tiny models "
                        f"({CHECKOUT_DATA} in a checkout of the repository).")
    manifest = json.loads((data / "manifest.json").read_text())
    results: dict = {"steps": list(steps), "frames": frames, "reference_steps": reference_steps, "runs": {}}
    for name in dict.fromkeys(n for n, _ in runs):
        m = manifest[name]
        pipe = _pipeline(name, data)
        pixels = load_file(str(data / m["vectors"]))["image.input"][0]
        image = ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        shape = (1, 4, frames, m["height"] // 8, m["width"] // 8)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        common = dict(guidance_scale=7.5, eta=0.0, num_frames=frames, height=m["height"], width=m["width"],
                      frame_stride=m["frame_stride"], latents=x_T, output_type="latent", return_dict=False)

        def run(sampler: str, n: int, spacing: str) -> torch.Tensor:
            return pipe(image, m["prompts"][0], num_inference_steps=n, sampler=sampler, timestep_spacing=spacing,
                        **common).double()

        start = time.perf_counter()
        reference = run("ddim", reference_steps, "uniform_trailing")  # the same timesteps for both spacings
        log(f"{name}: {reference_steps}-step DDIM reference in {time.perf_counter() - start:.0f} s")
        for model, spacing in runs:
            if model != name:
                continue
            table = {}
            for sampler in SAMPLERS:
                table[sampler] = [float((run(sampler, n, spacing) - reference).norm() / reference.norm()) for n in steps]
                log(f"{name} {spacing} {sampler}: " + " ".join(f"{e:.2e}" for e in table[sampler]))
            results["runs"][f"{name}/{spacing}"] = table
    return results


def markdown(results: dict) -> str:
    """The distances as a Markdown table (one row per model, spacing and sampler)."""
    steps = results["steps"]
    lines = ["| model / spacing | sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for run, table in results["runs"].items():
        for sampler, errors in table.items():
            lines.append(f"| {run} | {sampler} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> Path:
    """Draw the distances (log-log, one panel per model and spacing) to a PNG, atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('Plotting needs matplotlib: pip install "dynamicrafter[plot]".') from None
    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), sharey=True, squeeze=False)
    steps = np.array(results["steps"])
    for ax, (run, table) in zip(axes[0], runs.items()):
        for sampler, errors in table.items():
            ax.loglog(steps, errors, "o-", label=sampler, markersize=4)
        ax.loglog(steps, errors[0] * (steps / steps[0]) ** -1.0, ":", color="grey", linewidth=1, label="order 1")
        ax.loglog(steps, table["ddim"][0] * (steps / steps[0]) ** -2.0, "--", color="grey", linewidth=1,
                  label="order 2")
        ax.set_title(run, fontsize=10)
        ax.set_xlabel("steps")
        ax.set_xticks(steps, [str(n) for n in steps], fontsize=8)
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"relative L2 distance to {results['reference_steps']}-step DDIM")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Tiny models, eta 0, CFG 7.5, {results['frames']} frames, fixed x_T", fontsize=10)
    fig.tight_layout()
    write_atomically(out, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
    plt.close(fig)
    return out


def build_parser() -> Parser:
    parser = Parser(prog="python -m dynamicrafter.bench.convergence", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help=f"folder with the tiny models and their manifest.json ({CHECKOUT_DATA} in a checkout)")
    parser.add_argument("--out", type=Path, help="PNG to draw (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="step counts (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=2, help="frames per video (default: 2)")
    parser.add_argument("--reference-steps", type=int, default=1000, help="DDIM steps of the reference (default: 1000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1; the tiny models gain nothing from more)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and write what was asked for; returns the exit status."""
    return run_tool(argv, build_parser, _convergence)


def _convergence(args: argparse.Namespace) -> int:
    if args.data is None:
        raise CliError(f"--data is needed: the folder with the tiny models ({CHECKOUT_DATA} in a checkout).", EXIT_USAGE)
    if min(args.steps) < 1 or args.frames < 1 or not 1 <= args.reference_steps <= 1000:
        raise CliError("Step counts and frames must be positive, the reference at most 1000 steps.", EXIT_USAGE)
    torch.set_num_threads(max(1, args.threads))
    logging.getLogger("dynamicrafter").setLevel(logging.WARNING)  # hundreds of pipeline runs: no "Ready" lines
    results = measure(args.data, tuple(args.steps), frames=args.frames, reference_steps=args.reference_steps,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        print(f"wrote {plot(results, args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
