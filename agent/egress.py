"""The network of a job's `verify`: the job's allowlist, the same one its agent's commands have.

The check runs under bubblewrap in a network namespace of its own, with no way out but one Unix
socket bound into it. Outside, the entrypoint serves an HTTP proxy on that socket (`Proxy`):
CONNECT for HTTPS, absolute-form requests for plain HTTP. It admits only the job's allowed
domains; a request for any other host is answered 403 before anything is resolved or connected.
It adds no credential to what it carries (of a plain HTTP request it drops only the proxy's
headers, and asks for one request per connection) and logs no content, only the names of the
hosts it refused. Inside, the bridge (this file run as a script) listens
on a loopback port, carries each connection to the socket, and runs the check with
HTTP_PROXY/HTTPS_PROXY (both cases) pointing at it: what the CLI's sandbox does with socat, but
the port listens before the check starts, so no check races it.
Standard library only, like the rest of the agent; the bridge runs isolated (`python3 -I -S`)
and imports nothing of agent/.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

HEAD_LIMIT = 64 * 1024
"""Most bytes a request's line and headers may take."""
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
LOOPBACK = "localhost,127.0.0.1,::1"
"""Where a check goes direct: its namespace's own loopback, its own servers."""
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NOT_STARTED = 127
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization"}


def allowed(host: str, domains: Iterable[str]) -> bool:
    """Whether `host` is one of `domains` (`*.example.com`: any subdomain of example.com)."""
    host = host.strip("[]").rstrip(".").lower()
    for domain in domains:
        domain = domain.rstrip(".").lower()
        if domain.startswith("*.") and host.endswith(domain[1:]):
            return True
        if host == domain:
            return True
    return False


def relay(one: socket.socket, other: socket.socket) -> None:
    """Carry bytes both ways until both sides are done; each end's EOF passed on."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    back = threading.Thread(target=pump, args=(other, one), daemon=True)
    back.start()
    pump(one, other)
    back.join()


# The proxy, outside the sandbox ----------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request's line and headers (without the blank line), and what followed them."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_LIMIT:
            raise _Refused(431, "request headers too large")
        chunk = sock.recv(65536)
        if not chunk:
            raise _Refused(400, "the request ended before its headers did")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def _target(method: str, target: str) -> tuple[str, int, str | None]:
    """The host, port and (for plain HTTP) the origin-form path a request asks for."""
    if method == "CONNECT":
        host, _, number = target.rpartition(":")
        if not host or not number.isdigit():
            raise _Refused(400, f"bad CONNECT target {target!r}")
        return host.strip("[]"), int(number), None
    url = urllib.parse.urlsplit(target)
    try:
        port = url.port or 80
    except ValueError:
        raise _Refused(400, f"bad port in {target!r}") from None
    if url.scheme != "http" or not url.hostname:
        raise _Refused(400, "only absolute http:// requests and CONNECT go through this proxy")
    after = target.split("://", 1)[1].split("#", 1)[0]
    starts = [at for at in (after.find("/"), after.find("?")) if at >= 0]
    path = after[min(starts) :] if starts else "/"
    return url.hostname, port, path if path.startswith("/") else f"/{path}"


def _forwarded(head: bytes, path: str) -> bytes:
    """A plain HTTP request as its server gets it: origin-form, no proxy headers, one request."""
    line, *headers = head.split(b"\r\n")
    method, _, version = line.split(b" ")
    kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in _HOP_BY_HOP]
    request = [b" ".join([method, path.encode("latin-1"), version]), *kept, b"Connection: close"]
    return b"\r\n".join(request) + b"\r\n\r\n"


def _answer(client: socket.socket, status: int, reason: str) -> None:
    body = f"sortie: {reason}\n".encode()
    head = f"HTTP/1.1 {status} Refused\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    with contextlib.suppress(OSError):
        client.sendall(head.encode("latin-1") + b"\r\n" + body)


class Proxy:
    """The allowlisting proxy of one run of a check, on a Unix socket in `directory`: a thread
    accepts, a thread a connection; leaving ends them all."""

    def __init__(
        self, domains: Sequence[str], directory: Path, refused: Callable[[str], None]
    ) -> None:
        self.path = directory / "egress.sock"
        self.domains = tuple(domains)
        self._refused = refused
        self._told: set[str] = set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(128)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._closing = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:
            waker.connect(str(self.path))  # the accept returns, and sees it is closing
            self._thread.join()
        self._listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:  # the check is over: so is every connection it left open
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # out of descriptors: the check's connections are refused from now on
            if self._closing:
                client.close()
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    @contextmanager
    def _tracked(self, sock: socket.socket) -> Iterator[socket.socket]:
        """`sock` for as long as it is used, ended when the proxy stops, then closed."""
        with self._lock:
            self._open.add(sock)
        try:
            with sock:
                yield sock
        finally:
            with self._lock:
                self._open.discard(sock)

    def _refuse(self, host: str) -> None:
        """Tell of a refused host, once per run of the check."""
        with self._lock:
            new = host not in self._told
            self._told.add(host)
        if new:
            self._refused(host)

    def _handle(self, client: socket.socket) -> None:
        with self._tracked(client):
            self._exchange(client)

    def _exchange(self, client: socket.socket) -> None:
        client.settimeout(HEAD_TIMEOUT_S)
        try:
            head, rest = _read_head(client)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            host, port, path = _target(method, target)
            if not allowed(host, self.domains):
                self._refuse(host)
                raise _Refused(403, f"{host} is not in this job's network allowlist")
        except _Refused as refusal:
            _answer(client, refusal.status, str(refusal))
            return
        except ValueError:
            _answer(client, 400, "a malformed request line")
            return
        except OSError:
            return  # the client went away, or never finished its headers
        try:
            upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            _answer(client, 502, f"cannot reach {host}:{port}: {error.strerror or error}")
            return
        with self._tracked(upstream):
            client.settimeout(None)
            upstream.settimeout(None)
            try:
                if path is None:
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    upstream.sendall(rest)
                else:
                    upstream.sendall(_forwarded(head, path) + rest)
            except OSError:
                return
            relay(client, upstream)


# The bridge, inside the sandbox ----------------------------------------------------------------


SCRIPT = Path(__file__).resolve()
"""This file, which the bridge runs as a script."""


def bridge_argv(script: str, socket_path: str, command: Sequence[str]) -> list[str]:
    """The check run by the bridge (this file, seen at `script`): its proxy a loopback port
    carried to `socket_path`."""
    return [os.path.realpath(sys.executable), "-I", "-S", script, socket_path, "--", *command]


def _serve(listener: socket.socket, socket_path: str) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_carry, args=(client, socket_path), daemon=True).start()


def _carry(client: socket.socket, socket_path: str) -> None:
    with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as proxy:
        try:
            proxy.connect(socket_path)
        except OSError:
            return
        relay(client, proxy)


def bridge(argv: Sequence[str]) -> int:
    """Listen on loopback, then run the check with its proxy there; the check's exit code."""
    socket_path, separator, *command = argv
    assert separator == "--" and command, "usage: egress.py SOCKET -- COMMAND…"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = {**os.environ, **dict.fromkeys(PROXY_VARIABLES, url)}
    env.update(NO_PROXY=LOOPBACK, no_proxy=LOOPBACK)
    threading.Thread(target=_serve, args=(listener, socket_path), daemon=True).start()
    try:
        check = subprocess.Popen(command, env=env)
    except OSError as error:
        print(f"sortie: the check could not be started: {error}", file=sys.stderr)
        return NOT_STARTED
    code = check.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(bridge(sys.argv[1:]))
