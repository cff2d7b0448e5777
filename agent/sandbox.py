"""Claude Code's sandbox on every prompt job: the agent cannot leak what it holds.

The CLI runs with managed settings (its highest-precedence scope, /etc/claude-code) that the
entrypoint writes for the job and bubblewrap binds read-only over /etc/claude-code for the CLI
alone, so neither the repository's own `.claude/settings.json` nor the agent itself can change or
widen them: the sandbox on and required, no unsandboxed commands, Bash allowed inside it, every
credential the machine holds hidden from commands, network only to the job's allowed domains,
and only the permission rules, hooks and MCP servers these settings name. The job's `verify`
runs under bubblewrap too, writes confined to its checkout and temp, without the credentials,
its network the same allowlist through a proxy of its own (agent/egress.py).
Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import egress

if TYPE_CHECKING:
    from agent.job import Job

MANAGED_DIR = "/etc/claude-code"
"""Where the CLI reads managed settings on Linux (its `managed-settings.json`)."""
TOOLS = ("bwrap", "socat")
"""What the CLI's sandbox needs on Linux: bubblewrap confines, socat carries the proxy."""
EXIT_SANDBOX_UNAVAILABLE = 6
"""The entrypoint's exit code when the sandbox cannot start: the agent never ran."""
EDIT_TOOLS = ("Edit", "Write", "MultiEdit", "NotebookEdit")
"""Tools whose bare name would allow writing anywhere: confined to the workspace."""
_WEBFETCH = "WebFetch"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start on this machine (a tool it needs is missing or fails)."""


def check(path: str) -> None:
    """Raise SandboxUnavailable unless bubblewrap and socat are on PATH and bubblewrap works."""
    missing = [tool for tool in TOOLS if shutil.which(tool, path=path) is None]
    if missing:
        raise SandboxUnavailable(f"{', '.join(missing)} not on PATH (Debian: bubblewrap, socat)")
    bwrap = shutil.which("bwrap", path=path) or "bwrap"
    probe = [bwrap, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--", "true"]
    proc = subprocess.run(probe, capture_output=True, check=False)
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", errors="replace").strip()[:300]
        raise SandboxUnavailable(f"bubblewrap cannot make a sandbox here: {why}")


def permission_rules(
    allowed_tools: Iterable[str], workspace: Path, domains: Sequence[str] | None
) -> list[str]:
    """The job's allowed tools as managed allow rules: Bash always (it runs in the sandbox),
    bare edit tools confined to the workspace, WebFetch to the allowed domains (any domain
    when the network is open)."""
    rules: list[str] = ["Bash"]
    for tool in allowed_tools:
        if tool in EDIT_TOOLS:
            rules.append(f"Edit(/{workspace.as_posix()}/**)")
        elif tool == _WEBFETCH and domains is not None:
            rules += [f"WebFetch(domain:{domain})" for domain in domains]
        elif tool.startswith(f"{_WEBFETCH}(domain:") and domains is not None:
            if tool.removeprefix(f"{_WEBFETCH}(domain:").removesuffix(")") in domains:
                rules.append(tool)
        else:
            rules.append(tool)
    return list(dict.fromkeys(rules))


def managed_settings(
    *,
    allowed_tools: Iterable[str],
    workspace: Path,
    domains: Sequence[str] | None,
    hidden: Iterable[str],
    private: Iterable[Path],
) -> dict[str, Any]:
    """The CLI's managed settings for one job. `domains` None is an open network; `hidden` the
    variables no command may see; `private` the paths no tool of the agent may read."""
    private_rules = [f"Read(/{path.as_posix()}/**)" for path in private]
    sandbox: dict[str, Any] = {
        "enabled": True,
        "failIfUnavailable": True,
        "allowUnsandboxedCommands": False,
        "autoAllowBashIfSandboxed": True,
        "credentials": {"envVars": [{"name": name, "mode": "deny"} for name in sorted(hidden)]},
        "filesystem": {"denyRead": [path.as_posix() for path in private]},
    }
    if domains is not None:
        sandbox["network"] = {"allowedDomains": list(domains), "allowManagedDomainsOnly": True}
    else:
        sandbox["network"] = {"allowedDomains": ["*"]}
    return {
        "sandbox": sandbox,
        "permissions": {
            "allow": permission_rules(allowed_tools, workspace, domains),
            "deny": ["Read(//proc/**)", *private_rules],
        },
        "allowManagedPermissionRulesOnly": True,
        "allowManagedHooksOnly": True,
        "allowManagedMcpServersOnly": True,
        "allowedMcpServers": [],
        # The allowlist decides where WebFetch goes; the CLI's own blocklist check is a call
        # to claude.ai per domain that an allowlisted machine need not make.
        "skipWebFetchPreflight": True,
    }


def write_settings(directory: Path, settings: Mapping[str, Any]) -> Path:
    """Write managed-settings.json into `directory` (bound over /etc/claude-code), read-only."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "managed-settings.json"
    target.write_text(json.dumps(settings, indent=2))
    target.chmod(0o444)
    return directory


