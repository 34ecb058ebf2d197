"""The GPU measurements docs/benchmarks.md still needs, run in priority order within a time budget.

``python -m dynamicrafter.bench.suite --out DIR [--budget SECONDS] [--only NAME ...] [--tests DIR] [--list]``

Each item is one command run in its own process (mostly ``dynamicrafter.bench`` or
``dynamicrafter.bench.training`` with ``--json``, whose last output line is a JSON report; a few
tests and checks), so one that fails or runs out of time does not stop the others. An item that
runs the repository's tests needs their folder, ``--tests DIR``; without it, it is skipped. An
item may keep files in the output folder (the compile items' kernel cache, ``DIR/inductor``). Items run in
the order of :data:`SUITE` (the most wanted first) while the budget lasts; each gets at most its
own limit and what is left of the budget. Every item adds one line to ``DIR/results.jsonl``
(name, command, exit status, seconds, the JSON report or the end of the error output) as soon
as it ends; the full output goes to ``DIR/log.txt``. A lent GPU with a fixed allowance is used
best by one prepared call of this command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..frontend import EXIT_USAGE, CliError, Parser
from . import run_tool

__all__ = ["Item", "OUT", "SUITE", "TESTS", "main", "run_suite"]

#: Stands in an item's arguments for the folder of the repository's tests (``--tests``).
TESTS = "{tests}"
#: Stands in an item's arguments for the suite's output folder (``--out``).
OUT = "{out}"


@dataclass(frozen=True)
class Item:
    """One measurement: a name, the module and its arguments, and its time limit in seconds."""

    name: str
    module: str
    args: tuple[str, ...]
    limit: float = 150.0

    @property
    def needs_tests(self) -> bool:
        """Whether an argument names the repository's tests (:data:`TESTS`)."""
        return any(TESTS in arg for arg in self.args)

    def command(self, tests: Path | None = None, out: Path | None = None) -> list[str]:
        """The command line, with ``tests`` for :data:`TESTS` and ``out`` for :data:`OUT` where they are given."""
        args = list(self.args)
        for placeholder, path in ((TESTS, tests), (OUT, out)):
            if path is not None:
                args = [arg.replace(placeholder, str(path)) for arg in args]
        return [sys.executable, "-m", self.module, *args]


_GPU = ("--device", "cuda", "--random-weights", "--json")
_SAMPLING = (*_GPU, "--dtype", "bfloat16", "--frames", "16", "--steps", "50")
_TRAINING = ("--resolution", "512", "--frames", "16", *_GPU, "--steps", "5")
# Issue 20's compile targets: eager, then the first and second video with regional compilation, in a
# process with a cold kernel cache and then in one with the cache the first wrote.
_FIRST_COMPILED = ("512", *_SAMPLING, "--first-compiled-video", "regional", "--compile-cache", f"{OUT}/inductor")

#: What is still to measure on a GPU, most wanted first (docs/benchmarks.md says why).
SUITE: tuple[Item, ...] = (
    Item("compile-512-first-process", "dynamicrafter.bench", _FIRST_COMPILED, limit=300.0),
    Item("compile-512-second-process", "dynamicrafter.bench", _FIRST_COMPILED, limit=150.0),
    Item("train-lora-512", "dynamicrafter.bench.training", (*_TRAINING, "--mode", "lora", "--lora_rank", "64")),
    Item("train-full-512", "dynamicrafter.bench.training", (*_TRAINING, "--mode", "full")),
    Item("sample-512-profile", "dynamicrafter.bench", ("512", *_SAMPLING, "--profile")),
    # The fused norm's kernel tests run on the GPU itself there (under the interpreter elsewhere).
    Item("fused-norm-tests", "pytest", (f"{TESTS}/test_fused_norm.py", "-k", "kernel", "-q", "-p", "no:cacheprovider"),
         limit=120.0),
    Item("fused-norm-kernel", "dynamicrafter.models.fused_norm", ("--bench",), limit=90.0),
    Item("sample-512-fused-norm", "dynamicrafter.bench", ("512", *_SAMPLING, "--fused-norm", "on")),
    Item("sample-512-channels-last", "dynamicrafter.bench", ("512", *_SAMPLING, "--channels-last", "on")),
    Item("sample-512-fp8", "dynamicrafter.bench", ("512", *_SAMPLING, "--quantize", "fp8")),
    # Issue 17/20: a long video with FreeNoise windows (16-frame windows, stride 4): time and peak memory.
    Item("sample-512-64-frames-windows", "dynamicrafter.bench",
         ("512", *_GPU, "--dtype", "bfloat16", "--video_length", "64", "--num_inference_steps", "10"), limit=150.0),
    # Issue 17: a guided step and the decode at 16/32/64/128 frames, with and without windows (one process each).
    Item("long-video-frames-256", "dynamicrafter.bench.frames",
         ("256", "--device", "cuda", "--random-weights", "--dtype", "bfloat16", "--frames", "16", "32", "64", "128",
          "--steps", "3", "--json"), limit=300.0),
    Item("sample-256", "dynamicrafter.bench", ("256", *_SAMPLING)),
    Item("sample-1024-profile", "dynamicrafter.bench", ("1024", *_SAMPLING, "--profile"), limit=180.0),
    Item("train-lora-1024", "dynamicrafter.bench.training",
         ("--resolution", "1024", "--frames", "16", *_GPU, "--steps", "5", "--mode", "lora", "--lora_rank", "64"),
         limit=240.0),
    Item("sample-256-cuda-graphs", "dynamicrafter.bench", ("256", *_SAMPLING, "--compile-mode", "reduce-overhead"),
         limit=420.0),
)


