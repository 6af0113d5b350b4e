"""Rate limits: token buckets per key (origin, invitee) and a concurrency cap per key.

A refusal is a ``MatrixError`` 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``
(client-server API "Rate limiting"), which the web edge also turns into a
``Retry-After`` header.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from .core.errors import Codes, MatrixError

__all__ = ["ConcurrencyLimiter", "RateLimiter"]

#: Above this many tracked keys, buckets that have refilled completely are
#: forgotten, so a flood of distinct keys cannot grow memory without bound.
_PRUNE_ABOVE = 10_000


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, clock: IReactorTime, rate: float, burst: int, *, what: str) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._clock = clock
        self._rate = rate
        self._burst = float(burst)
        self._what = what
        #: key -> (tokens, time of last update in seconds)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - then) * self._rate)

    def acquire(self, key: str) -> None:
        """Take one token for ``key`` or raise 429 ``M_LIMIT_EXCEEDED``."""
        now = self._clock.seconds()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry_after_ms = int((1.0 - tokens) / self._rate * 1000) + 1
            raise MatrixError(
                429,
                Codes.LIMIT_EXCEEDED,
                f"Too many {self._what}; retry later",
                retry_after_ms=retry_after_ms,
            )
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > _PRUNE_ABOVE:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for key in [k for k in self._buckets if self._tokens(k, now) >= self._burst]:
            del self._buckets[key]


class ConcurrencyLimiter:
    """At most ``limit`` requests per key in progress; pair each ``acquire`` with ``release``."""

    def __init__(self, limit: int, *, what: str) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._what = what
        self._active: dict[str, int] = {}

    def acquire(self, key: str) -> None:
        """Count one more request for ``key`` or raise 429 ``M_LIMIT_EXCEEDED``."""
        active = self._active.get(key, 0)
        if active >= self._limit:
            raise MatrixError(
                429,
                Codes.LIMIT_EXCEEDED,
                f"Too many concurrent {self._what}",
                retry_after_ms=1000,
            )
        self._active[key] = active + 1

    def release(self, key: str) -> None:
        active = self._active.get(key, 0) - 1
        if active > 0:
            self._active[key] = active
        else:
            self._active.pop(key, None)

    def active(self, key: str) -> int:
        return self._active.get(key, 0)
