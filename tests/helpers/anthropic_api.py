"""A fake Anthropic Messages API on loopback, for running the real Claude Code CLI offline.

It answers `POST …/v1/messages` streaming (SSE) or not, as the request asks, with scripted turns
picked by markers in the request (the prompt travels in it):
- `[[tool]]`: the first turn asks for a tool (Bash `echo`), the next answers in text;
- `[[bash:COMMAND]]`: the same, the Bash tool running COMMAND (e.g. one that writes a file);
- `[[structured:JSON]]`: answers by calling the StructuredOutput tool the CLI offers for
  `--json-schema`, with JSON as its input;
- `[[hang]]`: accepts the request and never answers (a stall);
- `[[burst:N]]`: the first N requests of that prompt answer 429, the rest succeed;
- `[[status:NNN]]`: every request answers that status with Anthropic's error body;
- `[[cut]]`: a streamed answer breaks after its first event (the CLI then asks without
  streaming, which answers whole);
- `[[usage:N]]`: every answer reports N output tokens, so each turn costs what the CLI's
  price table makes of them.
- `[[script:KEY]]`: the tool calls `script()` registered under KEY, one per turn, then the
  answer in text (what the tools gave back is recorded with each call).
A path prefix before `/v1/` makes every request under it fail the same way, so one credential
of a pool (its `ANTHROPIC_BASE_URL_n`) can be refused while another works:
`/status/429/v1/messages` answers 429 with Anthropic's error body, likewise 401, 403, 400, 503,
529. Under `/limited/KEY` (`limited_url`) every request is refused as a subscription's usage
limit is, until the reset set with `limit(KEY, epoch)`: 429 with
`anthropic-ratelimit-unified-status: rejected` and `anthropic-ratelimit-unified-reset: <epoch>`
(the CLI then prints "You've hit your 5-hour limit · resets …" and a `rate_limit_event`); after
the reset it answers. Other endpoints the CLI may call answer an empty success. Every request is
recorded, with when it arrived.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    400: "messages: text content blocks must be non-empty",
    401: "invalid x-api-key",
    403: "Your credit balance is too low to access the Anthropic API.",
    429: "This request would exceed the rate limit for your organization of 50 requests per minute",
    500: "Internal server error",
    503: "Overloaded",
    529: "Overloaded",
}
ANSWER = "The answer is 42."
STRUCTURED_TOOL = "StructuredOutput"


@dataclass(frozen=True)
class ToolCall:
    """One tool use a scripted turn asks for: the tool's name and its input."""

    name: str
    input: dict[str, Any]


@dataclass
class Call:
    """One request the fake received."""

    path: str
    prefix: str
    status: int
    stream: bool
    model: str | None
    text: str
    tools: list[str]
    at: float = 0.0
    """When it arrived (epoch seconds)."""
    results: list[str] = field(default_factory=list)
    """What the tools the last turn asked for gave back (tool_result blocks), in order."""


@dataclass
class AnthropicApi:
    """The fake API, served from a thread of its own (its own event loop), so a hung request
    never holds up the test's loop."""

    host: str = "127.0.0.1"
    url: str = ""
    calls: list[Call] = field(default_factory=list)
    _bursts: Counter[str] = field(default_factory=Counter)
    _limits: dict[str, int] = field(default_factory=dict)
    _scripts: dict[str, list[ToolCall]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def base_url(self, status: int | None = None) -> str:
        """What `ANTHROPIC_BASE_URL` is set to: answering, or refusing every call with `status`."""
        return self.url if status is None else f"{self.url}/status/{status}"

    def limited_url(self, key: str) -> str:
        """An `ANTHROPIC_BASE_URL` refused for its usage limit until `limit(key, …)`'s reset."""
        return f"{self.url}/limited/{key}"

    def limit(self, key: str, reset: int) -> None:
        """Refuse every request under `limited_url(key)` for its usage limit until `reset`."""
        with self._lock:
            self._limits[key] = reset

    def script(self, *calls: ToolCall) -> str:
        """Register tool calls for one conversation; the marker that plays them in a prompt."""
        key = uuid.uuid4().hex
        with self._lock:
            self._scripts[key] = list(calls)
        return f"[[script:{key}]]"

    def calls_to(self, prefix: str = "", marker: str | None = None) -> list[Call]:
        """The Messages calls under a prefix (e.g. `/status/429`), or whose text has `marker`."""
        with self._lock:
            return [
                c
                for c in self.calls
                if c.path.endswith("/v1/messages")
                and c.prefix == prefix
                and (marker is None or marker in c.text)
            ]

    def start(self) -> AnthropicApi:
        """Serve on a free loopback port; `url` once started."""
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-anthropic", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the fake Anthropic API did not start")
        return self

    def stop(self) -> None:
        """Stop serving (hung requests are dropped)."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._released.set)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> AnthropicApi:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A hung request ends when its client goes (the CLI stopped), or when the fake stops.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://{self.host}:{port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        prefix, _, rest = path.partition("/v1/")
        rest = "/v1/" + rest if _ else path
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                body = {}
        if request.method != "POST" or not rest.startswith("/v1/messages"):
            self._record(path, prefix, 200, body)
            return web.json_response({})
        if rest == "/v1/messages/count_tokens":
            self._record(path, prefix, 200, body)
            return web.json_response({"input_tokens": len(json.dumps(body)) // 4})
        text = _text_of(body)
        status, reset = 200, None
        if limited := re.fullmatch(r"/limited/([\w-]+)", prefix):
            with self._lock:
                reset = self._limits.get(limited.group(1), 0)
            status = 429 if time.time() < reset else 200
        elif match := re.fullmatch(r"/status/(\d{3})", prefix) or re.search(
            r"\[\[status:(\d{3})\]\]", text
        ):
            status = int(match.group(1))
        elif burst := re.search(r"\[\[burst:(\d+)\]\]", text):
            key = text[burst.start() - 40 : burst.end()]
            with self._lock:
                self._bursts[key] += 1
                status = 429 if self._bursts[key] <= int(burst.group(1)) else 200
        self._record(path, prefix, status, body, text)
        if status != 200:
            return _error(status, reset)
        if "[[hang]]" in text:
            await self._released.wait()
            return web.Response(status=499)
        script = re.search(r"\[\[script:([0-9a-f]{32})\]\]", text)
        with self._lock:
            scripted = self._scripts.get(script.group(1), []) if script else []
        message = _reply(body, text, scripted)
        if body.get("stream"):
            return await _stream(request, message, cut="[[cut]]" in text)
        return web.json_response(message)

    def _record(
        self, path: str, prefix: str, status: int, body: dict[str, Any], text: str = ""
    ) -> None:
        tools = [str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict)]
        stream, model = bool(body.get("stream")), body.get("model")
        call = Call(
            path, prefix, status, stream, model, text, tools, time.time(), _results_of(body)
        )
        with self._lock:
            self.calls.append(call)


def _text_of(body: dict[str, Any]) -> str:
    """Every text the request carries in its messages (not the system prompt)."""
    parts: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    parts.append(block["text"])
    return "\n".join(parts)


def _results_of(body: dict[str, Any]) -> list[str]:
    """What the tools gave back, from the last message's tool_result blocks."""
    messages = body.get("messages") or []
    content = messages[-1].get("content") if messages else None
    results: list[str] = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            inner = block.get("content")
            if isinstance(inner, list):
                inner = "\n".join(str(b.get("text", "")) for b in inner if isinstance(b, dict))
            results.append(str(inner))
    return results


