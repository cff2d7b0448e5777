"""Jobs from a table: a template job filled from each row of a CSV or JSONL file, or a matrix.

`jobs_from` in a batch file names a file (relative to the batch file) or a matrix, and a
template job whose strings hold `{column}` placeholders (`{{` and `}}` for a brace). Expansion
reports every problem at once, each with the file and line it comes from; a job it makes is
then validated like a job written by hand (sortie/spec.py), and its problems name that line too.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROBLEMS = 50
"""Most problems a table reports one by one: 10,000 rows with the same fault say it 50 times."""
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .-]*$")
Row = Mapping[str, Any]


Cell = str | int | float | bool


class JobsFrom(BaseModel):
    """`jobs_from`: a template job filled from each row of a CSV or JSONL file, or from each
    combination of a matrix's values (sortie/table.py expands it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str | None = Field(default=None, min_length=1)
    """A .csv (first line: the column names) or .jsonl file, relative to the batch file."""
    matrix: dict[str, Annotated[list[Cell], Field(min_length=1)]] | None = Field(
        default=None, min_length=1
    )
    template: dict[str, Any]

    @model_validator(mode="after")
    def _file_or_matrix(self) -> Self:
        if (self.file is None) == (self.matrix is None):
            raise ValueError("give `file` (a table) or `matrix`, not both nor neither")
        return self


