"""The GPU benchmark suite's runner: one process per item, a line per item, a budget that holds."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from dynamicrafter.bench import suite as bench_suite
from dynamicrafter.bench.suite import OUT, TESTS, Item, run_suite


def test_items_run_apart_and_each_leaves_a_line(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text('{"s_per_step": 0.5,\n "device": "cuda"}')
    items = [Item("ok", "json.tool", ("--compact", str(report))),
             Item("bad", "dynamicrafter.bench", ("--steps", "1")),
             Item("slow", "dynamicrafter.bench", ("--steps", "1"), limit=0.05)]
    lines = run_suite(items, tmp_path / "out", budget=600)
    written = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert written == lines and [line["name"] for line in lines] == ["ok", "bad", "slow"]
    ok, bad, slow = lines
    assert ok["rc"] == 0 and ok["report"] == {"s_per_step": 0.5, "device": "cuda"} and "error" not in ok
    assert bad["rc"] == 2 and bad["error"].endswith("at least 2 (the first step is the warm-up).")
    assert slow["rc"] == "timeout" and "report" not in slow
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "=== ok (exit 0" in log and "=== slow (exit timeout" in log
    assert "bad: exit 2" in capsys.readouterr().out


def test_no_item_starts_without_time_left(tmp_path):
    lines = run_suite([Item("any", "json.tool", ())], tmp_path, budget=5)
    assert lines == [{"name": "any", "command": lines[0]["command"], "rc": None, "seconds": 0.0,
                      "skipped": "no time left in the budget"}]


def test_an_item_that_runs_the_tests_needs_their_folder(tmp_path):
    """The suite reads nothing of a checkout unless --tests names its tests folder."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "report.json").write_text("{}")
    item = Item("tests", "json.tool", (f"{TESTS}/report.json",))
    skipped, ran = run_suite([item], tmp_path / "out", budget=600) + run_suite([item], tmp_path / "out", 600,
                                                                                 tests=tmp_path / "tests")
    assert skipped["skipped"] == "needs --tests DIR, the repository's tests folder" and skipped["rc"] is None
    assert ran["rc"] == 0 and ran["report"] == {} and ran["command"].endswith(f"{tmp_path}/tests/report.json")


def test_an_item_can_keep_files_in_the_output_folder(tmp_path):
    """The compile items share a kernel cache under the suite's --out folder: cold for the first, warm for the second."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text('{"files": 1}')
    (line,) = run_suite([Item("out", "json.tool", ("--compact", f"{OUT}/report.json"))], tmp_path / "out", budget=600)
    assert line["rc"] == 0 and line["report"] == {"files": 1}
    assert line["command"].endswith(f"{tmp_path / 'out'}/report.json")
    first, second = (item for item in bench_suite.SUITE if item.name.startswith("compile-512-"))
    assert first.args == second.args and f"{OUT}/inductor" in first.args and "--first-compiled-video" in first.args


def test_list_and_unknown_items(capsys, caplog, tmp_path):
    assert bench_suite.main(["--list", "--only", "sample-256", "fused-norm-tests"]) == 0
    fused, sample = capsys.readouterr().out.strip().splitlines()  # in the suite's order
    assert sample.startswith("sample-256 ") and "-m dynamicrafter.bench 256 --device cuda" in sample and "--json" in sample
    assert fused.startswith("fused-norm-tests ") and "-m pytest {tests}/test_fused_norm.py -k kernel" in fused
    names = [item.name for item in bench_suite.SUITE]
    assert len(set(names)) == len(names) and names[:3] == ["compile-512-first-process", "compile-512-second-process",
                                                           "train-lora-512"]
    for argv, message in ((["--list", "--only", "sample-256", "sample-4096"], "Unknown item sample-4096; --list shows them."),
                          (["--list", "--tests", str(tmp_path / "none")], f"--tests: {tmp_path / 'none'} is not a folder; "
                                                                           "give the repository's tests folder."),
                          ([], "--out is needed to run the suite.")):
        caplog.clear()
        assert bench_suite.main(argv) == 2
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [message]


def test_the_old_module_still_runs_the_suite():
    done = subprocess.run([sys.executable, "-m", "dynamicrafter.bench_suite", "--list", "--only", "sample-256"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("sample-256 ")


def test_a_run_names_its_results_and_fails_when_an_item_failed(tmp_path, monkeypatch, capsys):
    report = tmp_path / "report.json"
    report.write_text("{}")
    monkeypatch.setattr(bench_suite, "SUITE", (Item("ok", "json.tool", ("--compact", str(report))),
                                              Item("bad", "json.tool", (str(tmp_path / "missing.json"),))))
    assert bench_suite.main(["--out", str(tmp_path / "out"), "--only", "ok"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"1 of 1 items ran without error; results in {tmp_path / 'out' / 'results.jsonl'}")
    assert bench_suite.main(["--out", str(tmp_path / "out")]) == 1
    assert "1 of 2 items ran without error" in capsys.readouterr().out
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 3  # appended, never overwritten


def test_every_item_parses_with_its_benchmarks_flags():
    from dynamicrafter.bench import frames, generation, training

    parsers = {"dynamicrafter.bench": generation.build_parser, "dynamicrafter.bench.training": training.build_parser,
               "dynamicrafter.bench.frames": frames.build_parser}
    for item in bench_suite.SUITE:
        if item.module in ("pytest", "dynamicrafter.models.fused_norm"):
            continue  # tests and checks, not benchmarks
        parser = parsers[item.module]()
        args = item.command()[3:]
        assert "--json" in args  # the runner reads the report from the last line
        parser.parse_args(args)  # raises a CliError on an unknown flag