def _error(status: int, reset: int | None = None) -> web.Response:
    """Anthropic's error body for a status; with `reset`, a subscription's usage limit."""
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": ERROR_MESSAGES[status]},
        "request_id": request_id,
    }
    headers = {"request-id": request_id}
    if status == 429:
        headers["retry-after"] = "1"
    if reset is not None:
        headers["anthropic-ratelimit-unified-status"] = "rejected"
        headers["anthropic-ratelimit-unified-reset"] = str(reset)
        headers["anthropic-ratelimit-unified-representative-claim"] = "five_hour"
    if status in (503, 529):
        headers["x-should-retry"] = "true"
    return web.json_response(body, status=status, headers=headers)


def _turns(body: dict[str, Any]) -> int:
    """How many assistant turns the conversation already holds."""
    return sum(1 for m in body.get("messages") or [] if m.get("role") == "assistant")


def _reply(body: dict[str, Any], text: str, script: list[ToolCall]) -> dict[str, Any]:
    """The assistant message for this request, by the script its markers pick."""
    content: list[dict[str, Any]]
    stop = "end_turn"
    tools = {str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict)}
    structured = re.search(r"\[\[structured:(.*?)\]\]", text, re.S)
    bash = re.search(r"\[\[bash:(.*?)\]\]", text, re.S)
    if _turns(body) < len(script):
        call = script[_turns(body)]
        content = [_tool_use(call.name, call.input)]
        stop = "tool_use"
    elif ("[[tool]]" in text or bash) and _turns(body) == 0 and "Bash" in tools:
        command = bash.group(1) if bash else "echo tool-ran"
        content = [_tool_use("Bash", {"command": command, "description": "Run it"})]
        stop = "tool_use"
    elif structured and STRUCTURED_TOOL in tools and _turns(body) == _tool_turns(text):
        content = [_tool_use(STRUCTURED_TOOL, json.loads(structured.group(1)))]
        stop = "tool_use"
    else:
        content = [{"type": "text", "text": ANSWER}]
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model") or "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": max(1, len(text) // 4),
            "output_tokens": _output_tokens(text),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _output_tokens(text: str) -> int:
    """The tokens an answer reports: `[[usage:N]]`'s, else a dozen."""
    usage = re.search(r"\[\[usage:(\d+)\]\]", text)
    return int(usage.group(1)) if usage else 12


def _tool_turns(text: str) -> int:
    """Turns spent on `[[tool]]` before a structured answer."""
    return 1 if "[[tool]]" in text else 0


def _tool_use(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{uuid.uuid4().hex[:24]}",
        "name": name,
        "input": arguments,
    }


async def _stream(
    request: web.Request, message: dict[str, Any], cut: bool = False
) -> web.StreamResponse:
    """The message as Server-Sent Events, as the Messages API streams it; `cut` drops the
    connection after the first event, as a broken stream does."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def event(kind: str, data: dict[str, Any]) -> None:
        payload = json.dumps({"type": kind, **data})
        await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())

    start = {**message, "content": [], "stop_reason": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    await event("message_start", {"message": start})
    if cut:
        assert request.transport is not None
        request.transport.close()
        return response
    await event("ping", {})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            await event(
                "content_block_start",
                {"index": index, "content_block": {"type": "text", "text": ""}},
            )
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            empty = {**block, "input": {}}
            await event("content_block_start", {"index": index, "content_block": empty})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        await event("content_block_delta", {"index": index, "delta": delta})
        await event("content_block_stop", {"index": index})
    await event(
        "message_delta",
        {
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        },
    )
    await event("message_stop", {})
    await response.write_eof()
    return response
