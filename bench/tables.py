"""Benchmark: how long `starter.py validate` takes on a batch whose jobs come from a table.

    python -m bench.tables [--rows 10000] [--json]

Writes a CSV of N rows and a batch file whose `jobs_from` fills a prompt-job template from it
(a repository, a branch and a prompt per row), then times what `validate` does with it: read
and expand the table, validate every job, work out the plan. Prints one table row (the best of
three runs, so a busy machine's stalls count less).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from client.plan import plan
from sortie.spec import load_batch_file

BATCH = """\
name: table-bench
app: sortie-bench
max_machines: 100
jobs_from:
  file: rows.csv
  template:
    id: "fix-{repo}"
    prompt: "Fix issue {issue} in {repo}: {title}. Keep {{braces}} as they are."
    repos: [{url: "https://github.com/example/{repo}.git", branch: "{branch}"}]
    env: {ISSUE: "{issue}"}
"""


def measure(rows: int, tries: int = 3) -> tuple[float, float]:
    """The best of `tries` validations of a batch of `rows` table rows: wall-clock and CPU
    seconds (on a shared machine the CPU time is what the work itself took)."""
    with tempfile.TemporaryDirectory(prefix="sortie-bench-table-") as tmp:
        folder = Path(tmp)
        lines = ["repo,issue,branch,title"]
        lines += [f'repo-{i},{i},main,"Crash when {i} items, or more"' for i in range(rows)]
        (folder / "rows.csv").write_text("\n".join(lines) + "\n")
        (folder / "batch.yaml").write_text(BATCH)
        best, cpu = float("inf"), float("inf")
        for _ in range(tries):
            started, used = time.perf_counter(), time.process_time()
            found = plan(load_batch_file(folder / "batch.yaml"))
            best = min(best, time.perf_counter() - started)
            cpu = min(cpu, time.process_time() - used)
            assert found.jobs == rows
        return best, cpu


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print its row."""
    p = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    seconds, cpu = measure(args.rows)
    if args.json:
        print(json.dumps({"rows": args.rows, "validate_s": round(seconds, 3), "cpu_s": cpu}))
    else:
        print("| rows | validate (read, expand, validate, plan) | of it CPU |")
        print("|---:|---:|---:|")
        print(f"| {args.rows:,} | {seconds:.2f} s | {cpu:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