def claude_argv(bwrap: str, settings_dir: Path, argv: Sequence[str], info_fd: int) -> list[str]:
    """The CLI under bubblewrap with the job's managed settings bound read-only over
    /etc/claude-code; the rest of the machine as it is (the CLI's own sandbox runs inside)."""
    return [
        bwrap,
        "--dev-bind",
        "/",
        "/",
        "--ro-bind",
        str(settings_dir),
        MANAGED_DIR,
        "--die-with-parent",
        "--info-fd",
        str(info_fd),
        "--",
        *argv,
    ]


EGRESS_SOCKET = "/tmp/.sortie-egress.sock"
"""Where a check's way out, the allowlisting proxy's socket, is inside its sandbox."""
EGRESS_SCRIPT = "/tmp/.sortie-egress.py"
"""Where the bridge's script is inside the sandbox (its own path may be under the fresh /tmp)."""


def _interpreter_binds() -> list[str]:
    """The bridge's Python, bound back when it lives under /tmp (which the sandbox replaces)."""
    prefix = Path(sys.base_prefix).resolve()
    if not prefix.is_relative_to("/tmp"):
        return []
    return ["--ro-bind", str(prefix), str(prefix)]


def verify_argv(bwrap: str, cwd: Path, command: Sequence[str], proxy: Path | None) -> list[str]:
    """The job's check under bubblewrap: the machine read-only but its checkout and a fresh
    /tmp, its own process tree, and a network of its own whose one way out is the allowlisting
    proxy at `proxy` (agent/egress.py); the machine's network when `proxy` is None (open)."""
    net: list[str] = []
    if proxy is not None:
        net = ["--unshare-net", "--bind", str(proxy), EGRESS_SOCKET]
        net += ["--ro-bind", str(egress.SCRIPT), EGRESS_SCRIPT, *_interpreter_binds()]
        command = egress.bridge_argv(EGRESS_SCRIPT, EGRESS_SOCKET, command)
    return [
        bwrap,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--bind",
        str(cwd),
        str(cwd),
        "--unshare-pid",
        *net,
        "--die-with-parent",
        "--chdir",
        str(cwd),
        "--",
        *command,
    ]


class Confined(subprocess.Popen[bytes]):
    """The CLI under bubblewrap: a signal goes to the CLI itself (bubblewrap forwards none),
    so SIGTERM still lets it stop cleanly; SIGKILL takes bubblewrap and the CLI with it."""

    def __init__(self, argv: list[str], info: int, **kwargs: Any) -> None:
        super().__init__(argv, pass_fds=(info,), **kwargs)
        os.close(info)
        self.child: int | None = None

    def learn_child(self, info: int) -> None:
        """Read the CLI's pid from bubblewrap's --info-fd (EOF: bubblewrap failed)."""
        with os.fdopen(info, "rb") as stream:
            data = stream.read()
        try:
            pid = json.loads(data or b"{}").get("child-pid")
        except ValueError:
            pid = None
        self.child = pid if isinstance(pid, int) else None

    def send_signal(self, sig: int) -> None:
        if sig != signal.SIGKILL and self.child is not None and self.poll() is None:
            try:
                os.kill(self.child, sig)
                return
            except ProcessLookupError:
                pass
        super().send_signal(sig)


