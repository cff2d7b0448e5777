"""Jobs from a table: a template filled from a CSV, a JSONL file or a matrix (sortie/table.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sortie.fields import BatchFileError
from sortie.spec import load_batch_file, resolve_job
from tests.helpers.cli import run_cli


def batch(tmp_path: Path, jobs_from: object, **extra: object) -> Path:
    """A batch file beside the table files, its jobs from `jobs_from`."""
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"name": "table", "app": "app", "jobs_from": jobs_from, **extra}))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(BatchFileError) as error:
        load_batch_file(path)
    return error.value.problems


def test_every_row_of_a_csv_makes_a_job_with_its_values(tmp_path: Path) -> None:
    rows = ["repo,greeting"] + [f"r{i},hello {i}" for i in range(50)]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    template = {"id": "say-{repo}", "command": "echo '{greeting} from {repo}' {{x}}"}
    spec = load_batch_file(batch(tmp_path, {"file": "rows.csv", "template": template}))
    assert [job.id for job in spec.jobs] == [f"say-r{i}" for i in range(50)]
    assert spec.jobs[7].command == ["sh", "-c", "echo 'hello 7 from r7' {x}"]


def test_the_table_is_read_relative_to_the_batch_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.csv").write_text("n\n1\n")
    spec = load_batch_file(
        batch(tmp_path, {"file": "data/rows.csv", "template": {"id": "j{n}", "command": "true"}})
    )
    assert [job.id for job in spec.jobs] == ["j1"]


def test_a_bad_table_reports_the_placeholder_and_both_lines_at_once(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("repo,greeting\nr1,hi\nr2,\nr3,yo\nr1,again\n")
    template = {"id": "say-{repo}", "command": "echo {greeting} {nope}"}
    found = problems(batch(tmp_path, {"file": "rows.csv", "template": template}))
    assert found == [
        "jobs_from[0].template.command: unknown placeholder {nope}: rows.csv has no such "
        "column (it has repo, greeting)",
        "rows.csv line 3: empty greeting, which the template needs",
        "rows.csv line 5: duplicate job id 'say-r1' (first at rows.csv line 2)",
    ]


def test_validate_exits_2_naming_the_placeholder_and_the_lines(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("repo,greeting\nr1,hi\nr2,\nr3,yo\nr1,again\n")
    template = {"id": "say-{repo}", "command": "echo {greeting} {nope}"}
    ran = run_cli(
        ["validate", str(batch(tmp_path, {"file": "rows.csv", "template": template}))],
        {"PATH": "/usr/bin:/bin", "TEMPORAL_ADDRESS": "127.0.0.1:1"},
    )
    assert ran.returncode == 2, ran.stderr
    assert "{nope}" in ran.stderr and "line 3" in ran.stderr and "line 5" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_a_matrix_gives_every_combination(tmp_path: Path) -> None:
    source = {
        "matrix": {"model": ["haiku", "sonnet", "opus"], "n": [1, 2]},
        "template": {"id": "{model}-{n}", "command": ["echo", "{model}", "{n}"], "retries": "{n}"},
    }
    spec = load_batch_file(batch(tmp_path, source, jobs=[{"id": "hand", "command": "true"}]))
    assert [job.id for job in spec.jobs] == [
        "hand",
        "haiku-1",
        "haiku-2",
        "sonnet-1",
        "sonnet-2",
        "opus-1",
        "opus-2",
    ]
    assert spec.jobs[4].command == ["echo", "sonnet", "2"] and spec.jobs[4].retries == 2


def test_jsonl_rows_keep_their_values_types_in_a_lone_placeholder(tmp_path: Path) -> None:
    rows = [
        {"name": "a", "repos": ["https://example.com/a.git"], "turns": 5},
        {"name": "b", "repos": [], "turns": 7},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    template = {
        "id": "fix-{name}",
        "prompt": "Fix {name} in {turns} turns",
        "repos": "{repos}",
        "max_turns": "{turns}",
    }
    spec = load_batch_file(batch(tmp_path, [{"file": "rows.jsonl", "template": template}]))
    job = resolve_job(spec.defaults, spec.jobs[0], 0)
    assert job.prompt == "Fix a in 5 turns" and job.max_turns == 5
    assert [repo.url for repo in job.repos] == ["https://example.com/a.git"]


def test_a_made_jobs_field_error_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"t": "5"}\n{"t": "soon"}\n')
    found = problems(
        batch(
            tmp_path,
            {"file": "rows.jsonl", "template": {"id": "j{t}", "command": "true", "timeout": "{t}"}},
        )
    )
    assert len(found) == 1 and found[0].startswith("job 'jsoon' (rows.jsonl line 2): timeout:"), (
        found
    )


@pytest.mark.parametrize(
    ("files", "source", "said"),
    [
        ({}, {"file": "gone.csv"}, "gone.csv: no such file"),
        ({"t.txt": "a\n1\n"}, {"file": "t.txt"}, "t.txt: name a .csv or .jsonl file"),
        (
            {"t.jsonl": '{"n": 1}\nnot json\n'},
            {"file": "t.jsonl"},
            "t.jsonl line 2: not valid JSON",
        ),
        ({"t.csv": "n\n1,2\n"}, {"file": "t.csv"}, "t.csv line 2: 2 cells, the header names 1"),
        ({"t.csv": b"n\n\xff\n"}, {"file": "t.csv"}, "t.csv: not UTF-8 text"),
        ({}, {"matrix": {"n": [1]}, "file": "x.csv"}, "jobs_from[0]: give `file`"),
        ({}, {"matrix": {"n": []}}, "jobs_from[0].matrix.n: List should have at least 1 item"),
    ],
)
def test_tables_that_cannot_be_read_are_named(
    tmp_path: Path, files: dict[str, str | bytes], source: dict[str, object], said: str
) -> None:
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    found = problems(batch(tmp_path, {**source, "template": {"id": "j{n}", "command": "true"}}))
    assert any(p.startswith(said) for p in found), found


def test_lone_braces_and_non_names_are_template_problems(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("n\n1\n")
    template = {"id": "j{n}", "command": "awk '{print $1}' }"}
    found = problems(batch(tmp_path, {"file": "t.csv", "template": template}))
    assert found[0].startswith("jobs_from[0].template.command: {print $1} is not a placeholder")
    assert found[1] == "jobs_from[0].template.command: a lone '}' (write }} for a literal brace)"


def test_ids_must_differ_from_the_jobs_written_by_hand(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("n\n1\n2\n")
    source = {"file": "t.csv", "template": {"id": "j{n}", "command": "true"}}
    found = problems(batch(tmp_path, source, jobs=[{"id": "j2", "command": "true"}]))
    assert found == ["t.csv line 3: duplicate job id 'j2' (first at jobs[0])"]


def test_a_thousand_bad_rows_are_reported_fifty_times_and_counted(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("n\n" + "\n".join("1" for _ in range(1000)) + "\n")
    found = problems(
        batch(tmp_path, {"file": "t.csv", "template": {"id": "j{n}", "command": "true"}})
    )
    assert len(found) == 51 and found[-1] == "... and 949 more problems like these"


def test_a_template_without_an_id_is_said_once(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("n\n1\n2\n")
    found = problems(batch(tmp_path, {"file": "t.csv", "template": {"command": "echo {n}"}}))
    assert found == ['jobs_from[0].template.id: required (e.g. "fix-{repo}")']
