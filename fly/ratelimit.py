"""Client-side token buckets that keep each action within Fly's published rate limits.

Fly limits every action per identifier (the machine id, or the app for create and list) to
1 request/s with bursts of 3; get is allowed 5/s with bursts of 10. A batch that respects these
never draws a 429. Callers reserve a slot before each request: the reservation happens at once
(no lock, no await), then the caller sleeps until its slot comes, so concurrent callers are
served in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_RATE", "FLY_RATES", "Rate", "RateLimiter"]


@dataclass(frozen=True)
class Rate:
    """A sustained rate and the burst allowed on top of it."""

    per_second: float
    burst: int


DEFAULT_RATE = Rate(per_second=1.0, burst=3)
FLY_RATES: Mapping[str, Rate] = {"get": Rate(per_second=5.0, burst=10)}


@dataclass
class _Bucket:
    """Tokens available at ``stamp``; negative when callers hold reservations not yet due."""

    level: float
    stamp: float


class RateLimiter:
    """Async token buckets keyed by (action, identifier), bounded in memory."""

    def __init__(
        self,
        rates: Mapping[str, Rate] = FLY_RATES,
        *,
        default: Rate = DEFAULT_RATE,
        headroom: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        sweep_every: float = 30.0,
        enabled: bool = True,
    ) -> None:
        """``headroom`` tokens of each burst stay unused, absorbing jitter between our clock
        and the moments Fly sees the requests arrive (new connections, slow responses)."""
        self._rates = dict(rates)
        self._default = default
        self._headroom = headroom
        self._clock = clock
        self._sleep = sleep
        self._sweep_every = sweep_every
        self._enabled = enabled
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._last_sweep = clock()

    @classmethod
    def disabled(cls) -> RateLimiter:
        """A limiter that never waits (localfly without enforcement, or tests)."""
        return cls(enabled=False)

    @property
    def enabled(self) -> bool:
        """Whether acquire ever waits."""
        return self._enabled

    def __len__(self) -> int:
        """Buckets currently held; idle full buckets are dropped."""
        return len(self._buckets)

    def rate(self, action: str) -> Rate:
        """The published rate for an action."""
        return self._rates.get(action, self._default)

    async def acquire(self, action: str, key: str) -> None:
        """Wait until one more ``action`` request for ``key`` stays within the rate."""
        if not self._enabled:
            return
        rate = self.rate(action)
        capacity = max(1.0, rate.burst - self._headroom)
        now = self._clock()
        self._maybe_sweep(now)
        bucket = self._buckets.get((action, key))
        if bucket is None:
            bucket = self._buckets[(action, key)] = _Bucket(level=capacity, stamp=now)
        else:
            bucket.level = min(capacity, bucket.level + (now - bucket.stamp) * rate.per_second)
            bucket.stamp = now
        bucket.level -= 1.0
        if bucket.level >= 0:
            return
        try:
            await self._sleep(-bucket.level / rate.per_second)
        except BaseException:  # raised as it came
            # Cancelled before our slot came: give it back to the callers behind us.
            bucket.level += 1.0
            raise

    def _maybe_sweep(self, now: float) -> None:
        """Drop buckets that have refilled completely: they would be recreated identical."""
        if now - self._last_sweep < self._sweep_every:
            return
        self._last_sweep = now
        for (action, key), bucket in list(self._buckets.items()):
            rate = self.rate(action)
            capacity = max(1.0, rate.burst - self._headroom)
            if bucket.level + (now - bucket.stamp) * rate.per_second >= capacity:
                del self._buckets[(action, key)]
