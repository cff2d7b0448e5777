"""Batch files: what validates, what is refused, and how errors name the field and the job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from client.batches import CHUNK_INPUT_BYTES, PAYLOAD_BYTES, batch_input, chunk_size
from sortie.fields import (
    FAILURE_RATE_AFTER,
    BatchFileError,
    branch_name,
    parse_duration,
    parse_memory_mb,
    parse_percent,
)
from sortie.spec import (
    BatchSpec,
    LogTail,
    StormGuard,
    app_for,
    load_batch_file,
    parse_batch,
    resolve_job,
)

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
name: nightly-review
app: my-fly-app
max_machines: 10
chunk_size: 25
defaults:
  image: registry.fly.io/sortie-agent:latest
  region: iad
  guest: {cpu_kind: shared, cpus: 2, memory_mb: 4096}
  timeout: 30m
  retries: 2
  env: {LOG_LEVEL: info}
  secrets: [GITHUB_TOKEN]
jobs:
  - id: auth
    command: ["sh", "-c", "make -C src/auth lint"]
    env: {EXTRA: "1"}
  - id: api
    prompt: "Review src/api for injection bugs"
    repos: ["https://github.com/org/repo"]
    timeout: 1h30m
"""


def problems(data: object) -> list[str]:
    with pytest.raises(BatchFileError) as caught:
        parse_batch(data, "batch.yaml")
    return caught.value.problems


def base(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "b",
        "app": "a",
        "jobs": [{"id": "one", "command": ["true"]}],
    }
    data.update(overrides)
    return data


def test_the_issue_example_validates_and_resolves(tmp_path: Path) -> None:
    path = tmp_path / "batch.yaml"
    path.write_text(GOOD)
    spec = load_batch_file(path)
    auth = resolve_job(spec.defaults, spec.jobs[0], 0)
    api = resolve_job(spec.defaults, spec.jobs[1], 1)
    assert auth.env == {"LOG_LEVEL": "info", "EXTRA": "1"}
    assert auth.timeout_s == 1800 and api.timeout_s == 5400
    assert auth.guest.memory_mb == 4096 and auth.retries == 2 and auth.region == "iad"
    assert auth.secrets == ["GITHUB_TOKEN"]
    assert api.prompt and api.repos[0].url == "https://github.com/org/repo"
    assert spec.secret_names() == ["GITHUB_TOKEN"]


def test_same_content_same_batch_id_and_different_content_differs() -> None:
    one = parse_batch(base())
    assert one.batch_id() == parse_batch(base()).batch_id()
    assert one.batch_id().startswith("batch-b-")
    assert one.batch_id() != parse_batch(base(max_machines=3)).batch_id()


def test_unknown_keys_name_the_job_and_field() -> None:
    found = problems(base(jobs=[{"id": "x", "command": ["true"], "comand": "oops"}]))
    assert found == ["job 'x' (jobs[0]): comand: unknown key"]
    assert problems(base(extra=1)) == ["extra: unknown key"]


def test_duplicate_and_missing_ids() -> None:
    dup = problems(base(jobs=[{"id": "x", "command": "a"}, {"id": "x", "command": "b"}]))
    assert dup == ["job 'x' (jobs[1]): id: duplicate job id (first at jobs[0])"]
    missing = problems(base(jobs=[{"command": ["true"]}]))
    assert missing == ["job '?' (jobs[0]): id: required"]


def test_empty_batch_is_refused() -> None:
    assert problems(base(jobs=[])) == ["jobs: the batch has no jobs"]
    assert "jobs: required" in problems({"name": "b", "app": "a"})


def test_a_job_needs_exactly_one_of_command_and_prompt() -> None:
    both = problems(base(jobs=[{"id": "x", "command": ["true"], "prompt": "hi"}]))
    neither = problems(base(jobs=[{"id": "y"}]))
    assert both == ["job 'x' (jobs[0]): set exactly one of command or prompt"]
    assert neither == ["job 'y' (jobs[0]): set exactly one of command or prompt"]


