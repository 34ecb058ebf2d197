"""The GPU benchmark suite's runner: one process per item, a line per item, a budget that holds."""

from __future__ import annotations

import json

from dynamicrafter import bench_suite
from dynamicrafter.bench_suite import Item, run_suite

from .conftest import DATA

TINY = ("--config", str(DATA / "tiny256.yaml"), "--frames", "2", "--steps", "2", "--device", "cpu",
        "--dtype", "float32")


def test_items_run_apart_and_each_leaves_a_line(tmp_path, capsys):
    items = [Item("tiny", "dynamicrafter.bench", TINY), Item("bad", "dynamicrafter.bench", ("--steps", "1")),
             Item("slow", "dynamicrafter.bench", TINY, limit=0.2)]
    lines = run_suite(items, tmp_path, budget=600)
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == lines and [line["name"] for line in lines] == ["tiny", "bad", "slow"]
    tiny, bad, slow = lines
    assert tiny["rc"] == 0 and tiny["report"]["resolution"] == "tiny256" and "error" not in tiny
    assert bad["rc"] == 2 and bad["error"].endswith("at least 2 (the first step is the warm-up).")
    assert slow["rc"] == "timeout" and "report" not in slow
    log = (tmp_path / "log.txt").read_text()
    assert "=== tiny (exit 0" in log and "=== slow (exit timeout" in log
    assert "bad: exit 2" in capsys.readouterr().out


def test_no_item_starts_without_time_left(tmp_path):
    lines = run_suite([Item("tiny", "dynamicrafter.bench", TINY)], tmp_path, budget=5)
    assert lines == [{"name": "tiny", "command": lines[0]["command"], "rc": None, "seconds": 0.0,
                      "skipped": "no time left in the budget"}]


def test_list_and_unknown_items(capsys):
    assert bench_suite.main(["--list", "--only", "sample-256"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("sample-256 ") and "-m dynamicrafter.bench 256 --device cuda" in out and "--json" in out
    names = [item.name for item in bench_suite.SUITE]
    assert len(set(names)) == len(names) and names[0] == "train-lora-512"


def test_every_item_parses_with_its_benchmarks_flags():
    import importlib

    for item in bench_suite.SUITE:
        parser = importlib.import_module(item.module).build_parser()
        parser.parse_args(list(item.command()[3:]))  # exits (SystemExit) on an unknown flag