def run_suite(items: tuple[Item, ...] | list[Item], out: Path, budget: float, tests: Path | None = None) -> list[dict]:
    """Run ``items`` in order within ``budget`` seconds; returns the lines written to ``out/results.jsonl``.

    ``tests`` is the folder of the repository's tests: an item that runs them is skipped without it.
    """
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    lines: list[dict] = []
    with open(out / "results.jsonl", "a") as results, open(out / "log.txt", "a") as log:
        for item in items:
            left = deadline - time.monotonic()
            command = item.command(tests, out)
            line: dict = {"name": item.name, "command": " ".join(command[1:])}
            if item.needs_tests and tests is None:
                line.update(rc=None, seconds=0.0, skipped="needs --tests DIR, the repository's tests folder")
            elif left < 10:
                line.update(rc=None, seconds=0.0, skipped="no time left in the budget")
            else:
                start = time.monotonic()
                try:
                    done = subprocess.run(command, capture_output=True, text=True,
                                          timeout=min(item.limit, left))
                    rc, stdout, stderr = done.returncode, done.stdout, done.stderr
                except subprocess.TimeoutExpired as expired:
                    rc = "timeout"
                    stdout, stderr = _text(expired.stdout), _text(expired.stderr)
                line.update(rc=rc, seconds=round(time.monotonic() - start, 1))
                report = _last_json(stdout)
                if report is not None:
                    line["report"] = report
                if rc != 0:
                    line["error"] = stderr.strip()[-2000:]
                log.write(f"=== {item.name} (exit {rc}, {line['seconds']} s)\n$ {line['command']}\n{stdout}{stderr}\n")
                log.flush()
            results.write(json.dumps(line) + "\n")
            results.flush()
            lines.append(line)
            status = line.get("skipped") or f"exit {line['rc']} in {line['seconds']} s"
            print(f"{item.name}: {status}", flush=True)
    return lines


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def build_parser() -> Parser:
    parser = Parser(prog="python -m dynamicrafter.bench.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.jsonl and log.txt")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite (default: 540)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these items only, in the suite's order")
    parser.add_argument("--tests", type=Path, metavar="DIR",
                        help="the repository's tests folder, for the items that run tests (skipped without it)")
    parser.add_argument("--list", action="store_true", help="print the items and their commands, run nothing")
    return parser


def _suite(args: argparse.Namespace) -> int:
    items = list(SUITE)
    if args.only:
        unknown = sorted(set(args.only) - {item.name for item in SUITE})
        if unknown:
            raise CliError(f"Unknown item {', '.join(unknown)}; --list shows them.", EXIT_USAGE)
        items = [item for item in SUITE if item.name in args.only]
    if args.tests is not None and not args.tests.is_dir():
        raise CliError(f"--tests: {args.tests} is not a folder; give the repository's tests folder.", EXIT_USAGE)
    if args.list:
        for item in items:
            print(f"{item.name:28} {' '.join(item.command(args.tests, args.out)[1:])}")
        return 0
    if args.out is None:
        raise CliError("--out is needed to run the suite.", EXIT_USAGE)
    lines = run_suite(items, args.out, args.budget, args.tests)
    failed = [line["name"] for line in lines if line["rc"] not in (0, None)]
    print(f"{len(lines) - len(failed)} of {len(lines)} items ran without error; results in {args.out / 'results.jsonl'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or list it); returns the exit status: 1 when an item failed, 2 for bad arguments."""
    return run_tool(argv, build_parser, _suite)


if __name__ == "__main__":
    sys.exit(main())