def at(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a path: `[0].matrix.n`."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def message(item: Any) -> str:
    """A pydantic error's message as the batch file's problems say it."""
    if item["type"] == "extra_forbidden":
        return "unknown key"
    if item["type"] == "missing":
        return "required"
    return str(item["msg"]).removeprefix("Value error, ")


class TableError(ValueError):
    """A table file that cannot be read at all: its problems, each with a line number."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Part:
    """A piece of a template string: literal text, or the column whose value goes there."""

    text: str
    column: str | None = None


@dataclass(frozen=True)
class TemplateString:
    """One string of the template, split into literal text and placeholders."""

    parts: tuple[Part, ...]

    @property
    def columns(self) -> set[str]:
        """The columns this string names."""
        return {part.column for part in self.parts if part.column is not None}

    def fill(self, row: Row, missing: set[str]) -> Any:
        """The string with the row's values; a lone `{column}` keeps a JSONL value's type."""
        if len(self.parts) == 1 and self.parts[0].column is not None:
            value = _value(row, self.parts[0].column, missing)
            return value if not isinstance(value, str | int | float) else _text(value)
        return "".join(
            part.text if part.column is None else _text(_value(row, part.column, missing))
            for part in self.parts
        )


def parse_string(text: str) -> tuple[TemplateString, list[str]]:
    """Split a template string; the problems are malformed placeholders and lone braces."""
    parts: list[Part] = []
    problems: list[str] = []
    literal: list[str] = []
    at = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[at : match.start()])
        at = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif token in ("{", "}"):
            problems.append(f"a lone {token!r} (write {token * 2} for a literal brace)")
            literal.append(token)
        else:
            name = match.group(1).strip()
            if not _NAME.fullmatch(name):
                problems.append(
                    f"{token} is not a placeholder (name a column, or write {{{{ and }}}} "
                    "for literal braces)"
                )
                literal.append(token)
                continue
            parts.append(Part("".join(literal)))
            literal = []
            parts.append(Part("", name))
    literal.append(text[at:])
    parts.append(Part("".join(literal)))
    kept = tuple(p for p in parts if p.column is not None or p.text)
    return TemplateString(kept or (Part(""),)), problems


class Template:
    """A template job, its strings parsed once so that 10,000 rows fill fast."""

    def __init__(self, template: Mapping[str, Any], where: str) -> None:
        self.problems: list[str] = []
        self.columns: dict[str, str] = {}
        """Each column the template names, and the first field that names it."""
        self._shape = self._compile(dict(template), where + ".template")

    def _compile(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            parsed, problems = parse_string(value)
            self.problems += [f"{where}: {problem}" for problem in problems]
            for column in sorted(parsed.columns):
                self.columns.setdefault(column, where)
            return parsed if any(p.column for p in parsed.parts) else _literal(parsed)
        if isinstance(value, dict):
            return {key: self._compile(item, f"{where}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self._compile(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value

    def fill(self, row: Row) -> tuple[dict[str, Any], set[str]]:
        """The row's job, and the columns it needed whose cells are empty."""
        missing: set[str] = set()
        job = _filled(self._shape, row, missing)
        assert isinstance(job, dict)
        return job, missing


def _literal(parsed: TemplateString) -> str:
    return "".join(part.text for part in parsed.parts)


def _filled(shape: Any, row: Row, missing: set[str]) -> Any:
    if isinstance(shape, TemplateString):
        return shape.fill(row, missing)
    if isinstance(shape, dict):
        return {key: _filled(item, row, missing) for key, item in shape.items()}
    if isinstance(shape, list):
        return [_filled(item, row, missing) for item in shape]
    return shape


def _value(row: Row, column: str, missing: set[str]) -> Any:
    value = row.get(column)
    if value is None or value == "":
        missing.add(column)
        return ""
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class Rows:
    """A table's rows, each with where it came from (`rows.csv line 7`)."""

    columns: list[str]
    rows: list[tuple[str, Row]]


def read_file(path: Path, shown: str) -> Rows:
    """A CSV (with a header row) or JSONL file's rows; TableError when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TableError([f"{shown}: no such file"]) from None
    except UnicodeDecodeError as error:
        raise TableError([f"{shown}: not UTF-8 text (at byte {error.start})"]) from None
    except OSError as error:
        raise TableError([f"{shown}: cannot read: {error.strerror}"]) from None
    if path.suffix.lower() == ".csv":
        return _csv_rows(text, shown)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _jsonl_rows(text, shown)
    raise TableError([f"{shown}: name a .csv or .jsonl file"])


def _csv_rows(text: str, shown: str) -> Rows:
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise TableError([f"{shown}: empty (the first line names the columns)"])
        columns = [name.strip() for name in header]
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise TableError([f"{shown} line 1: column {duplicated[0]!r} named twice"])
        rows: list[tuple[str, Row]] = []
        problems: list[str] = []
        start = reader.line_num + 1
        for cells in reader:
            where = f"{shown} line {start}"
            start = reader.line_num + 1
            if not cells or all(not cell.strip() for cell in cells):
                continue
            if len(cells) > len(columns):
                problems.append(f"{where}: {len(cells)} cells, the header names {len(columns)}")
                continue
            rows.append((where, dict(zip(columns, cells, strict=False))))
    except csv.Error as error:
        raise TableError([f"{shown} line {reader.line_num}: not valid CSV: {error}"]) from None
    if problems:
        raise TableError(problems)
    return Rows(columns, rows)


def _jsonl_rows(text: str, shown: str) -> Rows:
    rows: list[tuple[str, Row]] = []
    problems: list[str] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{shown} line {number}"
        try:
            row = json.loads(line)
        except ValueError as error:
            problems.append(f"{where}: not valid JSON: {error}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: a row must be a JSON object")
            continue
        columns.update(dict.fromkeys(row))
        rows.append((where, row))
    if problems:
        raise TableError(problems)
    return Rows(list(columns), rows)


def matrix_rows(matrix: Mapping[str, Sequence[Any]], where: str) -> Rows:
    """Every combination of the matrix's values, the first key varying slowest."""
    keys = list(matrix)
    rows: list[tuple[str, Row]] = []
    for values in itertools.product(*(matrix[key] for key in keys)):
        row = dict(zip(keys, values, strict=True))
        label = ", ".join(f"{key}={_text(value)}" for key, value in row.items())
        rows.append((f"{where} ({label})", row))
    return Rows(keys, rows)


@dataclass
class Expansion:
    """The jobs a batch's `jobs_from` made, where each came from, and every problem found."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _more: int = 0

    def problem(self, text: str) -> None:
        """Record a problem; past MAX_PROBLEMS only count it."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self._more += 1

    def report(self) -> list[str]:
        """The problems, with how many were left out."""
        more = [f"... and {self._more} more problems like these"] if self._more else []
        return self.problems + more


def expand(sources: Iterable[JobsFrom], base: Path, written: Sequence[object] = ()) -> Expansion:
    """Fill every source's template with its rows; ids must differ from each other and from
    the jobs written by hand (`written`)."""
    out = Expansion()
    first: dict[str, str] = {}
    for i, job in enumerate(written):
        if isinstance(job, dict) and isinstance(job.get("id"), str):
            first.setdefault(job["id"], f"jobs[{i}]")
    for n, source in enumerate(sources):
        where = f"jobs_from[{n}]"
        template = Template(source.template, where)
        for problem in template.problems:
            out.problem(problem)
        if "id" not in source.template:
            out.problem(f'{where}.template.id: required (e.g. "fix-{{repo}}")')
            continue  # every row's job would lack it too: said once is enough
        try:
            if source.file is not None:
                shown = source.file
                rows = read_file(base / source.file, shown)
            else:
                assert source.matrix is not None
                shown = f"{where}.matrix"
                rows = matrix_rows(source.matrix, shown)
        except TableError as error:
            for problem in error.problems:
                out.problem(problem)
            continue
        unknown = sorted(set(template.columns) - set(rows.columns))
        for column in unknown:
            out.problem(
                f"{template.columns[column]}: unknown placeholder {{{column}}}: {shown} has no "
                f"such column (it has {', '.join(rows.columns) or 'none'})"
            )
        if not rows.rows:
            out.problem(f"{shown}: no rows")
        for origin, row in rows.rows:
            job, missing = template.fill(row)
            missing.difference_update(unknown)  # reported once above, not on every row
            if missing:
                named = ", ".join(sorted(missing))
                out.problem(f"{origin}: empty {named}, which the template needs")
                continue
            job_id = job.get("id")
            if isinstance(job_id, str):
                if job_id in first:
                    out.problem(f"{origin}: duplicate job id {job_id!r} (first at {first[job_id]})")
                    continue
                first[job_id] = origin
            if unknown or template.problems:
                continue  # its ids are checked; the job itself cannot be right
            out.jobs.append(job)
            out.origins.append(origin)
    return out


def locate(problems: Iterable[str], origins: Sequence[str], offset: int) -> Iterator[str]:
    """Problems about `jobs[i]` that a table made, naming its file and line instead."""

    def named(match: re.Match[str]) -> str:
        index = int(match.group(1)) - offset
        return f"({origins[index]})" if 0 <= index < len(origins) else match.group(0)

    for problem in problems:
        yield re.sub(r"\(jobs\[(\d+)\]\)", named, problem)