def start_confined(argv: list[str], settings_dir: Path, bwrap: str, **kwargs: Any) -> Confined:
    """Start the CLI under bubblewrap with its managed settings; knows the CLI's pid."""
    read, write = os.pipe()
    proc = Confined(claude_argv(bwrap, settings_dir, argv, write), write, **kwargs)
    proc.learn_child(read)
    return proc


def repo_hosts(urls: Iterable[str]) -> list[str]:
    """The hosts of the job's repositories (HTTP(S) and ssh URLs), which it may always reach."""
    hosts: list[str] = []
    for url in urls:
        host = urllib.parse.urlsplit(url).hostname
        if host is None and "@" in url and ":" in url:  # scp-like: git@github.com:org/repo
            host = url.split("@", 1)[1].split(":", 1)[0]
        if host:
            hosts.append(host)
    return list(dict.fromkeys(hosts))


@dataclass(frozen=True)
class Sandbox:
    """One job's sandbox: bubblewrap, its managed settings, and the secrets kept from it."""

    bwrap: str
    settings_dir: Path
    domains: tuple[str, ...] | None
    """Where the agent's commands, WebFetch and `verify` may go: the job's allowed domains and
    its repositories' hosts; None when the job's network is open."""
    secrets: tuple[str, ...]

    @classmethod
    def make(
        cls, env: Mapping[str, str], job: Job, workspace: Path, secret_env: Iterable[str]
    ) -> Sandbox:
        """Check the machine can sandbox, and write the job's managed settings."""
        path = env.get("PATH", os.defpath)
        check(path)
        domains = None
        if job.network is not None:
            domains = tuple(dict.fromkeys([*job.network, *repo_hosts(r.url for r in job.repos)]))
        settings = managed_settings(
            allowed_tools=job.allowed_tools,
            workspace=workspace,
            domains=domains,
            hidden={*secret_env, *job.secrets},
            private=[Path(__file__).resolve().parent],
        )
        directory = write_settings(Path(tempfile.mkdtemp(prefix="sortie-settings-")), settings)
        bwrap = shutil.which("bwrap", path=path) or "bwrap"
        return cls(bwrap, directory, domains, job.secrets)

    def start_claude(
        self, argv: list[str], cwd: Path, env: dict[str, str], **kwargs: Any
    ) -> Confined:
        """The CLI under its managed settings, without the repository's own settings files:
        their `env` could point the CLI's API traffic, credential and all, anywhere (no managed
        setting stops that). The repository's CLAUDE.md still loads, as an added directory's."""
        own = ["--setting-sources", "user", "--add-dir", str(cwd)]
        env = {**env, "CLAUDE_CODE_ADDITIONAL_DIRECTORIES_CLAUDE_MD": "1"}
        return start_confined(
            [*argv, *own], self.settings_dir, self.bwrap, cwd=cwd, env=env, **kwargs
        )

    @contextmanager
    def confine_check(
        self, command: Sequence[str], cwd: Path, refused: Callable[[str], None]
    ) -> Iterator[list[str]]:
        """The job's `verify` command, confined, for as long as it runs: its network the same
        allowlist as the agent's, through a proxy of its own (`refused` hears each host that
        proxy turned away), or the machine's when the job's network is open."""
        if self.domains is None:
            yield verify_argv(self.bwrap, cwd, command, None)
            return
        with (
            tempfile.TemporaryDirectory(prefix="sortie-egress-") as directory,
            egress.Proxy(self.domains, Path(directory), refused) as proxy,
        ):
            yield verify_argv(self.bwrap, cwd, command, proxy.path)
