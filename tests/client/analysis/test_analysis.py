"""The pure parts of `analyze`: a checkout's files, the strategies, findings and the report."""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from client.analysis.files import (
    AnalysisError,
    SourceFile,
    changed_files,
    language_of,
    read_checkout,
)
from client.analysis.findings import (
    FINDINGS_SCHEMA,
    FINDINGS_SCHEMA_DOC,
    PROMPT_LIMIT,
    AnalysisSummary,
    Finding,
    ParsedAnswer,
    analysis_prompt,
    findings_document,
    merge,
    parse_answer,
    parse_structured,
    render_report,
    severity_counts,
)
from client.analysis.partition import (
    MARKDOWN_LIMIT,
    Part,
    Strategy,
    partition,
    plan_markdown,
    plan_table,
)
from sortie.fields import check_json_schema

STRATEGIES: tuple[Strategy, ...] = ("directory", "size", "type", "equal")


# --- read_checkout ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the user's and the system's git configuration out of the tests."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@x", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def write(repo: Path, path: str, content: str | bytes) -> None:
    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)


APP = "def main() -> None:\n    print('hi')\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed repository with one file of every kind that must be left out."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    files: dict[str, str | bytes] = {
        "README.md": "# demo\n",
        "src/app.py": APP,
        "src/util.py": "X = 1\n",
        "src/generated_pb2.py": "GENERATED = True\n",
        "src/vendor/copied.py": "y = 2\n",
        "node_modules/lib/index.js": "module.exports = 1;\n",
        "vendor/dep/dep.go": "package dep\n",
        "third/lib.py": "z = 3\n",
        "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01",
        "package-lock.json": "{}\n",
        "go.sum": "example.com/x v1.0.0 h1:abc=\n",
        "src/empty.py": "",
        ".gitignore": "*.log\n",
        ".gitattributes": (
            "third/** linguist-vendored\nsrc/generated_pb2.py linguist-generated=true\n"
        ),
        "debug.log": "ignored\n",
    }
    for path, content in files.items():
        write(root, path, content)
    (root / "link.py").symlink_to("src/app.py")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root


