"""A webhook receiver on loopback: records every POST, answers 200, or holds one unanswered.

`hold` names an event whose first POST is kept waiting until `release()`: the test can kill
the worker while the POST is in flight. A POST counts as delivered only when its answer went
back to a sender still connected, as a real receiver sees it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Post:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    delivered: bool = False

    @property
    def document(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def event(self) -> str:
        return self.headers.get("Sortie-Event", "")

    def signed_by(self, secret: str) -> bool:
        """Whether `Sortie-Signature` is the HMAC-SHA256 of the body with `secret`."""
        digest = hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("Sortie-Signature", ""), f"sha256={digest}")


@dataclass
class WebhookReceiver:
    """The receiver; `url` once started."""

    hold: str | None = None
    url: str = ""
    posts: list[Post] = field(default_factory=list)
    _held: Any = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        """Let the held POST answer (to nobody, if its sender died)."""
        self._released.set()

    def held_sender_gone(self) -> bool:
        """Whether the held POST's sender has hung up."""
        return self._held is not None and bool(self._held.is_closing())

    def delivered(self, event: str | None = None) -> list[Post]:
        """The POSTs answered 200 to a sender still there, of one event or all."""
        return [p for p in self.posts if p.delivered and event in (None, p.event)]

    def arrived(self, event: str) -> list[Post]:
        """Every POST of the event that arrived, answered or not."""
        return [p for p in self.posts if p.event == event]

    async def _handle(self, request: web.Request) -> web.Response:
        post = Post(request.path, dict(request.headers), await request.read())
        self.posts.append(post)
        if self.hold is not None and post.event == self.hold and self._held is None:
            self._held = request.transport
            await self._released.wait()
        transport = request.transport
        post.delivered = transport is not None and not transport.is_closing()
        return web.Response(text="ok")
