"""The mutations `make prove` runs stay in step with the code and with the guarantees table."""

from __future__ import annotations

from pathlib import Path

from tests.mutations.__main__ import load, stale

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = load(ROOT / "tests/mutations/mutations.toml")


def table_rows() -> list[str]:
    """The first cell of every row of docs/guarantees.md's table."""
    lines = (ROOT / "docs/guarantees.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| failure |")]
    return [row[2:].split(" | ", 1)[0].strip() for row in rows]


def test_every_guarantee_row_has_a_mutation_and_every_mutation_a_row() -> None:
    rows, named = table_rows(), {m.row for m in MUTATIONS}
    assert len(rows) >= 40
    assert [row for row in rows if row not in named] == []
    assert sorted(named - set(rows)) == []


def test_every_mutation_still_applies_to_the_code() -> None:
    assert [(m.name, why) for m in MUTATIONS if (why := stale(m, ROOT))] == []


def test_every_mutation_names_tests_that_exist() -> None:
    missing = [
        (m.name, test)
        for m in MUTATIONS
        for test in m.tests
        if not (ROOT / test.split("::", 1)[0]).is_file() and not test.startswith("…")
    ]
    assert missing == []
