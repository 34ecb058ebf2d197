"""The GPU measurements docs/benchmarks.md still needs, run in priority order within a time budget.

``python -m dynamicrafter.bench_suite --out DIR [--budget SECONDS] [--only NAME ...] [--list]``

Each item is one command run in its own process (mostly ``dynamicrafter.bench`` or
``dynamicrafter.training.bench`` with ``--json``, whose last output line is a JSON report; a few
tests and checks), so one that fails or runs out of time does not stop the others. Items run in
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

__all__ = ["Item", "SUITE", "main", "run_suite"]


@dataclass(frozen=True)
class Item:
    """One measurement: a name, the module and its arguments, and its time limit in seconds."""

    name: str
    module: str
    args: tuple[str, ...]
    limit: float = 150.0

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


_GPU = ("--device", "cuda", "--random-weights", "--json")
_SAMPLING = (*_GPU, "--dtype", "bfloat16", "--frames", "16", "--steps", "50")
_TRAINING = ("--resolution", "512", "--frames", "16", *_GPU, "--steps", "5")

#: What is still to measure on a GPU, most wanted first (docs/benchmarks.md says why).
SUITE: tuple[Item, ...] = (
    Item("train-lora-512", "dynamicrafter.training.bench", (*_TRAINING, "--mode", "lora", "--lora_rank", "64")),
    Item("train-full-512", "dynamicrafter.training.bench", (*_TRAINING, "--mode", "full")),
    Item("sample-512-profile", "dynamicrafter.bench", ("512", *_SAMPLING, "--profile")),
    # The fused norm's kernel tests run on the GPU itself there (under the interpreter elsewhere).
    Item("fused-norm-tests", "pytest", ("tests/test_fused_norm.py", "-k", "kernel", "-q", "-p", "no:cacheprovider"),
         limit=120.0),
    Item("fused-norm-kernel", "dynamicrafter.models.fused_norm", ("--bench",), limit=90.0),
    Item("sample-512-fused-norm", "dynamicrafter.bench", ("512", *_SAMPLING, "--fused-norm", "on")),
    Item("sample-512-channels-last", "dynamicrafter.bench", ("512", *_SAMPLING, "--channels-last", "on")),
    Item("sample-512-fp8", "dynamicrafter.bench", ("512", *_SAMPLING, "--quantize", "fp8")),
    Item("sample-256", "dynamicrafter.bench", ("256", *_SAMPLING)),
    Item("sample-1024-profile", "dynamicrafter.bench", ("1024", *_SAMPLING, "--profile"), limit=180.0),
    Item("train-lora-1024", "dynamicrafter.training.bench",
         ("--resolution", "1024", "--frames", "16", *_GPU, "--steps", "5", "--mode", "lora", "--lora_rank", "64"),
         limit=240.0),
    Item("sample-256-cuda-graphs", "dynamicrafter.bench", ("256", *_SAMPLING, "--compile-mode", "reduce-overhead"),
         limit=420.0),
)


def run_suite(items: tuple[Item, ...] | list[Item], out: Path, budget: float) -> list[dict]:
    """Run ``items`` in order within ``budget`` seconds; returns the lines written to ``out/results.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    lines: list[dict] = []
    with open(out / "results.jsonl", "a") as results, open(out / "log.txt", "a") as log:
        for item in items:
            left = deadline - time.monotonic()
            line: dict = {"name": item.name, "command": " ".join(item.command()[1:])}
            if left < 10:
                line.update(rc=None, seconds=0.0, skipped="no time left in the budget")
            else:
                start = time.monotonic()
                try:
                    done = subprocess.run(item.command(), capture_output=True, text=True,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamicrafter.bench_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.jsonl and log.txt")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite (default: 540)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these items only, in the suite's order")
    parser.add_argument("--list", action="store_true", help="print the items and their commands, run nothing")
    args = parser.parse_args(argv)
    items = list(SUITE)
    if args.only:
        unknown = sorted(set(args.only) - {item.name for item in SUITE})
        if unknown:
            parser.error(f"unknown item {', '.join(unknown)}; --list shows them")
        items = [item for item in SUITE if item.name in args.only]
    if args.list:
        for item in items:
            print(f"{item.name:28} {' '.join(item.command()[1:])}")
        return 0
    if args.out is None:
        parser.error("--out is needed to run the suite")
    lines = run_suite(items, args.out, args.budget)
    failed = [line["name"] for line in lines if line["rc"] not in (0, None)]
    print(f"{len(lines) - len(failed)} of {len(lines)} items ran without error; results in {args.out / 'results.jsonl'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
