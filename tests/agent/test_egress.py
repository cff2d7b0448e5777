"""The allowlisting proxy of a job's `verify` (agent/egress.py), spoken to on its Unix socket as
the bridge inside the sandbox would; end to end (bubblewrap, the bridge, the real CLI's batch)
it is proved in tests/test_sandbox.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent import egress


class Upstream:
    """A TCP server on loopback that records the bytes of each connection and answers `ok`,
    then closes it (or, holding, keeps it open)."""

    def __init__(self, hold: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.held: list[socket.socket] = []
        self.hold = hold
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                data += chunk
            self.received.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            if self.hold:
                self.held.append(conn)
            else:
                conn.close()


@contextmanager
def proxy(tmp_path: Path, domains: list[str]) -> Iterator[tuple[egress.Proxy, list[str]]]:
    refused: list[str] = []
    with egress.Proxy(domains, tmp_path, refused.append) as running:
        yield running, refused


def ask(running: egress.Proxy, request: bytes) -> bytes:
    """Send `request` on the proxy's socket and read until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(running.path))
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("host", "domains", "admitted"),
    [
        ("pypi.org", ["pypi.org"], True),
        ("PyPI.org.", ["pypi.org"], True),
        ("files.pypi.org", ["pypi.org"], False),
        ("files.pypi.org", ["*.pypi.org"], True),
        ("pypi.org", ["*.pypi.org"], False),
        ("evilpypi.org", ["*.pypi.org"], False),
        ("pypi.org.evil.example", ["pypi.org"], False),
        ("[::1]", ["::1"], True),
        ("127.0.0.1", [], False),
    ],
)
def test_a_host_is_admitted_only_by_its_own_name_or_a_wildcard_parent(
    host: str, domains: list[str], admitted: bool
) -> None:
    assert egress.allowed(host, domains) is admitted


def test_a_host_outside_the_allowlist_is_refused_and_never_reached(tmp_path: Path) -> None:
    upstream = Upstream()
    with proxy(tmp_path, ["localhost"]) as (running, refused):
        plain = ask(running, f"GET http://127.0.0.1:{upstream.port}/x HTTP/1.1\r\n\r\n".encode())
        tunnel = ask(running, f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n\r\n".encode())
        relative = ask(running, b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert plain.startswith(b"HTTP/1.1 403") and tunnel.startswith(b"HTTP/1.1 403")
    assert b"127.0.0.1 is not in this job's network allowlist" in plain
    assert relative.startswith(b"HTTP/1.1 400")
    assert refused == ["127.0.0.1"], "told once per host"
    assert upstream.received == []


def test_plain_http_reaches_its_host_as_sent_without_the_proxys_headers(tmp_path: Path) -> None:
    upstream = Upstream()
    request = (
        f"POST http://localhost:{upstream.port}/p?q=1 HTTP/1.1\r\n"
        f"Host: localhost:{upstream.port}\r\nX-Check: 1\r\nProxy-Authorization: Basic eA==\r\n"
        "Proxy-Connection: Keep-Alive\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nbody"
    )
    with proxy(tmp_path, ["localhost"]) as (running, refused):
        answer = ask(running, request.encode())
    assert answer.endswith(b"\r\n\r\nok") and refused == []
    assert upstream.received == [
        (
            f"POST /p?q=1 HTTP/1.1\r\nHost: localhost:{upstream.port}\r\nX-Check: 1\r\n"
            "Content-Length: 4\r\nConnection: close\r\n\r\nbody"
        ).encode()
    ]


def test_connect_tunnels_to_an_allowed_host_until_the_proxy_stops(tmp_path: Path) -> None:
    upstream = Upstream(hold=True)
    with proxy(tmp_path, ["*.localhost", "localhost"]) as (running, _):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(30)
        client.connect(str(running.path))
        client.sendall(
            f"CONNECT localhost:{upstream.port} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n".encode()
        )
        answer = b""
        while not answer.endswith(b"ok"):
            answer += client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    # The check is over: the tunnel it left open is closed from the proxy's side.
    assert client.recv(4096) == b""
    client.close()
    assert upstream.received == [b"GET / HTTP/1.1\r\n\r\n"]
