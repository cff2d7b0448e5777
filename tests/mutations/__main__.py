"""`make prove`: every guarantee in docs/guarantees.md removed on purpose, and its tests seen red.

Each mutation in mutations.toml names its row of the guarantees table, the product code it
changes (exact old -> new replacements, each old text found exactly once) and the tests that
prove the row. Each is applied to a scratch copy of the tree, where those tests run (two
mutations at a time, one per core); a mutation is caught when its tests fail. A mutation whose
old text is no longer in the code (the code moved on) is reported as stale, never as caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = Path(__file__).with_name("mutations.toml")
LEFT_OUT = shutil.ignore_patterns(
    ".git", ".venv", ".state", "*_cache", "__pycache__", "*.egg-info", "node_modules"
)
TIMEOUT_S = 420
"""One mutation's tests at most: a hang past it counts as red (pytest-timeout would fail it)."""


@dataclass
class Edit:
    """One exact replacement in one file."""

    file: str
    old: str
    new: str


@dataclass
class Mutation:
    """A guarantee taken out of the code, and the tests that must notice."""

    row: str
    name: str
    tests: list[str]
    edits: list[Edit]
    verdict: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    caught: bool = field(default=False)


def load(path: Path) -> list[Mutation]:
    """The mutations the file lists, in its order."""
    found = []
    for entry in tomllib.loads(path.read_text())["mutation"]:
        edits = [Edit(**e) for e in entry.get("edit", [])]
        found.append(Mutation(entry["row"], entry["name"], list(entry["tests"]), edits))
    return found


def stale(mutation: Mutation, root: Path) -> str | None:
    """Why the mutation no longer applies to the code at `root`, or None."""
    for edit in mutation.edits:
        path = root / edit.file
        if not path.is_file():
            return f"{edit.file} is gone"
        count = path.read_text().count(edit.old)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            return f"old text {where} in {edit.file}: {edit.old.strip().splitlines()[0]!r}"
    return None


def apply(mutation: Mutation, root: Path) -> None:
    """Make the mutation's replacements in the tree at `root`."""
    for edit in mutation.edits:
        path = root / edit.file
        path.write_text(path.read_text().replace(edit.old, edit.new, 1))


def run(mutation: Mutation, base: Path, scratch: Path) -> Mutation:
    """Apply the mutation to a copy of the tree `base` and run its row's tests there."""
    started = time.monotonic()
    why = stale(mutation, base)
    if why is not None:
        mutation.verdict, mutation.detail = "stale", why
        return mutation
    copy = Path(tempfile.mkdtemp(prefix="mutant-", dir=scratch))
    shutil.copytree(base, copy, dirs_exist_ok=True, symlinks=True)
    apply(mutation, copy)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "--tb=native",
    ]
    try:
        ran = subprocess.run(
            [*command, *mutation.tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        code, out = ran.returncode, ran.stdout + ran.stderr
    except subprocess.TimeoutExpired:
        code, out = 1, f"tests still running after {TIMEOUT_S} s"
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    mutation.seconds = time.monotonic() - started
    if code == 1:
        mutation.verdict, mutation.caught = "caught", True
        mutation.detail = _first_failure(out)
    elif code == 0:
        mutation.verdict, mutation.detail = "SURVIVED", "every test passed"
    else:
        mutation.verdict, mutation.detail = "error", f"pytest exit {code}: {_last_line(out)}"
    return mutation


def _first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line
    return _last_line(out)


def _last_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main() -> int:
    """Run every mutation (or those whose row or name contains --only) and print the table."""
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        help="run the mutations whose row or name contains this (may be repeated)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="mutations at once (default 2)")
    parser.add_argument("--check", action="store_true", help="only check every old text is found")
    args = parser.parse_args()
    console = Console(highlight=False, width=200)
    mutations = load(MUTATIONS)
    if args.only:
        mutations = [m for m in mutations if any(o in m.row or o in m.name for o in args.only)]
    if args.check:
        problems = [(m, why) for m in mutations if (why := stale(m, ROOT))]
        for m, why in problems:
            console.print(f"[red]stale[/]: {m.row} / {m.name}: {why}")
        console.print(f"{len(mutations) - len(problems)} of {len(mutations)} mutations apply")
        return 1 if problems else 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sortie-prove-") as scratch:
        base = Path(scratch) / "tree"  # the tree as it is now: edits made meanwhile stay out
        shutil.copytree(ROOT, base, ignore=LEFT_OUT)
        if (ROOT / ".state").is_dir():  # the real Claude Code CLI, shared, not copied
            (base / ".state").symlink_to(ROOT / ".state")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for done in pool.map(lambda m: run(m, base, Path(scratch)), mutations):
                mark = "[green]caught[/]" if done.caught else f"[red]{done.verdict}[/]"
                console.print(f"{mark} {done.seconds:6.1f}s  {done.row} / {done.name}")
                console.print(f"         {done.detail}", style="dim", overflow="ellipsis")
    table = Table(title="Every guarantee removed on purpose, and its tests seen red")
    for column in ("row", "mutation", "tests", "caught", "seconds"):
        table.add_column(column, overflow="fold")
    for m in mutations:
        table.add_row(
            m.row,
            m.name,
            "\n".join(m.tests),
            "yes" if m.caught else f"[red]{m.verdict}[/]: {m.detail}",
            f"{m.seconds:.0f}",
        )
    console.print(table)
    caught = sum(m.caught for m in mutations)
    console.print(f"in {time.monotonic() - started:.0f} s")
    console.print(f"{caught} of {len(mutations)} mutations caught")
    return 0 if caught == len(mutations) else 1


if __name__ == "__main__":
    sys.exit(main())
