"""Imports go one way: the command-line front end (``shopkpi``) uses the packages below it, and none of them imports
it back (issue 10, item 5). Read from the source with ``ast``, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BELOW_THE_CLI = ("processor", "orchestration", "loadgen", "perf")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``import a.b``, ``from a.b import c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", BELOW_THE_CLI)
def test_nothing_below_the_cli_imports_it(package: str) -> None:
    assert modules(package), f"no modules under {package}/"
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported(path) if m == "shopkpi" or m.startswith("shopkpi."))
        for path in modules(package)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from shopkpi.render import console\n    import shopkpi.cli\n")
    assert imported(module) == {"os", "shopkpi.render", "shopkpi.cli"}
