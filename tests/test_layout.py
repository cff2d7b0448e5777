"""The tree's layers hold: what each package may import, no grab-bag modules, none too long.

`sortie/` is what the client and the worker share, so it stands on nothing of theirs;
`workflows/` and `activities/` run on the worker and never reach the starter's `client/`;
activities never reach workflows (workflows call activities, not the other way round).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {".venv", ".state", ".git", "tests", "bench", "node_modules", "build"}
MOST_LINES = 500

FORBIDDEN = {
    "sortie": {"workflows", "activities", "client", "starter", "worker"},
    "workflows": {"client", "starter"},
    "activities": {"client", "starter", "workflows"},
}
"""What each package must never import (its modules, at any depth)."""


def modules() -> list[Path]:
    """Every Python module of the project outside tests/ and bench/."""
    found = [p for p in ROOT.glob("*.py")]
    for top in sorted(ROOT.iterdir()):
        if top.is_dir() and top.name not in SKIPPED and not top.name.startswith("."):
            found += top.rglob("*.py")
    return sorted(found)


def imported(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever in the module the import is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_scan_sees_the_tree() -> None:
    layers = {p.relative_to(ROOT).parts[0] for p in modules()}
    assert {"sortie", "client", "workflows", "activities", "starter.py", "worker.py"} <= layers


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package: str) -> None:
    crossings = {
        f"{p.relative_to(ROOT)} imports {name}"
        for p in (ROOT / package).rglob("*.py")
        for name in imported(p) & FORBIDDEN[package]
    }
    assert not crossings, sorted(crossings)


def test_no_grab_bag_modules() -> None:
    grab_bags = [
        str(p.relative_to(ROOT)) for p in modules() if p.stem in {"utils", "helpers", "misc"}
    ]
    assert not grab_bags


def test_no_module_longer_than_one_sitting() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MOST_LINES
    }
    assert not long, f"over {MOST_LINES} lines: {long}"
