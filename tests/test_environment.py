"""The test suite's own promises: a missing system program skips (fails under CI); dependencies are what is imported."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from .conftest import ROOT, require_system_program

#: Declared without being imported, each for a reason given in pyproject.toml.
NOT_IMPORTED_ON_PURPOSE = {"torchvision"}


def test_missing_system_program_skips_with_the_package_name(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Debian's 'chromium' package \(apt-get install -y chromium\)"):
        require_system_program(tmp_path / "chromium", "chromium")


def test_missing_system_program_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium"):
        require_system_program(tmp_path / "chromium", "chromium")
    assert require_system_program(Path(sys.executable), "python3") == Path(sys.executable)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _imported_top_level(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_declared_dependencies_are_exactly_those_imported():
    """Every third-party module the package imports is declared, and every declared package is imported."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    optional = set().union(*extras.values())
    distributions = metadata.packages_distributions()
    imported = set()
    for module in _imported_top_level(ROOT / "dynamicrafter") - set(sys.stdlib_module_names) - {"dynamicrafter"}:
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        imported |= owners
    missing = {name for name in imported if name not in declared and name not in optional}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    unused = {name for name in declared if name not in imported} - NOT_IMPORTED_ON_PURPOSE
    assert not unused, f"declared but never imported: {sorted(unused)}"


def test_the_test_extra_brings_everything_the_tests_import():
    """``pip install -e ".[test]"`` is enough for every test to run: nothing skipped for a missing package.

    What a test imports, or skips without (``pytest.importorskip``), is a dependency or in the test extra.
    """
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    available = _requirement_names(project["dependencies"]) | _requirement_names(project["optional-dependencies"]["test"])
    distributions = metadata.packages_distributions()
    local = {"dynamicrafter", "tests", "scripts", "conftest"} | {path.stem for path in (ROOT / "tests").glob("*.py")}
    skipped_without = {node.args[0].value.split(".")[0] for path in (ROOT / "tests").glob("*.py")
                       for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                       if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                       and node.args and isinstance(node.args[0], ast.Constant)}
    missing = {}
    for module in (_imported_top_level(ROOT / "tests") | skipped_without) - set(sys.stdlib_module_names) - local:
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not owners & available:
            missing[module] = sorted(owners)
    assert not missing, f"imported by the tests but not in the test extra of pyproject.toml: {missing}"