def test_a_default_command_counts_for_every_job() -> None:
    spec = parse_batch(base(defaults={"command": "echo hi"}, jobs=[{"id": "x"}]))
    assert resolve_job(spec.defaults, spec.jobs[0], 0).command == ["sh", "-c", "echo hi"]


def test_bad_durations_and_sizes_are_named() -> None:
    found = problems(
        base(
            jobs=[
                {"id": "t", "command": "x", "timeout": "3 fortnights"},
                {"id": "m", "command": "x", "guest": {"memory_mb": 1000}},
            ]
        )
    )
    assert found[0].startswith("job 't' (jobs[0]): timeout: invalid duration")
    assert found[1].startswith("job 'm' (jobs[1]): guest.memory_mb: memory must be")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(base(max_machines=0, jobs=[{"id": "a b", "command": "x", "retries": 99}]))
    assert len(found) == 3


def test_cross_field_problems_are_reported_beside_field_errors() -> None:
    found = problems(
        base(
            name="Bad Name",
            defaults={"timeout": "soon"},
            jobs=[
                {"id": "a", "command": "x", "retries": 99},
                {"id": "a", "command": "y"},
                {"id": "b"},
                {"id": "c", "command": "x", "prompt": "hi"},
                {"id": "d", "command": "x", "model": "opus"},
                "not a job",
            ],
        )
    )
    assert found[0].startswith("name: String should match pattern")
    assert found[1].startswith("defaults.timeout: invalid duration")
    assert found[2].startswith("job 'a' (jobs[0]): retries: Input should be less than")
    assert found[3].startswith("job '?' (jobs[5]): job: Input should be a valid dictionary")
    assert found[4:] == [
        "job 'a' (jobs[1]): id: duplicate job id (first at jobs[0])",
        "job 'b' (jobs[2]): set exactly one of command or prompt",
        "job 'c' (jobs[3]): set exactly one of command or prompt",
        "job 'd' (jobs[4]): model is only for prompt jobs",
    ]


def test_an_empty_batch_still_reports_its_other_problems() -> None:
    assert problems(base(app="A!", jobs=None)) == [
        "app: String should match pattern '^[a-z0-9][a-z0-9-]{0,61}$'",
        "jobs: the batch has no jobs",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h30m", 5400), ("500ms", 0.5), (45, 45), ("2", 2)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1s", "0", "1x", "h", True, "1h 5"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "mb"), [(512, 512), ("4gb", 4096), ("1024mb", 1024)])
