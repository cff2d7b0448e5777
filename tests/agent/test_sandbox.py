"""The managed settings a prompt job's CLI gets (agent/sandbox.py); the real CLI's behaviour
under them is proved end to end in tests/test_sandbox.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import sandbox

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
