"""Sortie's command line: submit batches, watch and steer them, read their results.

    python starter.py submit FILE [--wait] [--json] [--new]
    python starter.py validate FILE
    python starter.py doctor [FILE] [--json]
    python starter.py watch ID
    python starter.py status ID [--json]
    python starter.py pause|resume|cancel ID [--reason TEXT]
    python starter.py set-max-machines ID N
    python starter.py set-budget ID USD
    python starter.py results ID [--json] [--job JOB] [--latest]
        [--format json|jsonl|csv|md] [--out FILE]
    python starter.py retry ID [--failed] [--timed-out] [--cancelled] [--jobs a,b,...]
        [--continue-sessions [PROMPT]] [--wait] [--json]
    python starter.py logs ID JOB [--follow]
    python starter.py diff ID JOB [--repo PATH] [--out FILE]
    python starter.py artifacts ID [JOB] --out DIR
    python starter.py handoff ID JOB [--dir DIR]
    python starter.py set-failure-limit ID [--max-failures N] [--max-failure-rate P%]
        [--on-too-many-failures pause|cancel]
    python starter.py followup ID JOB "PROMPT" [--no-wait]
    python starter.py analyze PATH [--repo URL] [--ref REF] [--workers N]
        [--strategy directory|size|type|equal] [--min-files 5] [--max-files 20]
        [--focus "security, bugs, quality"] [--since BATCH_ID] [--watch] [--out DIR]
    python starter.py findings ID [--out DIR]
    python starter.py list
    python starter.py reap [--app APP] [--dry-run] [--schedule EVERY]

Configured by environment: Temporal's profile and TEMPORAL_* variables (temporalio.envconfig),
SORTIE_TASK_QUEUE, SORTIE_UI_URL. Exit codes: 0 success, 1 a batch with failed or cancelled
jobs, 2 bad input (usage, an unreadable or invalid batch file, a batch the worker refused, no
such batch).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from temporalio.service import RPCError, RPCStatusCode

from client import batches, changes, export, handoff
from client.analysis.files import AnalysisError
from client.analysis.findings import DEFAULT_FOCUS
from client.commands.analyze import cmd_analyze, cmd_findings
from client.commands.check import cmd_doctor, cmd_validate
from client.commands.handover import cmd_artifacts, cmd_handoff
from client.commands.read import cmd_diff, cmd_list, cmd_logs, cmd_results, cmd_status
from client.commands.reap import cmd_reap
from client.commands.rerun import cmd_followup, cmd_retry
from client.commands.run import cmd_submit, cmd_watch
from client.commands.steer import cmd_signal
from sortie.artifacts import ArtifactsUnavailable
from sortie.fields import BatchFileError, parse_percent
from sortie.settings import Settings
from sortie.spec import OnTooManyFailures
from sortie.store import StoreError
from sortie.temporal import run_main


def _positive_usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the budget must be positive")
    return value


def _failures(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of jobs: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the number of failures must be 0 (no limit) or more")
    return value


def _failure_rate(text: str) -> float:
    if text.strip().removesuffix("%").strip() in ("0", "0.0"):
        return 0.0  # no limit
    try:
        return parse_percent(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    p = argparse.ArgumentParser(prog="starter.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a batch file")
    s.add_argument("file")
    s.add_argument("--wait", action="store_true", help="watch until done and print results")
    s.add_argument("--json", action="store_true", help="print a JSON document")
    s.add_argument("--new", action="store_true", help="run an already submitted file again")
    s.set_defaults(run=cmd_submit)
    s = sub.add_parser("validate", help="check a batch file and print its plan (no server)")
    s.add_argument("file")
    s.set_defaults(run=cmd_validate)
    s = sub.add_parser("doctor", help="check Temporal, workers, the store, Fly and credentials")
    s.add_argument("file", nargs="?", help="a batch file: also check its apps, images, secrets")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_doctor)
    for name, run in (("watch", cmd_watch), ("status", cmd_status), ("results", cmd_results)):
        s = sub.add_parser(name, help=f"{name} a batch")
        s.add_argument("id")
        if name != "watch":
            s.add_argument("--json", action="store_true")
        if name == "results":
            s.add_argument("--job", help="one job's turns with their whole answers")
            s.add_argument(
                "--latest", action="store_true", help="each job's latest outcome over its retries"
            )
            s.add_argument(
                "--format", choices=[f.value for f in export.Format], help="export, streaming"
            )
            s.add_argument("--out", metavar="FILE", help="write the export to FILE")
        s.set_defaults(run=run)
    for name in ("pause", "resume", "cancel"):
        s = sub.add_parser(name, help=f"{name} a batch")
        s.add_argument("id")
        if name != "resume":
            s.add_argument("--reason")
        s.set_defaults(run=cmd_signal)
    s = sub.add_parser("set-max-machines", help="change a running batch's machine cap")
    s.add_argument("id")
    s.add_argument("n", type=int)
    s.set_defaults(run=cmd_signal)
    s = sub.add_parser("set-budget", help="change a running batch's budget (US dollars)")
    s.add_argument("id")
    s.add_argument("usd", type=_positive_usd)
    s.set_defaults(run=cmd_signal)
    s = sub.add_parser(
        "set-failure-limit", help="change a running batch's failure thresholds (0: no limit)"
    )
    s.add_argument("id")
    s.add_argument("--max-failures", type=_failures, metavar="N")
    s.add_argument("--max-failure-rate", type=_failure_rate, metavar="P%")
    s.add_argument("--on-too-many-failures", choices=[o.value for o in OnTooManyFailures])
    s.set_defaults(run=cmd_signal)
    s = sub.add_parser("analyze", help="review a codebase with parallel Claude jobs")
    s.add_argument("path", help="a local git checkout (or a directory inside one)")
    s.add_argument("--repo", help="the URL machines clone (default: origin, else PATH)")
    s.add_argument("--ref", default="HEAD", help="the commit to review (default HEAD)")
    s.add_argument("--workers", type=int, default=4, help="machines at once")
    s.add_argument(
        "--strategy", choices=["directory", "size", "type", "equal"], default="directory"
    )
    s.add_argument("--min-files", type=int, default=5)
    s.add_argument("--max-files", type=int, default=20)
    s.add_argument("--focus", default=DEFAULT_FOCUS)
    s.add_argument(
        "--since",
        metavar="BATCH_ID",
        help="review only the parts changed since that analysis; carry the others over",
    )
    s.add_argument("--watch", action="store_true", help="follow it and write the report")
    s.add_argument("--out", help="where report.md and findings.json go")
    s.add_argument("--app", help="Fly app (default FLY_APP)")
    s.add_argument("--model")
    s.add_argument("--max-cost", type=_positive_usd, help="budget in US dollars")
    s.add_argument(
        "--secret", action="append", help="a worker secret the jobs need, e.g. GITHUB_TOKEN"
    )
    s.set_defaults(run=cmd_analyze)
    s = sub.add_parser("findings", help="merge an analysis batch's findings (so far) into a report")
    s.add_argument("id")
    s.add_argument("--out")
    s.set_defaults(run=cmd_findings)
    s = sub.add_parser("retry", help="run a closed batch's unsuccessful jobs again")
    s.add_argument("id")
    s.add_argument("--failed", action="store_true", help="the failed jobs")
    s.add_argument("--timed-out", action="store_true", help="the jobs that timed out")
    s.add_argument("--cancelled", action="store_true", help="the cancelled jobs")
    s.add_argument("--jobs", help="these jobs, by id: a,b,c")
    s.add_argument(
        "--continue-sessions",
        nargs="?",
        const=batches.DEFAULT_CONTINUE_PROMPT,
        metavar="PROMPT",
        help="prompt jobs out of turns or budget continue their session (with PROMPT)",
    )
    s.add_argument("--wait", action="store_true", help="watch until done and print results")
    s.add_argument("--json", action="store_true", help="print a JSON document")
    s.set_defaults(run=cmd_retry)
    s = sub.add_parser("logs", help="a job's machine logs, live while it runs")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("--follow", "-f", action="store_true", help="until the job ends")
    s.set_defaults(run=cmd_logs)
    s = sub.add_parser("diff", help="a prompt job's change to a repository, as a patch")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("--repo", metavar="PATH", help="the repository's path (when it has several)")
    s.add_argument("--out", metavar="FILE", help="write the patch to FILE")
    s.set_defaults(run=cmd_diff)
    s = sub.add_parser("artifacts", help="write the files jobs kept (their `artifacts`)")
    s.add_argument("id")
    s.add_argument("job", nargs="?", help="one job (default: every job, each in DIR/JOB)")
    s.add_argument("--out", metavar="DIR", required=True, help="where the files go")
    s.set_defaults(run=cmd_artifacts)
    s = sub.add_parser("handoff", help="a prompt job's repositories and session, to go on here")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("--dir", metavar="DIR", help="a new directory (default ./handoff-JOB)")
    s.set_defaults(run=cmd_handoff)
    s = sub.add_parser("followup", help="continue a finished prompt job's Claude session")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("prompt")
    s.add_argument("--no-wait", action="store_true", help="start it and return")
    s.set_defaults(run=cmd_followup)
    sub.add_parser("list", help="list recent batches").set_defaults(run=cmd_list)
    s = sub.add_parser("reap", help="destroy machines no running batch owns")
    s.add_argument("--app", help="Fly app (default FLY_APP)")
    s.add_argument("--dry-run", action="store_true", help="only list the orphans")
    s.add_argument("--schedule", metavar="EVERY", help="run on a Temporal Schedule, e.g. 10m")
    s.set_defaults(run=cmd_reap)
    return p


EXIT_CODES: tuple[tuple[type[Exception], int, Callable[[Any], str]], ...] = (
    # A bad input: the file, the store, a job or a batch that cannot be what was asked.
    (BatchFileError, 2, lambda error: str(error.render())),
    (StoreError, 2, str),
    (AnalysisError, 2, "cannot analyse: {}".format),
    (batches.BatchRejected, 2, str),  # before BatchNotReadable, which it is a case of
    (batches.UnknownJob, 2, str),
    (batches.FollowupRefused, 2, str),
    (batches.RetryRefused, 2, "cannot retry: {}".format),
    (changes.ChangesUnavailable, 2, str),
    (ArtifactsUnavailable, 2, str),
    (handoff.HandoffError, 2, str),
    # The batch failed or was terminated: no results to read, as a batch whose jobs failed.
    (batches.BatchNotReadable, 1, str),
)
"""What each command's refusal exits with, and how it is told on stderr (never a traceback); the
first class that matches wins."""


def refused(error: Exception) -> int:
    """Tell a command's refusal (an error of EXIT_CODES) on stderr and give its exit code."""
    code, told = next((c, t) for kind, c, t in EXIT_CODES if isinstance(error, kind))
    print(told(error), file=sys.stderr)
    return code


async def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run one command; report bad input clearly."""
    args = parser().parse_args(argv)
    if getattr(args, "n", 1) < 1:
        print("N must be at least 1", file=sys.stderr)
        return 2
    if args.command == "set-failure-limit" and (
        args.max_failures is None
        and args.max_failure_rate is None
        and args.on_too_many_failures is None
    ):
        print(
            "set-failure-limit: give --max-failures, --max-failure-rate or --on-too-many-failures",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings.from_env()
    except ValueError as error:
        print(f"bad configuration: {error}", file=sys.stderr)
        return 2
    try:
        code: int = await args.run(args, settings)
    except tuple(kind for kind, _, _ in EXIT_CODES) as error:
        return refused(error)
    except RPCError as error:
        if error.status is RPCStatusCode.NOT_FOUND:
            print(f"no such batch: {error.message}", file=sys.stderr)
            return 2
        raise
    except RuntimeError as error:
        if "connect" in str(error).lower():
            print(f"cannot reach Temporal at {settings.temporal_address}: {error}", file=sys.stderr)
            return 2
        raise
    finally:
        await settings.blob_store().close()
    return code


if __name__ == "__main__":
    run_main(main())
