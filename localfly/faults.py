"""Fault injection and Fly's rate limits, switchable per run without code changes.

A FaultConfig comes from `--faults JSON`, the LOCALFLY_FAULTS variable, or
`PUT /_localfly/faults` at runtime. HTTP rules act on requests by endpoint; machine rules act on
machines at creation, matched by metadata and name. A rule's `count` is how many more times it
fires (null: every time); `rate` is the chance it fires on a matching request.
"""

from __future__ import annotations

import math
import random
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Endpoint = Literal[
    "app",
    "create",
    "update",
    "get",
    "list",
    "wait",
    "stop",
    "start",
    "destroy",
    "logs",
    "metadata",
    "events",
    "other",
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RateLimits(_Config):
    """Enforce Fly's published Machines API rate limits with 429s."""

    enforce: bool = False
    retry_after: bool = True


class HttpFault(_Config):
    """Misbehave on matching requests.

    `slow` holds a request before it is handled; `slow_response` handles it at once and holds
    the answer (the machine exists, the caller has not heard yet); `lose_response` handles it
    and drops the connection (the call took effect, the caller never hears it did);
    `lose_create_response` is `lose_response` for creates only.
    """

    kind: Literal[
        "status", "drop", "slow", "slow_response", "lose_response", "lose_create_response"
    ]
    status: int = 503
    retry_after: float | None = None
    rate: float = Field(default=1.0, ge=0, le=1)
    count: int | None = None
    endpoints: list[Endpoint] | None = None
    delay_ms: int = 1000


class MachineFault(_Config):
    """Make matching new machines misbehave."""

    kind: Literal["fail_boot", "stuck_created", "oom", "no_exit_event", "withhold_report"]
    """`withhold_report`: the machine runs without the presigned upload URLs it was given, so
    its agent's report and archive never reach the store (a report lost on the way back)."""
    count: int | None = None
    metadata: dict[str, str] = {}
    name_contains: str | None = None


class FaultConfig(_Config):
    """Everything localfly can be told to do wrong, and how fast things happen."""

    rate_limits: RateLimits = RateLimits()
    http: list[HttpFault] = []
    machines: list[MachineFault] = []
    list_lag_s: float = 0.0
    log_lag_s: float = 0.0
    log_drop_rate: float = Field(default=0.0, ge=0, le=1)
    """The share of log lines lost for good, as Fly's best-effort logs may lose them."""
    missing_apps: list[str] = []
    """Apps that answer 404 as if they did not exist (every other valid name is an app)."""
    boot_delay_s: float = 0.05
    memory_poll_s: float = Field(default=0.2, ge=0)
    """How often the OOM killer looks at each machine's resident memory; 0 turns it off."""
    destroyed_visible_s: float = 2.0
    """How long a destroyed machine still answers GET and lists (then 404). Fly documents no
    such time; kept short so that no outcome can lean on it: a retry after a crash or a
    heartbeat timeout always comes later than this. Tests set 0 to forget at once."""
    seed: int | None = None


# Fly's published limits: per action and identifier, 1 req/s sustained with bursts of 3;
# get machine 5 req/s with bursts of 10.
RATES: dict[str, tuple[float, float]] = {"get": (5.0, 10.0)}
DEFAULT_RATE = (1.0, 3.0)


class Faults:
    """The live fault state: the config, its remaining counts, the rate-limit buckets."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = config or FaultConfig()
        self._random = random.Random(self.config.seed)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def replace(self, config: FaultConfig) -> None:
        """Switch to a new config (counts start afresh)."""
        self.config = config
        self._random = random.Random(config.seed)
        self._buckets.clear()

    def http_fault(self, endpoint: str) -> HttpFault | None:
        """The first HTTP rule that fires for this request, consuming one of its count."""
        for rule in self.config.http:
            if rule.endpoints is not None and endpoint not in rule.endpoints:
                continue
            if rule.count is not None and rule.count <= 0:
                continue
            if rule.rate < 1 and self._random.random() >= rule.rate:
                continue
            if rule.count is not None:
                rule.count -= 1
            return rule
        return None

    def drops_log_line(self) -> bool:
        """Whether the next log line is lost for good (`log_drop_rate`)."""
        rate = self.config.log_drop_rate
        return rate > 0 and self._random.random() < rate

    def machine_fault(self, name: str, metadata: dict[str, str]) -> str | None:
        """The kind of the first machine rule matching a new machine, consuming its count."""
        for rule in self.config.machines:
            if rule.count is not None and rule.count <= 0:
                continue
            if any(metadata.get(k) != v for k, v in rule.metadata.items()):
                continue
            if rule.name_contains and rule.name_contains not in name:
                continue
            if rule.count is not None:
                rule.count -= 1
            return rule.kind
        return None

    def rate_limited(self, action: str, key: str) -> float | None:
        """Seconds to wait when this request is over Fly's rate limit, else None (enforced only)."""
        if not self.config.rate_limits.enforce:
            return None
        rate, burst = RATES.get(action, DEFAULT_RATE)
        now = time.monotonic()
        tokens, last = self._buckets.get((action, key), (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1:
            self._buckets[(action, key)] = (tokens - 1, now)
            return None
        self._buckets[(action, key)] = (tokens, now)
        return (1 - tokens) / rate

    @staticmethod
    def retry_after_header(seconds: float) -> str:
        """Retry-After carries whole seconds."""
        return str(max(1, math.ceil(seconds)))
