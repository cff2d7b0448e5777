"""The managed settings a prompt job's CLI gets (agent/sandbox.py); the real CLI's behaviour
under them is proved end to end in tests/test_sandbox.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent import egress, sandbox

WORKSPACE = Path("/workspace")


def test_bare_tools_are_confined_to_the_workspace_and_the_allowed_domains() -> None:
    tools = ["Read", "Write", "Edit", "WebFetch", "WebFetch(domain:evil.example)", "Bash(git *)"]
    rules = sandbox.permission_rules(tools, WORKSPACE, ["pypi.org"])
    assert rules == [
        "Bash",
        "Read",
        "Edit(//workspace/**)",
        "WebFetch(domain:pypi.org)",
        "Bash(git *)",
    ]
    opened = sandbox.permission_rules(["WebFetch", "WebFetch(domain:a.example)"], WORKSPACE, None)
    assert opened == ["Bash", "WebFetch", "WebFetch(domain:a.example)"]


def test_the_settings_require_the_sandbox_and_hide_every_secret() -> None:
    settings = sandbox.managed_settings(
        allowed_tools=[],
        workspace=WORKSPACE,
        domains=["github.com"],
        hidden={"GITHUB_TOKEN", "ANTHROPIC_API_KEY"},
        private=[Path("/opt/sortie/agent")],
    )
    box = settings["sandbox"]
    assert (box["enabled"], box["failIfUnavailable"], box["allowUnsandboxedCommands"]) == (
        True,
        True,
        False,
    )
    assert box["network"] == {"allowedDomains": ["github.com"], "allowManagedDomainsOnly": True}
    assert [v["name"] for v in box["credentials"]["envVars"]] == [
        "ANTHROPIC_API_KEY",
        "GITHUB_TOKEN",
    ]
    assert "Read(//proc/**)" in settings["permissions"]["deny"]
    assert "Read(//opt/sortie/agent/**)" in settings["permissions"]["deny"]
    assert settings["allowManagedPermissionRulesOnly"] and settings["allowManagedHooksOnly"]


@pytest.mark.parametrize(
    ("urls", "hosts"),
    [
        (
            ["https://github.com/o/r", "git@gitlab.com:o/r.git", "/local/path"],
            ["github.com", "gitlab.com"],
        ),
        (
            ["https://x:tok@git.example.org/r", "https://github.com/o/s"],
            ["git.example.org", "github.com"],
        ),
    ],
)
def test_the_repositories_hosts_are_always_allowed(urls: list[str], hosts: list[str]) -> None:
    assert sandbox.repo_hosts(urls) == hosts


def test_no_bubblewrap_on_path_is_a_sandbox_that_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(sandbox.SandboxUnavailable, match="bwrap, socat not on PATH"):
        sandbox.check(str(tmp_path))


def test_the_checks_bridge_starts_wherever_its_script_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check's /tmp is a fresh tmpfs: a bridge whose file (or Python) lives under /tmp, as a
    # checkout there does, would be hidden from the check unless bound back into its sandbox.
    script = tmp_path / "checkout" / "egress.py"
    script.parent.mkdir()
    shutil.copy(egress.SCRIPT, script)
    monkeypatch.setattr(egress, "SCRIPT", script)
    proxy = tmp_path / "proxy.sock"
    proxy.touch()
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    work = tmp_path / "work"  # the check's own checkout, bound: not where the bridge lives
    work.mkdir()
    argv = sandbox.verify_argv(bwrap, work, ["sh", "-c", 'test -n "$HTTPS_PROXY"'], proxy)
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