def test_read_checkout_lists_only_committed_reviewable_files(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://example.com/org/demo.git")
    write(repo, "src/app.py", APP + "# an uncommitted edit\n")
    write(repo, "src/new.py", "print('not committed')\n")

    checkout = read_checkout(repo)

    assert [f.path for f in checkout.files] == [
        ".gitattributes",
        ".gitignore",
        "README.md",
        "src/app.py",
        "src/util.py",
    ]
    assert checkout.root == str(repo.resolve())
    assert checkout.commit == git(repo, "rev-parse", "HEAD")
    assert len(checkout.commit) == 40
    assert checkout.remote == "https://example.com/org/demo.git"
    assert checkout.dirty
    assert checkout.scope == ""
    app = next(f for f in checkout.files if f.path == "src/app.py")
    assert app.size == len(APP.encode())  # the committed size, not the edited one
    assert app.language == "python"
    assert checkout.excluded == {
        "binary": 1,
        "empty": 1,
        "generated": 1,
        "lock file": 2,
        "not a regular file": 1,
        "vendored": 4,
    }


def test_read_checkout_clean_tree_without_remote(repo: Path) -> None:
    checkout = read_checkout(repo)
    assert not checkout.dirty
    assert checkout.remote is None


def test_read_checkout_of_a_subdirectory_keeps_root_relative_paths(repo: Path) -> None:
    checkout = read_checkout(repo / "src")
    assert checkout.scope == "src"
    assert checkout.root == str(repo.resolve())
    assert [f.path for f in checkout.files] == ["src/app.py", "src/util.py"]


def test_read_checkout_refuses_a_plain_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(AnalysisError, match="not a git repository"):
        read_checkout(plain)
    with pytest.raises(AnalysisError, match="no such directory"):
        read_checkout(tmp_path / "missing")


def test_read_checkout_refuses_a_repository_without_commits(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "fresh")
    with pytest.raises(AnalysisError, match="no commit yet"):
        read_checkout(tmp_path / "fresh")


def test_changed_files_since_a_commit_count_a_rename_on_both_sides(repo: Path) -> None:
    before = read_checkout(repo).commit
    write(repo, "src/util.py", "X = 2\n")
    git(repo, "mv", "src/app.py", "src/main.py")
    git(repo, "commit", "-q", "-am", "change and rename")
    assert changed_files(read_checkout(repo), before) == {
        "src/util.py",
        "src/app.py",
        "src/main.py",
    }
    assert changed_files(read_checkout(repo), read_checkout(repo).commit) == set()
    with pytest.raises(AnalysisError, match="commit 0123456789ab is not in"):
        changed_files(read_checkout(repo), "0123456789abcdef0123456789abcdef01234567")


def test_language_from_extension_and_name() -> None:
    assert language_of("a/b.PY") == "python"
    assert language_of("web/x.tsx") == "typescript"
    assert language_of("Dockerfile") == "dockerfile"
    assert language_of("data.bin") == "other"
    assert language_of("noext") == "other"


# --- partition ---------------------------------------------------------------------------------


def sources(paths: list[str], size: int = 100) -> list[SourceFile]:
    return [SourceFile(path=p, size=size, language=language_of(p)) for p in paths]


def random_tree(seed: int, n: int) -> list[SourceFile]:
    """n files scattered over a random tree of directories with random sizes and languages."""
    rng = random.Random(seed)
    dirs = [""]
    for i in range(60):
        parent = rng.choice(dirs)
        dirs.append(f"{parent}/d{i}" if parent else f"d{i}")
    exts = [".py", ".ts", ".go", ".md", ".json", ".rs"]
    paths = {f"{rng.choice(dirs)}/f{i}{rng.choice(exts)}".lstrip("/") for i in range(n)}
    return [
        SourceFile(path=p, size=int(rng.paretovariate(1.2) * 500), language=language_of(p))
        for p in sorted(paths)
    ]


def check_cover(files: list[SourceFile], parts: list[Part], max_files: int) -> None:
    """Every file in exactly one part, no empty or oversized part, bytes and names right."""
    placed = Counter(path for part in parts for path in part.files)
    assert placed == Counter(f.path for f in files)
    sizes = {f.path: f.size for f in files}
    for part in parts:
        assert 1 <= len(part.files) <= max_files
        assert part.files == sorted(part.files)
        assert part.bytes == sum(sizes[p] for p in part.files)
    assert len({part.name for part in parts}) == len(parts)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_covers_each_file_once_and_is_deterministic(strategy: Strategy) -> None:
    files = random_tree(1, 700)
    parts = partition(files, strategy)
    check_cover(files, parts, 20)
    shuffled = list(files)
    random.Random(2).shuffle(shuffled)
    assert partition(shuffled, strategy) == parts
    assert partition([], strategy) == []


def test_directory_parts_stay_within_bounds_on_random_trees() -> None:
    for seed in range(5):
        files = random_tree(seed, 400)
        parts = partition(files, "directory", min_files=5, max_files=20)
        check_cover(files, parts, 20)
        assert all(len(part.files) >= 5 for part in parts), [len(p.files) for p in parts]


def test_directory_splits_a_giant_directory() -> None:
    files = sources([f"src/big/f{i:03d}.py" for i in range(500)])
    parts = partition(files, "directory")
    check_cover(files, parts, 20)
    assert [len(part.files) for part in parts] == [20] * 25
    assert parts[0].name == "src/big (1/25)"
    assert parts[0].files[0] == "src/big/f000.py"
    assert parts[-1].files[-1] == "src/big/f499.py"


def test_directory_gathers_many_tiny_directories() -> None:
    files = sources([f"pkg/d{i:03d}/mod.py" for i in range(200)])
    parts = partition(files, "directory", min_files=5, max_files=20)
    check_cover(files, parts, 20)
    assert len(parts) == 10
    assert all(5 <= len(part.files) <= 20 for part in parts)
    # consecutive in path order: each part holds neighbouring directories
    assert parts[0].files == [f"pkg/d{i:03d}/mod.py" for i in range(20)]


def test_directory_keeps_module_boundaries() -> None:
    paths = (
        [f"src/api/a{i:02d}.py" for i in range(12)]
        + [f"src/api/v1/b{i}.py" for i in range(3)]
        + [f"src/auth/x{i}.py" for i in range(8)]
        + [f"src/ui/c{i:02d}.ts" for i in range(34)]
        + ["src/main.py", "src/config.py"]
        + ["README.md", "setup.py"]
    )
    files = sources(paths)
    parts = partition(files, "directory", min_files=5, max_files=20)
    check_cover(files, parts, 20)
    by_name = {part.name: part for part in parts}
    assert by_name["src/api"].files == sorted(p for p in paths if p.startswith("src/api/"))
    assert by_name["src/ui (1/2)"].files + by_name["src/ui (2/2)"].files == sorted(
        p for p in paths if p.startswith("src/ui/")
    )
    assert all(len(part.files) >= 5 for part in parts)
    # the loose files of src and of the root joined the smallest part, src/auth
    loose = next(part for part in parts if "src/main.py" in part.files)
    assert loose.name.startswith("src/auth")
    assert {"README.md", "setup.py", "src/config.py"} <= set(loose.files)


def test_directory_small_repository_is_one_part() -> None:
    files = sources(["a.py", "lib/b.py", "lib/c/d.py"])
    parts = partition(files, "directory", min_files=5, max_files=20)
    assert [(p.name, len(p.files)) for p in parts] == [("(root)", 3)]
    nested = partition(sources(["src/x/a.py", "src/x/b.py"]), "directory")
    assert [p.name for p in nested] == ["src/x"]


def test_type_groups_by_language() -> None:
    paths = (
        [f"py/m{i:02d}.py" for i in range(45)]
        + [f"web/c{i}.ts" for i in range(7)]
        + ["a.toml", "b.yaml", "c.yml"]
    )
    files = sources(paths)
    parts = partition(files, "type", min_files=5, max_files=20)
    check_cover(files, parts, 20)
    assert [(p.name, len(p.files)) for p in parts] == [
        ("python (1/3)", 15),
        ("python (2/3)", 15),
        ("python (3/3)", 15),
        ("typescript", 7),
        ("mixed", 3),
    ]
    languages = {f.path: f.language for f in files}
    for part in parts[:4]:
        assert len({languages[p] for p in part.files}) == 1


def test_size_balances_bytes_on_a_skewed_input() -> None:
    rng = random.Random(5)
    sizes = [50_000] * 20 + [rng.randint(100, 5_000) for _ in range(180)]
    files = [
        SourceFile(path=f"f{i:03d}.py", size=size, language="python")
        for i, size in enumerate(sizes)
    ]
    parts = partition(files, "size", max_files=20)
    check_cover(files, parts, 20)
    assert len(parts) == 10
    loads = [part.bytes for part in parts]
    assert max(loads) / min(loads) < 1.5
    equal = [part.bytes for part in partition(files, "equal", max_files=20)]
    assert max(equal) / min(equal) > max(loads) / min(loads)
    # sizes growing in path order: placing files in that order would leave a ratio near 1.3
    growing = [
        SourceFile(path=f"g{i:02d}.py", size=int(1000 * 1.15**i), language="python")
        for i in range(45)
    ]
    loads = [part.bytes for part in partition(growing, "size", max_files=20)]
    assert len(loads) == 3
    assert max(loads) / min(loads) < 1.05


def test_equal_parts_have_equal_counts_in_path_order() -> None:
    files = sources([f"d{i % 7}/f{i:03d}.py" for i in range(45)])
    parts = partition(files, "equal", max_files=20)
    check_cover(files, parts, 20)
    assert [len(p.files) for p in parts] == [15, 15, 15]
    assert [p.name for p in parts] == ["part 01", "part 02", "part 03"]
    assert [path for p in parts for path in p.files] == sorted(f.path for f in files)


def test_partition_validates_its_arguments() -> None:
    files = sources(["a.py"])
    with pytest.raises(AnalysisError, match="min_files"):
        partition(files, min_files=0)
    with pytest.raises(AnalysisError, match="max_files"):
        partition(files, min_files=10, max_files=5)
    with pytest.raises(AnalysisError, match="strategy"):
        partition(files, "bogus")  # type: ignore[arg-type]
    with pytest.raises(AnalysisError, match="twice"):
        partition(sources(["a.py", "a.py"]))


def test_plan_table_and_markdown() -> None:
    parts = partition(sources([f"d{i:02d}/f{j}.py" for i in range(9) for j in range(6)]))
    table = plan_table(parts)
    assert len(table) == len(parts) + 2
    assert table[0].split() == ["#", "part", "files", "bytes"]
    assert "d00" in table[1] and table[1].split()[-1] == "600"
    assert table[-1].split()[-2:] == ["54", "5,400"]
    assert len({len(line) for line in table}) == 1

    markdown = plan_markdown(parts)
    assert markdown.count("\n") == len(parts) + 2
    assert "| 1 | `d00` | 6 | 600 |" in markdown

    many = [
        Part(name=f"very/long/directory/name/{i:05d}", files=["x"], bytes=1) for i in range(5000)
    ]
    long_markdown = plan_markdown(many)
    assert len(long_markdown) < MARKDOWN_LIMIT
    assert "more parts" in long_markdown
    assert "5,000 parts" in long_markdown
    assert "`a\\|b`" in plan_markdown([Part(name="a|b", files=["x"], bytes=1)])


# --- findings ----------------------------------------------------------------------------------

ITEM = {
    "file": "src/app.py",
    "line": 3,
    "severity": "high",
    "category": "security",
    "title": "Shell injection",
    "detail": "User input reaches os.system.",
}


def test_parse_bare_array() -> None:
    parsed = parse_answer(json.dumps([ITEM]), "src")
    assert parsed.error is None and parsed.raw is None
    assert parsed.findings == [Finding(**ITEM, chunk="src")]


def test_parse_fenced_prose_wrapped_and_object_forms() -> None:
    fenced = f"Here is my review.\n```json\n{json.dumps([ITEM], indent=2)}\n```\nDone [1]."
    prose = f"I looked at [the files] and found: {json.dumps([ITEM])} That is all."
    wrapped = json.dumps({"summary": "one issue", "findings": [ITEM]})
    nested = f"Result: {json.dumps({'review': {'findings': [ITEM]}})}"
    for text in (fenced, prose, wrapped, nested):
        parsed = parse_answer(text, "src")
        assert parsed.error is None, text
        assert [f.title for f in parsed.findings] == ["Shell injection"], text


def test_parse_prefers_a_fenced_block_to_json_in_the_prose() -> None:
    text = f"You asked for this format: {json.dumps([ITEM])}. I found nothing:\n```json\n[]\n```"
    assert parse_answer(text, "src") == ParsedAnswer()


def test_parse_empty_array_is_no_findings_not_an_error() -> None:
    assert parse_answer("[]", "src") == ParsedAnswer()
    assert parse_answer("Nothing found.\n```json\n[]\n```", "src") == ParsedAnswer()


def test_parse_maps_severity_synonyms_and_cleans_items() -> None:
    items = [
        {**ITEM, "severity": "ERROR", "title": "a"},
        {**ITEM, "severity": "Warning", "title": "b"},
        {**ITEM, "severity": "note", "title": "c"},
        {**ITEM, "severity": "catastrophic", "title": "d"},
        {**ITEM, "severity": " Critical ", "title": "e"},
        {"file": "./lib/x.py:17", "title": "f", "line": None},
        {"file": "y.py", "title": "g", "line": "12-14", "category": "Bugs"},
        {"file": "z.py", "title": "h", "line": 0},
        {"title": "no file"},
        {"file": "w.py"},
        "not an object",
    ]
    parsed = parse_answer(json.dumps(items), "chunk-a")
    assert parsed.error is None
    assert parsed.skipped == 3
    got = {f.title: f for f in parsed.findings}
    assert [got[t].severity for t in "abcde"] == ["high", "medium", "low", "info", "critical"]
    assert (got["f"].file, got["f"].line, got["f"].severity) == ("lib/x.py", 17, "info")
    assert (got["g"].line, got["g"].category) == (12, "bugs")
    assert got["h"].line is None
    assert all(f.chunk == "chunk-a" for f in parsed.findings)


def test_parse_garbage_keeps_the_raw_answer() -> None:
    text = "I could not review these files, sorry: see [1] and [2]."
    parsed = parse_answer(text, "src")
    assert parsed.findings == []
    assert parsed.error == "no JSON findings in the answer"
    assert parsed.raw == text
    invalid = parse_answer('[{"foo": 1}, {"bar": 2}]', "src")
    assert invalid.error is not None and invalid.raw is not None and invalid.skipped == 2
    assert parse_answer("[" * 50_000, "src").error is not None


@pytest.mark.parametrize("text", [None, "", "   \n"])
def test_parse_empty_answer_is_an_error(text: str | None) -> None:
    parsed = parse_answer(text, "src")
    assert parsed.error == "empty answer"
    assert parsed.findings == []


def test_finding_model_is_strict() -> None:
    assert Finding(**{**ITEM, "severity": "HIGH"}).severity == "high"
    with pytest.raises(ValidationError):
        Finding(**{**ITEM, "severity": "error"})
    with pytest.raises(ValidationError):
        Finding(**{**ITEM, "line": 0})
    with pytest.raises(ValidationError):
        Finding.model_validate({**ITEM, "extra": "x"})


def finding(file: str, line: int | None, severity: str, title: str, chunk: str) -> Finding:
    return Finding(
        file=file, line=line, severity=severity, category="bugs", title=title, chunk=chunk
    )


def test_merge_dedupes_across_chunks_and_sorts() -> None:
    first = ParsedAnswer(
        findings=[
            finding("b.py", 10, "medium", "Off by one", "part 01"),
            finding("a.py", None, "low", "No docstring", "part 01"),
            finding("a.py", 5, "low", "Unused import", "part 01"),
        ]
    )
    second = ParsedAnswer(
        findings=[
            finding("b.py", 10, "critical", "off  by ONE", "part 02"),
            finding("b.py", 11, "medium", "Off by one", "part 02"),
            finding("c.py", 1, "critical", "Secret in code", "part 02"),
        ]
    )
    failed = ParsedAnswer(error="empty answer")
    merged = merge([first, failed, second])
    assert [(f.file, f.line, f.severity, f.chunk) for f in merged] == [
        ("b.py", 10, "critical", "part 01"),
        ("c.py", 1, "critical", "part 02"),
        ("b.py", 11, "medium", "part 02"),
        ("a.py", 5, "low", "part 01"),
        ("a.py", None, "low", "part 01"),
    ]
    assert severity_counts(merged) == {"critical": 2, "high": 0, "medium": 1, "low": 2, "info": 0}


def test_analysis_prompt_lists_the_files_and_the_answer_format() -> None:
    part = Part(name="src/api", files=["src/api/a.py", "src/api/b.py"], bytes=10)
    prompt = analysis_prompt(part, "security and error handling")
    assert "- src/api/a.py\n- src/api/b.py\n" in prompt
    assert "ONLY" in prompt
    assert "security and error handling" in prompt
    assert FINDINGS_SCHEMA_DOC in prompt
    assert 'empty "findings" list' in prompt
    assert "code quality" in analysis_prompt(part, "")

    long_paths = [f"{'d' * 200}/" * 19 + f"file{i}.py" for i in range(20)]
    big = analysis_prompt(Part(name="deep", files=long_paths, bytes=1), "bugs")
    assert len(big.encode()) < PROMPT_LIMIT
    assert all(path in big for path in long_paths)
    with pytest.raises(AnalysisError, match="smaller parts"):
        analysis_prompt(Part(name="huge", files=long_paths * 2, bytes=1), "bugs")


def summary(**changes: object) -> AnalysisSummary:
    base = AnalysisSummary(
        repo="https://example.com/org/demo.git",
        commit="a" * 40,
        files=87,
        chunks=3,
        unparsed_chunks=["src/ui"],
        findings_by_severity={"critical": 1, "medium": 1},
        wall_s=45.0,
        sequential_s=225.0,
        cost_usd=0.4512,
        sessions={"chunk-001": "sess-abc123", "chunk-002": "sess-def456", "chunk-003": "sess-x"},
        chunk_names={"chunk-001": "src/api", "chunk-002": "src/auth", "chunk-003": "src/ui"},
        batch_id="analyze-demo-1a2b",
        status="completed",
    )
    return base.model_copy(update=changes)


def test_render_report_has_the_summary_sessions_followups_and_raw_answers() -> None:
    findings = [
        Finding(**{**ITEM, "severity": "critical"}, chunk="src/api"),
        finding("src/auth/login.py", None, "medium", "Weak hash", "src/auth"),
    ]
    raw = "Sorry, I ran out of turns ```oops``` " + "x" * 5000
    report = render_report(summary(), findings, {"src/ui": raw})
    assert "# Analysis of https://example.com/org/demo.git" in report
    assert "a" * 40 in report
    assert "| files analysed | 87 |" in report
    assert "3 (1 unparsed)" in report
    assert "2: 1 critical, 1 medium" in report
    assert "45s (sequential estimate 3m 45s, 5.0x faster)" in report
    assert "$0.45" in report
    assert "analyze-demo-1a2b" in report and "completed" in report
    for session in ("sess-abc123", "sess-def456"):
        assert session in report
    assert 'python starter.py followup analyze-demo-1a2b chunk-002 "..."' in report
    assert "`src/app.py:3`** Shell injection _(security)_" in report
    assert "  User input reaches os.system." in report
    assert "### Critical (1)" in report and "### Medium (1)" in report
    assert "## Unparsed answers" in report
    assert raw[:4000] in report and raw[:4001] not in report
    assert "````\nSorry" in report  # a fence the answer's own backticks cannot close


def test_render_report_without_findings_or_sessions() -> None:
    report = render_report(summary(unparsed_chunks=[], sessions={}, dirty=True, wall_s=0.0), [], {})
    assert "No findings." in report
    assert "uncommitted changes" in report
    assert "Unparsed" not in report
    assert "followup" not in report


def test_findings_document_round_trips() -> None:
    findings = [Finding(**ITEM, chunk="src")]
    document = json.loads(findings_document(summary(), findings))
    assert AnalysisSummary.model_validate(document["summary"]) == summary()
    assert [Finding.model_validate(f) for f in document["findings"]] == findings


def test_findings_come_as_the_schema_s_object_and_the_schema_is_one() -> None:
    check_json_schema(FINDINGS_SCHEMA)
    value = {
        "findings": [
            {"file": "a.py", "line": 3, "severity": "high", "category": "bugs", "title": "Off"},
            {"file": "", "severity": "low", "category": "x", "title": "no file"},
        ]
    }
    answer = parse_structured(value, "part")
    assert [(f.file, f.line, f.chunk) for f in answer.findings] == [("a.py", 3, "part")]
    assert answer.skipped == 1 and answer.error is None
    assert parse_structured({"other": 1}, "part").error == "no findings in the structured answer"