def test_sizes(text: object, mb: int) -> None:
    assert parse_memory_mb(text) == mb


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError, match="cannot read"):
        load_batch_file(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(BatchFileError, match="not valid YAML"):
        load_batch_file(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(BatchFileError, match=r"not UTF-8 text \(byte 0x89 at offset 0\)"):
        load_batch_file(binary)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(BatchFileError, match=r"byte 0xe9 at offset 9"):
        load_batch_file(latin)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(BatchFileError, match="must be a mapping"):
        load_batch_file(listed)


def test_the_demo_batch_is_valid() -> None:
    spec = load_batch_file(ROOT / "examples" / "demo.yaml")
    assert isinstance(spec, BatchSpec) and len(spec.jobs) >= 12


def test_prompt_job_fields_are_validated_and_refused_on_command_jobs() -> None:
    found = problems(
        base(
            max_cost_usd=0,
            keep_sessions="soon",
            jobs=[
                {"id": "cmd", "command": "true", "model": "claude-x", "repos": ["u"]},
                {
                    "id": "ask",
                    "prompt": "review",
                    "max_turns": 0,
                    "allowed_tools": "Read",
                    "repos": [{"url": "u", "branch": "", "ref": "main", "path": "../up"}],
                },
            ],
        )
    )
    text = "\n".join(found)
    assert "max_cost_usd: Input should be greater than 0" in text
    assert "keep_sessions: invalid duration" in text
    assert "job 'ask' (jobs[1]): max_turns" in text
    assert "job 'ask' (jobs[1]): allowed_tools" in text
    for field in ("branch", "ref", "path"):
        assert f"job 'ask' (jobs[1]): repos.0.{field}" in text, field


def test_prompt_only_fields_on_a_command_job_name_the_field() -> None:
    found = problems(base(jobs=[{"id": "cmd", "command": "true", "model": "m", "repos": ["u"]}]))
    assert found == [
        "job 'cmd' (jobs[0]): repos is only for prompt jobs",
        "job 'cmd' (jobs[0]): model is only for prompt jobs",
    ]


def test_a_prompt_job_with_repos_branch_and_ref_resolves() -> None:
    spec = parse_batch(
        base(
            max_cost_usd=12.5,
            keep_sessions="7d",
            jobs=[
                {
                    "id": "ask",
                    "prompt": "review",
                    "max_cost_usd": 1,
                    "repos": [
                        {"url": "https://x/r", "branch": "dev", "ref": "4f2a9c1", "path": "r"}
                    ],
                }
            ],
        )
    )
    assert spec.max_cost_usd == 12.5 and spec.keep_sessions == 7 * 86400
    job = resolve_job(spec.defaults, spec.jobs[0], 0)
    assert job.max_cost_usd == 1 and job.repos[0].ref == "4f2a9c1" and job.repos[0].branch == "dev"


def test_log_tail_defaults_to_on_failure_and_takes_only_known_values() -> None:
    data = base(jobs=[{"id": "a", "command": "true"}, {"id": "b", "command": "true"}])
    data["defaults"] = {"log_tail": "always"}
    data["jobs"][1]["log_tail"] = "on_failure"  # type: ignore[index]
    spec = parse_batch(data)
    jobs = [resolve_job(spec.defaults, job, i) for i, job in enumerate(spec.jobs)]
    assert [job.log_tail for job in jobs] == [LogTail.ALWAYS, LogTail.ON_FAILURE]
    plain = parse_batch(base(jobs=[{"id": "a", "command": "true"}]))
    assert resolve_job(plain.defaults, plain.jobs[0], 0).log_tail is LogTail.ON_FAILURE
    found = problems(base(jobs=[{"id": "a", "command": "true", "log_tail": "sometimes"}]))
    assert any(p.startswith("job 'a' (jobs[0]): log_tail") for p in found), found


@pytest.mark.parametrize(
    ("jobs", "machines", "most", "size"),
    [
        (1000, 100, 25, 20),  # 40 chunks would share 100 slots 2 or 3 each: 50 share them 2 each
        (100, 10, 25, 20),  # 4 chunks -> 5, two slots each
        (10000, 200, 25, 25),  # 400 chunks: two rounds of one slot each, as asked
        (80, 20, 20, 20),  # 4 chunks, five slots each, as asked
        (300, 7, 20, 15),  # 15 chunks -> 21, three rounds of one slot each
        (14, 10, 25, 14),  # one chunk
        (5, 3, 1, 1),  # never more than asked
    ],
)
def test_chunks_are_sized_so_the_machines_divide_evenly(
    jobs: int, machines: int, most: int, size: int
) -> None:
    spec = parse_batch(
        {
            "name": "even",
            "app": "a",
            "max_machines": machines,
            "chunk_size": most,
            "defaults": {"command": "true"},
            "jobs": [{"id": f"j{i}"} for i in range(jobs)],
        }
    )
    assert spec.balanced_chunk_size() == size


def test_chunks_hold_a_hundred_jobs_unless_asked_otherwise() -> None:
    spec = parse_batch(
        {
            "name": "plain",
            "app": "a",
            "max_machines": 100,
            "defaults": {"command": "true"},
            "jobs": [{"id": f"j{i}"} for i in range(1000)],
        }
    )
    assert spec.chunk_size == 100
    assert chunk_size(spec) == 100  # ten chunks of ten slots each


def test_a_long_default_prompt_makes_chunks_smaller_so_each_start_fits() -> None:
    spec = parse_batch(
        {
            "name": "long",
            "app": "a",
            "max_machines": 100,
            "defaults": {"prompt": "review this " * 2_500},  # 30 KB, repeated in every job
            "jobs": [{"id": f"j{i}"} for i in range(1000)],
        }
    )
    size = chunk_size(spec)
    assert size == 10  # 13 would fit; 100 chunks of 10 share the 100 slots evenly
    chunk = [resolve_job(spec.defaults, job, i) for i, job in enumerate(spec.jobs[:size])]
    assert sum(len(job.model_dump_json()) for job in chunk) <= CHUNK_INPUT_BYTES


def test_a_job_too_large_for_any_chunk_is_refused_before_anything_starts() -> None:
    spec = parse_batch(
        {
            "name": "huge",
            "app": "a",
            "jobs": [{"id": "small", "prompt": "hi"}, {"id": "big", "prompt": "x" * 1_100_000}],
        }
    )
    with pytest.raises(BatchFileError) as caught:
        batch_input(spec, "batch-huge")
    size = len(resolve_job(spec.defaults, spec.jobs[1], 1).model_dump_json())
    assert f"job 'big' is {size:,} bytes" in str(caught.value)
    assert f"at most {CHUNK_INPUT_BYTES:,}" in str(caught.value)


def test_a_large_batch_goes_to_the_store_and_its_input_stays_small() -> None:
    # 20,000 prompt jobs of 2 KB: 40 MB of jobs, an input of a few KB (the bench submits
    # 100,000 of them).
    spec = parse_batch(
        {
            "name": "many",
            "app": "a",
            "max_machines": 200,
            "jobs": [{"id": f"j{i:06d}", "prompt": f"{i} " + "y" * 2_000} for i in range(20_000)],
        }
    )
    claimed = batch_input(spec, "batch-many")
    size = len(claimed.input.model_dump_json())
    assert size < PAYLOAD_BYTES and size < 50_000, size
    assert all(len(data) <= CHUNK_INPUT_BYTES for data in claimed.objects.values())
    assert claimed.input.jobs.total == 20_000
    assert len(claimed.objects) == len(claimed.input.jobs.digests)


def test_a_chunk_size_whose_results_could_outgrow_a_payload_is_refused() -> None:
    found = problems(base(chunk_size=251, jobs=[{"id": "a", "command": "true"}]))
    assert found == ["chunk_size: Input should be less than or equal to 250"], found
    largest = parse_batch(base(chunk_size=250, jobs=[{"id": "a", "command": "true"}]))
    assert largest.chunk_size == 250


def test_apps_spread_the_jobs_and_priority_is_one_to_five() -> None:
    jobs = [{"id": f"j{i}", "command": "true"} for i in range(5)]
    spec = parse_batch({"name": "many", "apps": ["a", "b", "c"], "priority": 1, "jobs": jobs})
    assert (spec.app, spec.fly_apps, spec.priority) == ("a", ["a", "b", "c"], 1)
    data = batch_input(spec, spec.batch_id()).input
    assert [app_for(data.apps, i) for i in range(5)] == ["a", "b", "c", "a", "b"]
    assert parse_batch({"name": "one", "app": "a", "jobs": jobs}).fly_apps == ["a"]
    cases: list[tuple[dict[str, object], str]] = [
        ({"app": "a", "apps": ["b"]}, "give `app` (one Fly app) or `apps` (several), not both"),
        ({"apps": ["a", "a"]}, "apps: each Fly app may be named once"),
        ({"app": "a", "priority": 0}, "priority: Input should be greater than or equal to 1"),
        ({"app": "a", "priority": 6}, "priority: Input should be less than or equal to 5"),
    ]
    for bad, problem in cases:
        with pytest.raises(BatchFileError) as refused:
            parse_batch({"name": "bad", "jobs": jobs} | bad)
        assert problem in refused.value.problems, refused.value.problems


def test_failure_thresholds_and_the_storm_guard_validate_and_reach_the_batch() -> None:
    spec = parse_batch(
        {
            "name": "guarded",
            "app": "a",
            "max_failures": 20,
            "max_failure_rate": "12.5%",
            "on_too_many_failures": "cancel",
            "storm": {"errors": 5, "within": "2m", "auto_resume_after": "10m"},
            "jobs": [{"id": "x", "command": "true"}],
        }
    )
    limit = batch_input(spec, "b").input.failure_limit
    assert (limit.max_failures, limit.max_failure_rate, limit.on_too_many) == (20, 12.5, "cancel")
    assert batch_input(spec, "b").input.storm == StormGuard(
        errors=5, within=120, auto_resume_after=600
    )
    plain = parse_batch({"name": "p", "app": "a", "jobs": [{"id": "x", "command": "true"}]})
    assert (plain.max_failures, plain.max_failure_rate, plain.on_too_many_failures) == (
        None,
        None,
        "pause",
    )
    assert plain.storm == StormGuard(errors=10, within=300, auto_resume_after=None)
    off = yaml.safe_load("name: o\napp: a\nstorm: off\njobs: [{id: x, command: 'true'}]\n")
    assert parse_batch(off).storm is None, "YAML's off turns the storm guard off"


def test_bad_failure_thresholds_are_refused_and_the_rate_says_when_it_counts() -> None:
    with pytest.raises(BatchFileError) as error:
        parse_batch(
            {
                "name": "bad",
                "app": "a",
                "max_failures": 0,
                "max_failure_rate": "0%",
                "on_too_many_failures": "explode",
                "storm": {"errors": 0, "within": "soon"},
                "jobs": [{"id": "x", "command": "true"}],
            }
        )
    assert error.value.problems == [
        "max_failures: Input should be greater than or equal to 1",
        "max_failure_rate: invalid failure rate '0%': use a percentage above 0% and at most "
        f"100%, e.g. 10% (it counts once {FAILURE_RATE_AFTER} jobs have finished)",
        "on_too_many_failures: Input should be 'pause' or 'cancel'",
        "storm.errors: Input should be greater than or equal to 1",
        "storm.within: invalid duration 'soon' (use e.g. 90s, 30m, 1h30m)",
    ]
    for rate in ("150%", "ten", True, -5):
        with pytest.raises(BatchFileError, match="invalid failure rate"):
            parse_batch(
                {
                    "name": "b",
                    "app": "a",
                    "max_failure_rate": rate,
                    "jobs": [{"id": "x", "command": "true"}],
                }
            )
    assert parse_percent("10%") == parse_percent(10) == parse_percent(" 10 % ") == 10.0


def test_verify_and_push_branch_resolve_and_are_refused_on_command_jobs() -> None:
    spec = parse_batch(
        base(
            defaults={"max_iterations": 3},
            jobs=[
                {"id": "a", "prompt": "p", "verify": "make test", "push_branch": "s/{batch}/{job}"},
                {"id": "b", "prompt": "p", "verify": ["pytest", "-q"], "max_iterations": 1},
                {"id": "c", "prompt": "p"},
            ],
        )
    )
    a, b, c = (resolve_job(spec.defaults, job, i) for i, job in enumerate(spec.jobs))
    assert a.verify == ["sh", "-c", "make test"] and a.max_iterations == 3
    assert b.verify == ["pytest", "-q"] and b.max_iterations == 1
    assert c.verify is None and c.push_branch is None
    assert branch_name(a.push_branch or "", "batch-x-1", "a") == "s/batch-x-1/a"
    found = problems(
        base(
            jobs=[
                {"id": "cmd", "command": "true", "verify": "make test", "push_branch": "x"},
                {"id": "many", "prompt": "p", "verify": "true", "max_iterations": 11},
                {"id": "none", "prompt": "p", "verify": "true", "max_iterations": 0},
                {"id": "empty", "prompt": "p", "verify": []},
                {"id": "odd", "prompt": "p", "push_branch": "s/{user}"},
                {"id": "bad", "prompt": "p", "push_branch": "s/../x"},
            ]
        )
    )
    assert found == [
        "job 'many' (jobs[1]): max_iterations: Input should be less than or equal to 10",
        "job 'none' (jobs[2]): max_iterations: Input should be greater than or equal to 1",
        "job 'empty' (jobs[3]): verify: Value should have at least 1 item after validation, not 0",
        "job 'odd' (jobs[4]): push_branch: unknown placeholder {user} (use {batch} and {job})",
        "job 'bad' (jobs[5]): push_branch: 's/../x' does not make a valid git branch name",
        "job 'cmd' (jobs[0]): verify is only for prompt jobs",
        "job 'cmd' (jobs[0]): push_branch is only for prompt jobs",
    ]


def test_json_schema_must_be_a_valid_object_schema() -> None:
    found = problems(
        base(
            jobs=[
                {"id": "typo", "prompt": "p", "json_schema": {"type": "object", "required": 3}},
                {"id": "list", "prompt": "p", "json_schema": {"type": "array"}},
                {"id": "text", "prompt": "p", "json_schema": "an object please"},
                {"id": "cmd", "command": "true", "json_schema": {"type": "object"}},
            ]
        )
    )
    assert found == [
        "job 'typo' (jobs[0]): json_schema: not a valid JSON Schema at required: "
        "3 is not of type 'array'",
        "job 'list' (jobs[1]): json_schema: must describe an object (`type: object`): "
        "Claude answers with one",
        "job 'text' (jobs[2]): json_schema: Input should be a valid dictionary",
        "job 'cmd' (jobs[3]): json_schema is only for prompt jobs",
    ]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    spec = parse_batch(base(jobs=[{"id": "ok", "prompt": "p", "json_schema": schema}]))
    assert resolve_job(spec.defaults, spec.jobs[0], 0).json_schema == schema


def test_stall_timeout_defaults_to_ten_minutes_and_may_be_off() -> None:
    jobs = [
        {"id": "default", "prompt": "p"},
        {"id": "short", "prompt": "p", "stall_timeout": "40s"},
        {"id": "off", "prompt": "p", "stall_timeout": "off"},
        {"id": "yaml-off", "prompt": "p", "stall_timeout": False},
    ]
    spec = parse_batch(base(jobs=jobs))
    stalls = [resolve_job(spec.defaults, job, i).stall_timeout_s for i, job in enumerate(spec.jobs)]
    assert stalls == [600.0, 40.0, 0.0, 0.0]
    found = problems(base(jobs=[{"id": "bad", "prompt": "p", "stall_timeout": "soon"}]))
    assert found == [
        "job 'bad' (jobs[0]): stall_timeout: invalid duration 'soon' (use e.g. 90s, 30m, 1h30m)"
    ]


def test_notify_is_checked_and_its_secrets_are_the_batchs() -> None:
    hook = {"url": "https://hooks.example.com/x/${HOOK_PATH}", "secret": "HOOK_KEY"}
    spec = parse_batch(base(notify=hook))
    assert spec.notify is not None and [e.value for e in spec.notify.events] == [
        "completed",
        "failed",
        "cancelled",
        "paused",
    ]
    assert spec.secret_names() == ["HOOK_KEY", "HOOK_PATH"]
    slack = parse_batch(base(notify={"url": "https://h.example/${P}", "format": "slack"}))
    assert slack.notify is not None and slack.notify.secret is None, "Slack's URL is its secret"

    def notify_problems(**fields: object) -> str:
        return "\n".join(problems(base(notify={**hook, **fields})))

    assert "needed to sign JSON POSTs" in notify_problems(secret=None)
    assert "holds a credential" in notify_problems(url="https://u:p@hooks.example.com/")
    assert "holds a credential" in notify_problems(url="https://h.example/?token=abc")
    assert parse_batch(base(notify={**hook, "url": "https://h.example/?token=${T}"}))
    assert "no secret name" in notify_problems(url="https://h.example/${not a name}")
    assert "http(s)://host" in notify_problems(url="ftp://h.example/")
    assert "events" in notify_problems(events=["finished"])
    assert "events" in notify_problems(events=[])


def test_max_memory_and_on_oom_grow_the_retry_of_an_oom_killed_job() -> None:
    jobs = [
        {"id": "default", "command": "true"},
        {"id": "capped", "command": "true", "max_memory": "768mb"},
        {"id": "same", "command": "true", "on_oom": "same"},
        {"id": "big", "command": "true", "guest": {"cpus": 1, "memory_mb": "1gb"}},
        {"id": "fast", "command": "true", "guest": {"cpu_kind": "performance", "cpus": 1}},
    ]
    spec = parse_batch(base(jobs=jobs))
    default, capped, same, big, fast = (
        resolve_job(spec.defaults, j, i) for i, j in enumerate(spec.jobs)
    )
    # Doubling, up to four times the job's memory by default, within Fly's 2 GB per shared CPU.
    assert [default.memory_after_oom(m) for m in (256, 512, 1024)] == [512, 1024, 1024]
    assert [capped.memory_after_oom(m) for m in (256, 512, 768)] == [512, 768, 768]
    assert same.memory_after_oom(256) == 256
    assert [big.memory_after_oom(m) for m in (1024, 2048)] == [2048, 2048]
    assert fast.memory_after_oom(256) == 512 and fast.sized(512).guest.memory_mb == 512
    found = problems(
        base(
            defaults={"max_memory": "4gb"},
            jobs=[
                {"id": "low", "command": "true", "guest": {"memory_mb": 1024}, "max_memory": 512},
                {"id": "fly", "command": "true"},
                {"id": "ok", "command": "true", "guest": {"cpus": 2}},
                {"id": "kind", "command": "true", "guest": {"cpus": 2}, "on_oom": "bigger"},
            ],
        )
    )
    assert found == [
        "job 'kind' (jobs[3]): on_oom: Input should be 'grow' or 'same'",
        "job 'low' (jobs[0]): max_memory: 512 MB is below the job's memory_mb (1024 MB)",
        "job 'fly' (jobs[1]): max_memory: 4096 MB is more than Fly gives 1 shared CPU (2048 MB)",
    ]


def test_network_is_an_allowlist_or_open_and_only_for_prompt_jobs() -> None:
    from sortie.claude import job_document
    from sortie.spec import Network, parse_batch, resolve_job

    spec = parse_batch(
        {
            "name": "net",
            "app": "a",
            "defaults": {"network": {"allow": ["pypi.org", "*.example.com"]}},
            "jobs": [
                {"id": "a", "prompt": "p"},
                {"id": "b", "prompt": "p", "network": "open", "secrets": ["NPM_TOKEN"]},
            ],
        }
    )
    a, b = (resolve_job(spec.defaults, job, i) for i, job in enumerate(spec.jobs))
    assert a.network == Network(allow=["pypi.org", "*.example.com"]) and b.network == "open"
    assert job_document(a)["network"] == ["pypi.org", "*.example.com"]
    assert job_document(b)["network"] is None and job_document(b)["secrets"] == ["NPM_TOKEN"]
    assert spec.open_network() == ["b"]
    with pytest.raises(BatchFileError) as bad:
        parse_batch(
            {
                "name": "net",
                "app": "a",
                "jobs": [
                    {"id": "c", "command": "true", "network": "open"},
                    {"id": "d", "prompt": "p", "network": {"allow": ["http://x.org/"]}},
                    {"id": "e", "prompt": "p", "network": "closed"},
                ],
            }
        )
    problems = "\n".join(bad.value.problems)
    assert "job 'c' (jobs[0]): network is only for prompt jobs" in problems
    assert "job 'd' (jobs[1]): network.Network.allow.0" in problems
    assert "job 'e' (jobs[2]): network" in problems
